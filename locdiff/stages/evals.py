"""Evaluations: predict a split of an embeddings artifact with a trained run, plus baselines.

Writes ``eval/<run name>/<dataset>/<hash>`` (upstream: the run, the embeddings, the anchor set the
run's decoder searches and, when given, the retrieval index) with ``predictions.parquet`` (one row per
method and image: true and predicted lat/lon, distance, score, top-k modes with their mass, LocDiff's
50 %/90 % credible radii) and ``metrics.parquet`` (one row per method: accuracy at 1/25/200/750/2500 km,
median/mean km, GeoScore, n; LocDiff's row adds the coverage of its credible radii as predicted (with
the scales the run fitted on its ``val`` split when it was trained, see
``locdiff.inference.load_predictor``), raw (``_raw``) and refitted on ``val`` here (``_cal``)); the
manifest carries the metrics too.

Methods side by side: ``locdiff``; with a retrieval index ``locdiff-h`` (LocDiff-H) and ``retrieval-1nn``
(the nearest gallery image's location); the baselines (default ``most-common-region``).
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
CALIBRATION_ROWS = 5000  # val rows the radius scales are fitted on (quantiles: 5000 is plenty)
# fewer val rows than this fit no mode-mass map (the masses are used as the decoder gives them): on the
# demo's 300 val rows a fitted map made the test split's reliability worse (largest gap 5.1 -> 16.4 points)
MASS_CALIBRATION_MIN_ROWS = 2000
EVAL_BLOCK_ROWS = 1 << 16  # rows of a split predicted at a time (rounded down to whole inference batches)


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
        + [("radius50_km", pa.float64()), ("radius90_km", pa.float64())]
    )


PREDICTIONS_SCHEMA = _predictions_schema()


def _fit_baseline(kind: str, store, train_emb_key: str, train_config):
    """Train one of locdiff_core.baselines on the run's (memory-mapped) training split, for the run's
    ``train.baseline_steps`` with the rest of its training section."""
    import dataclasses

    from locdiff.embedstore import open_embeddings
    from locdiff_core.baselines import train_baseline

    steps = train_config.baseline_steps
    tc = dataclasses.replace(
        train_config, max_steps=steps, warmup_steps=min(train_config.warmup_steps, steps // 10), log_every=0
    )
    return train_baseline(_BASELINE_KINDS[kind], open_embeddings(store, train_emb_key, "train"), tc)


def _baseline_predictions(model, emb: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        lat, lon = model.predict(torch.from_numpy(emb))
    return {"pred_lat": lat.double().numpy(), "pred_lon": lon.double().numpy(), "score": np.ones(len(emb))}


def fit_radius_scales(dist_km: np.ndarray, radii_km: np.ndarray, levels=(0.5, 0.9)) -> list[float]:
    """Calibration factors s_q such that a fraction q of ``dist <= s_q * radius_q`` on these (validation)
    predictions: the q-quantile of dist / radius_q, per level (``radii_km`` ``[N, len(levels)]``)."""
    r = np.maximum(np.asarray(radii_km, dtype=np.float64), 1e-6)
    d = np.asarray(dist_km, dtype=np.float64)[:, None]
    return [float(np.quantile(d[:, 0] / r[:, i], q)) for i, q in enumerate(levels)]


def coverage(dist_km: np.ndarray, radius_km: np.ndarray) -> float:
    """Fraction of truths inside the radius."""
    return float(np.mean(np.asarray(dist_km) <= np.asarray(radius_km)))


def evaluate_run(
    store: Store,
    run_key: str,
    embeddings_key: str,
    *,
    split: str | None = "test",
    dataset: str | None = None,
    baselines: list[str] | tuple[str, ...] | None = BASELINES,
    seed: int = 0,
    progress: Callable[[float, float], None] | None = None,
    retrieval_key: str | None = None,
    device: str | None = None,
) -> str:
    """Evaluate a committed run on one split (None: every row) of an embeddings artifact; returns the key.

    ``retrieval_key``: a retrieval index (``locdiff.stages.retrieval``) built from the run's training
    split: adds the ``locdiff-h`` and ``retrieval-1nn`` methods. ``device``: where the predictor runs
    (None or "auto": CUDA when available); not part of the key."""
    from locdiff.embedstore import iter_embeddings
    from locdiff.inference import load_predictor, predict_embeddings

    baselines = BASELINES if baselines is None else baselines
    unknown = sorted(set(baselines) - set(_BASELINE_KINDS))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; allowed: {sorted(_BASELINE_KINDS)}")
    run_man = store.manifest(run_key)
    dataset = dataset or Key.parse(embeddings_key).head
    run_name = run_man.get("run_name") or Key.parse(run_key).name
    cfg = {"split": split, "dataset": dataset, "baselines": list(baselines), "seed": seed}
    decoder_anchors = (run_man.get("anchors") or {}).get("uniform")
    upstream = [
        run_key,
        embeddings_key,
        *([decoder_anchors] if decoder_anchors else []),
        *([retrieval_key] if retrieval_key else []),
    ]

    def build(w) -> None:
        import torch

        from locdiff.stages.retrieval import load_index

        predictor = load_predictor(store, run_key, device)
        index = load_index(store, retrieval_key) if retrieval_key else None
        train_emb_key = run_man.get("embeddings") or embeddings_key
        fitted = {
            kind: _fit_baseline(kind, store, train_emb_key, predictor.config.train) for kind in baselines
        }
        # the split is read and predicted a block at a time (memory bounded by the block, not the split);
        # one generator across blocks of whole inference batches = the draws of one call on the split
        batch = max(1, predictor.config.infer.batch_size)
        n, blocks = iter_embeddings(store, embeddings_key, split, batch * max(1, EVAL_BLOCK_ROWS // batch))
        gen = torch.Generator().manual_seed(seed)
        ids, lat, lon, parts, done = [], [], [], [], 0
        for b_ids, emb, b_lat, b_lon in blocks:
            tick = (lambda d, _t, o=done: progress(o + d, n)) if progress else None
            out = predict_embeddings(predictor, emb, progress=tick, retrieval=index, generator=gen)
            methods: dict[str, dict[str, np.ndarray]] = {"locdiff": out}
            if index is not None:
                methods["locdiff-h"] = {
                    "pred_lat": out["hybrid_lat"],
                    "pred_lon": out["hybrid_lon"],
                    "score": np.ones(len(emb)),
                }
                methods["retrieval-1nn"] = {
                    "pred_lat": out["nn_lat"],
                    "pred_lon": out["nn_lon"],
                    "score": out["nn_sim"],
                }
            for kind, model in fitted.items():
                methods[kind] = _baseline_predictions(model, emb)
            ids += b_ids
            lat.append(b_lat)
            lon.append(b_lon)
            parts.append(methods)
            done += len(b_ids)
        methods = {m: {c: np.concatenate([p[m][c] for p in parts]) for c in parts[0][m]} for m in parts[0]}
        calib = _val_calibration(store, predictor, train_emb_key, seed)
        basin_km = 2 * predictor.shdd.half_width_km()  # the decoder's default mode separation
        _write(w, run_key, dataset, split, ids, np.concatenate(lat), np.concatenate(lon), methods, calib,
               basin_km)

    return get_or_build(store, STAGE, f"{run_name}/{dataset}", cfg, upstream, build)


def _val_calibration(store: Store, predictor, train_emb_key: str, seed: int) -> dict | None:
    """Radius scales and the mode-mass map fitted on the run's ``val`` split (None when it has none):
    LocDiff's predictions on its first :data:`CALIBRATION_ROWS` rows, then :func:`fit_radius_scales` on
    the raw radii (the config's own scales divided out) and, from :data:`MASS_CALIBRATION_MIN_ROWS` rows
    on, ``fit_mass_calibration`` of the first mode's raw mass against the truth lying in its basin."""
    import torch

    from locdiff.embedstore import iter_embeddings
    from locdiff.inference import predict_embeddings
    from locdiff_core.metrics import fit_mass_calibration, in_first_basin
    from locdiff_core.sphere import haversine_km

    try:  # the first CALIBRATION_ROWS rows of val, read from the mapped arrays (one bounded block)
        _, blocks = iter_embeddings(store, train_emb_key, "val", CALIBRATION_ROWS)
    except LookupError:
        return None
    _, emb, lat, lon = next(blocks)
    config = predictor.config
    inf = config.infer
    predictor.config = config.replace(infer={"mass_calibration": ()})  # fit on the decoder's own masses
    try:
        out = predict_embeddings(predictor, emb, seed + 1)
    finally:
        predictor.config = config
    lat, lon = torch.from_numpy(lat), torch.from_numpy(lon)
    d = haversine_km(lat, lon, torch.from_numpy(out["pred_lat"]), torch.from_numpy(out["pred_lon"])).numpy()
    raw = np.stack([out["radius50_km"] / inf.radius50_scale, out["radius90_km"] / inf.radius90_scale], 1)
    s50, s90 = fit_radius_scales(d, raw)
    basin_km = 2 * predictor.shdd.half_width_km()  # as in the evaluation's mass reliability
    hit = in_first_basin(lat, lon, out["modes_lat"], out["modes_lon"], basin_km)
    return {
        "radius50_scale": s50,
        "radius90_scale": s90,
        "mass_calibration": [list(k) for k in fit_mass_calibration(out["modes_mass"][:, 0], hit)]
        if len(d) >= MASS_CALIBRATION_MIN_ROWS
        else [],
        "val_n": len(d),
        "val_coverage50_raw": coverage(d, raw[:, 0]),
        "val_coverage90_raw": coverage(d, raw[:, 1]),
        "config_scales": [inf.radius50_scale, inf.radius90_scale],
    }


def _write(w, run_key, dataset, split, ids, lat, lon, methods, calib=None, basin_km=None) -> None:
    import pyarrow as pa
    import torch

    from locdiff_core.metrics import geolocation_metrics
    from locdiff_core.sphere import haversine_km

    pred_tables, metric_rows, reliability = [], [], {}
    t_lat, t_lon = torch.from_numpy(lat), torch.from_numpy(lon)
    for method, out in methods.items():
        p_lat = torch.as_tensor(out["pred_lat"], dtype=torch.float64)
        p_lon = torch.as_tensor(out["pred_lon"], dtype=torch.float64)
        dist = haversine_km(t_lat, t_lon, p_lat, p_lon).numpy()
        m = {
            k: (float(v) if not isinstance(v, int) else v)
            for k, v in geolocation_metrics(t_lat, t_lon, p_lat, p_lon).items()
        }
        if "radius50_km" in out:
            r50, r90 = np.asarray(out["radius50_km"]), np.asarray(out["radius90_km"])
            m.update(coverage50=coverage(dist, r50), coverage90=coverage(dist, r90))
            m.update(radius50_median_km=float(np.median(r50)), radius90_median_km=float(np.median(r90)))
            if calib:
                c50, c90 = calib["config_scales"]
                m.update(
                    coverage50_raw=coverage(dist, r50 / c50),
                    coverage90_raw=coverage(dist, r90 / c90),
                    coverage50_cal=coverage(dist, r50 / c50 * calib["radius50_scale"]),
                    coverage90_cal=coverage(dist, r90 / c90 * calib["radius90_scale"]),
                )
        if "modes_mass" in out and basin_km:
            reliability[method] = _mass_reliability(lat, lon, out, basin_km)
            m.update(reliability[method]["summary"])
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
        for c in ("radius50_km", "radius90_km"):
            cols[c] = np.asarray(out[c], dtype=np.float64) if c in out else [None] * len(ids)
        pred_tables.append(pa.table(cols, schema=PREDICTIONS_SCHEMA))

    w.write_table("predictions.parquet", pa.concat_tables(pred_tables))
    w.write_table("metrics.parquet", pa.Table.from_pylist(metric_rows))
    w.set(
        metrics={r["method"]: {k: v for k, v in r.items() if k not in ("run",)} for r in metric_rows},
        calibration=calib,
        mass_reliability=reliability,
    )


def _mass_reliability(lat, lon, out, basin_km: float) -> dict:
    """How well ``mode1_mass`` (the first mode's probability mass) predicts that the truth lies in that
    mode's basin (nearer to it than to the other modes and within ``basin_km``, the decoder's default
    mode separation): binned reliability rows plus ``mass_ece`` / ``mass_max_gap``."""
    from locdiff_core.metrics import in_first_basin, mass_reliability, reliability_summary

    mass = np.asarray(out["modes_mass"], dtype=np.float64)[:, 0]
    hit = in_first_basin(lat, lon, np.asarray(out["modes_lat"]), np.asarray(out["modes_lon"]), basin_km)
    rows = mass_reliability(mass, hit)
    return {"basin_km": basin_km, "bins": rows, "summary": reliability_summary(rows)}
