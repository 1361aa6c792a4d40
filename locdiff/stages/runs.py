"""Training runs: resumable LocDiff training whose checkpoints live in the store.

``runs/<name>/<hash>``: the key hashes the resolved config and the upstream artifacts it reads — the
embeddings, the SHDD target cache (unless ``train.targets="per_batch"``) and the anchor sets (the
uniform set the decoder and the SHDD-KL loss use, and the data set the loss draws the photo distribution
from) — so re-running after a crash lands on the same run. Every periodic checkpoint is a committed
*part* of the (not yet committed) run and survives the crash; the next attempt resumes from the newest.
The committed run holds ``model.pt`` (the last checkpoint), ``curves.json``/``curves.parquet`` and the
manifest fields ``start_step``, ``final_step``, ``embeddings``, ``targets``, ``anchors``.

Checkpoints are read only through ``locdiff_core.checkpoint.from_bytes`` (``weights_only`` loading): a
file in the store cannot run code, whoever put it there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np

from locdiff.errors import UserError
from locdiff.inference import MODEL_FILE
from locdiff.stages import get_or_build, stage_key
from locdiff.storage import Key, Store
from locdiff_core.config import LocDiffConfig

STAGE = "runs"
CHECKPOINT_DIR = "checkpoints"


def checkpoint_relpath(step: int) -> str:
    return f"{CHECKPOINT_DIR}/step-{int(step):09d}.pt"


def resolve_config(preset: str, overrides: dict | None = None, embed_dim: int | None = None) -> LocDiffConfig:
    """The preset with user overrides (nested dicts) and, when known, the data's embedding width."""
    from locdiff_core.config import get_preset

    overrides = dict(overrides or {})
    if embed_dim is not None:
        overrides["embed_dim"] = int(embed_dim)
    try:
        return get_preset(preset, **overrides)
    except (ValueError, TypeError) as exc:
        raise UserError(f"invalid training config: {exc}", "check the preset name and overrides") from None


def anchor_roles(config: LocDiffConfig) -> tuple[str, ...]:
    """The anchor sets a run of this config reads: the decoder's uniform set, plus the data set when the
    SHDD-KL loss draws photo-distribution anchors."""
    kl = config.loss.kind != "mse"
    return ("uniform", "data") if kl and config.loss.n_data_anchors else ("uniform",)


# ------------------------------------------------------------------------------------------ loading
def load_geo(store: Store, embeddings_key: str, split: str, targets_key: str | None = None):
    """One split as a memory-mapped ``PartedGeo`` (with the cached codes of ``targets_key`` when
    given): nothing but the split column is read until a batch asks for its rows."""
    from locdiff.embedstore import open_embeddings

    return open_embeddings(store, embeddings_key, split, targets_key)  # rows checked when written


def load_geo_in_memory(store: Store, embeddings_key: str, split: str, targets_key: str | None = None):
    import torch

    from locdiff.embedstore import load_embeddings
    from locdiff.stages.targets import load_targets
    from locdiff_core.data import GeoEmbeddings

    ids, emb, lat, lon = load_embeddings(store, embeddings_key, split)
    codes = None
    if targets_key is not None:
        code_ids, codes = load_targets(store, targets_key, split)
        if code_ids != ids:
            raise ValueError(
                f"target cache {targets_key} is not aligned with {embeddings_key} on split {split!r} "
                f"({len(code_ids)} vs {len(ids)} rows); rebuild the cache"
            )
    return GeoEmbeddings(emb, lat.to(torch.float64), lon.to(torch.float64), codes)


def anchor_pools(store: Store, anchors: dict[str, str], train_data):
    """``AnchorPools`` for SHDD-KL from the run's anchor-set artifacts."""
    from locdiff.stages.anchors import load_anchor_set
    from locdiff_core.train import AnchorPools

    ulat, ulon = load_anchor_set(store, anchors["uniform"])
    if anchors.get("data"):
        dlat, dlon = load_anchor_set(store, anchors["data"])
    else:
        dlat, dlon = train_data.lat_deg, train_data.lon_deg
    return AnchorPools(ulat, ulon, dlat, dlon)


def _latest_part(store: Store, writer, key: str, max_steps: int, every: int) -> tuple[int, dict] | None:
    """(step, checkpoint) of the newest checkpoint part an earlier attempt committed, if any."""
    from locdiff_core.checkpoint import CheckpointError, from_bytes

    if every <= 0:
        return None
    for step in range((max_steps // every) * every, 0, -every):
        rel = checkpoint_relpath(step)
        if writer.part_done(rel):
            with writer.open_part(rel) as f:
                data = f.read()
            try:
                return step, from_bytes(data, source=f"checkpoint part {rel} of {key}")
            except CheckpointError as exc:
                raise UserError(
                    str(exc), f"the run cannot resume from it: delete {store.url}/{key} to start over"
                ) from None
    return None


# ------------------------------------------------------------------------------------------ the stage
def train_run(
    store: Store,
    embeddings_key: str,
    config: LocDiffConfig,
    *,
    targets_key: str | None = None,
    anchors: dict[str, str] | None = None,
    name: str | None = None,
    preset: str | None = None,
    stop_after_steps: int | None = None,
    progress: Callable[[float, float], None] | None = None,
    log: logging.Logger | None = None,
    data_on_device: bool | None = None,
    on_curves: Callable[[str, dict], None] | None = None,
) -> str:
    """Train (or resume, or reuse) a LocDiff run on the train/val splits of an embeddings artifact.

    ``targets_key``: the SHDD target cache to read x₀ from (required unless ``train.targets`` is
    ``per_batch``); ``anchors``: ``{"uniform": key, "data": key}`` anchor-set artifacts (see
    :func:`anchor_roles`). Returns the run key. ``stop_after_steps`` (testing aid) stops the attempt
    early without committing. ``data_on_device``: hold the training rows on the CUDA device (None:
    when they fit in half its free memory). Every :func:`locdiff.curves.live_every` steps the curves so
    far are written to the run's in-flight area (the catalog's ``curves`` view, ``in_flight``) and
    handed to ``on_curves(run_key, curves)``.

    Under torchrun (``locdiff.ddp``) every rank calls this: all read the memory-mapped rows, rank 0
    alone opens the writer, resumes (the checkpoint is broadcast), checkpoints and commits.
    """
    from locdiff import faults
    from locdiff.curves import live_every
    from locdiff_core.checkpoint import CheckpointError, to_bytes
    from locdiff_core.train import distributed_rank_world, train

    log = log or logging.getLogger("locdiff.runs")
    tc = config.train
    key, run_name, cfg, upstream, targets_key, anchors = _identity(
        store, embeddings_key, config, targets_key, anchors, name, preset
    )
    rank, world = distributed_rank_world()

    def build(w) -> None:  # w: rank 0's writer (None on the other ranks)
        train_data = load_geo(store, embeddings_key, "train", targets_key)
        if train_data.embed_dim != config.embed_dim:
            raise UserError(
                f"{embeddings_key} holds {train_data.embed_dim}-d embeddings, the config says "
                f"embed_dim={config.embed_dim}",
                "resolve the config with the embeddings' width (resolve_config(..., embed_dim=...))",
            )
        val_data = None
        if rank == 0:
            try:
                val_data = load_geo(store, embeddings_key, "val")
            except LookupError:
                val_data = None
        pools = anchor_pools(store, anchors, train_data) if "uniform" in anchors else None
        data_device = _data_device(config, train_data, data_on_device)

        found = _latest_part(store, w, key, tc.max_steps, tc.checkpoint_every) if rank == 0 else None
        if world > 1:
            found = _broadcast_resume(found)
        start_step, resume = (found[0], found[1]) if found else (0, None)
        if rank == 0:
            if resume is not None:
                log.info(
                    "resuming run %s from checkpoint at step %d (written by %d process(es); now %d)",
                    key,
                    start_step,
                    int(resume.get("world_size", 1)),
                    world,
                )
            else:
                log.info("starting run %s from step 0 (%d steps, %d process(es))", key, tc.max_steps, world)
            if progress:
                progress(start_step, tc.max_steps)

        def save(ckpt: dict) -> None:
            if ckpt["step"] >= tc.max_steps:
                return  # the final one is written as model.pt below
            rel = checkpoint_relpath(ckpt["step"])
            w.write_bytes(rel, to_bytes(ckpt))
            w.commit_part(rel)

        live = _LiveCurves(w, key, resume, live_every(tc), on_curves) if rank == 0 else None

        def on_event(event: dict) -> None:
            if event.get("event") == "train":
                faults.point("runs:train-step")
            if rank != 0:
                return
            live(event)
            if event.get("event") == "train":
                if progress:
                    progress(event["step"], tc.max_steps)
                log.info("step %d loss %.4f lr %.2e", event["step"], event["loss"], event["lr"])
            elif event.get("event") == "val":
                log.info("step %d val median %.0f km", event["step"], event.get("median_km", float("nan")))

        try:
            result = train(
                config,
                train_data,
                val_data,
                checkpoint_callback=save if rank == 0 else None,
                resume_from=resume,
                progress=on_event,
                max_steps=stop_after_steps,
                anchor_pools=pools,
                data_device=data_device,
            )
        except CheckpointError as exc:
            written = int(resume.get("world_size", 1)) if isinstance(resume, dict) else 1
            raise UserError(
                f"cannot resume run {key} from its step-{start_step} checkpoint (written by {written} "
                f"process(es), resumed by {world}): {exc}".replace("\n", " "),
                f"the world size may change, the config may not; delete {store.url}/{key} to start over",
            ) from None
        if result.step < tc.max_steps:
            raise RuntimeError(f"training stopped at step {result.step} of {tc.max_steps} (stop_after_steps)")
        if rank != 0:
            return
        calibration = None
        if val_data is not None:  # the radius scales travel with the run (load_predictor uses them)
            from locdiff.inference import checkpoint_predictor
            from locdiff.stages.evals import _val_calibration

            predictor = checkpoint_predictor(store, result.checkpoint, anchors.get("uniform"))
            calibration = _val_calibration(store, predictor, embeddings_key, seed=0)
            if calibration:
                log.info(
                    "radius scales fitted on %d val rows: x%.3g (50 %%), x%.3g (90 %%)",
                    calibration["val_n"],
                    calibration["radius50_scale"],
                    calibration["radius90_scale"],
                )
        w.write_bytes(MODEL_FILE, to_bytes(result.checkpoint))
        w.write_bytes("curves.json", json.dumps(result.curves).encode())
        w.write_table("curves.parquet", curves_table(result.curves))
        w.set(
            start_step=start_step,
            final_step=result.step,
            preset=preset,
            run_name=run_name,
            embeddings=embeddings_key,
            targets=targets_key,
            anchors=anchors,
            val_metrics=result.val_metrics,
            radius_calibration=calibration,
            world_size=world,
        )

    # one trainer per run key at a time (a DDP launch is one trainer: its ranks do not take the lease);
    # rank 0 alone opens the writer (finds the checkpoint to resume from, writes, commits)
    on_wait = lambda owner: log.info("run %s is being trained by %s; waiting for it", key, owner)  # noqa: E731
    return get_or_build(
        store,
        STAGE,
        run_name,
        cfg,
        upstream,
        build,
        lease=world == 1,
        on_wait=on_wait,
        write=rank == 0,
        log=log,
    )


class _LiveCurves:
    """Rank 0's copy of the curves so far (from the resumed checkpoint on): every ``every`` steps and at
    every validation they are written to the run's in-flight area and handed to ``on_curves``."""

    def __init__(self, writer, key: str, resume: dict | None, every: int, on_curves) -> None:
        import copy

        self.writer, self.key, self.every, self.on_curves = writer, key, every, on_curves
        self.curves = copy.deepcopy((resume or {}).get("curves") or {"train": [], "val": []})

    def __call__(self, event: dict) -> None:
        from locdiff.curves import LIVE_CURVES

        kind = event.get("event")
        if kind not in ("train", "val"):
            return
        row = {k: v for k, v in event.items() if k not in ("event", "max_steps")}
        self.curves.setdefault(kind, []).append(row)
        if not self.every or (kind == "train" and row["step"] % self.every):
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            sink = pa.BufferOutputStream()
            pq.write_table(curves_table(self.curves), sink)
            self.writer.write_live(LIVE_CURVES, sink.getvalue().to_pybytes())
        except OSError as exc:  # the live view is best effort; training goes on
            logging.getLogger("locdiff.runs").warning("in-flight curves of %s not written: %s", self.key, exc)
        if self.on_curves is not None:
            try:
                self.on_curves(self.key, self.curves)
            except Exception as exc:  # noqa: BLE001 - a chart must never stop training
                logging.getLogger("locdiff.runs").warning("training chart not refreshed: %s", exc)


def run_key(store: Store, embeddings_key: str, config: LocDiffConfig, **inputs) -> str:
    """The key :func:`train_run` trains under for these arguments (``targets_key``, ``anchors``,
    ``name``, ``preset``): what a launcher watches while the ranks train."""
    return _identity(store, embeddings_key, config, *(inputs.get(k) for k in _IDENTITY_INPUTS))[0]


_IDENTITY_INPUTS = ("targets_key", "anchors", "name", "preset")


def _identity(store, embeddings_key, config, targets_key, anchors, name, preset):
    """(key, run name, config dict, upstream, targets key, anchors) of a run: the key hashes the config
    and the artifacts it reads (the target cache unless ``per_batch``; its anchor roles)."""
    if config.train.targets == "cache" and targets_key is None:
        raise ValueError("train.targets='cache' needs the target cache's key (targets_key)")
    if config.train.targets == "per_batch":
        targets_key = None
    anchors = {r: anchors[r] for r in anchor_roles(config)} if anchors else {}
    cfg = config.to_dict()
    upstream = [embeddings_key, *([targets_key] if targets_key else []), *anchors.values()]
    run_name = name or f"{Key.parse(embeddings_key).head}-{preset or 'custom'}"
    return stage_key(store, STAGE, run_name, cfg, upstream), run_name, cfg, upstream, targets_key, anchors


def curves_from_table(table) -> dict:
    """The inverse of :func:`curves_table`: ``{"train": [{"step", metric: value}], "val": [...]}``."""
    rows: dict[str, dict[int, dict]] = {}
    for r in table.to_pylist():
        curve, metric = r["metric"].split("/", 1)
        rows.setdefault(curve, {}).setdefault(r["step"], {"step": r["step"]})[metric] = r["value"]
    return {"train": [], "val": [], **{c: [by[s] for s in sorted(by)] for c, by in rows.items()}}


LIVE_POLL_S = 5.0  # a launcher reads the in-flight curves at most this often


class LiveWatcher:
    """Reads a run's in-flight curves (``Store.read_live``) and hands them to ``on_curves`` when they
    changed: how the launcher of a multi-process run (``locdiff.ddp``) refreshes the chart that rank 0
    feeds in a single process."""

    def __init__(self, store: Store, key: str, on_curves, every_s: float | None = None) -> None:
        self.store, self.key, self.on_curves = store, key, on_curves
        self.every_s = LIVE_POLL_S if every_s is None else every_s
        self._last, self._seen = float("-inf"), None

    def poll(self, force: bool = False) -> bool:
        """True when new curves were handed on; at most one read per ``every_s`` unless ``force``."""
        import time

        import pyarrow as pa
        import pyarrow.parquet as pq

        from locdiff.curves import LIVE_CURVES

        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return False
        self._last = now
        data = self.store.read_live(self.key, LIVE_CURVES)
        if data is None or data == self._seen:
            return False
        self._seen = data
        try:
            self.on_curves(self.key, curves_from_table(pq.read_table(pa.BufferReader(data))))
        except Exception as exc:  # noqa: BLE001 - a chart must never stop training
            logging.getLogger("locdiff.runs").warning("training chart not refreshed: %s", exc)
            return False
        return True


def _broadcast_resume(found: tuple[int, dict] | None) -> tuple[int, dict] | None:
    """Rank 0's resume checkpoint, sent to every rank as bytes and loaded safely (weights_only)."""
    import torch.distributed as dist

    from locdiff_core.checkpoint import from_bytes, to_bytes

    box = [None if found is None else (found[0], to_bytes(found[1]))] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    step, data = box[0]
    return step, (found[1] if found is not None else from_bytes(data, source=f"step-{step} checkpoint"))


def _data_device(config: LocDiffConfig, data, on_device: bool | None) -> str | None:
    """Where the training rows live: on the CUDA device when asked, or (auto) when it is the training
    device and they take at most half of its free memory; else None (memory-mapped on the host)."""
    import torch

    from locdiff_core.device import resolve_device

    device = resolve_device(config.train.device, "train.device")
    if on_device is False or device.type != "cuda":
        if on_device:
            raise UserError("data_on_device=True needs train.device on CUDA", "set train.device='cuda'")
        return None
    nbytes = data.nbytes() if hasattr(data, "nbytes") else 0
    free, _ = torch.cuda.mem_get_info()
    if on_device or nbytes <= free // 2:
        return f"cuda:{torch.cuda.current_device()}"
    return None


def curves_table(curves: dict):
    """Training curves in long form (step, metric, value), metric "<curve>/<name>" (view `curves`)."""
    import pyarrow as pa

    rows = []
    for curve, entries in curves.items():
        for e in entries:
            for metric, value in e.items():
                if metric != "step" and isinstance(value, int | float) and np.isfinite(value):
                    rows.append(
                        {"step": int(e["step"]), "metric": f"{curve}/{metric}", "value": float(value)}
                    )
    schema = pa.schema([("step", pa.int64()), ("metric", pa.string()), ("value", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)
