"""CLI: `locdiff runs list|tag|untag` — trained runs and the names (aliases) that point at them."""

from __future__ import annotations

import json

import typer

runs_app = typer.Typer(help="Trained runs and their names (aliases such as prod).", no_args_is_help=True)

_STORAGE_HELP = "Store URI (default: $LOCDIFF_STORAGE or data/store)."
_HEADLINE = ("acc_25km", "acc_200km", "acc_750km", "median_km", "geoscore")


def runs_table(storage: str | None = None) -> list[dict]:
    """One row per committed run (oldest first): names, key, dataset, encoder, preset, steps, created and
    the headline metrics of its newest LocDiff evaluation, all read through the DuckDB catalog."""
    from locdiff.catalog import connect
    from locdiff.encoders import encoder_spec
    from locdiff.stages import aliases
    from locdiff.storage import Key, Store

    store = Store.from_uri(storage)
    con = connect(store)
    runs = con.execute(
        "SELECT key, name, CAST(created AS VARCHAR), info FROM runs ORDER BY created, key"
    ).fetchall()
    metrics = {}
    for row in con.execute(
        "SELECT m.run, m.dataset, " + ", ".join(f"m.{c}" for c in _HEADLINE) + " FROM metrics m "
        "JOIN artifacts a ON a.key = m.key WHERE m.method = 'locdiff' ORDER BY a.created"
    ).fetchall():
        metrics[row[0]] = row[1:]  # newest evaluation wins
    emb_info = {
        k: json.loads(i)
        for k, i in con.execute("SELECT key, info FROM artifacts WHERE stage = 'embeddings'").fetchall()
    }
    names: dict[str, list[str]] = {}
    for alias, run in aliases.current(store).items():
        names.setdefault(run, []).append(alias)
    out = []
    for key, _name, created, info in runs:
        info = json.loads(info or "{}")
        emb = info.get("embeddings") or ""
        row = {
            "names": ",".join(sorted(names.get(key, []))),
            "key": key,
            "dataset": Key.parse(emb).head if emb else None,
            "encoder": encoder_spec(emb_info.get(emb, {})) if emb else None,
            "preset": info.get("preset"),
            "steps": info.get("final_step"),
            "created": (created or "")[:19],
            "eval_dataset": None,
            **{c: None for c in _HEADLINE},
        }
        if key in metrics:
            m = metrics[key]
            row["eval_dataset"] = m[0]
            row.update(dict(zip(_HEADLINE, m[1:], strict=True)))
        out.append(row)
    return out


def _fmt(v, col: str) -> str:
    if v is None:
        return "-"
    if col.startswith("acc_"):
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:,.0f}"
    return str(v)


@runs_app.command("list")
def list_runs(
    storage: str = typer.Option(None, "--storage", help=_STORAGE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
) -> None:
    """Committed runs: name(s), key, dataset, encoder, preset, steps, created, headline metrics."""
    rows = runs_table(storage)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        print("no committed run; `locdiff demo` trains one")
        return
    cols = ["names", "key", "dataset", "encoder", "preset", "steps", "created", "eval_dataset", *_HEADLINE]
    head = ["name", "key", "dataset", "encoder", "preset", "steps", "created", "eval on", "25km", "200km"]
    head += ["750km", "median_km", "geoscore"]
    body = [[_fmt(r[c], c) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    for line in [head, ["-" * w for w in widths], *body]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


@runs_app.command("tag")
def tag_run(
    run_key: str = typer.Argument(..., help="A committed run key (runs/NAME/HASH) or an existing name."),
    name: str = typer.Argument(..., help="The name to give it, e.g. prod."),
    storage: str = typer.Option(None, "--storage", help=_STORAGE_HELP),
) -> None:
    """Name a run (moves the name when it already points elsewhere; the history is kept)."""
    from locdiff.stages import aliases
    from locdiff.storage import Store

    store = Store.from_uri(storage)
    run = aliases.resolve_run(store, run_key)
    before = aliases.resolve_alias(store, aliases.check_name(name))
    key = aliases.tag(store, run, name)
    moved = f" (was {before})" if before and before != run else ""
    print(f"{name} -> {run}{moved}  [{key}]")


@runs_app.command("untag")
def untag_run(
    name: str = typer.Argument(..., help="The name to remove."),
    storage: str = typer.Option(None, "--storage", help=_STORAGE_HELP),
) -> None:
    """Remove a name (the run stays; the removal is recorded in the alias history)."""
    from locdiff.stages import aliases
    from locdiff.storage import Store

    store = Store.from_uri(storage)
    was = aliases.resolve_alias(store, aliases.check_name(name))
    key = aliases.untag(store, name)
    print(f"{name} removed (was {was})  [{key}]")
