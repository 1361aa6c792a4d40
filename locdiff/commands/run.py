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


def _run_flow_in_process(fn, **params):
    """Run a flow here, against the local stack when it is up."""
    stack = _stack_for_flows()
    if stack is None:
        return fn(**params)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        return fn(**params)


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
    from locdiff.storage import Store

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
            if name.endswith(".png"):
                print(f"{name.split('-')[0]:<8} {store.uri(report_key, name)}")
    print(f"Prefect UI (run): {url}")
    print('query artifacts:  locdiff sql "SELECT method, acc_750km, acc_2500km, median_km FROM metrics"')
    print(f"[demo] done in {time.monotonic() - t0:,.0f} s; `locdiff stack down` stops the stack.")


def deploy_command(
    name: list[str] = typer.Option(None, "--name", "-n", help="Deployment(s) to deploy (default: all)."),
) -> None:
    """Deploy prefect.yaml's deployments to the local stack (starts the server if needed)."""
    from locdiff.stack import Stack, deploy

    stack = Stack()
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
        None, "--nproc", help="Training processes under torchrun/DDP (default 1; at most the GPUs/cores)."
    ),
) -> None:
    """Run the train-mp16 pipeline in this process (against the local stack when it is up)."""
    from locdiff.ddp import NPROC_ENV, resolve_nproc
    from locdiff.flows.train_mp16 import train_mp16

    if nproc is not None:  # checked now, before any stage runs; the train task reads it from the env
        os.environ[NPROC_ENV] = str(resolve_nproc(nproc))

    out = _run_flow_in_process(
        train_mp16,
        dataset=dataset,
        encoder=encoder,
        preset=preset,
        overrides=_parse_params(override),
        eval_datasets=list(eval_dataset or []),
        baselines=["most-common-region"],
    )
    print(f"run: {out['run']}")


def evaluate_command(
    dataset: list[str] = typer.Option(None, "--dataset", "-d", help="Datasets (default: the nightly four)."),
    run: str = typer.Option(None, help="Run key (default: the newest committed run)."),
) -> None:
    """Evaluate a committed run on benchmarks present locally (absent ones are skipped with a note)."""
    from locdiff.flows.evaluate_latest import evaluate_latest

    out = _run_flow_in_process(evaluate_latest, datasets=list(dataset) if dataset else None, run_key=run)
    for n in out["notes"]:
        print(n)
    if out["report"]:
        print(out["report"]["text_table"])
        print(f"report: {out['report']['report']}")


def predict_command(
    images: list[Path] = typer.Argument(..., help="Image files.", exists=False),
    checkpoint: str = typer.Option(
        None, help="Run key in the store or a .pt checkpoint file (default: newest run)."
    ),
    encoder: str = typer.Option(None, help="Encoder (default: the one the run was trained on)."),
    top_k: int = typer.Option(3, help="Modes to print per image."),
    map_png: Path = typer.Option(None, "--map", help="Write a map of the predictions (PNG)."),
    samples: int = typer.Option(None, help="K samples per image (default: the run's config)."),
) -> None:
    """Predict where IMAGE(s) were taken: lat/lon and the top-k modes of the spherical distribution."""
    from locdiff.commands.predict import predict_images

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise UserError(f"no such image file: {missing[0]}", "pass paths of JPEG/PNG files")
    results = predict_images(
        [str(p) for p in images], checkpoint=checkpoint, encoder=encoder, samples=samples
    )
    for path, r in zip(images, results, strict=True):
        print(f"{path}: {r['lat']:.4f}, {r['lon']:.4f}  (score {r['score']:.3g})")
        for i, (mlat, mlon, mass) in enumerate(
            zip(r["modes_lat"], r["modes_lon"], r["modes_mass"], strict=True)
        ):
            if i >= top_k:
                break
            if mlat != mlat or mass <= 0:  # NaN placeholder: the distribution has fewer modes
                continue
            print(f"  mode {i + 1}: {mlat:8.4f}, {mlon:9.4f}  mass {mass:.3f}")
    if map_png:
        from locdiff.commands.predict import predictions_map_png

        map_png.write_bytes(predictions_map_png(results, [p.name for p in images]))
        print(f"map: {map_png}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
    app.command("deploy")(deploy_command)
    app.command("run")(run_command)
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("predict")(predict_command)
