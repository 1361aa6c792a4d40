"""`demo`: the whole pipeline on the embedded Blue Marble sample, offline on 2 CPU cores (docs/design.md §6).

Same stages as `train-mp16`, with the offline EfficientNet-Lite0 encoder, the `cpu` preset, and the
trivial most-common-region baseline evaluated beside LocDiff.
"""

from __future__ import annotations

from prefect import flow

from locdiff.flows.pipeline import run_pipeline

# Sized for < 15 minutes on 2 idle CPU cores. Measured on a shared, heavily loaded 2-core machine with
# the sample's default 15,000 tiles and 3,000 steps: 42 min end to end (embedding 7.5 min, training ~25 min),
# with the validation median flat after ~1,500 steps (232 km at 1,500, 245 km at 2,500); LocDiff 70.4 % /
# 81.9 % at 750 / 2,500 km vs 3.1 % / 42.6 % for the most-common-region baseline. Hence 10,000 tiles
# and 1,500 steps.
DEMO_DATASET_OPTIONS: dict = {"n": 10_000}
DEMO_OVERRIDES: dict = {"train": {"max_steps": 1500, "eval_every": 500, "checkpoint_every": 500}}


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
        baselines=["most-common-region"],
        storage=storage,
        refresh=False,
        title="LocDiff demo (Blue Marble sample)",
    )
