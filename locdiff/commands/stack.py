"""`locdiff stack up|down|status`: the local Prefect server, process worker and optional S3 server."""

from __future__ import annotations

import typer

stack_app = typer.Typer(
    help="Start, stop and inspect the local stack (Prefect server on 127.0.0.1, process worker, S3).",
    no_args_is_help=True,
)


@stack_app.command("up")
def up(
    port: int = typer.Option(None, help="Server port (default: $LOCDIFF_PREFECT_PORT, last used, or 4200)."),
    s3: bool = typer.Option(False, "--s3", help="Also start a seaweedfs S3-compatible server."),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Start a process worker."),
) -> None:
    """Start the Prefect server (project-local PREFECT_HOME) and a process worker; idempotent."""
    from locdiff.stack import Stack

    st = Stack(port=port).up(worker=worker, s3=s3)
    for line in st.lines():
        print(line)
    print(f"export PREFECT_API_URL={st.api_url}   # for prefect CLI commands in this shell")


@stack_app.command("down")
def down(
    grace: float = typer.Option(10.0, help="Seconds to wait after SIGTERM before SIGKILL."),
) -> None:
    """Stop everything `stack up` started (SIGTERM to each process group, then SIGKILL)."""
    from locdiff.stack import Stack

    stopped = Stack().down(grace_s=grace)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@stack_app.command("status")
def status() -> None:
    """Show what runs, where, and whether it is healthy. Exit status 1 when the stack is not up."""
    from locdiff.stack import Stack

    st = Stack().status()
    for line in st.lines():
        print(line)
    if not st.up:
        raise typer.Exit(1)


@stack_app.command("env")
def env() -> None:
    """Print shell exports that point the prefect CLI at the local stack (eval "$(locdiff stack env)")."""
    from locdiff.stack import Stack

    s = Stack()
    e = s.env({})
    for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        print(f"export {k}={e[k]}")
