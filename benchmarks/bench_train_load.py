"""Training on a busy machine: how much slower the demo's training loop runs while other processes
compete for the cores, per OpenMP/torch thread setting, against the same loop on the machine as it is.

Each measurement is a fresh subprocess running the real ``locdiff_core.train.train`` loop of the demo's
``cpu`` preset (synthetic embeddings) for ``--steps`` steps, with one setting:

- ``default``: torch's default (one thread per core; libgomp spins while waiting at a barrier);
- ``passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once);
- ``1-thread``: ``torch.set_num_threads(1)``;
- ``locdiff``: what locdiff's processes do (``import locdiff`` before torch sets ``OMP_WAIT_POLICY``).

The load is ``--hogs`` busy-looping processes (load average ≈ hogs + our threads). Printed per setting:
wall seconds and CPU seconds of the loop idle and loaded, the loaded/idle wall ratio, and the "fair"
ratio a process would get from an even split of the cores between every runnable thread
(min(threads, cores)·(threads + hogs)/(cores·threads), at least 1; other users of the machine not
counted), and the
CPU seconds per step (spinning shows as CPU time that buys no progress).

Run: ``.venv/bin/python benchmarks/bench_train_load.py [--steps 40] [--hogs 6] [--repeats 2]``.
The machine this ran on may be shared: compare ratios from one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> (environment, torch threads, import locdiff before torch)
    "default": ({}, None, False),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None, False),
    "1-thread": ({}, 1, False),
    "locdiff": ({}, None, True),
}


def child(steps: int, threads: int | None, import_locdiff: bool) -> None:
    sys.path.insert(0, str(ROOT))
    import resource

    if import_locdiff:
        import locdiff  # noqa: F401

    import torch

    from benchmarks.bench_train import bench_setup
    from locdiff_core.train import train

    if threads:
        torch.set_num_threads(threads)
    cfg, data, _ = bench_setup("cpu", steps, 4096)
    train(cfg, data, max_steps=2)  # warm-up
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    train(cfg, data)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads()}))


def measure(name: str, steps: int, timeout_s: float) -> dict:
    env_extra, threads, import_locdiff = SETTINGS[name]
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps)]
    if threads:
        cmd += ["--threads", str(threads)]
    if import_locdiff:
        cmd += ["--import-locdiff"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    try:
        out = subprocess.run(
            cmd, env={**env, **env_extra}, capture_output=True, text=True, check=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:  # the wall time is at least the timeout; CPU time unknown
        return {
            "wall_s": float(timeout_s),
            "cpu_s": float("nan"),
            "threads": threads or os.cpu_count() or 1,
            "timed_out": True,
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hog(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--hogs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement (then: >= it)")
    ap.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated, from: " + ", ".join(SETTINGS)
    )
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--import-locdiff", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.steps, a.threads, a.import_locdiff)
        return
    names = a.settings.split(",")
    print(
        f"cores {os.cpu_count()}, load average before {os.getloadavg()[0]:.1f}; {a.steps} steps, "
        f"{a.hogs} hogs, best of {a.repeats}",
        flush=True,
    )
    res: dict = {}
    for loaded in (False, True) if a.hogs else (False,):
        stop = mp.Event()
        hogs = [mp.Process(target=_hog, args=(stop,), daemon=True) for _ in range(a.hogs if loaded else 0)]
        for h in hogs:
            h.start()
        try:
            for _ in range(a.repeats):  # settings interleaved, so drifts in the machine's load hit all
                for name in names:
                    m = measure(name, a.steps, a.timeout)
                    best = res.get((name, loaded))
                    if best is None or m["wall_s"] < best["wall_s"]:
                        res[(name, loaded)] = m
                    print(
                        f"  {'+ hogs' if loaded else 'as is '} {name:9s} {'>=' if m.get('timed_out') else ''}"
                        f"{m['wall_s']:6.2f} s wall "
                        f"{m['cpu_s']:6.2f} s CPU",
                        flush=True,
                    )
        finally:
            stop.set()
            for h in hogs:
                h.join()
    ref = res[(names[0], False)]["wall_s"]
    print(
        f"\n{'setting':10s} {'as is s':>7s} {'+hogs s':>9s} {'hogs/as is':>11s} {'fair':>5s} "
        f"{'vs ' + names[0] + ' as is':>15s} {'CPU s/step':>10s} {'+hogs':>7s}"
    )
    for name in names:
        i = res[(name, False)]
        l = res.get((name, True), i)  # without hogs: the machine as it is, twice
        t = i["threads"]
        c = os.cpu_count() or 1  # alone: min(t, c) cores; loaded: an even share c·t/(t + hogs) of them
        fair = max(1.0, min(t, c) * (t + a.hogs) / (c * t))
        print(
            f"{name:10s} {i['wall_s']:7.2f} {l['wall_s']:9.2f} {l['wall_s'] / i['wall_s']:11.2f} "
            f"{fair:5.1f} {l['wall_s'] / ref:15.2f} {i['cpu_s'] / a.steps:10.3f} {l['cpu_s'] / a.steps:7.3f}"
        )


if __name__ == "__main__":
    main()
