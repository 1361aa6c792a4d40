"""What the demo's orchestration costs in CPU, measured on a real local Prefect server.

- the server at rest: CPU seconds per second of the server's process tree while nothing calls it;
- the demo's status poll (``locdiff.stack.wait_flow_run`` asks the server for the flow run once a
  second): CPU per poll in the polling process and in the server, with a new HTTP client per call
  (``httpx.get``, what ``locdiff.stack`` did before) and with one kept client (what it does now).

Printed as milliseconds per poll, as the share of one core that polling once a second takes, and as
ratios between the two clients (same run).

- the flow run's own traffic, each kind in a flow run of its own (a process with the stack's
  environment, as the worker starts them): server CPU per task run, per log line sent to the API and per
  progress-artifact update, net of an empty flow run measured the same way (the reference).

Run: ``.venv/bin/python benchmarks/bench_orchestration.py [--polls 60] [--rest-s 30]``. The machine may
be shared: read the ratios, and compare the figures only within one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tree_cpu(pid: int) -> float:
    import psutil

    p = psutil.Process(pid)
    total = 0.0
    for q in [p, *p.children(recursive=True)]:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


FLOW = """
import sys
from prefect import flow, task, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

kind, n = sys.argv[1], int(sys.argv[2])

@task
def noop(i):
    return i

@flow
def bench():
    if kind == "tasks":
        for i in range(n):
            noop(i)
    elif kind == "logs":
        log = get_run_logger()
        for i in range(n):
            log.info("line %d", i)
    elif kind == "progress":
        aid = create_progress_artifact(progress=0.0, key="bench")
        for i in range(n):
            update_progress_artifact(aid, 100.0 * (i + 1) / n)

bench()
"""


def flow_traffic(s, pid: int, n: int) -> None:
    """Server CPU per task run / log line / progress update, net of an empty flow run."""
    import subprocess

    def server_cpu_of(kind: str, count: int) -> float:
        c0 = tree_cpu(pid)
        subprocess.run(
            [sys.executable, "-c", FLOW, kind, str(count)], env=s.env(), check=True, capture_output=True
        )
        time.sleep(3)  # logs and events are sent in batches: let the server finish them
        return tree_cpu(pid) - c0

    empty = min(server_cpu_of("none", 0) for _ in range(2))
    print(f"server CPU for an empty flow run: {1e3 * empty:.0f} ms (the reference)", flush=True)
    for kind in ("tasks", "logs", "progress"):
        net = server_cpu_of(kind, n) - empty
        print(
            f"  {kind:9s} {1e3 * net / n:6.2f} ms server CPU each ({n} in one flow run; "
            f"{net / max(empty, 1e-9):.2f}x the empty flow run)",
            flush=True,
        )


def main() -> None:
    import httpx

    from locdiff import stack as st

    ap = argparse.ArgumentParser()
    ap.add_argument("--polls", type=int, default=60)
    ap.add_argument("--rest-s", type=float, default=30.0)
    ap.add_argument("--items", type=int, default=50, help="task runs / log lines / updates per flow run")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="locdiff-bench-orch-") as tmp:
        s = st.Stack(root=tmp, home=Path(tmp) / ".prefect", port=st.free_port(None))
        t0 = time.perf_counter()
        s.start_server()
        print(f"server up in {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            pid = s._pid("server")
            time.sleep(5)  # let start-up settle
            c0, w0 = tree_cpu(pid), time.perf_counter()
            time.sleep(a.rest_s)
            rest = (tree_cpu(pid) - c0) / (time.perf_counter() - w0)
            print(f"server at rest: {100 * rest:.1f} % of a core", flush=True)
            url = f"{s.api_url}/flow_runs/filter"  # a real query, like the flow-run poll
            kept = httpx.Client(timeout=10)
            ways = {
                "new client per poll": lambda: httpx.post(url, json={"limit": 1}, timeout=10),
                "one kept client": lambda: kept.post(url, json={"limit": 1}),
            }
            res = {}
            for name, call in ways.items():
                call()
                c_srv, c_me, w = tree_cpu(pid), time.process_time(), time.perf_counter()
                for _ in range(a.polls):
                    call().raise_for_status()
                wall = time.perf_counter() - w
                me = (time.process_time() - c_me) / a.polls
                srv = max(0.0, (tree_cpu(pid) - c_srv - rest * wall)) / a.polls
                res[name] = (me, srv)
                print(
                    f"{name:22s} poller {1e3 * me:6.2f} ms CPU/poll, server {1e3 * srv:6.2f} ms CPU/poll; "
                    f"at 1 poll/s: {100 * (me + srv):.1f} % of a core",
                    flush=True,
                )
            flow_traffic(s, pid, a.items)
            (m0, s0), (m1, s1) = res.values()
            print(
                f"kept client / new client: poller {m1 / m0:.2f}x, "
                f"poller + server {(m1 + s1) / (m0 + s0):.2f}x"
            )
        finally:
            s.down()


if __name__ == "__main__":
    main()
