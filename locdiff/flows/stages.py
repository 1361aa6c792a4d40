"""One Prefect subflow per stage: each calls its task and returns what it returns (a store key, or the
report summary). Flows chain these by keyword; the Prefect UI shows every stage as its own flow run."""

from __future__ import annotations

from prefect import flow, unmapped

from locdiff.flows import tasks
from locdiff_core.config import LocDiffConfig


@flow(name="prepare-dataset", log_prints=True)
def prepare_flow(storage: str | None, dataset: str = "bluemarble", options: dict | None = None) -> str:
    """Download/validate/shard `dataset` (or build the embedded sample); returns the dataset key."""
    return tasks.prepare_task(storage, dataset, options or {})


@flow(name="embed", log_prints=True)
def embed_flow(
    storage: str | None,
    dataset_key: str,
    encoder: str = "efficientnet-lite0",
    options: dict | None = None,
    dask: str | None = None,
    dask_workers: int = 2,
) -> str:
    """Image embeddings of every image of `dataset_key`; returns the embeddings key.

    dask: None embeds in this process; "local" fans the shards out over a Dask LocalCluster of
    `dask_workers` worker processes; "tcp://HOST:PORT" over an existing scheduler's workers. Each
    shard is one task that commits its own part; the artifact is committed when all are done.
    """
    if dask:
        _embed_shards_flow(storage, dataset_key, encoder, options or {}, dask, dask_workers)
    return tasks.embed_task(storage, dataset_key, encoder, options or {})


def _embed_shards_flow(
    storage: str | None, dataset_key: str, encoder: str, options: dict, dask: str, workers: int
) -> None:
    """Map the per-shard task over the shards still to do, on a DaskTaskRunner."""
    runner = dask_task_runner(dask, workers)

    @flow(name="embed-shards", task_runner=runner, log_prints=True)
    def embed_shards(storage, dataset_key, encoder, options):
        todo = tasks.embed_todo_task(storage, dataset_key, encoder, options)
        futures = tasks.embed_shard_task.map(storage, dataset_key, todo, encoder, unmapped(options))
        return [f.result() for f in futures]

    embed_shards(storage, dataset_key, encoder, options)


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


@flow(name="targets", log_prints=True)
def targets_flow(storage: str | None, embeddings_key: str, max_degree: int = 16) -> str:
    """The SHDD target cache of an embeddings artifact; returns its key."""
    return tasks.targets_task(storage, embeddings_key, max_degree)


@flow(name="anchors", log_prints=True)
def anchors_flow(
    storage: str | None, kind: str = "uniform", n: int = 10_000, source_key: str | None = None
) -> str:
    """An anchor set (uniform lattice, a dataset's training coordinates, or land-only); returns its key."""
    return tasks.anchors_task(storage, kind, n, source_key)


@flow(name="train", log_prints=True)
def train_flow(
    storage: str | None,
    embeddings_key: str,
    config: LocDiffConfig,
    targets_key: str | None = None,
    anchors: dict[str, str] | None = None,
    name: str | None = None,
    preset: str | None = None,
    refresh: bool = False,
    nproc: int | None = None,
) -> str:
    """Returns the run key; a re-run after a crash resumes from the run's newest checkpoint.

    nproc: DDP processes under torchrun (default: $LOCDIFF_NPROC, the GPU pools' job variable, else every
    visible GPU, 1 on the CPU)."""
    t = tasks.train_task.with_options(refresh_cache=True) if refresh else tasks.train_task
    return t(storage, embeddings_key, config, targets_key, anchors, name, preset, nproc=nproc)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    storage: str | None,
    run_key: str,
    embeddings_key: str,
    split: str | None = "test",
    dataset: str | None = None,
    baselines: list[str] | None = None,
    retrieval_key: str | None = None,
    device: str | None = None,
) -> str:
    """Returns the eval key (predictions.parquet + metrics.parquet)."""
    return tasks.evaluate_task(
        storage, run_key, embeddings_key, split, dataset, baselines, retrieval_key, device
    )


@flow(name="retrieval-index", log_prints=True)
def retrieval_flow(storage: str | None, embeddings_key: str, split: str = "train") -> str:
    """The retrieval index (gallery: normalised embeddings + coordinates) of a split; returns its key."""
    return tasks.retrieval_task(storage, embeddings_key, split)


@flow(name="report", log_prints=True)
def report_flow(
    storage: str | None,
    eval_keys: list[str],
    title: str = "LocDiff evaluation",
    notes: list[str] | None = None,
) -> dict:
    """Publishes a table artifact and a markdown artifact; returns {key, rows, report, images, text_table}."""
    return tasks.report_task(storage, eval_keys, title, notes or [])
