"""What every locdiff task shares: the store, cache policies, retries, progress reporting.

Conventions (DESIGN §2, §5):
- A task does one thing and returns a store key (``<stage>/<name>/<hash16>``, content-addressed by the
  data layer); flows pass keys between tasks, never data.
- Cache policy: the task's inputs plus a stage version (``stage_cache``), so a re-run with the same
  inputs reuses finished stages (the Prefect UI shows them as Cached) and bumping a stage version
  invalidates exactly that stage. Underneath, the store is content-addressed too, so even with the
  Prefect cache bypassed (``refresh=True`` on the flows) a finished artifact is found and not rebuilt.
- Retries with exponential backoff only on tasks whose failures are transient I/O (downloads, object
  storage); compute tasks fail fast.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, CachePolicy
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from locdiff.storage import Store

# Bump a stage's version when its task wrapper changes what it produces (the data layer versions its
# own keys as well).
STAGE_VERSIONS = {
    "prepare": "1",
    "embed": "1",
    "targets": "1",
    "anchors": "1",
    "train": "1",
    "evaluate": "1",
    "report": "1",
}

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
    if stage not in STAGE_VERSIONS:
        raise ValueError(f"unknown stage {stage!r}; known: {sorted(STAGE_VERSIONS)}")
    return INPUTS + StageVersion(stage=stage, version=STAGE_VERSIONS[stage])


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
        timeout_seconds=timeout_seconds,
    )


def open_store(storage: str | None) -> Store:
    """The artifact store at `storage` (a URI; None = $LOCDIFF_STORAGE or the project's data/store)."""
    return Store.from_uri(storage)


def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


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
