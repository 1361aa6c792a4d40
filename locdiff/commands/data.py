"""CLI: `locdiff datasets list|prepare` and the top-level `locdiff sql`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from locdiff.errors import UserError

datasets_app = typer.Typer(
    help="Datasets: what is known, what is local, and how to prepare them.", no_args_is_help=True
)

_STORAGE_HELP = "storage root URI (default: $LOCDIFF_STORAGE or <project>/data/store)"

# options shared by `prepare` and `download` (the image download settings: DownloadOptions)
Storage = Annotated[str, typer.Option("--storage", help=_STORAGE_HELP)]
Limit = Annotated[int, typer.Option("--limit", min=1, help="only the first N rows")]
ShardSize = Annotated[int, typer.Option("--shard-size", min=1)]
Workers = Annotated[int, typer.Option("--workers", min=1, help="downloads in flight (over all shards)")]
ImageSize = Annotated[
    int, typer.Option("--image-size", min=16, help="downloads: shortest side after resize (aspect kept)")
]
KeepOriginal = Annotated[bool, typer.Option("--keep-original", help="downloads: store images as fetched")]
Processes = Annotated[
    int, typer.Option("--processes", min=-1, help="downloads: decode/resize processes (-1: CPUs)")
]
PerHost = Annotated[int, typer.Option("--per-host", min=1, help="downloads: requests in flight to one host")]
Timeout = Annotated[float, typer.Option("--timeout", min=0.1, help="downloads: connect/read timeout (s)")]
DnsCache = Annotated[int, typer.Option("--dns-cache", min=0, help="downloads: seconds to cache DNS answers")]
MaxSkipShare = Annotated[
    float,
    typer.Option(
        "--max-skip-share",
        min=0.0,
        max=1.0,
        help="refuse to commit when more than this share of rows is left out (1.0 accepts any)",
    ),
]


def _store(storage: str | None):
    from locdiff.storage import Store

    return Store.from_uri(storage)


@datasets_app.command("list")
def list_datasets(
    storage: str = typer.Option(None, "--storage", help=_STORAGE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also show sources, licence and pitfalls"),
) -> None:
    """Show the known datasets, which are committed in the store, and how to get the others."""
    from locdiff.datasets.registry import REGISTRY

    store = _store(storage)
    local: dict[str, list[dict]] = {}
    for m in store.list("datasets"):
        local.setdefault(m.get("name", ""), []).append(m)
    print(f"storage: {store.url}")
    print(f"{'name':<11} {'kind':<9} {'images':<44} local")
    for spec in REGISTRY.values():
        mans = local.pop(spec.name, [])
        here = f"yes: {mans[-1]['key']} ({mans[-1].get('rows')} rows)" if mans else "no"
        print(f"{spec.name:<11} {spec.kind:<9} {spec.n_images[:44]:<44} {here}")
        if not mans or verbose:
            print(f"{'':<11} how: {spec.obtain}")
        if verbose:
            print(f"{'':<11} title: {spec.title}; size: {spec.size}")
            for src in spec.sources:
                print(f"{'':<11} source: {src}")
            print(f"{'':<11} licence: {spec.licence}")
            print(f"{'':<11} columns: {spec.columns}")
            for p in spec.pitfalls:
                print(f"{'':<11} pitfall: {p}")
    for name, mans in sorted(local.items()):  # user datasets
        print(f"{name:<11} {'user':<9} {'':<44} yes: {mans[-1]['key']} ({mans[-1].get('rows')} rows)")


def _print_key(store, key: str, summary) -> None:
    """A built dataset's key on stdout, after ``key: summary(its manifest)`` on stderr."""
    print(f"{key}: {summary(store.manifest(key))}", file=sys.stderr)
    print(key)


@datasets_app.command("prepare")
def prepare(
    name: str = typer.Argument(..., help="a registry name (see `locdiff datasets list`) or any new name"),
    manifest: Path = typer.Option(
        None, "--manifest", help="CSV/Parquet with image id, path or URL, lat, lon"
    ),
    images_root: Path = typer.Option(None, "--images-root", help="folder that relative image paths are in"),
    archive: Path = typer.Option(None, "--archive", help="a tar/zip of the images (extracted safely)"),
    fix_swapped: bool = typer.Option(False, "--fix-swapped", help="swap LAT/LON when the header is reversed"),
    split: str = typer.Option(None, "--split", help="split for rows without a split column"),
    shard_size: ShardSize = 1000,
    workers: Workers = 256,
    limit: Limit = None,
    n: int = typer.Option(None, "--n", min=1, help="bluemarble: number of tiles"),
    seed: int = typer.Option(0, "--seed", help="bluemarble: random seed"),
    storage: Storage = None,
    allow_outside_root: bool = typer.Option(
        False, "--allow-outside-root", help="read absolute paths, file:// URLs, paths outside --images-root"
    ),
    allow_protocol: list[str] = typer.Option(
        None, "--allow-protocol", help="fetch image URLs of this fsspec protocol too (besides http, https)"
    ),
    max_skip_share: MaxSkipShare = 0.5,
    image_size: ImageSize = 224,
    keep_original: KeepOriginal = False,
    processes: Processes = -1,
    per_host: PerHost = 128,
    timeout: Timeout = 20.0,
    dns_cache: DnsCache = 600,
    force: bool = typer.Option(
        False, "--force", help="rebuild even when this dataset is committed (under a new key)"
    ),
    id_col: str = typer.Option(None, "--id-col", help="the manifest's image-id column (default: guessed)"),
    lat_col: str = typer.Option(None, "--lat-col", help="the manifest's latitude column"),
    lon_col: str = typer.Option(None, "--lon-col", help="the manifest's longitude column"),
    image_col: str = typer.Option(None, "--image-col", help="the manifest's image path/URL column"),
) -> None:
    """Build a dataset artifact (manifest Parquet + tar shards) in the store; prints its key.

    Image URLs are downloaded in parallel (--workers requests in flight over many shards, at most
    --per-host to one host), resized on download to --image-size, and a re-run fetches again only the
    samples that failed transiently (dead links are counted, never retried)."""
    from locdiff.datasets.registry import REGISTRY

    store = _store(storage)
    spec = REGISTRY.get(name.lower())
    if spec is not None and spec.kind == "embedded":
        from locdiff.datasets.bluemarble import build_bluemarble

        key = build_bluemarble(store, seed=seed, **({} if n is None else {"n": n}))
        print(key)
        return
    download = _download_options(workers, image_size, keep_original, processes, per_host, timeout, dns_cache)
    if manifest is None:
        how = (
            spec.obtain
            if spec is not None
            else "pass --manifest FILE (CSV/Parquet: id, path or URL, lat, lon)"
        )
        raise UserError(f"dataset {name!r} needs a manifest file (--manifest)", how)
    if not manifest.exists():
        raise UserError(f"manifest not found: {manifest}", "check the --manifest path")
    from locdiff.datasets.prepare import prepare_from_manifest

    default_split = split or (spec.splits[0] if spec is not None else "test")

    def progress(shards: int, rows: int) -> None:
        print(f"  shard {shards}: {rows} rows so far", file=sys.stderr)

    key = prepare_from_manifest(
        store,
        name.lower(),
        manifest,
        images_root=images_root,
        archive=archive,
        fix_swapped=fix_swapped,
        default_split=default_split,
        shard_size=shard_size,
        max_workers=min(workers, 32),  # local files: threads; downloads use --workers in full
        limit=limit,
        progress=progress,
        allow_outside_root=allow_outside_root,
        allow_protocols=tuple(allow_protocol or ()),
        max_skip_share=max_skip_share,
        force=force,
        download=download,
        id_col=id_col,
        lat_col=lat_col,
        lon_col=lon_col,
        image_col=image_col,
    )
    _print_key(store, key, lambda m: f"{m.get('rows')} images, {m.get('n_skipped', 0)} skipped "
               f"({m.get('n_dead', 0)} dead links), {m.get('n_dropped_rows', 0)} rows without coordinates")


@datasets_app.command("download")
def download(
    name: str = typer.Argument(..., help="mp16 | yfcc26k | im2gps3k | yfcc4k | osv5m"),
    mirror: str = typer.Option(
        None, "--mirror", help="http(s) base URL or local folder holding the published files by name"
    ),
    url: list[str] = typer.Option(
        None, "--url", help="ROLE=URL_OR_PATH for one file (roles: see the error of a wrong one)"
    ),
    split: str = typer.Option(None, "--split", help="osv5m: test (default) or train"),
    downloads: Path = typer.Option(
        None,
        "--downloads",
        help="where the lists/archives go (default: $LOCDIFF_DOWNLOADS or data/downloads)",
    ),
    limit: Limit = None,
    shard_size: ShardSize = 1000,
    workers: Workers = 256,
    image_size: ImageSize = 224,
    keep_original: KeepOriginal = False,
    processes: Processes = -1,
    per_host: PerHost = 128,
    timeout: Timeout = 20.0,
    dns_cache: DnsCache = 600,
    max_skip_share: MaxSkipShare = 1.0,
    storage: Storage = None,
) -> None:
    """Download an official dataset from its published lists (joined with the coordinates) into the
    store; prints its key. A re-run resumes, and fetches again only what failed transiently."""
    from locdiff.datasets.sources import download_dataset

    urls = {}
    for item in url or []:
        role, sep, where = item.partition("=")
        if not sep or not role or not where:
            raise UserError(f"--url {item!r} is not ROLE=URL_OR_PATH", "e.g. --url urls=/data/mp16_urls.csv")
        urls[role] = where
    store = _store(storage)
    key = download_dataset(
        store,
        name,
        mirror=mirror,
        urls=urls,
        split=split,
        downloads=downloads,
        limit=limit,
        shard_size=shard_size,
        max_skip_share=max_skip_share,
        download=_download_options(
            workers, image_size, keep_original, processes, per_host, timeout, dns_cache
        ),
    )
    _print_key(store, key, lambda m: f"{m.get('rows')} images, {m.get('n_dead', 0)} dead links, "
               f"{m.get('n_failed', 0)} failed (re-run to fetch them again), {m.get('n_skipped', 0)} skipped")


def _download_options(workers, image_size, keep_original, processes, per_host, timeout, dns_cache):
    from locdiff.datasets.downloader import DownloadOptions

    return DownloadOptions(
        concurrency=workers,
        per_host=per_host,
        image_size=None if keep_original else image_size,
        processes=processes,
        connect_timeout_s=timeout,
        read_timeout_s=timeout,
        dns_cache_s=dns_cache,
    )


def _sql_error(exc: Exception) -> UserError:
    """One line for a DuckDB error; permission errors say that the catalog is read-only."""
    import duckdb

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    if any(ln.startswith(("Error Traceback", "Traceback")) for ln in lines):  # raised in Python (our
        text = lines[-1]  # read-only filesystem): its last line says what, the rest is a traceback
    views = "views: artifacts, datasets, embeddings, runs, curves, predictions, metrics"
    refused = isinstance(exc, duckdb.PermissionException) or "PermissionError" in text or "read-only" in text
    if refused:
        return UserError(
            f"SQL refused: {text}",
            "`locdiff sql` is read-only and reads only the store's views (no COPY … TO, ATTACH, "
            "INSTALL/LOAD, or files outside the store); write results with --format csv|parquet "
            "--output FILE; " + views,
        )
    return UserError(f"SQL error: {text}", views)


@datasets_app.command("synth")
def synth(
    name: str = typer.Argument(..., help="name of the synthetic set (key: embeddings/NAME/synthetic/<hash>)"),
    rows: int = typer.Option(100_000, "--rows", min=1, help="number of rows"),
    dim: int = typer.Option(768, "--dim", min=2, help="embedding width E (stored as float16)"),
    seed: int = typer.Option(0, "--seed"),
    part_rows: int = typer.Option(100_000, "--part-rows", min=1, help="rows per part"),
    storage: str = typer.Option(None, "--storage", help=_STORAGE_HELP),
) -> None:
    """Write a SYNTHETIC embeddings artifact directly (no images): a smooth noisy function of the
    location, for scale measurements and tests only, never for accuracy claims; prints its key."""
    from locdiff.datasets.synth import synth_embeddings

    key = synth_embeddings(_store(storage), name, rows, dim, seed=seed, part_rows=part_rows)
    print(key)


def sql(
    query: str = typer.Argument(
        ..., help="SQL over the views: artifacts, datasets, embeddings, runs, curves, predictions, metrics"
    ),
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json | parquet"),
    output: Path = typer.Option(None, "--output", "-o", help="write to this file (required for parquet)"),
    storage: str = typer.Option(None, "--storage", help=_STORAGE_HELP),
    max_rows: int = typer.Option(100, "--max-rows", help="table format: rows shown"),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="check the views' files against their sha256 (else size only)"
    ),
) -> None:
    """Run read-only SQL against the artifact catalog (DuckDB) and print the result."""
    import duckdb

    from locdiff.catalog import connect

    formats = ("table", "csv", "json", "parquet")
    if fmt not in formats:
        raise UserError(f"unknown --format {fmt!r}", f"allowed: {', '.join(formats)}")
    if fmt == "parquet" and output is None:
        raise UserError("--format parquet needs --output FILE")
    if not query.strip():
        raise UserError("the SQL query is empty", 'e.g. locdiff sql "SELECT * FROM runs"')
    if output is not None:
        _check_output(output)
    con = connect(
        _store(storage), verify=verify, on_warning=lambda msg: print(f"warning: {msg}", file=sys.stderr)
    )
    try:
        rel = con.sql(query)
    except duckdb.Error as exc:
        raise _sql_error(exc) from exc
    if rel is None:  # a statement without a result (e.g. SET)
        return
    try:
        table = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    except duckdb.Error as exc:
        raise _sql_error(exc) from exc
    if hasattr(table, "read_all"):
        table = table.read_all()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, output)
        print(f"{table.num_rows} rows -> {output}", file=sys.stderr)
        return
    df = table.to_pandas()
    if fmt == "csv":
        text = df.to_csv(index=False)
    elif fmt == "json":
        text = json.dumps(json.loads(df.to_json(orient="records", date_format="iso")), indent=1) + "\n"
    else:
        import pandas as pd

        with pd.option_context(
            "display.max_rows",
            max_rows,
            "display.max_columns",
            50,
            "display.width",
            200,
            "display.max_colwidth",
            60,
        ):
            text = (
                df.head(max_rows).to_string(index=False)
                if len(df)
                else "(no rows) columns: " + ", ".join(df.columns)
            ) + "\n"
            if len(df) > max_rows:
                text += f"... {len(df) - max_rows} more rows (use --max-rows or --format csv)\n"
    if output is not None:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def _check_output(output: Path) -> None:
    """``--output`` is a local file in an existing folder (a URL would be taken as a local path)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:/", str(output)):
        raise UserError(
            f"--output takes a local file, not a URL: {output}",
            "write to a local file, then copy it (e.g. `aws s3 cp FILE s3://…`)",
        )
    if output.is_dir():
        raise UserError(f"--output {output} is a folder", "name a file, e.g. out.csv")
    if not output.parent.is_dir():
        raise UserError(f"--output {output}: the folder {output.parent} does not exist", "create it first")


def register(app: typer.Typer) -> None:
    """Add the top-level `sql` command."""
    app.command("sql")(sql)
