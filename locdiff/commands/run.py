"""Top-level commands: `locdiff demo`, `deploy`, `run`, `train`, `evaluate`, `predict`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer

from locdiff.errors import UserError


def _parse_params(items: list[str] | None) -> dict:
    """`key=value` pairs; values parsed as JSON when they parse (numbers, lists, dicts), else strings."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(
                f"parameter {item!r} is not KEY=VALUE", "e.g. -p preset=tiny -p 'overrides={\"train\": {}}'"
            )
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _stack_for_flows():
    """The local stack when it is up (so in-process flows report to it instead of a temporary server)."""
    from locdiff.stack import Stack

    st = Stack()
    return st if st.server_healthy() else None


EPHEMERAL_STARTUP_S = 120  # seconds to wait for Prefect's temporary server when the stack is not up


def _run_flow_in_process(fn, **params):
    """Run a flow here, against the local stack when it is up, else against a temporary Prefect server
    that must answer within ``EPHEMERAL_STARTUP_S`` seconds (or ``$PREFECT_SERVER_EPHEMERAL_STARTUP_
    TIMEOUT_SECONDS``); when it does not, a one-line error says to start the stack."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP

    stack = _stack_for_flows()
    wait = int(os.environ.get(STARTUP.name) or EPHEMERAL_STARTUP_S)
    updates = {PREFECT_API_URL: stack.api_url} if stack is not None else {STARTUP: wait}
    try:
        with temporary_settings(updates=updates):
            return fn(**params)
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        raise UserError(
            f"no Prefect server: the local stack is not up and a temporary server did not answer within "
            f"{wait} s",
            "start the stack with `locdiff stack up` (this command then reuses it) and re-run",
        ) from None


class _LogTail:
    """Print what the worker's flow runs write to its log, from the current end of the file on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = path.stat().st_size if path.exists() else 0

    def __call__(self, *_: object) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return
        if data:
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()


def demo_command(
    sample_size: int = typer.Option(
        None, help="Number of Blue Marble tiles (default: the sample's default)."
    ),
    preset: str = typer.Option("cpu", help="Model preset: tiny | cpu | default | mp16."),
    timeout: float = typer.Option(3600, help="Seconds to wait for the run."),
    quiet: bool = typer.Option(False, "--quiet", help="Do not stream the run's output."),
) -> None:
    """The whole pipeline on the embedded Blue Marble sample, offline on CPU, through the local stack.

    Brings the stack up if needed, deploys prefect.yaml, runs the `demo/demo` deployment on the process
    worker (prepare -> embed -> targets -> anchors -> train -> evaluate -> report), then prints the
    metrics table (LocDiff beside the most-common-region baseline), where the report and map are, and
    the run's page in the Prefect UI.
    """
    from locdiff.stack import Stack, deploy, flow_run_url, run_deployment, wait_flow_run
    from locdiff.stages.runs import resolve_config
    from locdiff.storage import Store

    resolve_config(preset)  # a bad preset is one line now, before the stack is brought up
    _check_deployments(Stack().root, ["demo"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    stack = Stack()
    print(f"[demo] local stack (Prefect server + process worker) in {stack.home} ...", flush=True)
    st = stack.up(worker=True)
    print(f"[demo] Prefect UI: {st.ui_url}", flush=True)
    print("[demo] deploying prefect.yaml ...", flush=True)
    deploy(stack, ["demo"])
    store = Store.from_uri(None)
    params: dict = {"preset": preset, "storage": store.url}
    if sample_size:
        params["dataset_options"] = {"n": int(sample_size)}
    fr = run_deployment(stack, "demo/demo", params)
    url = flow_run_url(stack, fr["id"])
    print(f"[demo] flow run {fr['name']}: {url}", flush=True)
    tail = _LogTail(stack.log_file("worker"))
    fr = wait_flow_run(stack, fr["id"], timeout=timeout, poll_s=1.0, on_poll=None if quiet else tail)
    state = fr.get("state") or {}
    if state.get("type") != "COMPLETED":
        raise UserError(
            f"the demo run ended {state.get('type', 'UNKNOWN')}: {state.get('message') or 'no message'}",
            f"open {url} for its logs (worker log: {stack.log_file('worker')})",
        )
    report_key = store.latest("reports")
    print()
    if report_key:
        from locdiff import report as rp

        with store.open(report_key, "metrics.json") as f:
            rows = json.loads(f.read())
        print(rp.text_table(rows))
        print()
        print(f"report:  {store.uri(report_key, 'report.md')}")
        for name in store.files(report_key):
            if name.endswith((".png", ".html")):  # .html: the interactive map, one offline file
                print(f"{name.split('-')[0]:<8} {store.uri(report_key, name)}")
    print(f"Prefect UI (run): {url}")
    print('query artifacts:  locdiff sql "SELECT method, acc_750km, acc_2500km, median_km FROM metrics"')
    print(f"[demo] done in {time.monotonic() - t0:,.0f} s; `locdiff stack down` stops the stack.")


def _check_deployments(root: Path, names: list[str]) -> None:
    """The project's prefect.yaml exists and names each of ``names``."""
    import yaml

    path = Path(root) / "prefect.yaml"
    if not path.is_file():
        raise UserError(f"no prefect.yaml in {root}", "run it in the project, or set LOCDIFF_PROJECT_DIR")
    known = [d.get("name") for d in (yaml.safe_load(path.read_text()) or {}).get("deployments") or []]
    unknown = [n for n in names if n not in known]
    if unknown:
        names_text = ", ".join(map(repr, unknown))
        raise UserError(f"no deployment named {names_text} in {path}", f"deployments: {', '.join(known)}")


def deploy_command(
    name: list[str] = typer.Option(None, "--name", "-n", help="Deployment(s) to deploy (default: all)."),
) -> None:
    """Deploy prefect.yaml's deployments to the local stack (starts the server if needed)."""
    from locdiff.stack import Stack, deploy

    stack = Stack()
    _check_deployments(stack.root, list(name or []))  # one line now, before a server is started
    stack.start_server()
    stack.ensure_pool()
    deploy(stack, list(name) if name else None)
    print(f"deployed to {stack.api_url}; UI: {stack.ui_url}")


def run_command(
    deployment: str = typer.Argument(..., help="FLOW/DEPLOYMENT, e.g. train-mp16/default."),
    param: list[str] = typer.Option(
        None, "--param", "-p", help="KEY=VALUE (JSON values allowed); repeatable."
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for the run to finish."),
    timeout: float = typer.Option(24 * 3600, help="Seconds to wait."),
) -> None:
    """Run a deployment on the local stack with parameter overrides (like `prefect deployment run`)."""
    from locdiff.stack import Stack, flow_run_url, run_deployment, wait_flow_run

    stack = Stack()
    if not stack.server_healthy():
        raise UserError("the local stack is not running", "start it with `locdiff stack up`")
    fr = run_deployment(stack, deployment, _parse_params(param))
    print(f"flow run {fr['name']}: {flow_run_url(stack, fr['id'])}")
    if wait:
        fr = wait_flow_run(stack, fr["id"], timeout=timeout, poll_s=2.0)
        state = fr.get("state") or {}
        print(f"state: {state.get('type')} {state.get('message') or ''}".rstrip())
        if state.get("type") != "COMPLETED":
            raise typer.Exit(1)


def train_command(
    dataset: str = typer.Option("bluemarble", help="Registry dataset name."),
    encoder: str = typer.Option("efficientnet-lite0", help="Encoder name (or open_clip MODEL/PRETRAINED)."),
    preset: str = typer.Option("cpu", help="tiny | cpu | default | mp16."),
    override: list[str] = typer.Option(
        None, "--set", help='Config override KEY=JSON, e.g. train={"max_steps":100}.'
    ),
    eval_dataset: list[str] = typer.Option(None, "--eval", help="Benchmark to evaluate on (repeatable)."),
    nproc: int = typer.Option(
        None,
        "--nproc",
        help="Training processes under torchrun/DDP (default: every visible GPU, 1 on the CPU).",
    ),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cuda | cpu, to embed and train."),
) -> None:
    """Run the train-mp16 pipeline in this process (against the local stack when it is up)."""
    from locdiff.ddp import resolve_nproc
    from locdiff.flows.train_mp16 import train_mp16
    from locdiff.stages.runs import resolve_config

    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device!r} is not allowed", "use auto, cuda or cpu")
    if nproc is not None:
        resolve_nproc(nproc, device)  # checked now, before any stage runs
    overrides = _parse_params(override)
    resolve_config(preset, overrides)  # one line now, not a failed flow run's traceback in its log
    out = _run_flow_in_process(
        train_mp16,
        dataset=dataset,
        encoder=encoder,
        preset=preset,
        overrides=overrides,
        eval_datasets=list(eval_dataset or []),
        baselines=["most-common-region"],
        nproc=nproc,
        device=device,
    )
    print(f"run: {out['run']}")


def evaluate_command(
    dataset: list[str] = typer.Option(None, "--dataset", "-d", help="Datasets (default: the nightly four)."),
    run: str = typer.Option(
        None, "--run", "--model", "-m", help="Run key or name (default: prod, else the newest run)."
    ),
    storage: str = typer.Option(
        None, "--storage", help="Store URI (default: $LOCDIFF_STORAGE or data/store)."
    ),
    device: str = typer.Option("auto", help="cpu | cuda | auto (CUDA when available): embedding and model."),
) -> None:
    """Evaluate a committed run on benchmarks present locally (absent ones are skipped with a note)."""
    from locdiff.flows.evaluate_latest import evaluate_latest
    from locdiff.stages import aliases
    from locdiff.storage import Store
    from locdiff_core.device import resolve_device

    resolve_device(device, "--device")  # an unknown device, or CUDA without one: a one-line error now
    store = Store.from_uri(storage)
    run = aliases.resolve_run(store, run) if run else aliases.default_run(store)  # one-line errors here
    out = _run_flow_in_process(
        evaluate_latest,
        datasets=list(dataset) if dataset else None,
        run_key=run,
        storage=storage,
        device=device,
    )
    for n in out["notes"]:
        print(n)
    if out["report"]:
        print(out["report"]["text_table"])
        print(f"report: {out['report']['report']}")


def predict_command(
    inputs: list[str] = typer.Argument(
        ..., help="Image files, folders (recursive), globs, http(s) URLs, or a CSV/Parquet manifest."
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Run key or name (`locdiff runs list`); default: prod, else the newest run.",
    ),
    checkpoint: str = typer.Option(None, help="A run key, or a model.pt checkpoint file (needs --encoder)."),
    encoder: str = typer.Option(None, help="Encoder (default: the one the run was trained on)."),
    out: Path = typer.Option(
        None, "--out", "-o", help="Write rows to FILE.csv, FILE.parquet or FILE.geojson."
    ),
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    batch_size: int = typer.Option(32, help="Images per batch (bounds memory)."),
    top_k: int = typer.Option(3, help="Modes to print per image (stdout)."),
    map_png: Path = typer.Option(
        None, "--map", help="Write a map of the predictions: FILE.html (interactive, offline) or FILE.png."
    ),
    samples: int = typer.Option(None, help="K samples per image (default: the run's config)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    storage: str = typer.Option(
        None, "--storage", help="Store URI (default: $LOCDIFF_STORAGE or data/store)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    hybrid: bool = typer.Option(
        False, "--hybrid", help="Also LocDiff-H: refine with the run's training images (retrieval gallery)."
    ),
) -> None:
    """Predict where images were taken: lat/lon and the top-k modes of the spherical distribution.

    Without --out, one line per image (and its modes) is printed; with --out, rows go to the file and a
    summary is printed. Unreadable images become rows with an error; they never stop the batch.
    """
    from locdiff.commands import predict as pr
    from locdiff.inference import Timings, as_result, load_model, predict_batches

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be >= 1", "e.g. --batch-size 32")
    if model and checkpoint:
        raise UserError("pass either --model or --checkpoint, not both", "--model takes run keys and names")
    writer_fmt = pr.output_format(out) if out else None
    items = pr.expand_inputs(inputs)
    is_file = bool(checkpoint) and Path(checkpoint).is_file()
    if checkpoint and not is_file and "/" not in checkpoint:
        raise UserError(f"--checkpoint {checkpoint!r} is neither a file nor a run key", "e.g. runs/NAME/HASH")
    m = load_model(
        model or (None if is_file else checkpoint),
        storage,
        encoder,
        device,
        checkpoint if is_file else None,
        hybrid,
    )
    if samples:
        m.predictor.config = m.predictor.config.replace(infer={"num_samples": int(samples)})
    writer = pr.RowWriter(out, m.columns) if out else None
    timings = Timings()
    kept: list[dict] = []  # for --map (capped)
    bar = _progress_bar(progress and writer is not None)
    try:
        with bar:
            task = bar.add_task("predict", total=None)
            for rows in predict_batches(items, m, batch_size=batch_size, seed=seed, timings=timings):
                if writer is not None:
                    writer.write(rows)
                else:
                    for r in rows:
                        _print_row(r, top_k)
                if map_png and len(kept) < 500:
                    kept.extend(as_result(r) for r in rows[: 500 - len(kept)])
                bar.update(task, advance=len(rows))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    t = timings.as_dict()
    rate = f"{t['images_per_s']:.1f} images/s" if t["images_per_s"] else "-"
    who = m.run_key or checkpoint
    print(
        f"{t['images']} images ({t['errors']} unreadable) with {who} on {m.device}: {rate}", file=sys.stderr
    )
    if writer is not None:
        print(f"wrote {writer.count} rows to {out} ({writer_fmt})")
    if t["images"] == 0:
        raise UserError(
            "no image found in the inputs", f"image extensions: {', '.join(sorted(pr.IMAGE_EXTS))}"
        )
    if map_png:
        good = [r for r in kept if r.get("error") is None]
        if map_png.suffix.lower() in (".html", ".htm"):
            from locdiff import mapview

            title = f"locdiff predictions ({who})"
            map_png.write_text(mapview.page_html(mapview.prediction_items(good), title), encoding="utf-8")
        else:
            map_png.write_bytes(pr.predictions_map_png(good, [str(r["id"]) for r in good]))
        print(f"map: {map_png}")


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


def _print_row(r: dict, top_k: int) -> None:
    if r.get("error"):
        print(f"{r['path']}: error: {r['error']}")
        return
    print(f"{r['path']}: {r['lat']:.4f}, {r['lon']:.4f}  (score {r['score']:.3g})")
    if r.get("radius50_km") is not None:
        r50, r90 = r["radius50_km"], r["radius90_km"]
        print(f"  credible radii: 50 % within {r50:,.0f} km, 90 % within {r90:,.0f} km")
    if r.get("hybrid_lat") is not None:
        print(f"  LocDiff-H: {r['hybrid_lat']:.4f}, {r['hybrid_lon']:.4f}")
    for i in range(1, top_k + 1):
        mlat, mlon, mass = (r.get(f"mode{i}_{p}") for p in ("lat", "lon", "mass"))
        if mlat is None or mass is None or mass <= 0:  # the distribution has fewer modes
            continue
        print(f"  mode {i}: {mlat:8.4f}, {mlon:9.4f}  mass {mass:.3f}")


def sample_images_command(
    folder: Path = typer.Argument(..., help="Folder to write the tiles and manifest.csv to."),
    n: int = typer.Option(8, "--n", "-n", min=1, max=10_000, help="Number of tiles."),
    seed: int = typer.Option(0, help="Which gallery coordinates to crop around."),
) -> None:
    """Write N Blue Marble JPEG tiles (+ manifest.csv with their true lat/lon) to try predict on."""
    from locdiff.commands.predict import write_sample_images

    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder", "pass a new or existing folder")
    above = next((p for p in folder.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"cannot create {folder}: {above} is not a folder", "pass a new or existing folder")
    manifest = write_sample_images(folder, n=n, seed=seed)
    print(f"{n} tiles in {folder}/; true coordinates in {manifest}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
    app.command("deploy")(deploy_command)
    app.command("run")(run_command)
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("predict")(predict_command)
    app.command("sample-images")(sample_images_command)
