"""One Prefect subflow per stage: each calls its task and returns what it returns (a store key, or the
report summary). Flows chain these by keyword; the Prefect UI shows every stage as its own flow run."""

from __future__ import annotations

from prefect import flow

from locdiff.flows import tasks
from locdiff_core.config import LocDiffConfig


@flow(name="prepare-dataset", log_prints=True)
def prepare_flow(storage: str | None, dataset: str = "bluemarble", options: dict | None = None) -> str:
    """Download/validate/shard `dataset` (or build the embedded sample); returns the dataset key."""
    return tasks.prepare_task(storage, dataset, options or {})


@flow(name="embed", log_prints=True)
def embed_flow(
    storage: str | None, dataset_key: str, encoder: str = "efficientnet-lite0", options: dict | None = None
) -> str:
    """Image embeddings of every image of `dataset_key`; returns the embeddings key."""
    return tasks.embed_task(storage, dataset_key, encoder, options or {})


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
) -> str:
    """Returns the run key; a re-run after a crash resumes from the run's newest checkpoint."""
    t = tasks.train_task.with_options(refresh_cache=True) if refresh else tasks.train_task
    return t(storage, embeddings_key, config, targets_key, anchors, name, preset)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    storage: str | None,
    run_key: str,
    embeddings_key: str,
    split: str | None = "test",
    dataset: str | None = None,
    baselines: list[str] | None = None,
    retrieval_key: str | None = None,
) -> str:
    """Returns the eval key (predictions.parquet + metrics.parquet)."""
    return tasks.evaluate_task(storage, run_key, embeddings_key, split, dataset, baselines, retrieval_key)


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
