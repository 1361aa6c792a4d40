"""Method benchmark: LocDiff against baselines on the same embeddings, splits and training budget.

Usage (from the project root)::

    .venv/bin/python benchmarks/method/run.py --config benchmarks/method/config.toml \
        [--rows locdiff,regression] [--seeds 0,1,2] [--out docs/results_tables.md]

What it does:

1. builds (or reuses: both are content-addressed in the store) the Blue Marble sample and its
   embeddings with the offline encoder (``[data]`` of the config);
2. for every row of the config and every seed, trains the row's method on the ``train`` split with the
   shared budget (``[budget]``: steps, batch size, learning rate) and evaluates it on every split of
   ``[data].eval_splits`` (haversine distance, accuracy counted at distance <= threshold);
3. writes one markdown table per split (mean ± sample standard deviation over seeds) to ``--out``, and
   a JSON file with every per-seed figure beside it.

Methods: ``locdiff`` (``locdiff_core.train`` + ``sampling.Predictor``), ``locdiff-h`` (the same model and
samples; LocDiff's modes propose regions, the training images within ``infer.hybrid_radius_km`` of one
are scored by embedding similarity: ``locdiff_core.hybrid.hybrid_from_neighbours``), ``regression`` and
``classification`` (``locdiff_core.baselines``), ``retrieval`` (GeoCLIP-style: cosine similarity of the
query embedding against every training embedding -> coordinates of the nearest, or the densest of the
top-k), ``most_common_cell``.

Caching (reruns compute only what is missing): per (row, seed) a JSON of metrics under
``<cache>/results/`` (LocDiff rows keyed with the pipeline's eval version too, so a decoder change
recomputes them); trained LocDiff models under ``<cache>/models/``, keyed by everything that
affects training (embeddings key, config without its ``infer`` section, seed), so rows that differ
only in inference settings (K, S, guidance, ρ, EMA, decoder anchors) share one trained model.
``<cache>`` defaults to ``<project>/data/bench/method``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

BENCH_VERSION = "1"  # bump when the evaluation protocol changes (invalidates cached rows)
METHODS = ("locdiff", "locdiff-h", "regression", "classification", "retrieval", "most_common_cell")
COVERAGE_COLS = ("coverage50", "coverage50_cal", "coverage90", "coverage90_cal")
METRIC_COLS = ("acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km", "geoscore")
ROW_KEYS = {
    "name",
    "method",
    "group",
    "note",
    "config",
    "seeds",
    "use_ema",
    "decode_anchors",
    "retrieval",
    "eval_splits",
}
SPLIT_NOTES = {
    "test": "random gallery points, every training point >= 100 km away (the honest test)",
    "test_random": "random gallery points from the training pool (LEAKY: near-duplicate tiles)",
    "test_uniform": "uniform land points >= 100 km from training (unseen locations, new distribution)",
    "val": "validation split (model selection only: LocDiff-H's radius and rule are chosen here)",
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------------------------- config
def load_config(path: str | Path) -> dict:
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    for section in ("data", "budget", "rows"):
        if section not in cfg:
            raise ValueError(f"{path}: missing [{section}] section (needs data, budget, rows)")
    names = [r.get("name") for r in cfg["rows"]]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise ValueError(f"{path}: every [[rows]] needs a unique non-empty name, got {names}")
    for r in cfg["rows"]:
        unknown = sorted(set(r) - ROW_KEYS)
        if unknown:
            raise ValueError(f"row {r['name']!r}: unknown keys {unknown}; allowed: {sorted(ROW_KEYS)}")
        if r.get("method") not in METHODS:
            raise ValueError(f"row {r['name']!r}: method={r.get('method')!r}; allowed: {', '.join(METHODS)}")
    return cfg


def resolved_locdiff_config(cfg: dict, row: dict, seed: int):
    """The LocDiffConfig of a row: preset + shared budget + the row's overrides + the seed."""
    from locdiff_core.config import get_preset

    b = cfg["budget"]
    over = {
        "embed_dim": int(cfg["data"].get("embed_dim", 1280)),
        "train": {
            "max_steps": int(b["max_steps"]),
            "batch_size": int(b["batch_size"]),
            "lr": float(b["lr"]),
            "warmup_steps": int(b.get("warmup_steps", 100)),
            "eval_every": 0,
            "checkpoint_every": 0,
            "log_every": 0,
            "device": "cpu",
        },
    }
    if "infer" in b:  # pinned inference settings: the table stays put when a preset's defaults move
        over["infer"] = dict(b["infer"])
    over = _deep_merge(over, row.get("config", {}))
    over = _deep_merge(over, {"train": {"seed": int(seed)}})
    return get_preset(b.get("preset", "cpu"), **over)


# ----------------------------------------------------------------------------------------------- data
def prepare_data(data_cfg: dict, store=None, progress=print):
    """Build/reuse the sample and its embeddings; returns (embeddings key, {split: GeoEmbeddings})."""
    from locdiff.datasets.bluemarble import build_bluemarble
    from locdiff.embedstore import load_embeddings
    from locdiff.stages.embeddings import embed_dataset
    from locdiff.storage import Store
    from locdiff_core.data import GeoEmbeddings

    store = store or Store.from_uri(data_cfg.get("store"))
    t0 = time.perf_counter()
    ds_key = build_bluemarble(
        store,
        n=int(data_cfg["n"]),
        seed=int(data_cfg.get("seed", 0)),
        tile_deg=float(data_cfg.get("tile_deg", 4.0)),
        size_px=int(data_cfg.get("size_px", 128)),
    )
    emb_key = embed_dataset(store, ds_key, data_cfg.get("encoder", "efficientnet-lite0"))
    progress(f"data: {ds_key} -> {emb_key} ({time.perf_counter() - t0:.1f} s)")
    splits = {}
    wanted = ["train", *data_cfg.get("eval_splits", ["test", "test_random", "test_uniform"])]
    for split in wanted + [s for s in data_cfg.get("extra_splits", []) if s not in wanted]:
        try:
            _, emb, lat, lon = load_embeddings(store, emb_key, split=split)
        except LookupError:
            if split in wanted:
                raise
            continue  # an extra split the sample does not have
        cap = int(data_cfg.get("max_eval", 0))
        if split != "train" and cap and emb.shape[0] > cap:
            emb, lat, lon = emb[:cap], lat[:cap], lon[:cap]  # splits are already in random order
        splits[split] = GeoEmbeddings(emb, lat, lon)
    return emb_key, splits


# -------------------------------------------------------------------------------------------- methods
class Retrieval:
    """GeoCLIP-style retrieval over the training set: cosine similarity of embeddings -> coordinates.

    ``k == 1``: the nearest training image's location. ``k > 1``: among the top-k neighbours, the one
    whose ``radius_km`` neighbourhood (within the top-k) carries the most similarity mass (a vote).
    """

    def __init__(self, train, k: int = 1, radius_km: float = 200.0, chunk: int = 512):
        self.emb = torch.nn.functional.normalize(train.emb.float(), dim=1)
        self.lat, self.lon = train.lat_deg.double(), train.lon_deg.double()
        self.k, self.radius_km, self.chunk = int(k), float(radius_km), chunk

    def predict(self, emb):
        from locdiff_core.sphere import haversine_km

        q = torch.nn.functional.normalize(emb.float(), dim=1)
        lats, lons = [], []
        for s in range(0, q.shape[0], self.chunk):
            sim, idx = (q[s : s + self.chunk] @ self.emb.T).topk(self.k, dim=1)  # [b, k]
            la, lo = self.lat[idx], self.lon[idx]  # [b, k]
            if self.k == 1:
                lats.append(la[:, 0]), lons.append(lo[:, 0])
                continue
            d = haversine_km(la[:, :, None], lo[:, :, None], la[:, None, :], lo[:, None, :])  # [b, k, k]
            w = sim.double().clamp_min(0)[:, None, :]  # [b, 1, k]
            votes = ((d <= self.radius_km) * w).sum(-1)  # [b, k]
            best = votes.argmax(dim=1, keepdim=True)
            lats.append(la.gather(1, best)[:, 0]), lons.append(lo.gather(1, best)[:, 0])
        return torch.cat(lats), torch.cat(lons)


def decode_grid(row: dict, config, train):
    """The decoder's anchor set of a row (None = SHDD's default Fibonacci grid)."""
    from locdiff_core.anchors import AnchorGrid

    spec = row.get("decode_anchors")
    if not spec:
        return None
    kind, n = spec.get("kind", "uniform"), int(spec.get("n", 0))
    if kind == "uniform":
        return AnchorGrid.fibonacci(n, config.max_degree, max_cache_bytes=1 << 29)
    if kind == "data":  # training coordinates only: the test locations are never candidates
        return AnchorGrid(train.lat_deg, train.lon_deg, config.max_degree)
    raise ValueError(f"row {row['name']!r}: decode_anchors.kind={kind!r}; allowed: 'uniform', 'data'")


def _model_cache_path(cache: Path, emb_key: str, config) -> Path:
    d = config.to_dict()
    d.pop("infer")
    return cache / "models" / f"{_hash({'emb': emb_key, 'config': d, 'v': BENCH_VERSION})}.pt"


def fit_locdiff(cache: Path, emb_key: str, config, train, log=print):
    """Train (or load the cached) LocDiff model; returns (checkpoint, train_seconds, cached?)."""
    from locdiff_core.train import train as train_locdiff

    path = _model_cache_path(cache, emb_key, config)
    if path.exists():
        blob = torch.load(path, weights_only=False)
        return blob["checkpoint"], blob["train_s"], True
    t0 = time.perf_counter()
    res = train_locdiff(config, train)
    train_s = time.perf_counter() - t0
    ckpt = {k: res.checkpoint[k] for k in ("format", "config", "step", "model", "ema", "curves")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"checkpoint": ckpt, "train_s": train_s}, tmp)
    tmp.replace(path)
    log(f"  trained LocDiff L={config.max_degree} loss={config.loss.kind} in {train_s:.0f} s")
    return ckpt, train_s, False


_CODES: dict = {}  # sampled, averaged codes per (model, inference settings, seed, split) in this process
_SAMPLES: dict = {}  # the same samples' own peaks (lat, lon [N, K]) on the decoder grid


def run_row_seed(cfg: dict, row: dict, seed: int, emb_key: str, splits: dict, cache: Path, log=print) -> dict:
    """Train + evaluate one row for one seed (no caching of the result here)."""
    from locdiff_core.baselines import train_baseline
    from locdiff_core.metrics import geolocation_metrics

    torch.manual_seed(seed)
    train = splits["train"]
    method = row["method"]
    out: dict = {"row": row["name"], "method": method, "seed": seed, "splits": {}}
    t0 = time.perf_counter()
    cached_model = False
    if method in ("locdiff", "locdiff-h"):
        from locdiff_core.sampling import Predictor, credible_radii, sample_locations, sample_x0

        last_radii: dict = {}

        config = resolved_locdiff_config(cfg, row, seed)
        ckpt, train_s, cached_model = fit_locdiff(cache, emb_key, config, train, log)
        predictor = Predictor.from_checkpoint(
            ckpt,
            use_ema=bool(row.get("use_ema", True)),
            device="cpu",
            anchors=decode_grid(row, config, train),
        )
        out["config"] = config.to_dict()

        inf = config.infer
        sample_key = (
            str(_model_cache_path(cache, emb_key, config)),
            bool(row.get("use_ema", True)),
            inf.num_samples,
            inf.num_steps,
            inf.sampler,
            inf.eta,
            inf.guidance,
            seed,
        )

        def predict(emb):
            # rows that differ only in decoding (ρ, decoder anchors) share the sampled codes of a split
            key = (*sample_key, emb.shape[0], float(emb.sum()))
            if key not in _CODES:
                gen = torch.Generator().manual_seed(10_000 + seed)
                codes, s_lat, s_lon = [], [], []
                grid = predictor.anchors if predictor.anchors is not None else predictor.shdd.default_grid()
                for s in range(0, emb.shape[0], inf.batch_size):
                    x0 = sample_x0(
                        predictor.model,
                        predictor.schedule,
                        emb[s : s + inf.batch_size],
                        num_samples=inf.num_samples,
                        num_steps=inf.num_steps,
                        sampler=inf.sampler,
                        eta=inf.eta,
                        guidance=inf.guidance,
                        generator=gen,
                    )  # [b, K, D]
                    codes.append(x0.mean(dim=1) / predictor.shdd.scale)  # averaged code, as Predictor
                    la, lo = sample_locations(x0 / predictor.shdd.scale, grid)  # each sample's peak
                    s_lat.append(la), s_lon.append(lo)
                _CODES[key] = torch.cat(codes).to(torch.float64)
                _SAMPLES[key] = (torch.cat(s_lat), torch.cat(s_lon))
            dec = predictor.shdd.decode(
                _CODES[key], rho_km=inf.rho_km, anchors=predictor.anchors, top_k=inf.top_k
            )
            if method == "locdiff":
                # LocDiff's 50 % / 90 % credible radii (K-sample distance quantiles) for the coverage
                last_radii["r"] = credible_radii(dec.lat_deg, dec.lon_deg, *_SAMPLES[key]).numpy()
                return dec.lat_deg, dec.lon_deg
            return hybrid_predict(dec, emb)

        if method == "locdiff-h":
            from locdiff_core.hybrid import hybrid_from_neighbours
            from locdiff_core.retrieval import normalize_rows, search_inner_product

            gallery = normalize_rows(train.emb)
            g_lat, g_lon = train.lat_deg.double(), train.lon_deg.double()

            def hybrid_predict(dec, emb):
                sim, idx = search_inner_product(normalize_rows(emb), gallery, inf.hybrid_candidates)
                m = inf.hybrid_modes
                h = hybrid_from_neighbours(
                    dec.lat_deg.double(),
                    dec.lon_deg.double(),
                    dec.modes_lat_deg[:, :m].double(),
                    dec.modes_lon_deg[:, :m].double(),
                    sim,
                    g_lat[idx],
                    g_lon[idx],
                    radius_km=inf.hybrid_radius_km,
                    rule=inf.hybrid_rule,
                    modes_mass=dec.modes_mass[:, :m].double(),
                    min_mass=inf.hybrid_min_mass,
                )
                return h.lat_deg, h.lon_deg

    elif method == "retrieval":
        rc = row.get("retrieval", {})
        model = Retrieval(train, k=int(rc.get("k", 1)), radius_km=float(rc.get("radius_km", 200.0)))
        train_s = time.perf_counter() - t0
        predict = model.predict
    else:
        from locdiff_core.config import TrainConfig

        b = cfg["budget"]
        tc = TrainConfig(
            batch_size=int(b["batch_size"]),
            max_steps=int(row.get("config", {}).get("max_steps", b["max_steps"])),
            lr=float(b["lr"]),
            warmup_steps=int(b.get("warmup_steps", 100)),
            seed=seed,
            log_every=0,
            eval_every=0,
        )
        bc = row.get("config", {})
        model = train_baseline(
            method,
            train,
            tc,
            hidden=int(bc.get("hidden", 512)),
            n_cells=int(bc.get("n_cells", 1024)),
        )
        train_s = time.perf_counter() - t0
        predict = model.predict
    out["train_s"] = train_s
    out["train_cached"] = cached_model
    radii: dict = {}  # split -> (distances, radii [N, 2]) of LocDiff, for coverage and calibration
    import numpy as np

    from locdiff_core.sphere import haversine_km

    for split, data in splits.items():
        default_splits = cfg["data"].get("eval_splits", list(splits))
        if split == "train" or split not in row.get("eval_splits", default_splits):
            continue
        t1 = time.perf_counter()
        with torch.inference_mode():
            lat, lon = predict(data.emb)
        infer_s = time.perf_counter() - t1
        m = geolocation_metrics(data.lat_deg, data.lon_deg, lat, lon)
        out["splits"][split] = {**{k: float(v) for k, v in m.items()}, "infer_s": infer_s}
        if method == "locdiff":
            d = haversine_km(data.lat_deg, data.lon_deg, lat.double(), lon.double()).numpy()
            r = last_radii["r"]
            out["splits"][split].update(
                coverage50=float((d <= r[:, 0]).mean()), coverage90=float((d <= r[:, 1]).mean())
            )
            radii[split] = (d, r)
    if method == "locdiff" and "val" in splits and radii:
        # calibration: one scale per level fitted on `val` (the q-quantile of distance / radius there)
        if "val" not in radii:
            with torch.inference_mode():
                lat, lon = predict(splits["val"].emb)
            v = splits["val"]
            radii["val"] = (
                haversine_km(v.lat_deg, v.lon_deg, lat.double(), lon.double()).numpy(),
                last_radii["r"],
            )
        dv, rv = radii["val"]
        scales = [float(np.quantile(dv / np.maximum(rv[:, i], 1e-6), q)) for i, q in enumerate((0.5, 0.9))]
        out["radius_scales_val"] = scales
        for split, (d, r) in radii.items():
            if split in out["splits"]:
                out["splits"][split].update(
                    coverage50_cal=float((d <= scales[0] * r[:, 0]).mean()),
                    coverage90_cal=float((d <= scales[1] * r[:, 1]).mean()),
                )
    return out


def result_key(cfg: dict, row: dict, seed: int, emb_key: str) -> str:
    from locdiff.stages import VERSIONS

    spec = {k: v for k, v in row.items() if k not in ("group", "note", "seeds")}
    if row["method"] in ("locdiff", "locdiff-h"):
        spec["resolved"] = resolved_locdiff_config(cfg, row, seed).to_dict()
        if not spec["resolved"]["infer"]["hybrid_min_mass"]:  # no gate: the keys from before the field
            del spec["resolved"]["infer"]["hybrid_min_mass"]
        # the decoder's figures move with the pipeline's eval version (bumped when decoding changes):
        # cached rows decoded by an older decoder are recomputed (their trained models are reused)
        spec["decoder"] = VERSIONS["eval"]
    else:
        spec["budget"] = {k: v for k, v in cfg["budget"].items() if k != "infer"}  # LocDiff-only settings
    data = {k: v for k, v in cfg["data"].items() if k not in ("store", "extra_splits")}
    return _hash({"v": BENCH_VERSION, "emb": emb_key, "data": data, "row": spec, "seed": seed})


def run_benchmark(
    cfg: dict, rows=None, seeds=None, cache=None, store=None, log=print, cached_only: bool = False
) -> list[dict]:
    """Every (row, seed) result, computing only those missing from the cache (none if ``cached_only``)."""
    torch.set_num_threads(int(cfg.get("threads", 2)))
    cache = Path(cache or cfg.get("cache") or ROOT / "data" / "bench" / "method")
    emb_key, splits = prepare_data(cfg["data"], store=store, progress=log)
    sizes = {k: len(v) for k, v in splits.items()}
    log(f"split sizes: {sizes}")
    wanted = [r for r in cfg["rows"] if rows is None or r["name"] in rows]
    if rows is not None:
        missing = sorted(set(rows) - {r["name"] for r in wanted})
        if missing:
            raise ValueError(f"unknown row(s) {missing}; the config has {[r['name'] for r in cfg['rows']]}")
    results = []
    for row in wanted:
        row_seeds = seeds if seeds is not None else row.get("seeds", cfg["budget"].get("seeds", [0]))
        for seed in row_seeds:
            key = result_key(cfg, row, int(seed), emb_key)
            path = cache / "results" / f"{key}.json"
            if path.exists():
                res = json.loads(path.read_text())
            elif cached_only:
                continue
            else:
                log(f"row {row['name']!r} seed {seed} ...")
                res = run_row_seed(cfg, row, int(seed), emb_key, splits, cache, log)
                res.update(key=key, embeddings=emb_key, sizes=sizes)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(res, indent=1, default=str))
                tmp.replace(path)
                t = res["splits"].get("test", {})
                log(
                    f"  {row['name']} s{seed}: test median {t.get('median_km', float('nan')):.0f} km, "
                    f"acc200 {100 * t.get('acc_200km', float('nan')):.1f} %, train {res['train_s']:.0f} s"
                )
            res["group"] = row.get("group", "main")
            res["note"] = row.get("note", "")
            results.append(res)
    return results


# --------------------------------------------------------------------------------------------- tables
def _fmt(values: list[float], kind: str) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    if kind == "pct":
        s = f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")
    elif kind == "km":
        s = f"{mean:,.0f}" + (f" ± {sd:,.0f}" if sd is not None else "")
    else:
        s = f"{mean:,.0f}" + (f" ± {sd:,.0f}" if sd is not None else "")
    return s


def aggregate(results: list[dict]) -> dict:
    """{row: {"group", "note", "seeds", split: {metric: [values]}, "train_s": [...]}} in row order."""
    agg: dict[str, dict] = {}
    for r in results:
        a = agg.setdefault(
            r["row"],
            {"group": r["group"], "note": r["note"], "method": r["method"], "seeds": [], "train_s": []},
        )
        a["seeds"].append(r["seed"])
        a["train_s"].append(r["train_s"])
        for split, m in r["splits"].items():
            s = a.setdefault(split, {})
            for k, v in m.items():
                s.setdefault(k, []).append(v)
    return agg


def render_tables(results: list[dict], cfg: dict, groups=("main", "budget", "ablation", "select")) -> str:
    agg = aggregate(results)
    splits = [s for s in cfg["data"].get("eval_splits", ["test", "test_random", "test_uniform"])]
    splits += [s for s in cfg["data"].get("extra_splits", []) if s not in splits]
    lines = []
    sizes = results[0].get("sizes", {}) if results else {}
    for group in groups:
        rows = [(n, a) for n, a in agg.items() if a["group"] == group]
        if not rows:
            continue
        for split in splits:
            if not any(split in a for _, a in rows):
                continue
            title = f"### {group}: `{split}` (n = {sizes.get(split, '?')}) — {SPLIT_NOTES.get(split, '')}"
            lines += [title, ""]
            lines.append(
                "| row | seeds | acc@1 km % | 25 km % | 200 km % | 750 km % | 2500 km % | median km | "
                "GeoScore | train s | infer s |"
            )
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for name, a in rows:
                m = a.get(split)
                if not m:
                    continue
                cells = [_fmt(m[c], "pct") for c in METRIC_COLS[:5]]
                cells += [_fmt(m["median_km"], "km"), _fmt(m["geoscore"], "num")]
                cells += [
                    f"{sum(a['train_s']) / len(a['train_s']):.0f}",
                    f"{sum(m['infer_s']) / len(m['infer_s']):.1f}",
                ]
                lines.append(f"| {name} | {len(a['seeds'])} | " + " | ".join(cells) + " |")
            lines.append("")
    cov = [(n, a) for n, a in agg.items() if any("coverage50" in a.get(sp, {}) for sp in splits)]
    if cov:
        lines += [
            "### credible radii: % of truths inside LocDiff's 50 % / 90 % radius (raw; calibrated = one "
            "scale per level fitted on `val`)",
            "",
            "| row | split | seeds | 50 % raw | 50 % calibrated | 90 % raw | 90 % calibrated |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, a in cov:
            for split in splits:
                m = a.get(split)
                if not m or "coverage50" not in m:
                    continue
                cells = [_fmt(m.get(k, []), "pct") for k in COVERAGE_COLS]
                lines.append(f"| {name} | {split} | {len(m['coverage50'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / "method" / "config.toml"))
    ap.add_argument("--rows", help="comma-separated row names (default: all rows of the config)")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the row's or [budget].seeds)")
    ap.add_argument("--out", help="markdown file for the tables (a .json with every seed goes beside it)")
    ap.add_argument("--cache", help="cache folder (default: <project>/data/bench/method)")
    ap.add_argument("--cached-only", action="store_true", help="tabulate cached rows only, compute nothing")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    # row names may contain commas: separate them with ';' when any does
    sep = ";" if args.rows and ";" in args.rows else ","
    rows = [r.strip() for r in args.rows.split(sep)] if args.rows else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    t0 = time.perf_counter()
    results = run_benchmark(
        cfg,
        rows=rows,
        seeds=seeds,
        cache=args.cache,
        log=lambda m: print(m, flush=True),
        cached_only=args.cached_only,
    )
    text = render_tables(results, cfg)
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "benchmarks/method/run.py --config " + os.path.relpath(args.config, ROOT)
        header = f"<!-- generated by {cmd}; do not edit by hand -->\n\n"
        out.write_text(header + text + "\n")
        slim = [{k: v for k, v in r.items() if k != "config"} for r in results]
        out.with_suffix(".json").write_text(json.dumps(slim, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
