"""`evaluate-latest` (nightly): evaluate the `prod` model (else the newest run) on the benchmarks present."""

from __future__ import annotations

from prefect import flow

from locdiff.flows.pipeline import BENCHMARKS, evaluate_present
from locdiff.flows.stages import report_flow, retrieval_flow
from locdiff.stages import ReportSpec, RetrievalSpec


@flow(name="evaluate-latest", log_prints=True)
def evaluate_latest(
    datasets: list[str] | None = None,
    run_key: str | None = None,
    storage: str | None = None,
    device: str = "auto",
) -> dict:
    """Evaluate `run_key` (a run key or a model name; default: the run named `prod`, else the newest
    committed run) on each dataset present locally; a dataset not prepared in the store is skipped with
    a note in the report. device: auto (CUDA when available) | cuda | cpu, for embedding the
    benchmarks and for the predictor."""
    from locdiff.errors import UserError
    from locdiff.inference import run_encoder
    from locdiff.stages import aliases
    from locdiff.storage import Store

    store = Store.from_uri(storage)
    if run_key is None and store.latest("runs") is None:
        raise UserError("no committed training run in the store", "run `locdiff demo` or train-mp16 first")
    # a run key or a model name (`locdiff runs tag`); by default the run named `prod`, else the newest
    run_key = aliases.resolve_run(store, run_key) if run_key else aliases.default_run(store)
    print(f"evaluating {run_key}")
    from locdiff.stages.evals import BASELINES

    train_emb = store.manifest(run_key).get("embeddings")
    retrieval_key = retrieval_flow(storage=storage, spec=RetrievalSpec(train_emb)) if train_emb else None
    eval_keys, notes = evaluate_present(
        storage,
        run_key,
        run_encoder(store, run_key),
        list(BENCHMARKS) if datasets is None else datasets,
        list(BASELINES),
        encoder_options={"device": device},
        retrieval_key=retrieval_key,
        device=device,
    )
    title = f"nightly evaluation of {run_key}"
    report = report_flow(storage=storage, spec=ReportSpec(eval_keys, title, notes)) if eval_keys else None
    if report is None:
        print("no dataset to evaluate on:\n" + "\n".join(notes))
    return {
        "run": run_key,
        "retrieval": retrieval_key,
        "evaluations": eval_keys,
        "notes": notes,
        "report": report,
    }
