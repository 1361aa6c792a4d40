"""`evaluate-latest` (nightly): evaluate the newest committed run on the benchmarks present locally."""

from __future__ import annotations

from prefect import flow, get_run_logger

from locdiff.flows.embed import embed_flow
from locdiff.flows.evaluate import evaluate_flow
from locdiff.flows.report import report_flow

NIGHTLY_DATASETS = ["yfcc26k", "gws15k", "im2gps3k", "yfcc4k"]


def run_encoder(store, run_key: str) -> str:
    """The encoder whose embeddings the run was trained on (recorded in the embeddings manifest)."""
    emb_key = store.manifest(run_key).get("embeddings")
    if not emb_key:
        raise ValueError(f"{run_key}: the run's manifest does not name its embeddings")
    from locdiff.tasks.predict import encoder_spec

    enc = encoder_spec(store.manifest(emb_key))
    if not enc:
        raise ValueError(f"{emb_key}: the embeddings manifest does not name its encoder")
    return enc


@flow(name="evaluate-latest", log_prints=True)
def evaluate_latest(
    datasets: list[str] | None = None, run_key: str | None = None, storage: str | None = None
) -> dict:
    """Evaluate `run_key` (default: the newest committed run) on each dataset present locally; a
    dataset not prepared in the store is skipped with a note in the report."""
    from locdiff.errors import UserError
    from locdiff.tasks.common import open_store
    from locdiff.tasks.data import dataset_available

    log = get_run_logger()
    store = open_store(storage)
    run_key = run_key or store.latest("runs")
    if run_key is None:
        raise UserError("no committed training run in the store", "run `locdiff demo` or train-mp16 first")
    encoder = run_encoder(store, run_key)
    eval_keys, notes = [], []
    for name in NIGHTLY_DATASETS if datasets is None else datasets:
        key = dataset_available(storage, name)
        if key is None:
            note = f"{name}: skipped, not present locally (see `locdiff datasets list` for how to obtain it)"
            log.warning(note)
            notes.append(note)
            continue
        emb_key = embed_flow(key, encoder, {}, storage)
        eval_keys.append(evaluate_flow(run_key, emb_key, None, name, [], storage))
    report = report_flow(eval_keys, f"nightly evaluation of {run_key}", notes, storage) if eval_keys else None
    if report is None:
        print("no dataset to evaluate on:\n" + "\n".join(notes))
    return {"run": run_key, "evaluations": eval_keys, "notes": notes, "report": report}
