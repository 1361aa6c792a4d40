"""The chained pipeline shared by `train-mp16` and `demo`: every stage as a subflow, passing keys."""

from __future__ import annotations

from prefect import get_run_logger

from locdiff.flows.anchors import anchors_flow
from locdiff.flows.embed import embed_flow
from locdiff.flows.evaluate import evaluate_flow
from locdiff.flows.prepare import prepare_dataset_flow
from locdiff.flows.report import report_flow
from locdiff.flows.targets import targets_flow
from locdiff.flows.train import train_flow


def _has_split(dataset: str, split: str) -> bool:
    from locdiff.datasets import registry

    try:
        return split in registry.get(dataset).splits
    except Exception:  # noqa: BLE001 - user datasets: try and let the evaluation say
        return True


def run_pipeline(
    *,
    dataset: str,
    encoder: str,
    preset: str,
    overrides: dict | None,
    dataset_options: dict | None,
    encoder_options: dict | None,
    eval_datasets: list[str] | None,
    anchors: dict | None,
    baselines: list[str] | None,
    storage: str | None,
    refresh: bool,
    title: str,
) -> dict:
    from locdiff.tasks.data import dataset_available
    from locdiff.tasks.train import resolve_config

    log = get_run_logger()
    overrides = dict(overrides or {})
    # Validate the config before any work: a typo in an override fails in a second, not after embedding.
    max_degree = resolve_config(preset, overrides.get("embed_dim", 1), overrides).max_degree

    ds_key = prepare_dataset_flow(dataset, dataset_options or {}, storage)
    emb_key = embed_flow(ds_key, encoder, encoder_options or {}, storage)
    targets_key = targets_flow(emb_key, max_degree, storage)
    anchor_opts = {"kind": "uniform", "n": 10_000, **(anchors or {})}
    anchors_key = anchors_flow(
        anchor_opts["kind"], int(anchor_opts["n"]), anchor_opts.get("source_key"), storage
    )
    run_key = train_flow(emb_key, preset, overrides, None, storage, refresh)

    eval_keys, notes = [], []
    if _has_split(dataset, "test"):
        eval_keys.append(evaluate_flow(run_key, emb_key, "test", dataset, baselines, storage))
    for name in eval_datasets or []:
        key = dataset_available(storage, name)
        if key is None:
            note = f"{name}: skipped, not present locally (see `locdiff datasets list` for how to obtain it)"
            log.warning(note)
            notes.append(note)
            continue
        ek = embed_flow(key, encoder, encoder_options or {}, storage)
        eval_keys.append(evaluate_flow(run_key, ek, None, name, baselines, storage))
    report = report_flow(eval_keys, title, notes, storage) if eval_keys else None
    summary = {
        "dataset": ds_key,
        "embeddings": emb_key,
        "targets": targets_key,
        "anchors": anchors_key,
        "run": run_key,
        "evaluations": eval_keys,
        "notes": notes,
        "report": report,
    }
    if report:
        print(report["text_table"])
        print(f"report: {report['report']}")
        for name, loc in report["images"].items():
            print(f"{name}: {loc}")
    return summary
