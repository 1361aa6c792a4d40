"""`train-mp16`: the whole pipeline for MP16 by default, then evaluation (docs/design.md §5).

Every parameter can be overridden at run time, e.g. the end-to-end test's small run:

    prefect deployment run train-mp16/default -p dataset=bluemarble -p encoder=efficientnet-lite0 \
        -p preset=tiny -p 'dataset_options={"n": 400}' -p eval_datasets=[]
"""

from __future__ import annotations

from prefect import flow

from locdiff.flows.pipeline import BENCHMARKS, run_pipeline


@flow(name="train-mp16", log_prints=True)
def train_mp16(
    dataset: str = "mp16",
    encoder: str = "ViT-L-14/openai",
    preset: str = "mp16",
    overrides: dict | None = None,
    dataset_options: dict | None = None,
    encoder_options: dict | None = None,
    eval_datasets: list[str] | None = None,
    baselines: list[str] | None = None,
    storage: str | None = None,
    refresh: bool = False,
    device: str = "auto",
    nproc: int | None = None,
    dask: str | None = None,
    embeddings: str | None = None,
) -> dict:
    """prepare -> embed -> targets -> anchors -> train -> evaluate -> report.

    dataset: registry name (`locdiff datasets list`); encoder: `efficientnet-lite0` or an open_clip
    `MODEL/PRETRAINED` (or a local checkpoint); preset: tiny | cpu | default | mp16; overrides: nested
    config overrides, e.g. {"train": {"max_steps": 1000}}; eval_datasets: benchmarks to evaluate on
    (default YFCC26k, GWS15k, Im2GPS3k, YFCC4k; skipped with a note when not prepared locally);
    baselines: e.g. ["most-common-region"]; storage: store URI (default $LOCDIFF_STORAGE or the project's
    data/store); refresh: retrain even when an identical run is cached; device: auto (CUDA when
    available) | cuda | cpu, for embedding and training; nproc: training processes under torchrun
    (default: every visible GPU, 1 on the CPU); dask: fan the embedding out over a Dask cluster
    ("local" or a scheduler address); embeddings: the key of a committed embeddings artifact
    (`embeddings/...`, e.g. features computed elsewhere or `locdiff datasets synth`) to train on instead of
    prepare -> embed (dataset and encoder then unused; its `train` split trains, `val` calibrates, and only
    eval_datasets are evaluated). An eval_datasets entry may also be an embeddings key: all its rows are
    evaluated as they are.
    """
    overrides = dict(overrides or {})
    encoder_options = {"device": device, **(encoder_options or {})}
    if device != "auto":
        overrides["train"] = {"device": device, **overrides.get("train", {})}
    return run_pipeline(
        dataset=dataset,
        encoder=encoder,
        preset=preset,
        overrides=overrides,
        dataset_options=dataset_options,
        encoder_options=encoder_options,
        eval_datasets=list(BENCHMARKS) if eval_datasets is None else eval_datasets,
        baselines=baselines if baselines is not None else [],
        storage=storage,
        refresh=refresh,
        nproc=nproc,
        dask=dask,
        embeddings=embeddings,
        title=f"train-mp16 {embeddings or dataset} {encoder} {preset}",
    )
