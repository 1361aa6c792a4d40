"""The chained pipeline shared by `train-mp16` and `demo`: every stage as a subflow, passing keys.

prepare → embed → targets (unless train.targets="per_batch") → anchors (the decoder's uniform set; plus
the data set when SHDD-KL draws photo-distribution anchors) → train → retrieval index (the training
split's gallery, for LocDiff-H and retrieval 1-NN) → evaluate → report. The config is
resolved once here (preset + overrides, validated before any work; the embedding width is applied
when the embeddings exist) and travels as one ``LocDiffConfig``.
"""

from __future__ import annotations

from prefect import get_run_logger

from locdiff.flows.stages import (
    anchors_flow,
    embed_flow,
    evaluate_flow,
    prepare_flow,
    report_flow,
    retrieval_flow,
    targets_flow,
    train_flow,
)
from locdiff.stages import (
    AnchorsSpec,
    DatasetSpec,
    EmbedSpec,
    EvalSpec,
    ReportSpec,
    RetrievalSpec,
    TargetsSpec,
    TrainSpec,
)

BENCHMARKS = ("yfcc26k", "gws15k", "im2gps3k", "yfcc4k")  # what train-mp16 and the nightly evaluate on


def committed_embeddings(store, key: str, param: str) -> str:
    """``key`` when it is a committed embeddings artifact, else a one-line UserError naming ``param``."""
    from locdiff.errors import UserError
    from locdiff.storage import Key

    try:
        ok = Key.parse(key).stage == "embeddings" and store.exists(key)
    except ValueError:
        ok = False
    if not ok:
        raise UserError(
            f"{param}: {key!r} is not a committed embeddings artifact in {store.url}",
            "allowed: a key listed by `locdiff sql \"SELECT key FROM artifacts WHERE stage = 'embeddings'\"`",
        )
    return key


def evaluate_present(
    storage: str | None,
    run_key: str,
    encoder: str,
    datasets: list[str],
    baselines: list[str],
    encoder_options: dict | None = None,
    retrieval_key: str | None = None,
    device: str | None = None,
) -> tuple[list[str], list[str]]:
    """Embed and evaluate every dataset of `datasets` that is committed in the store (all its rows);
    returns (eval keys, notes on the ones skipped). ``retrieval_key``: the run's gallery index (adds
    LocDiff-H and retrieval 1-NN); ``device``: the predictor's (default: the encoder's, else auto)."""
    from locdiff.stages.datasets import latest_dataset
    from locdiff.storage import Key, Store

    log = get_run_logger()
    store = Store.from_uri(storage)
    eval_keys, notes = [], []
    for name in datasets:
        if name.startswith("embeddings/"):  # features computed elsewhere: every row, no embedding stage
            ek = committed_embeddings(store, name, "eval_datasets")
            name = Key.parse(ek).head
        else:
            key = latest_dataset(store, name)
            if key is None:
                note = f"{name}: skipped, not present locally (`locdiff datasets list` says how to get it)"
                log.warning(note)
                notes.append(note)
                continue
            ek = embed_flow(storage=storage, spec=EmbedSpec(key, encoder, encoder_options or {}))
        spec = EvalSpec(
            run_key=run_key,
            embeddings_key=ek,
            split=None,
            dataset=name,
            baselines=baselines,
            retrieval_key=retrieval_key,
            device=device or (encoder_options or {}).get("device"),
        )
        eval_keys.append(evaluate_flow(storage=storage, spec=spec))
    return eval_keys, notes


def run_pipeline(
    *,
    storage: str | None,
    dataset: str,
    encoder: str,
    preset: str,
    overrides: dict | None,
    dataset_options: dict | None,
    encoder_options: dict | None,
    eval_datasets: list[str] | None,
    baselines: list[str] | None,
    refresh: bool,
    title: str,
    nproc: int | None = None,
    dask: str | None = None,
    embeddings: str | None = None,
) -> dict:
    from locdiff.stages.datasets import splits
    from locdiff.stages.runs import anchor_roles, resolve_config
    from locdiff.storage import Key, Store

    log = get_run_logger()
    config = resolve_config(preset, overrides)  # a typo in an override fails now, not after embedding
    baselines = list(baselines or [])

    store = Store.from_uri(storage)
    for name in eval_datasets or []:  # a mistyped key fails now, not after training
        if name.startswith("embeddings/"):
            committed_embeddings(store, name, "eval_datasets")
    if embeddings:  # features committed already (computed elsewhere, or synthetic): no prepare, no embed
        ds_key, emb_key = None, committed_embeddings(store, embeddings, "embeddings")
        dataset = Key.parse(emb_key).head
    else:
        ds_key = prepare_flow(storage=storage, spec=DatasetSpec(dataset, dataset_options or {}))
        emb_key = embed_flow(
            storage=storage, spec=EmbedSpec(ds_key, encoder, encoder_options or {}), dask=dask
        )
    config = config.replace(embed_dim=int(store.manifest(emb_key)["dim"]))  # the data's width
    targets_key = None
    if config.train.targets == "cache":
        targets_key = targets_flow(storage=storage, spec=TargetsSpec(emb_key, config.max_degree))
    anchors = {
        "uniform": anchors_flow(storage=storage, spec=AnchorsSpec("uniform", config.decoder_anchor_count))
    }
    if "data" in anchor_roles(config):
        spec = AnchorsSpec("data", config.loss.data_anchor_pool, dataset_key=emb_key)
        anchors["data"] = anchors_flow(storage=storage, spec=spec)
    spec = TrainSpec(
        embeddings_key=emb_key,
        config=config,
        targets_key=targets_key,
        anchors=anchors,
        name=f"{dataset.lower()}-{preset}",
        preset=preset,
        nproc=nproc,
    )
    run_key = train_flow(storage=storage, spec=spec, refresh=refresh)

    retrieval_key = retrieval_flow(storage=storage, spec=RetrievalSpec(emb_key, "train"))

    eval_keys, notes = [], []
    if ds_key and splits(store, ds_key).get("test"):
        spec = EvalSpec(
            run_key=run_key,
            embeddings_key=emb_key,
            split="test",
            dataset=dataset,
            baselines=baselines,
            retrieval_key=retrieval_key,
            device=(encoder_options or {}).get("device"),
        )
        eval_keys.append(evaluate_flow(storage=storage, spec=spec))
    else:
        what = "given as embeddings" if embeddings else "no test split"
        notes.append(f"{dataset}: {what}; evaluated on the benchmarks present only")
        log.info(notes[-1])
    more, skipped = evaluate_present(
        storage, run_key, encoder, eval_datasets or [], baselines, encoder_options, retrieval_key
    )
    eval_keys += more
    notes += skipped
    report = report_flow(storage=storage, spec=ReportSpec(eval_keys, title, notes)) if eval_keys else None
    summary = {
        "dataset": ds_key,
        "embeddings": emb_key,
        "targets": targets_key,
        "anchors": anchors,
        "run": run_key,
        "retrieval": retrieval_key,
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
