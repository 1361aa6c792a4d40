"""Multi-process training under torchrun (``torch.distributed.run``) with DDP.

:func:`launch_train` is what the train task calls for ``TrainSpec.nproc`` N > 1: it writes the run's
spec (``TrainSpec.to_dict()``) to a temporary folder and runs ::

    python -m torch.distributed.run --standalone --nproc-per-node N -m locdiff.ddp SPEC.json

Each of the N processes (:func:`main`) joins the process group (``nccl`` when training on CUDA, one
device per local rank; ``gloo`` on CPU) and calls the ordinary stage function
``locdiff.stages.runs.train_run``: every rank memory-maps the training rows and reads its slice of
each global batch, DDP averages the gradients, and rank 0 alone resumes (its checkpoint is broadcast),
writes checkpoints, curves and the run artifact, and commits it. The run key does not depend on N, so
a run started with one N resumes with another.

When a rank dies, torchrun stops the others and exits non-zero; :func:`launch_train` turns that into
one line naming the rank and how it ended. Checkpoints committed before the failure stay in the store,
so running the same command again resumes from the last one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from locdiff.errors import UserError


def _cuda_training(device: str = "auto") -> bool:
    from locdiff_core.device import resolve_device

    return resolve_device(device, "train.device").type == "cuda"


def max_nproc(device: str = "auto") -> int:
    """Processes one machine allows: its GPUs when training on CUDA, else its CPU cores."""
    import torch

    if _cuda_training(device):
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def resolve_nproc(nproc: int | None, device: str = "auto") -> int:
    """``nproc`` (None: auto, every visible GPU when training on CUDA, 1 on the CPU), checked against
    :func:`max_nproc`."""
    nproc = int(nproc) if nproc is not None else max_nproc(device) if _cuda_training(device) else 1
    limit = max_nproc(device)
    what = "GPUs" if _cuda_training(device) else "CPU cores"
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if nproc > limit:
        raise UserError(
            f"--nproc {nproc} is more than this machine allows ({limit} {what})",
            f"use --nproc {limit} or fewer",
        )
    return nproc


def torchrun_command(nproc: int, spec_path: str) -> list[str]:
    """The command each training job runs for ``nproc`` > 1 processes on one node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={int(nproc)}",
        "-m",
        "locdiff.ddp",
        spec_path,
    ]


# one failure in torchrun's summary: "rank : 1 (local_rank: 1)" then "exitcode : -9 (pid: …)"
_FAIL_RE = re.compile(r"^\s*rank\s*:\s*(\d+).*\n\s*exitcode\s*:\s*(-?\d+)", re.M)


# how the other ranks die of one rank's failure: gloo aborts on a lost peer, torchrun terminates the rest
_COLLATERAL = {"SIGABRT", "SIGTERM"}


def _how(code: int) -> str:
    import signal

    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _failure(tail: str, returncode: int, errors_dir: Path) -> str:
    """One line: which rank failed and how (a rank's own error message when it left one).

    Which rank torchrun lists as the "first observed" failure is a race when one rank's death makes
    the others abort, so a failure that is not collateral (SIGABRT, SIGTERM) is named first."""
    for f in sorted(errors_dir.glob("rank-*.txt")):
        msg = f.read_text().strip()
        if msg:
            return f"rank {f.stem.split('-')[1]} failed: {msg}"
    summary = tail[tail.find("Failures:") :] if "Failures:" in tail else tail
    root = summary.rsplit("Root Cause", 1)[-1]  # torchrun's own pick
    failures = [(int(r), int(c)) for r, c in _FAIL_RE.findall(root) + _FAIL_RE.findall(summary)]
    cause = [(r, c) for r, c in failures if _how(c).split()[-1] not in _COLLATERAL] or failures
    if cause:
        rank, code = cause[0]
        return f"rank {rank} {_how(code)}"
    return f"torchrun exited with status {returncode}"


def launch_train(
    storage: str | None,
    spec,
    *,
    nproc: int,
    env: dict[str, str] | None = None,
    log: logging.Logger | None = None,
    on_curves=None,
) -> str:
    """Train the run of ``spec`` (a ``TrainSpec``) with ``nproc`` processes under torchrun; returns the run
    key (see module doc). ``on_curves(key, curves)``: called with the curves so far whenever rank 0
    refreshed them."""
    from locdiff.stages import spec_kwargs
    from locdiff.stages.runs import LiveWatcher, run_key
    from locdiff.storage import Store

    log = log or logging.getLogger("locdiff.ddp")
    device = spec.config.train.device
    nproc = resolve_nproc(nproc, device)
    store = Store.from_uri(storage)
    inputs = spec_kwargs(spec, "embeddings_key", "config", "stop_after_steps")
    watcher = (
        LiveWatcher(store, run_key(store, spec.embeddings_key, spec.config, **inputs), on_curves)
        if on_curves
        else None
    )
    with tempfile.TemporaryDirectory(prefix="locdiff-ddp-") as tmp:
        out, errors = os.path.join(tmp, "run_key.txt"), os.path.join(tmp, "errors")
        os.makedirs(errors)
        spec_path = os.path.join(tmp, "spec.json")
        # every rank opens the same store and trains the same spec
        job = {"storage": store.url, "spec": spec.to_dict(), "out": out, "errors": errors}
        Path(spec_path).write_text(json.dumps(job))
        cmd = torchrun_command(nproc, spec_path)
        child_env = {**os.environ, **(env or {})}
        if not _cuda_training(device):
            child_env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: keep gloo on loopback
        child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        log.info("launching %d training processes: %s", nproc, " ".join(cmd[1:]))
        tail: deque[str] = deque(maxlen=400)
        with subprocess.Popen(
            cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            for line in proc.stdout:
                tail.append(line)
                sys.stdout.write(line)
                if watcher is not None:
                    watcher.poll()
            proc.wait()
        if watcher is not None:  # the last refresh of a run that stopped (a committed run's is gone)
            watcher.poll(force=True)
        if proc.returncode != 0:
            why = _failure("".join(tail), proc.returncode, Path(errors))
            raise UserError(
                f"distributed training failed: {why}",
                "checkpoints committed before the failure are kept: run the same command again to resume",
            )
        return Path(out).read_text().strip()


def main(argv: list[str] | None = None) -> int:
    """One rank (started by torchrun): join the group, run ``train_run``, rank 0 reports the key."""
    import datetime

    import torch
    import torch.distributed as dist

    from locdiff.stages import TrainSpec, spec_kwargs
    from locdiff.stages.runs import train_run
    from locdiff.storage import Store

    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    spec = TrainSpec(**job["spec"])
    rank = int(os.environ["RANK"])
    cuda = _cuda_training(spec.config.train.device)
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(message)s"
    )
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    try:
        key = train_run(Store.from_uri(job["storage"]), **spec_kwargs(spec))
        if rank == 0:
            Path(job["out"]).write_text(key)
    except UserError as exc:
        Path(job["errors"], f"rank-{rank}.txt").write_text(exc.message)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
