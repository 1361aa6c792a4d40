"""The training task: resumable LocDiff training whose checkpoints live in the store.

The run's key is content-addressed from the resolved config and the embeddings it trains on, so
re-running the same deployment after a crash lands on the same run: every periodic checkpoint is a
committed *part* of the (not yet committed) run artifact and survives the crash; the next attempt
resumes from the newest one. The final artifact holds ``model.pt`` (the last checkpoint: model, EMA,
optimizer, step, RNG states, config), ``curves.json`` and the manifest fields ``start_step`` (where
the last attempt began) and ``final_step``.
"""

from __future__ import annotations

import io
import json
from typing import Any

from prefect import get_run_logger, task

from locdiff.tasks.common import STAGE_VERSIONS, Progress, open_store, stage_cache

CHECKPOINT_DIR = "checkpoints"


def checkpoint_relpath(step: int) -> str:
    return f"{CHECKPOINT_DIR}/step-{int(step):09d}.pt"


def resolve_config(preset: str, embed_dim: int, overrides: dict | None = None):
    """The preset with the embedding width of the data and user overrides (nested dicts) applied."""
    from locdiff_core.config import get_preset

    overrides = dict(overrides or {})
    overrides.setdefault("embed_dim", int(embed_dim))
    try:
        return get_preset(preset, **overrides)
    except ValueError as exc:
        from locdiff.errors import UserError

        raise UserError(f"invalid training config: {exc}", "check the preset name and overrides") from None


def run_key(store, name: str, config_dict: dict, embeddings_key: str) -> str:
    return store.key("runs", name, STAGE_VERSIONS["train"], config_dict, upstream=[embeddings_key])


def _latest_part(writer, max_steps: int, every: int) -> tuple[int, dict] | None:
    """(step, checkpoint) of the newest checkpoint part an earlier attempt committed, if any."""
    import torch

    if every <= 0:
        return None
    for step in range((max_steps // every) * every, 0, -every):
        rel = checkpoint_relpath(step)
        if writer.part_done(rel):
            with writer.open_part(rel) as f:
                ckpt = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
            return step, ckpt
    return None


def train_run(
    storage: str | None,
    embeddings_key: str,
    preset: str = "tiny",
    overrides: dict | None = None,
    name: str | None = None,
    stop_after_steps: int | None = None,
) -> str:
    """Train (or resume, or reuse) a LocDiff run on the train/val splits of an embeddings artifact.

    Returns the run key. `stop_after_steps` (testing aid) stops the attempt early without committing.
    """
    import torch

    from locdiff.tasks.data_io import load_embeddings
    from locdiff_core.train import train

    store = open_store(storage)
    train_data = load_embeddings(store, embeddings_key, "train")
    try:
        val_data = load_embeddings(store, embeddings_key, "val")
    except LookupError:
        val_data = None
    config = resolve_config(preset, train_data.embed_dim, overrides)
    cfg = config.to_dict()
    run_name = name or f"{embeddings_key.split('/')[1].replace('/', '-')}-{preset}"
    key = run_key(store, run_name, cfg, embeddings_key)
    log = _logger()
    if store.exists(key):
        log.info("run %s is committed already; reusing it", key)
        return key

    tc = config.train
    with store.writer(key, config=cfg, upstream=[embeddings_key], resume=True) as w:
        found = _latest_part(w, tc.max_steps, tc.checkpoint_every)
        start_step, resume = (found[0], found[1]) if found else (0, None)
        if resume is not None:
            log.info("resuming run %s from checkpoint at step %d", key, start_step)
        else:
            log.info("starting run %s from step 0 (%d steps)", key, tc.max_steps)
        bar = Progress("train", f"training {run_name}")
        bar(start_step, tc.max_steps)

        def save(ckpt: dict) -> None:
            if ckpt["step"] >= tc.max_steps:
                return  # the final one is written as model.pt below
            rel = checkpoint_relpath(ckpt["step"])
            buf = io.BytesIO()
            torch.save(ckpt, buf)
            w.write_bytes(rel, buf.getvalue())
            w.commit_part(rel)

        def progress(event: dict) -> None:
            if event.get("event") == "train":
                bar(event["step"], tc.max_steps)
                log.info("step %d loss %.4f lr %.2e", event["step"], event["loss"], event["lr"])
            elif event.get("event") == "val":
                log.info("step %d val median %.0f km", event["step"], event.get("median_km", float("nan")))

        result = train(
            config,
            train_data,
            val_data,
            checkpoint_callback=save,
            resume_from=resume,
            progress=progress,
            max_steps=stop_after_steps,
        )
        if result.step < tc.max_steps:
            raise RuntimeError(f"training stopped at step {result.step} of {tc.max_steps} (stop_after_steps)")
        buf = io.BytesIO()
        torch.save(result.checkpoint, buf)
        w.write_bytes("model.pt", buf.getvalue())
        w.write_bytes("curves.json", json.dumps(result.curves).encode())
        w.write_table("curves.parquet", curves_table(result.curves))
        w.set(
            start_step=start_step,
            final_step=result.step,
            preset=preset,
            run_name=run_name,
            embeddings=embeddings_key,
            val_metrics=result.val_metrics,
        )
        bar.done()
    return key


def curves_table(curves: dict):
    """Training curves in long form (step, metric, value), metric "<curve>/<name>" (view `curves`)."""
    import pyarrow as pa

    rows = []
    for curve, entries in curves.items():
        for e in entries:
            for name, value in e.items():
                if name != "step" and isinstance(value, int | float):
                    rows.append({"step": int(e["step"]), "metric": f"{curve}/{name}", "value": float(value)})
    schema = pa.schema([("step", pa.int64()), ("metric", pa.string()), ("value", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def load_checkpoint(storage: str | None, run_key: str) -> dict:
    import torch

    store = open_store(storage)
    with store.open(run_key, "model.pt") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run (plain .fn() calls): a standard logger
        import logging

        return logging.getLogger("locdiff.train")


# No retries: a failed training attempt resumes from its last checkpoint on the next run.
train_task = task(
    train_run,
    name="train",
    cache_policy=stage_cache("train"),
    persist_result=True,
    log_prints=True,
)
