"""MP16 rehearsal: the real `train-mp16/default` deployment on a real Prefect server and worker, with only
the data and the encoder swapped: a synthetic MP16 (``locdiff datasets synth``, ``--rows`` x ``--dim``,
default 4,720,000 x 768, the width of ViT-L/14) given as ``embeddings=``, and a synthetic YFCC26k
(``--eval-rows``) given as an ``eval_datasets`` embeddings key.

The flow run chains: target cache at ``--degree`` (L = 32 here; the ``mp16`` preset's L = 64 cache is
measured at ``--frac-rows`` rows and projected) -> anchors -> ``--steps`` training steps of the ``mp16``
preset's network under torchrun with ``--nproc`` processes -> the retrieval index over the train split ->
evaluation with LocDiff-H (``--samples`` x ``--sampler-steps`` of inference) -> the report.

Measured per stage: wall time (start/end of the flow run's subflow runs, from the Prefect API), peak RSS
of the worker's whole process tree (worker, flow-run process, torchrun and its ranks; sampled every
0.5 s with psutil) and of its largest process, and the disk of the committed artifact (its store folder).
The two synthetic sets are written before the stack starts (they stand in for prepare + embed) and
measured the same way. Prints a table, each stage's figure against a reference in the same run (the
largest process, the fraction), and the projections (marked as such).

    python benchmarks/rehearse_mp16.py --rows 20000 --eval-rows 256 --steps 10   # a smoke of the chain
    python benchmarks/rehearse_mp16.py --work DIR --steps 150 --eval-rows 2560 --samples 4 --sampler-steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locdiff.stack import Stack, deploy, flow_run, free_port, run_deployment  # noqa: E402
from locdiff.storage import Store  # noqa: E402

GIB, MIB = 2**30, 2**20
STAGES = {  # subflow name -> store stage of the artifact it commits
    "targets": "targets",
    "anchors": "anchors",
    "train": "runs",
    "retrieval-index": "retrieval",
    "evaluate": "eval",
    "report": "reports",
}


class TreeRSS:
    """Memory of process trees, sampled every ``every_s``: (time, sum of RSS, sum of PSS, largest RSS).
    The RSS sum counts pages shared by the processes (torch's libraries, mapped files) once per process;
    the PSS sum (``/proc/PID/smaps_rollup``) splits them, so it is what the tree holds."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.samples: list[tuple[float, int, int, int]] = []
        self.pids: list[int] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, args=(every_s,))
        self._t.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            total = pss = one = 0
            for pid in list(self.pids):
                try:
                    root = psutil.Process(pid)
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        m = p.memory_full_info()
                    except psutil.Error:
                        continue
                    total += m.rss
                    pss += m.pss
                    one = max(one, m.rss)
            self.samples.append((time.time(), total, pss, one))

    def peak(self, t0: float = 0.0, t1: float = float("inf")) -> dict:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        return {
            name: max((s[i] for s in inside), default=0)
            for i, name in ((1, "rss_tree"), (2, "pss_tree"), (3, "rss_one"))
        }

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` to completion with its tree's RSS sampled; wall seconds, peaks, last stdout line."""
    rss = TreeRSS()
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    rss.pids.append(p.pid)
    out, _ = p.communicate()
    wall = time.time() - t0
    rss.stop()
    if p.returncode:
        raise SystemExit(f"{cmd} failed with {p.returncode}")
    return {"wall_s": wall, **rss.peak(), "out": out.strip().splitlines()[-1]}


def synth(store_uri: str, name: str, rows: int, dim: int, seed: int, env: dict) -> dict:
    """``locdiff datasets synth``; ``reused``: the artifact was in the store already (wall = the look-up)."""
    before = {m["key"] for m in Store.from_uri(store_uri).list("embeddings")}
    cli = [sys.executable, "-m", "locdiff.cli"]
    r = measured(
        [
            *cli,
            "datasets",
            "synth",
            name,
            "--rows",
            str(rows),
            "--dim",
            str(dim),
            "--seed",
            str(seed),
            "--storage",
            store_uri,
        ],
        env,
    )
    r["key"] = r.pop("out")
    r["reused"] = r["key"] in before
    return r


def build_cache(store_uri: str, key: str, degree: int, env: dict) -> dict:
    code = (
        "import sys; from locdiff.storage import Store; from locdiff.stages.targets import build_targets; "
        "print(build_targets(Store.from_uri(sys.argv[1]), sys.argv[2], int(sys.argv[3])))"
    )
    r = measured([sys.executable, "-c", code, store_uri, key, str(degree)], env)
    r["key"] = r.pop("out")
    return r


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def subflows(stack: Stack, parent_id: str) -> list[dict]:
    runs = httpx.post(
        f"{stack.api_url}/flow_runs/filter",
        json={"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}, "sort": "START_TIME_ASC"},
        timeout=30,
    ).json()
    names: dict[str, str] = {}
    for r in runs:
        if r["flow_id"] not in names:
            names[r["flow_id"]] = httpx.get(f"{stack.api_url}/flows/{r['flow_id']}", timeout=10).json()[
                "name"
            ]
        r["flow_name"] = names[r["flow_id"]]
    return runs


def fmt_row(stage: str, rows: str, f: dict) -> str:
    d = "-" if f.get("disk") is None else f"{f['disk'] / GIB:.2f} GiB"
    mem = " | ".join(f"{f[k] / GIB:.2f} GiB" for k in ("pss_tree", "rss_tree", "rss_one"))
    return f"| {stage} | {rows} | {f['wall_s']:,.0f} s | {mem} | {d} |"


def committed_bytes(store: Store, stage: str, t0: float, t1: float) -> tuple[list[str], int]:
    """Keys of ``stage`` committed between t0 and t1 and their bytes (from their manifests)."""
    mans = [m for m in store.list(stage) if t0 - 1 <= ts(m["created_at"]) <= t1 + 1]
    return [m["key"] for m in mans], sum(int(m.get("bytes") or 0) for m in mans)


def node_projection(a, fig: dict, rows_train: int) -> dict:
    """PROJECTED full-job times on one node of ``--gpus`` GPUs from FLOPs and bytes: nominal peaks
    (``--gpu-tflops`` bf16/fp16 dense, ``--gpu-tbps`` HBM) at an assumed utilisation ``--mfu``; the
    measured CPU rates of this run are printed beside them as the reference."""
    from benchmarks.bench_train import linear_macs
    from locdiff_core.checkpoint import build_model
    from locdiff_core.config import get_preset

    out: dict = {}
    node_flops = a.gpus * a.gpu_tflops * 1e12 * a.mfu
    for degree in (a.degree, 64):
        macs = linear_macs(build_model(get_preset("mp16", max_degree=degree, embed_dim=a.dim)))
        out[f"L{degree}"] = {
            "macs_per_sample": macs,
            "train_s": 6 * macs * 200_000 * 1024 / node_flops,  # the preset's 200 k steps x 1024
            "infer_s": 2 * macs * 8 * 25 * 25_600 / node_flops,  # K = 8, S = 25 on 25,600 images
        }
    search = 2 * 25_600 * rows_train * a.dim
    out["search_s"] = search / node_flops
    out["search_tflop"] = search / 1e12
    out["gallery_read_s"] = rows_train * a.dim * 2 / (a.gpus * a.gpu_tbps * 1e12)  # once, fp16, from HBM
    out["train_bytes_per_sample_L64"] = 2 * a.dim + 4 * 65**2  # fp16 embedding + float32 L=64 codes
    curves = fig.get("train_curves") or []
    sps = [r["samples_per_s"] for r in curves if r.get("samples_per_s")]
    if sps:
        out["cpu_train_samples_per_s"] = sorted(sps)[len(sps) // 2]
        out["cpu_train_gflops"] = (
            6 * out[f"L{a.degree}"]["macs_per_sample"] * out["cpu_train_samples_per_s"] / 1e9
        )
    print(
        f"\nPROJECTED to one {a.gpus}-GPU node (nominal {a.gpu_tflops:.0f} TFLOP/s and {a.gpu_tbps} TB/s "
        f"per GPU, ASSUMED utilisation {a.mfu:.0%}; not measured):"
    )
    for degree in (a.degree, 64):
        o = out[f"L{degree}"]
        print(
            f"  L={degree}: {o['macs_per_sample'] / 1e6:.1f} M MACs/sample; 200 k steps x 1024: "
            f"{o['train_s'] / 60:.1f} min of model FLOPs; K=8 x S=25 on 25,600 images: {o['infer_s']:.1f} s"
        )
    print(
        f"  exact search, 25,600 queries x {rows_train:,} x {a.dim}: {out['search_tflop']:.0f} TFLOP, "
        f"{out['search_s']:.1f} s; the fp16 gallery read once from HBM: {out['gallery_read_s'] * 1e3:.1f} ms"
    )
    job_bytes = out["train_bytes_per_sample_L64"] * 200_000 * 1024
    out["train_read_s"] = job_bytes / (a.read_gbps * 1e9)
    out["train_step_latency_s"] = 200_000 * a.step_ms / 1e3
    print(
        f"  training data at L=64: {out['train_bytes_per_sample_L64'] / 1024:.1f} KiB/sample, "
        f"{job_bytes / 1e12:.1f} TB read over the 200 k steps: {out['train_read_s'] / 60:.0f} min at "
        f"{a.read_gbps} GB/s (ASSUMED node read rate); 200 k steps at an ASSUMED {a.step_ms} ms per step "
        f"(launches, all-reduce, loader): {out['train_step_latency_s'] / 60:.0f} min"
    )
    if sps:
        print(
            f"  reference, MEASURED here: {out['cpu_train_samples_per_s']:,.0f} samples/s on the CPU "
            f"(median of the logged steps) = {out['cpu_train_gflops']:.0f} GFLOP/s of model FLOPs"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4_720_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--eval-rows", type=int, default=25_600)
    ap.add_argument("--degree", type=int, default=32, help="L of the target cache and the network")
    ap.add_argument("--frac-rows", type=int, default=100_000, help="rows of the L=64 cache measurement")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8, help="K of inference (the preset's: 8)")
    ap.add_argument("--sampler-steps", type=int, default=25, help="S of inference (the preset's: 25)")
    ap.add_argument("--work", default=None, help="folder for the store (reused: synthetic sets are cached)")
    ap.add_argument("--gpus", type=int, default=8, help="projection: GPUs of the node")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="projection: nominal dense bf16 (H100)")
    ap.add_argument("--gpu-tbps", type=float, default=3.35, help="projection: HBM TB/s per GPU (H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.3, help="projection: assumed utilisation")
    ap.add_argument("--read-gbps", type=float, default=5.0, help="projection: training-data read GB/s")
    ap.add_argument("--step-ms", type=float, default=10.0, help="projection: per-step latency floor")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (default: delete it)")
    a = ap.parse_args()

    work = Path(a.work or tempfile.mkdtemp(prefix="rehearse-mp16-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    store_uri = "file://" + str(work / "store")
    store = Store.from_uri(store_uri)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOCDIFF_STORAGE": store_uri}
    fig: dict = {"args": vars(a), "stages": {}}
    rows_train = a.rows - 2 * (a.rows // 10)  # synth: exactly 10 % val and 10 % test per 100 k part

    # the stand-ins for prepare + embed, and the L = 64 cache at a fraction of the rows
    s = synth(store_uri, "mp16", a.rows, a.dim, 0, env)
    s["disk"] = store.manifest(s["key"])["bytes"]
    fig["stages"]["synth MP16"] = {**s, "rows": a.rows}
    train_key = s["key"]
    e = synth(store_uri, "yfcc26k", a.eval_rows, a.dim, 1, env)
    e["disk"] = store.manifest(e["key"])["bytes"]
    fig["stages"]["synth YFCC26k"] = {**e, "rows": a.eval_rows}
    frac = synth(store_uri, "mp16-fraction", a.frac_rows, a.dim, 0, env)
    for degree in (a.degree, 64):
        c = build_cache(store_uri, frac["key"], degree, env)
        c["disk"] = store.manifest(c["key"])["bytes"]
        fig["stages"][f"targets L={degree} (fraction)"] = {**c, "rows": a.frac_rows}

    params = {
        "storage": store_uri,
        "embeddings": train_key,
        "preset": "mp16",
        "overrides": {
            "max_degree": a.degree,
            "train": {"max_steps": a.steps, "log_every": max(1, a.steps // 10)},
            "infer": {"num_samples": a.samples, "num_steps": a.sampler_steps},
        },
        "eval_datasets": [e["key"]],
        "baselines": [],
        "device": "cpu",
        "nproc": a.nproc,
    }
    fig["params"] = params
    stack = Stack(
        root=ROOT,
        home=work / "prefect-home",
        port=free_port(None),
        pool="locdiff-rehearse",
        extra_env={"LOCDIFF_STORAGE": store_uri},
    )
    rss = TreeRSS()
    try:
        stack.start_server()
        stack.ensure_pool()
        deploy(stack, ["default"])
        worker = stack.start_worker(name="rehearse-mp16")
        rss.pids.append(worker)
        time.sleep(5)
        idle = rss.peak()
        t0 = time.time()
        fr = run_deployment(stack, "train-mp16/default", params)
        while True:
            state = (flow_run(stack, fr["id"]).get("state") or {}).get("type")
            if state in ("FAILED", "CRASHED", "CANCELLED", "COMPLETED"):
                break
            if time.time() - t0 > a.timeout:
                raise SystemExit("timed out")
            time.sleep(2)
        t_end = time.time()
        fig["flow_run"] = {"state": state, "wall_s": t_end - t0, "idle_worker": idle, **rss.peak(t0, t_end)}
        for r in subflows(stack, fr["id"]):
            if r["flow_name"] not in STAGES or not r.get("start_time"):
                continue
            start, end = ts(r["start_time"]), ts(r["end_time"]) if r.get("end_time") else t_end
            keys, disk = committed_bytes(store, STAGES[r["flow_name"]], start, end)
            name = r["flow_name"]
            if name == "anchors":
                name += f" ({r['parameters'].get('kind')})"
            fig["stages"][name] = {
                "wall_s": end - start,
                **rss.peak(start, end),
                "keys": keys,
                "disk": disk,
                "state": r["state"]["type"],
            }
    finally:
        rss.stop()
        stack.down(grace_s=5)
    if state != "COMPLETED":
        print(f"the flow run ended {state}; see {stack.log_file('worker')}")

    st = fig["stages"]
    run = store.latest("runs")
    if run:
        curves = json.loads(store.read_bytes(run, "curves.json"))
        fig["train_curves"] = curves.get("train", [])
        fig["val_curves"] = curves.get("val", [])
    ev = store.latest("eval")
    if ev:
        fig["metrics"] = store.manifest(ev)["metrics"]

    rows_of = {
        "synth MP16": a.rows,
        "synth YFCC26k": a.eval_rows,
        "targets": a.rows,
        "anchors (uniform)": "-",
        "anchors (data)": "-",
        "train": f"{a.steps} steps x 1024",
        "retrieval-index": rows_train,
        "evaluate": a.eval_rows,
        "report": "-",
    }
    print(
        f"\nrehearsal: {a.rows:,} x {a.dim} synthetic rows, L = {a.degree}, {a.steps} steps, "
        f"nproc {a.nproc}, K = {a.samples}, S = {a.sampler_steps}, {a.eval_rows:,} eval rows; flow run "
        f"{state} in {fig['flow_run']['wall_s']:,.0f} s; idle worker: {idle['pss_tree'] / GIB:.2f} GiB PSS"
    )
    print(
        "| stage | rows | wall | peak PSS, tree | peak RSS, tree (sum) | peak RSS, largest process | disk |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, f in st.items():
        label = name + (" (reused: already in the store)" if f.get("reused") else "")
        print(fmt_row(label, str(rows_of.get(name, f.get("rows", "-"))), f))

    # projections (marked): the L = 64 cache at the full rows, evaluation at 25,600 rows
    f32, f64 = st[f"targets L={a.degree} (fraction)"], st["targets L=64 (fraction)"]
    scale = a.rows / a.frac_rows
    proj = {
        "targets_L64_disk": f64["disk"] * scale,
        "targets_L64_wall_s": f64["wall_s"] * scale,
        "L64_vs_L32_disk": f64["disk"] / max(1, f32["disk"]),
    }
    if "targets" in st:
        proj["targets_fraction_projection_check"] = f32["disk"] * scale / max(1, st["targets"]["disk"])
    if "evaluate" in st:
        per_row = st["evaluate"]["wall_s"] / a.eval_rows
        proj["evaluate_25600_wall_s_same_settings"] = per_row * 25_600
    fig["projected"] = proj
    print("\nPROJECTED (not measured):")
    print(
        f"  L=64 cache at {a.rows:,} rows: {proj['targets_L64_disk'] / GIB:.1f} GiB, "
        f"{proj['targets_L64_wall_s'] / 60:.0f} min here ({scale:.1f} x the {a.frac_rows:,}-row build; "
        f"L=64/L={a.degree} disk {proj['L64_vs_L32_disk']:.2f} x at the fraction)"
    )
    if "targets_fraction_projection_check" in proj:
        print(
            f"  check of that projection at L={a.degree}: fraction x {scale:.1f} / measured full = "
            f"{proj['targets_fraction_projection_check']:.3f}"
        )
    if "evaluate_25600_wall_s_same_settings" in proj:
        print(
            f"  evaluation of 25,600 rows at K={a.samples}, S={a.sampler_steps}: "
            f"{proj['evaluate_25600_wall_s_same_settings'] / 60:.0f} min here (linear in rows; the stage "
            f"also fits the radius scales on 5,000 val rows, a fixed cost)"
        )
    fig["node"] = node_projection(a, fig, rows_train)
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=1, default=str))
    if a.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
