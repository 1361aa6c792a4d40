"""The `locdiff` command line: one typer app; each area mounts its own sub-commands.

Errors that users can fix (bad input, missing files, nothing running) are printed as one line plus a
hint and exit with status 2; see `locdiff.errors.UserError`. Errors of the environment (access denied,
missing bucket, unreachable endpoint, read-only or full disk) are one line too, with status 1.
"""

from __future__ import annotations

import sys

import typer

from locdiff.commands import data, run, runs, serve, stack
from locdiff.errors import StoreAccessError, UserError, environment_error

app = typer.Typer(
    help="LocDiff: worldwide image geolocation by diffusion in a spherical-harmonics space.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print the locdiff version."""
    from locdiff import __version__

    print(__version__)


app.add_typer(data.datasets_app, name="datasets")
app.add_typer(stack.stack_app, name="stack")
app.add_typer(runs.runs_app, name="runs")
for _area in (data, run, serve):  # each area registers its top-level commands
    _area.register(app)


def _fail(exc: UserError, code: int) -> None:
    print(f"error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    try:
        app()
    except StoreAccessError as exc:  # the environment (credentials, endpoint, disk), not the input
        _fail(exc, 1)
    except UserError as exc:
        _fail(exc, 2)
    except Exception as exc:
        from locdiff_core.checkpoint import CheckpointError
        from locdiff_core.device import DeviceError

        if isinstance(exc, CheckpointError):  # a checkpoint that does not load: what is wrong, one line
            _fail(UserError(str(exc), "pass a checkpoint locdiff wrote for this config, or retrain"), 2)
        if isinstance(exc, DeviceError):  # a device that is not there: the allowed ones, one line
            _fail(UserError(str(exc)), 2)
        err = environment_error(exc)  # access denied, unreachable endpoint, EROFS, ENOSPC, ...
        if err is None:
            raise  # a bug: keep the traceback
        _fail(err, 1)


if __name__ == "__main__":
    main()
