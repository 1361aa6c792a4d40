"""Evaluations: predict a split of an embeddings artifact with a trained run, plus baselines.

Writes ``eval/<run name>/<dataset>/<hash>`` (upstream: the run, the embeddings, and the anchor set the
run's decoder searches) with ``predictions.parquet`` (one row per method and image:
true and predicted lat/lon, distance, score, top-k modes with their mass) and ``metrics.parquet`` (one
row per method: accuracy at 1/25/200/750/2500 km, median/mean km, GeoScore, n); the manifest carries the
metrics too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from locdiff.stages import get_or_build
from locdiff.storage import Key, Store

STAGE = "eval"

# our method names -> locdiff_core.baselines kinds
_BASELINE_KINDS = {
    "most-common-region": "most_common_cell",
    "regression": "regression",
    "classification": "classification",
}
BASELINES = ("most-common-region",)  # the default: free to compute


def _predictions_schema():
    import pyarrow as pa

    modes = pa.list_(pa.float64())
    return pa.schema(
        [("method", pa.string()), ("image_id", pa.string())]
        + [
            (c, pa.float64())
            for c in ("true_lat", "true_lon", "pred_lat", "pred_lon", "distance_km", "score")
        ]
        + [("modes_lat", modes), ("modes_lon", modes), ("modes_mass", modes)]
    )


PREDICTIONS_SCHEMA = _predictions_schema()


def _baseline_predictions(kind: str, store, train_emb_key: str, emb: np.ndarray) -> dict[str, np.ndarray]:
    """Train (cheaply) one of locdiff_core.baselines on the run's training split and predict `emb`."""
    import torch

    from locdiff.stages.runs import load_geo
    from locdiff_core.baselines import train_baseline

    train_data = load_geo(store, train_emb_key, "train")
    model = train_baseline(_BASELINE_KINDS[kind], train_data)
    with torch.no_grad():
        lat, lon = model.predict(torch.from_numpy(emb))
    return {"pred_lat": lat.double().numpy(), "pred_lon": lon.double().numpy(), "score": np.ones(len(emb))}


def evaluate_run(
    store: Store,
    run_key: str,
    embeddings_key: str,
    *,
    split: str | None = "test",
    dataset: str | None = None,
    baselines: list[str] | tuple[str, ...] = BASELINES,
    seed: int = 0,
    progress: Callable[[float, float], None] | None = None,
) -> str:
    """Evaluate a committed run on one split (None: every row) of an embeddings artifact; returns the key."""
    from locdiff.stages.embeddings import load_embeddings
    from locdiff.stages.runs import load_predictor, predict_embeddings

    unknown = sorted(set(baselines) - set(_BASELINE_KINDS))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; allowed: {sorted(_BASELINE_KINDS)}")
    run_man = store.manifest(run_key)
    dataset = dataset or Key.parse(embeddings_key).head
    run_name = run_man.get("run_name") or Key.parse(run_key).name
    cfg = {"split": split, "dataset": dataset, "baselines": list(baselines), "seed": seed}
    decoder_anchors = (run_man.get("anchors") or {}).get("uniform")
    upstream = [run_key, embeddings_key, *([decoder_anchors] if decoder_anchors else [])]

    def build(w) -> None:
        ids, emb_t, lat_t, lon_t = load_embeddings(store, embeddings_key, split)
        emb, lat, lon = emb_t.numpy(), lat_t.numpy(), lon_t.numpy()
        predictor = load_predictor(store, run_key)
        methods: dict[str, dict[str, np.ndarray]] = {
            "locdiff": predict_embeddings(predictor, emb, seed, progress)
        }
        train_emb_key = run_man.get("embeddings") or embeddings_key
        for kind in baselines:
            methods[kind] = _baseline_predictions(kind, store, train_emb_key, emb)
        _write(w, run_key, dataset, split, ids, lat, lon, methods)

    return get_or_build(store, STAGE, f"{run_name}/{dataset}", cfg, upstream, build)


def _write(w, run_key, dataset, split, ids, lat, lon, methods) -> None:
    import pyarrow as pa
    import torch

    from locdiff_core.metrics import geolocation_metrics
    from locdiff_core.sphere import haversine_km

    pred_tables, metric_rows = [], []
    t_lat, t_lon = torch.from_numpy(lat), torch.from_numpy(lon)
    for method, out in methods.items():
        p_lat = torch.as_tensor(out["pred_lat"], dtype=torch.float64)
        p_lon = torch.as_tensor(out["pred_lon"], dtype=torch.float64)
        dist = haversine_km(t_lat, t_lon, p_lat, p_lon).numpy()
        m = {
            k: (float(v) if not isinstance(v, int) else v)
            for k, v in geolocation_metrics(t_lat, t_lon, p_lat, p_lon).items()
        }
        metric_rows.append({"run": run_key, "dataset": dataset, "split": split or "", "method": method, **m})
        cols = {
            "method": [method] * len(ids),
            "image_id": ids,
            "true_lat": lat,
            "true_lon": lon,
            "pred_lat": p_lat.numpy(),
            "pred_lon": p_lon.numpy(),
            "distance_km": dist,
            "score": np.asarray(out["score"], dtype=np.float64),
        }
        if "modes_lat" in out:
            cols["modes_lat"] = [list(map(float, r)) for r in out["modes_lat"]]
            cols["modes_lon"] = [list(map(float, r)) for r in out["modes_lon"]]
            cols["modes_mass"] = [list(map(float, r)) for r in out["modes_mass"]]
        else:
            cols["modes_lat"] = [[] for _ in ids]
            cols["modes_lon"] = [[] for _ in ids]
            cols["modes_mass"] = [[] for _ in ids]
        pred_tables.append(pa.table(cols, schema=PREDICTIONS_SCHEMA))

    w.write_table("predictions.parquet", pa.concat_tables(pred_tables))
    w.write_table("metrics.parquet", pa.Table.from_pylist(metric_rows))
    w.set(metrics={r["method"]: {k: v for k, v in r.items() if k not in ("run",)} for r in metric_rows})
