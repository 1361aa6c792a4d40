"""Stack process management without a server: PID files, stopping a process that ignores SIGTERM and
its children, never signalling a recycled pid, status and CLI errors."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from locdiff.stack import Stack

IGNORE_TERM = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    # a child in a session of its own, like the process worker's flow runs
    "code = 'import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'\n"
    "subprocess.Popen([sys.executable, '-c', code], start_new_session=True)\n"
    "time.sleep(600)\n"
)


def test_stop_kills_a_process_tree_that_ignores_sigterm(tmp_path):
    stack = Stack(root=tmp_path, port=1)
    pid = stack._spawn("worker", [sys.executable, "-c", IGNORE_TERM], stack.env())
    deadline = time.monotonic() + 30
    while not psutil.Process(pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(pid).children()[0]
    assert stack._pid("worker") == pid
    t0 = time.monotonic()
    assert stack.stop("worker", grace_s=1.0) is True
    assert time.monotonic() - t0 < 20
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE
    assert not stack.pid_file("worker").exists()
    assert stack.stop("worker") is False  # nothing left to stop


def test_a_recycled_pid_is_never_signalled(tmp_path):
    stack = Stack(root=tmp_path, port=1)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stack.state_dir.mkdir(parents=True)
        # a PID file naming a live process that is not the one we started (different start time)
        stack.pid_file("server").write_text(f"{other.pid} 12345.0\n")
        assert stack._pid("server") is None
        assert stack.stop("server", grace_s=0.5) is False
        assert other.poll() is None  # untouched
    finally:
        other.kill()
        other.wait()


def test_status_of_a_stopped_stack_and_cli_exit_code(tmp_path):
    import os

    port = 1  # nothing listens there
    st = Stack(root=tmp_path, port=port).status()
    assert not st.up and not st.components["server"].healthy and not st.components["worker"].running
    env = {**os.environ, "LOCDIFF_PROJECT_DIR": str(tmp_path), "LOCDIFF_PREFECT_PORT": str(port)}
    out = subprocess.run(
        [sys.executable, "-m", "locdiff.cli", "stack", "status"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1 and "server" in out.stdout and "stopped" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "locdiff.cli", "run", "demo/demo"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: the local stack is not running",
        "hint: start it with `locdiff stack up`",
    ]
