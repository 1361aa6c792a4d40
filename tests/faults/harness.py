"""Kill a real pipeline run at a named point (``locdiff.faults``), re-run it, and check that nothing
committed was lost and that the results equal a clean run's.

The pipeline is ``train-mp16`` on a tiny Blue Marble sample (160 tiles, tiny preset, 30 steps with a
checkpoint every 10, SHDD-KL on so every stage and both anchor sets run), in a subprocess reporting to
one shared Prefect server. ``python -m tests.faults.harness`` runs the whole sweep and prints a table;
``tests/faults/test_faults.py`` runs a fixed subset in CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGE_ORDER = ("datasets", "embeddings", "targets", "anchors", "runs", "eval", "reports")
PIPELINE = {
    "dataset": "bluemarble",
    "encoder": "efficientnet-lite0",
    "preset": "tiny",
    "overrides": {
        "loss": {"kind": "mse+kl"},
        "train": {"max_steps": 30, "checkpoint_every": 10, "log_every": 10},
    },
    "dataset_options": {"n": 160, "shard_size": 40},
    "eval_datasets": [],
    "baselines": ["most-common-region"],
}
# every stage's commit points; parts where a stage writes several (shards, checkpoints): first and later
SWEEP = [
    "datasets:part-written",
    "datasets:part-committed@2",
    "datasets:before-manifest",
    "datasets:committed",
    "embeddings:part-written",
    "embeddings:part-committed@3",
    "embeddings:before-manifest",
    "embeddings:committed",
    "targets:part-written@2",
    "targets:part-committed",
    "targets:before-manifest",
    "anchors:part-written",
    "anchors:part-committed",
    "anchors:before-manifest",
    "anchors:before-manifest@2",
    "runs:part-written",
    "runs:part-committed",
    "runs:part-committed@2",
    "runs:before-manifest",
    "runs:committed",
    "eval:before-manifest",
    "eval:committed",
    "reports:before-manifest",
    "reports:committed",
]


def run_pipeline(store_uri: str, env: dict, fault: str | None = None, timeout: float = 900) -> int:
    """The pipeline in a fresh process (returns its exit code; -9 = SIGKILLed by the fault point)."""
    code = (
        "import json, sys\n"
        "from locdiff.flows.train_mp16 import train_mp16\n"
        "train_mp16(**json.loads(sys.argv[1]))\n"
    )
    env = {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LOCDIFF_FAULT", None)
    if fault:
        env["LOCDIFF_FAULT"] = fault
    params = json.dumps({**PIPELINE, "storage": store_uri})
    out = subprocess.run(
        [sys.executable, "-c", code, params],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode not in (0, -9):
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
    return out.returncode


def outcome(store_uri: str) -> dict:
    """What a finished pipeline left: committed keys, the report's metrics, the run's weights."""
    from locdiff.inference import load_checkpoint
    from locdiff.storage import Store

    store = Store.from_uri(store_uri)
    mans = store.list()
    keys = sorted(m["key"] for m in mans)
    bad = {k: store.verify(k) for k in keys}
    bad = {k: v for k, v in bad.items() if v}
    report = store.latest("reports")
    run = store.latest("runs")
    with store.open(report, "metrics.json") as f:
        metrics = json.loads(f.read())
    ema = load_checkpoint(store, run)["ema"]
    return {"keys": keys, "failed_verify": bad, "metrics": metrics, "ema": ema}


def same_results(a: dict, b: dict) -> bool:
    import torch

    return (
        a["keys"] == b["keys"]
        and a["metrics"] == b["metrics"]
        and set(a["ema"]) == set(b["ema"])
        and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    )


def seed_store(src_root: Path, dst_root: Path, fault: str) -> None:
    """Copy the baseline's committed artifacts of the stages before the fault's stage (they would be
    rebuilt identically; copying saves the sweep minutes per point)."""
    stage = fault.split(":", 1)[0]
    for earlier in STAGE_ORDER[: STAGE_ORDER.index(stage)]:
        if (src_root / earlier).exists():
            shutil.copytree(src_root / earlier, dst_root / earlier)


def check_point(fault: str, base_root: Path, baseline: dict, work: Path, env: dict) -> dict:
    """Kill at `fault`, re-run, compare. Returns a row for the sweep table."""
    root = work / fault.replace(":", "_").replace("@", "_")
    root.mkdir(parents=True)
    seed_store(base_root, root, fault)
    uri = "file://" + str(root)
    t0 = time.monotonic()
    rc_fault = run_pipeline(uri, env, fault)
    rc_rerun = run_pipeline(uri, env)
    row = {"point": fault, "killed": rc_fault == -9, "rerun_rc": rc_rerun, "seconds": time.monotonic() - t0}
    if rc_rerun == 0:
        got = outcome(uri)
        row.update(
            artifacts=len(got["keys"]),
            failed_verify=len(got["failed_verify"]),
            equal=same_results(got, baseline),
        )
    return row


def main() -> int:
    from locdiff.stack import Stack, free_port

    points = sys.argv[1:] or SWEEP
    with tempfile.TemporaryDirectory(prefix="locdiff-faults-") as tmp:
        tmp = Path(tmp)
        stack = Stack(root=ROOT, home=tmp / "prefect-home", port=free_port(None), pool="faults")
        stack.start_server()
        try:
            env = stack.env()
            base = tmp / "baseline"
            assert run_pipeline("file://" + str(base), env) == 0, "the clean run failed"
            baseline = outcome("file://" + str(base))
            print(f"clean run: {len(baseline['keys'])} artifacts")
            print(
                f"{'point':<28} {'killed':>6} {'rerun':>5} {'artifacts':>9} {'bad':>4} {'equal':>5} {'s':>5}"
            )
            rows = []
            for p in points:
                r = check_point(p, base, baseline, tmp / "points", env)
                rows.append(r)
                print(
                    f"{r['point']:<28} {str(r['killed']):>6} {r['rerun_rc']:>5} {r.get('artifacts', '-'):>9} "
                    f"{r.get('failed_verify', '-'):>4} {str(r.get('equal', '-')):>5} {r['seconds']:>5.0f}",
                    flush=True,
                )
        finally:
            stack.down(grace_s=5)
    killed = sum(r["killed"] for r in rows)
    ok = sum(r.get("equal") is True and r.get("failed_verify") == 0 for r in rows)
    print(f"{len(rows)} points, {killed} killed a run, {ok} re-runs verified and equal to the clean run")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
