"""The pipeline's stages: one module per artifact kind, no Prefect (that lives in ``locdiff.flows``).

Each module owns its artifact's key, build and load:

| stage (store prefix) | module        | artifact                                                      |
|----------------------|---------------|---------------------------------------------------------------|
| ``datasets``         | datasets.py   | manifest + tar shards (built by ``locdiff.datasets``)         |
| ``embeddings``       | embeddings.py | per-shard parts: image_id, embedding, lat, lon, split         |
| ``targets``          | targets.py    | SHDD codes per embedding part, same rows                      |
| ``anchors``          | anchors.py    | anchor coordinates (uniform / data / land)                    |
| ``runs``             | runs.py       | checkpoints, curves                                           |
| ``retrieval``        | retrieval.py  | gallery index: normalised train embeddings + coordinates      |
| ``eval``             | evals.py      | predictions, metrics                                          |
| ``reports``          | reports.py    | report.md, figures, metrics.json                              |
| ``aliases``          | aliases.py    | one model-name change (tag/untag of a run)                    |

Each stage is declared once, as a :class:`Stage` in ``STAGE_DECLS``: its name (store prefix), version,
a frozen spec dataclass of its parameters, its build function and its run policy (I/O retries,
timeout). The version table ``VERSIONS``, the Prefect tasks and subflows (``locdiff.flows``) and the
torchrun launch spec (``locdiff.ddp``) derive from it: adding a parameter to a stage means adding a
field to its spec and a keyword to its build function, nothing else. Runtime-only things (a progress
callback, a logger, a chart callback) are keywords of ``Stage.build``, never spec fields.

Bump a stage's version when what it writes changes: its keys (and every key downstream, through
``upstream``) change with it. :func:`get_or_build` is the one "key → committed? → lease → writer →
commit" path every stage uses.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

from locdiff.storage import ArtifactWriter, Lease, Store
from locdiff_core.config import LocDiffConfig

# ------------------------------------------------------------------------------------------ the specs
LAUNCH = {"launch": True}  # field metadata: how to run the stage, not what it builds (not a build keyword)


def spec_kwargs(spec, *skip: str) -> dict:
    """A spec's fields as the build function's keywords (shallow: a config stays a ``LocDiffConfig``),
    less the launch fields and ``skip``."""
    fields = [f for f in dataclasses.fields(spec) if f.name not in skip and not f.metadata.get("launch")]
    return {f.name: getattr(spec, f.name) for f in fields}


@dataclass(frozen=True)
class DatasetSpec:
    dataset: str = "bluemarble"
    options: dict | None = None


@dataclass(frozen=True)
class EmbedSpec:
    dataset_key: str
    encoder: str = "efficientnet-lite0"  # a registry name, open_clip MODEL/PRETRAINED, or NAME@CHECKPOINT
    options: dict | None = None  # embed_dataset's keywords (batch_size, num_workers, device, image_size)

    def build_kwargs(self) -> dict:
        """The keywords of ``embed_dataset``/``shards_to_embed``: the encoder's, then the options."""
        from locdiff.encoders import encoder_kwargs

        return {"dataset_key": self.dataset_key, **encoder_kwargs(self.encoder), **dict(self.options or {})}


@dataclass(frozen=True)
class TargetsSpec:
    embeddings_key: str
    max_degree: int = 16


@dataclass(frozen=True)
class AnchorsSpec:
    kind: str = "uniform"
    n: int = 10_000
    dataset_key: str | None = None  # kind "data": the dataset or embeddings artifact drawn from


@dataclass(frozen=True)
class RetrievalSpec:
    embeddings_key: str
    split: str = "train"


@dataclass(frozen=True)
class TrainSpec:
    embeddings_key: str
    config: LocDiffConfig
    targets_key: str | None = None
    anchors: dict[str, str] | None = None
    name: str | None = None
    preset: str | None = None
    stop_after_steps: int | None = None
    # processes under torchrun (locdiff.ddp; None: every visible GPU, 1 on the CPU)
    nproc: int | None = dataclasses.field(default=None, metadata=LAUNCH)

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):  # from JSON (the torchrun spec file, a deployment parameter)
            object.__setattr__(self, "config", LocDiffConfig.from_dict(self.config))

    def to_dict(self) -> dict:
        fields = dataclasses.fields(self)
        return {**{f.name: getattr(self, f.name) for f in fields}, "config": self.config.to_dict()}


@dataclass(frozen=True)
class EvalSpec:
    run_key: str
    embeddings_key: str
    split: str | None = "test"
    dataset: str | None = None
    baselines: list[str] | None = None  # None: every baseline
    retrieval_key: str | None = None
    device: str | None = None  # the predictor's (None/auto: CUDA when available)


@dataclass(frozen=True)
class ReportSpec:
    eval_keys: list[str]
    title: str = "LocDiff evaluation"
    notes: list[str] | None = None


# ------------------------------------------------------------------------------------------ the stages
def _function(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """One stage, declared once. ``build_ref``: ``"module:function"``, called by :meth:`build` as
    ``function(store, **keywords, **runtime)`` where the keywords are the spec's fields (or its
    ``build_kwargs()``)."""

    name: str  # the store prefix
    version: str
    spec: type | None = None  # a frozen dataclass of the parameters (None: no Prefect task)
    build_ref: str = ""
    io: bool = False  # failures are transient I/O: the task retries them with backoff
    timeout_s: float | None = None
    task: str = ""  # the Prefect task's name (default: name)
    progress: bool = False  # the build function takes progress=(done, total)

    def build(self, store: Store, spec, **runtime):
        if not isinstance(spec, self.spec):
            raise TypeError(f"stage {self.name!r} takes a {self.spec.__name__}, got {type(spec).__name__}")
        fn = _function(self.build_ref)
        kwargs = spec.build_kwargs() if hasattr(spec, "build_kwargs") else spec_kwargs(spec)
        return fn(store, **kwargs, **runtime)


_H = 3600
STAGE_DECLS = {
    s.name: s
    for s in (
        Stage("datasets", "1", DatasetSpec, "locdiff.stages.datasets:prepare_dataset",
              io=True, timeout_s=48 * _H, task="prepare-dataset", progress=True),
        Stage("embeddings", "2", EmbedSpec, "locdiff.stages.embeddings:embed_dataset",
              io=True, timeout_s=48 * _H, task="embed", progress=True),
        # 4: the codes only in the .npy arrays (the Parquet parts keep image_id, split)
        Stage("targets", "4", TargetsSpec, "locdiff.stages.targets:build_targets",
              io=True, timeout_s=12 * _H),
        Stage("anchors", "2", AnchorsSpec, "locdiff.stages.anchors:build_anchor_set", io=True, timeout_s=_H),
        # compute: no retries (a failed attempt resumes from its last checkpoint on the next run)
        Stage("runs", "2", TrainSpec, "locdiff.stages.runs:train_run", task="train", progress=True),
        Stage("retrieval", "1", RetrievalSpec, "locdiff.stages.retrieval:build_index",
              io=True, timeout_s=6 * _H),
        # 4: mode masses are probabilities (a point-mass fit), mass reliability in the metrics;
        # 5: LocDiff-H's modes after the first propose a region only with mass >= infer.hybrid_min_mass
        Stage("eval", "5", EvalSpec, "locdiff.stages.evals:evaluate_run",
              timeout_s=6 * _H, task="evaluate", progress=True),
        # 3: metrics rows carry geoscore and radius coverage; 4: mode-mass reliability tables
        Stage("reports", "4", ReportSpec, "locdiff.stages.reports:build_report", task="report"),
        Stage("aliases", "1"),  # tag/untag records (locdiff.stages.aliases): no task
    )
}  # fmt: skip
VERSIONS = {name: s.version for name, s in STAGE_DECLS.items()}
STAGES = tuple(VERSIONS)


def stage_key(store: Store, stage: str, name: str, config: dict, upstream: Iterable[str] = ()) -> str:
    """The content-addressed key of a stage's artifact (stage version + config + upstream keys)."""
    if stage not in VERSIONS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return store.key(stage, name, VERSIONS[stage], config, list(upstream))


def get_or_build(
    store: Store,
    stage: str,
    name: str,
    config: dict,
    upstream: Iterable[str],
    build: Callable[[ArtifactWriter | None], None],
    *,
    commit: bool = True,
    lease: bool = False,
    on_wait: Callable[[str], None] | None = None,
    write: bool = True,
    log: logging.Logger | None = None,
) -> str:
    """The key of ``stage``'s artifact for (config, upstream): reused when committed, else built.

    ``build(writer)`` writes the files (parts it commits survive a crash; the next attempt's writer
    reports them done) and the artifact is committed when it returns. A committed key is never rebuilt
    (its content is what its key names): a rebuild takes a different config or upstream.

    Options: ``commit=False`` leaves the artifact uncommitted: ``build`` only commits (or asks about)
    parts, for a stage whose parts several processes write and whose own call commits them. ``lease``
    takes the key's :class:`~locdiff.storage.Lease` first (one builder at a time; ``on_wait(owner)``
    while another holds it; a key committed meanwhile is reused). ``write=False`` calls ``build(None)``
    and commits nothing: a rank of a DDP launch other than 0, which computes while rank 0 writes and
    commits. ``log``: says when a committed artifact is reused.
    """
    upstream = list(upstream)
    key = stage_key(store, stage, name, config, upstream)
    if store.exists(key):
        if log:
            log.info("%s is committed already; reusing it", key)
        return key
    with Lease(store, key, on_wait=on_wait) if lease else nullcontext() as held:
        if held is not None and held.committed:
            if log:
                log.info("%s was committed by another process; reusing it", key)
            return key
        if not write:
            build(None)
            return key
        w = store.writer(key, version=VERSIONS[stage], config=config, upstream=upstream)
        if not commit:
            build(w)
            return key
        with w:
            build(w)
    return key
