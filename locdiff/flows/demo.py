"""`demo`: the whole pipeline on the embedded Blue Marble sample, offline on 2 CPU cores (DESIGN §6).

Same stages as `train-mp16`, with the offline EfficientNet-Lite0 encoder, the `cpu` preset, and the
trivial most-common-region baseline evaluated beside LocDiff.
"""

from __future__ import annotations

from prefect import flow

from locdiff.flows.pipeline import run_pipeline

DEMO_DATASET_OPTIONS: dict = {}
DEMO_OVERRIDES: dict = {}


@flow(name="demo", log_prints=True)
def demo(
    dataset_options: dict | None = None,
    preset: str = "cpu",
    overrides: dict | None = None,
    storage: str | None = None,
) -> dict:
    return run_pipeline(
        dataset="bluemarble",
        encoder="efficientnet-lite0",
        preset=preset,
        overrides=DEMO_OVERRIDES if overrides is None else overrides,
        dataset_options=DEMO_DATASET_OPTIONS if dataset_options is None else dataset_options,
        encoder_options={},
        eval_datasets=[],
        anchors={"kind": "uniform", "n": 10_000},
        baselines=["most-common-region"],
        storage=storage,
        refresh=False,
        title="LocDiff demo (Blue Marble sample)",
    )
