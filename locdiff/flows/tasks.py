"""The Prefect tasks of locdiff: one thin wrapper per stage function, with its cache/retry/timeout policy.

Conventions (docs/design.md §2, §5):
- A task calls one function of ``locdiff.stages`` and returns the store key it produced; flows pass keys
  between tasks, never data. Parameters come in the same order as the stage function's, storage first.
- Cache policy: the task's inputs plus the stage's version (``locdiff.stages.VERSIONS``), so a re-run
  with the same inputs reuses finished stages (the Prefect UI shows them as Cached) and bumping a
  version invalidates exactly that stage. Underneath, the store is content-addressed too, so even with
  the Prefect cache bypassed (``refresh=True``) a finished artifact is found and not rebuilt.
- Retries with exponential backoff only on tasks whose failures are transient I/O (downloads, object
  storage), and only for errors that a retry can get past (``locdiff.errors.retry_if_transient``: a
  ``UserError`` or a ValueError fails at once); compute tasks fail fast (training resumes from its last
  checkpoint on the next run).
- Progress of long stages goes to the Prefect UI (progress artifacts) and the terminal.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from locdiff.errors import retry_if_transient
from locdiff.stages import VERSIONS
from locdiff.storage import Store
from locdiff_core.config import LocDiffConfig

# Exponential backoff for I/O tasks: 10 s, 20 s, 40 s (+-50% jitter).
IO_RETRIES = 3
IO_RETRY_DELAYS = exponential_backoff(backoff_factor=10)
IO_RETRY_JITTER = 0.5


@dataclass
class StageVersion(CachePolicy):
    """A cache-key component naming the stage and its version (combine with INPUTS)."""

    stage: str = ""
    version: str = ""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw: Any
    ) -> str | None:
        return hashlib.sha256(f"locdiff:{self.stage}:{self.version}".encode()).hexdigest()


def stage_cache(stage: str) -> CachePolicy:
    """INPUTS + the stage's version: equal inputs reuse the finished result."""
    if stage not in VERSIONS:
        raise ValueError(f"unknown stage {stage!r}; known: {sorted(VERSIONS)}")
    return INPUTS + StageVersion(stage=stage, version=VERSIONS[stage])


def io_task(fn, stage: str, timeout_seconds: float, name: str | None = None):
    """A Prefect task for an I/O-bound stage: cached on its inputs + stage version, retried with backoff."""
    return task(
        fn,
        name=name or stage,
        cache_policy=stage_cache(stage),
        persist_result=True,
        retries=IO_RETRIES,
        retry_delay_seconds=IO_RETRY_DELAYS,
        retry_jitter_factor=IO_RETRY_JITTER,
        retry_condition_fn=retry_if_transient,
        timeout_seconds=timeout_seconds,
    )


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run (plain .fn() calls): a standard logger
        return logging.getLogger("locdiff")


class Progress:
    """Progress of a long stage, in the Prefect UI (a progress artifact) and on the terminal.

    Call it as ``progress(done, total)``; artifact updates are throttled to one per `every_s` seconds.
    Outside a flow run (plain `.fn()` calls) only the terminal bar is drawn.
    """

    def __init__(self, stage: str, description: str = "", every_s: float = 2.0, stream=None) -> None:
        self.stage = stage
        self.description = description or stage
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stderr
        self._artifact_id = None
        self._last = 0.0
        self._last_pct = -1.0
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import get_run_context

            get_run_context()
            self._artifact_id = create_progress_artifact(
                progress=0.0, key=f"progress-{stage}", description=self.description
            )
        except Exception:  # noqa: BLE001 - no run context / no API: terminal only
            self._artifact_id = None

    def __call__(self, done: float, total: float) -> None:
        pct = 100.0 * float(done) / float(total) if total else 100.0
        pct = max(0.0, min(100.0, pct))
        now = time.monotonic()
        if pct < 100.0 and now - self._last < self.every_s:
            return
        self._last = now
        if self._artifact_id is not None and pct != self._last_pct:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self._artifact_id, pct)
            except Exception:  # noqa: BLE001 - progress is best effort
                pass
        self._last_pct = pct
        width = 30
        fill = int(width * pct / 100)
        end = "\n" if pct >= 100.0 else "\r"
        try:
            self.stream.write(f"{self.description}: [{'#' * fill}{'.' * (width - fill)}] {pct:5.1f}%{end}")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def done(self) -> None:
        self(1, 1)


# --------------------------------------------------------------------------------------------- the tasks
def prepare(storage: str | None, dataset: str, options: dict | None = None) -> str:
    """Prepare (or reuse) a dataset; returns its key."""
    from locdiff.stages.datasets import prepare_dataset

    bar = Progress("prepare", f"preparing {dataset}")
    key = prepare_dataset(Store.from_uri(storage), dataset, options, progress=bar)
    bar.done()
    return key


def embed(storage: str | None, dataset_key: str, encoder: str, options: dict | None = None) -> str:
    """Embed every image of a dataset artifact with an encoder of the registry; returns the key."""
    from locdiff.encoders import encoder_kwargs
    from locdiff.stages.embeddings import embed_dataset
    from locdiff.storage import Key

    bar = Progress("embed", f"embedding {Key.parse(dataset_key).name} with {encoder}")
    key = embed_dataset(
        Store.from_uri(storage), dataset_key, progress=bar, **encoder_kwargs(encoder), **dict(options or {})
    )
    bar.done()
    return key


def embed_shards_todo(
    storage: str | None, dataset_key: str, encoder: str, options: dict | None = None
) -> list:
    """The shard numbers of a dataset still to embed (for the Dask fan-out)."""
    from locdiff.encoders import encoder_kwargs
    from locdiff.stages.embeddings import shards_to_embed

    return shards_to_embed(
        Store.from_uri(storage), dataset_key, **encoder_kwargs(encoder), **dict(options or {})
    )


def embed_one_shard(
    storage: str | None, dataset_key: str, shard: int, encoder: str, options: dict | None = None
) -> int:
    """Embed one shard and commit its part; returns its image count (runs on a Dask worker)."""
    from locdiff.encoders import encoder_kwargs
    from locdiff.stages.embeddings import embed_shard

    opts = {k: v for k, v in dict(options or {}).items() if k != "num_workers"}
    return embed_shard(Store.from_uri(storage), dataset_key, shard, **encoder_kwargs(encoder), **opts)


def targets(storage: str | None, embeddings_key: str, max_degree: int) -> str:
    """The SHDD target cache of degree L for an embeddings artifact; returns the key."""
    from locdiff.stages.targets import build_targets

    return build_targets(Store.from_uri(storage), embeddings_key, max_degree)


def anchors(
    storage: str | None, kind: str = "uniform", n: int = 10_000, source_key: str | None = None
) -> str:
    """An anchor-set artifact (uniform / a dataset's or embeddings' coordinates / land); returns the key."""
    from locdiff.stages.anchors import build_anchor_set

    return build_anchor_set(Store.from_uri(storage), kind, n, dataset_key=source_key)


def retrieval(storage: str | None, embeddings_key: str, split: str = "train") -> str:
    """The retrieval index (gallery) of one split of an embeddings artifact; returns the key."""
    from locdiff.stages.retrieval import build_index

    return build_index(Store.from_uri(storage), embeddings_key, split)


def train(
    storage: str | None,
    embeddings_key: str,
    config: LocDiffConfig,
    targets_key: str | None = None,
    anchors: dict[str, str] | None = None,
    name: str | None = None,
    preset: str | None = None,
    stop_after_steps: int | None = None,
    nproc: int | None = None,
) -> str:
    """Train (or resume, or reuse) a run; returns the run key.

    ``nproc`` > 1 (default: ``$LOCDIFF_NPROC``, the work pools' job variable, else every visible GPU,
    1 on the CPU) runs it under torchrun with that many DDP processes (``locdiff.ddp``)."""
    from locdiff.ddp import launch_train, resolve_nproc
    from locdiff.flows.training_chart import TrainingChart
    from locdiff.stages.runs import train_run

    chart = TrainingChart(config.train.max_steps, config.train.batch_size)
    nproc = resolve_nproc(nproc, config.train.device)
    if nproc > 1:
        return launch_train(
            storage,
            embeddings_key,
            config,
            nproc=nproc,
            targets_key=targets_key,
            anchors=anchors,
            name=name,
            preset=preset,
            stop_after_steps=stop_after_steps,
            log=_logger(),
            on_curves=chart,
        )
    bar = Progress("train", f"training {name or preset or ''}".strip())
    key = train_run(
        Store.from_uri(storage),
        embeddings_key,
        config,
        targets_key=targets_key,
        anchors=anchors,
        name=name,
        preset=preset,
        stop_after_steps=stop_after_steps,
        progress=bar,
        log=_logger(),
        on_curves=chart,
    )
    bar.done()
    return key


def evaluate(
    storage: str | None,
    run_key: str,
    embeddings_key: str,
    split: str | None = "test",
    dataset: str | None = None,
    baselines: list[str] | None = None,
    retrieval_key: str | None = None,
    device: str | None = None,
) -> str:
    """Evaluate a committed run on one split of an embeddings artifact; returns the eval key (the
    predictor on ``device``: None/auto = CUDA when available)."""
    from locdiff.stages.evals import BASELINES, evaluate_run

    bar = Progress("evaluate", f"evaluating on {dataset or embeddings_key}/{split or 'all'}")
    key = evaluate_run(
        Store.from_uri(storage),
        run_key,
        embeddings_key,
        split=split,
        dataset=dataset,
        baselines=list(BASELINES if baselines is None else baselines),
        progress=bar,
        retrieval_key=retrieval_key,
        device=device,
    )
    bar.done()
    return key


def report(
    storage: str | None,
    eval_keys: list[str],
    title: str = "LocDiff evaluation",
    notes: list[str] | None = None,
) -> dict:
    """Write the report artifact and publish its table and markdown as Prefect artifacts."""
    from locdiff.stages.reports import build_report

    out = build_report(Store.from_uri(storage), eval_keys, title=title, notes=notes)
    _publish(title, out)
    return out


def _publish(title: str, out: dict) -> None:
    from locdiff import report as rp
    from locdiff.stages.reports import slug

    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:  # noqa: BLE001 - outside a run: nothing to publish to
        return
    base = slug(title) or "report"
    create_table_artifact(
        table=[
            {k: r.get(k) for k in ("dataset", "method", "source", *rp.ACC_KEYS, "median_km", "geoscore", "n")}
            for r in out["rows"]
        ],
        key=f"{base}-metrics",
        description=(
            f"{title}: accuracy (%) at 1/25/200/750/2500 km, median km and GeoScore of LocDiff, "
            "LocDiff-H, retrieval 1-NN and most-common-region, beside published figures"
        ),
    )
    create_markdown_artifact(
        markdown=out["ui_markdown"], key=f"{base}-report", description=f"{title} ({out['report']})"
    )


prepare_task = io_task(prepare, "datasets", timeout_seconds=48 * 3600, name="prepare-dataset")
# embedding resumes at shard granularity, so a retry redoes little
embed_task = io_task(embed, "embeddings", timeout_seconds=48 * 3600, name="embed")
# the Dask fan-out: not cached by Prefect (the store's part markers say what is done); a retry, or
# Dask re-running the task of a lost worker, redoes one shard at most
embed_todo_task = task(embed_shards_todo, name="embed-plan", cache_policy=NO_CACHE)
embed_shard_task = task(
    embed_one_shard,
    name="embed-shard",
    cache_policy=NO_CACHE,
    retries=IO_RETRIES,
    retry_delay_seconds=[1, 5, 20],
    retry_condition_fn=retry_if_transient,
    timeout_seconds=6 * 3600,
)
targets_task = io_task(targets, "targets", timeout_seconds=12 * 3600)
anchors_task = io_task(anchors, "anchors", timeout_seconds=3600)
retrieval_task = io_task(retrieval, "retrieval", timeout_seconds=6 * 3600)
# No retries: a failed training attempt resumes from its last checkpoint on the next run.
train_task = task(train, name="train", cache_policy=stage_cache("runs"), persist_result=True, log_prints=True)
evaluate_task = task(
    evaluate, name="evaluate", cache_policy=stage_cache("eval"), persist_result=True, timeout_seconds=6 * 3600
)
# Not cached: cheap, and every run should publish its own table and markdown artifacts.
report_task = task(report, name="report", cache_policy=NO_CACHE)
