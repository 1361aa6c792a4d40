"""The Prefect tasks of locdiff, derived from the stage declarations (``locdiff.stages.STAGE_DECLS``).

Conventions (docs/design.md §2, §5):
- A stage's task is ``task(storage, spec)``: it builds the stage's artifact from its spec (a frozen
  dataclass of the stage's parameters) and returns the store key it produced; flows pass keys between
  tasks, never data. Runtime-only things (progress bar, logger, training chart) are added here.
- Cache policy: the task's inputs plus the stage's version (``locdiff.stages.VERSIONS``), so a re-run
  with the same inputs reuses finished stages (the Prefect UI shows them as Cached) and bumping a
  version invalidates exactly that stage. Underneath, the store is content-addressed too, so even with
  the Prefect cache bypassed (``refresh=True``) a finished artifact is found and not rebuilt.
- Retries with exponential backoff only on the stages declared ``io`` (downloads, object storage), and
  only for errors that a retry can get past (``locdiff.errors.retry_if_transient``: a ``UserError`` or
  a ValueError fails at once); compute tasks fail fast (training resumes from its last
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
from locdiff.stages import STAGE_DECLS, VERSIONS, EmbedSpec, TrainSpec
from locdiff.storage import Store

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


def stage_task(stage: str, fn, **options):
    """The Prefect task running ``fn`` for a declared stage: cached on its inputs + the stage's version,
    with the stage's timeout; an ``io`` stage's retried with backoff on transient errors. ``options``
    override (``task``'s keywords)."""
    decl = STAGE_DECLS[stage]
    policy: dict[str, Any] = dict(
        name=decl.task or stage,
        cache_policy=stage_cache(stage),
        persist_result=True,
        timeout_seconds=decl.timeout_s,
        log_prints=True,
    )
    if decl.io:
        policy.update(
            retries=IO_RETRIES,
            retry_delay_seconds=IO_RETRY_DELAYS,
            retry_jitter_factor=IO_RETRY_JITTER,
            retry_condition_fn=retry_if_transient,
        )
    return task(fn, **{**policy, **options})


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
def build(stage: str, storage: str | None, spec, **runtime):
    """Build ``stage``'s artifact of ``spec`` in ``storage`` (with a progress bar when the stage reports
    progress); returns what the stage returns (its key)."""
    decl = STAGE_DECLS[stage]
    if decl.progress:
        runtime["progress"] = bar = Progress(stage, f"{decl.task or stage}: {_label(spec)}")
    out = decl.build(Store.from_uri(storage), spec, **runtime)
    if decl.progress:
        bar.done()
    return out


def _label(spec) -> str:
    """What a progress bar names: the first of the spec's fields that says what is built."""
    for field in ("name", "preset", "dataset", "dataset_key", "embeddings_key"):
        if getattr(spec, field, None):
            return str(getattr(spec, field))
    return ""


def _stage_fn(stage: str):
    def run(storage: str | None, spec) -> Any:
        return build(stage, storage, spec)

    run.__name__ = run.__qualname__ = STAGE_DECLS[stage].task or stage
    run.__doc__ = f"Build the {stage} artifact of a {STAGE_DECLS[stage].spec.__name__}; returns its key."
    return run


def train(storage: str | None, spec: TrainSpec) -> str:
    """Train (or resume, or reuse) the run of ``spec``; returns the run key. ``spec.nproc`` > 1 (resolved
    by ``locdiff.ddp.resolve_nproc``) trains under torchrun with that many DDP processes."""
    from locdiff.ddp import launch_train, resolve_nproc
    from locdiff.flows.training_chart import TrainingChart

    chart = TrainingChart(spec.config.train.max_steps, spec.config.train.batch_size)
    nproc = resolve_nproc(spec.nproc, spec.config.train.device)
    if nproc > 1:
        return launch_train(storage, spec, nproc=nproc, log=_logger(), on_curves=chart)
    return build("runs", storage, spec, log=_logger(), on_curves=chart)


def embed_shards_todo(storage: str | None, spec: EmbedSpec) -> list:
    """The shard numbers of a dataset still to embed (for the Dask fan-out)."""
    from locdiff.stages.embeddings import shards_to_embed

    return shards_to_embed(Store.from_uri(storage), **spec.build_kwargs())


def embed_one_shard(storage: str | None, spec: EmbedSpec, shard: int) -> int:
    """Embed one shard and commit its part; returns its image count (runs on a Dask worker)."""
    from locdiff.stages.embeddings import embed_shard

    opts = {k: v for k, v in spec.build_kwargs().items() if k != "num_workers"}
    return embed_shard(Store.from_uri(storage), shard=shard, **opts)


def report(storage: str | None, spec) -> dict:
    """Write the report artifact and publish its table and markdown as Prefect artifacts."""
    out = build("reports", storage, spec)
    _publish(spec.title, out)
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


prepare_task = stage_task("datasets", _stage_fn("datasets"))
# embedding resumes at shard granularity, so a retry redoes little
embed_task = stage_task("embeddings", _stage_fn("embeddings"))
# the Dask fan-out: not cached by Prefect (the store's part markers say what is done); a retry, or
# Dask re-running the task of a lost worker, redoes one shard at most
embed_todo_task = task(embed_shards_todo, name="embed-plan", cache_policy=NO_CACHE)
embed_shard_task = stage_task(
    "embeddings",
    embed_one_shard,
    name="embed-shard",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_delay_seconds=[1, 5, 20],
    retry_jitter_factor=None,
    timeout_seconds=6 * 3600,
)
targets_task = stage_task("targets", _stage_fn("targets"))
anchors_task = stage_task("anchors", _stage_fn("anchors"))
retrieval_task = stage_task("retrieval", _stage_fn("retrieval"))
# No retries: a failed training attempt resumes from its last checkpoint on the next run.
train_task = stage_task("runs", train)
evaluate_task = stage_task("eval", _stage_fn("eval"))
# Not cached: cheap, and every run should publish its own table and markdown artifacts.
report_task = stage_task("reports", report, cache_policy=NO_CACHE, persist_result=False)
