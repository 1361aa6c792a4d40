"""One Prefect subflow per stage, ``flow(storage, spec)``: each calls its stage's task with the spec
(``locdiff.stages``: one frozen dataclass of the stage's parameters) and returns what it returns (a store
key, or the report summary). The Prefect UI shows every stage as its own flow run.

A key is returned only while the store holds its artifact: when the Prefect result cache outlived it (a
store wiped, moved or pruned under a kept ``.prefect``), the task runs again with its cache refreshed."""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped

from locdiff.flows import tasks
from locdiff.stages import STAGE_DECLS, EmbedSpec, TrainSpec
from locdiff.storage import Store


def run_task(task, storage: str | None, spec, refresh: bool = False) -> Any:
    """``task(storage=..., spec=...)``, again with the cache refreshed when it returned (from the cache) a
    key whose artifact the store no longer holds."""
    out = (task.with_options(refresh_cache=True) if refresh else task)(storage=storage, spec=spec)
    if not refresh and isinstance(out, str) and not Store.from_uri(storage).exists(out):
        print(f"{out} is no longer in the store (the cached result outlived it): building it again")
        out = task.with_options(refresh_cache=True)(storage=storage, spec=spec)
    return out


def stage_flow(stage: str, name: str, task):
    """The subflow of a declared stage: ``flow(storage, spec)`` -> ``task(storage=..., spec=...)``."""
    spec_type = STAGE_DECLS[stage].spec

    def run(storage: str | None, spec) -> Any:
        return run_task(task, storage, spec)

    run.__annotations__ = {"storage": str | None, "spec": spec_type, "return": Any}
    run.__name__ = run.__qualname__ = f"{stage}_flow"
    run.__doc__ = f"The {stage} stage of a {spec_type.__name__}; returns its key (report: its summary)."
    return flow(run, name=name, log_prints=True)


prepare_flow = stage_flow("datasets", "prepare-dataset", tasks.prepare_task)
targets_flow = stage_flow("targets", "targets", tasks.targets_task)
anchors_flow = stage_flow("anchors", "anchors", tasks.anchors_task)
retrieval_flow = stage_flow("retrieval", "retrieval-index", tasks.retrieval_task)
evaluate_flow = stage_flow("eval", "evaluate", tasks.evaluate_task)
report_flow = stage_flow("reports", "report", tasks.report_task)


@flow(name="embed", log_prints=True)
def embed_flow(storage: str | None, spec: EmbedSpec, dask: str | None = None, dask_workers: int = 2) -> str:
    """Image embeddings of every image of `spec.dataset_key`; returns the embeddings key.

    dask: None embeds in this process; "local" fans the shards out over a Dask LocalCluster of
    `dask_workers` worker processes; "tcp://HOST:PORT" over an existing scheduler's workers. Each
    shard is one task that commits its own part; the artifact is committed when all are done.
    """
    if dask:
        _embed_shards_flow(storage, spec, dask, dask_workers)
    return run_task(tasks.embed_task, storage, spec)


def _embed_shards_flow(storage: str | None, spec: EmbedSpec, dask: str, workers: int) -> None:
    """Map the per-shard task over the shards still to do, on a DaskTaskRunner."""
    runner = dask_task_runner(dask, workers)

    @flow(name="embed-shards", task_runner=runner, log_prints=True)
    def embed_shards(storage: str | None, spec: EmbedSpec):
        todo = tasks.embed_todo_task(storage=storage, spec=spec)
        futures = tasks.embed_shard_task.map(storage=unmapped(storage), spec=unmapped(spec), shard=todo)
        return [f.result() for f in futures]

    embed_shards(storage, spec)


def dask_task_runner(dask: str, workers: int = 2):
    """A prefect-dask ``DaskTaskRunner``: a LocalCluster ("local") or an existing scheduler's address,
    checked first so that an unreachable one is a one-line error."""
    from prefect_dask import DaskTaskRunner

    from locdiff.errors import UserError

    if dask == "local":
        if workers < 1:
            raise UserError(f"dask_workers must be >= 1, got {workers}")
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": None,
            }
        )
    check_dask_address(dask)
    return DaskTaskRunner(address=dask)


def check_dask_address(address: str, timeout_s: float = 5.0) -> None:
    import socket
    from urllib.parse import urlparse

    from locdiff.errors import UserError

    u = urlparse(address)
    if u.scheme not in ("tcp", "tls") or not u.hostname or not u.port:
        raise UserError(f"not a Dask scheduler address: {address!r}", "use tcp://HOST:PORT, or 'local'")
    try:
        socket.create_connection((u.hostname, u.port), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach the Dask scheduler at {address}: {exc.strerror or exc}",
            "start it (dask scheduler / dask-cuda) or pass dask='local' for a local cluster",
        ) from None


@flow(name="train", log_prints=True)
def train_flow(storage: str | None, spec: TrainSpec, refresh: bool = False) -> str:
    """Returns the run key; a re-run after a crash resumes from the run's newest checkpoint. ``refresh``:
    bypass the Prefect cache (the store still reuses a committed run)."""
    return run_task(tasks.train_task, storage, spec, refresh)
