"""Smoke test of the method benchmark: end to end on a tiny sample (real tiles, real offline encoder)."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHOD_ROWS = {
    "locdiff": "locdiff",
    "locdiff-h": "locdiff-h",
    "regression": "regression",
    "classification": "classification",
    "retrieval": "retrieval",
    "retrieval-top3": "retrieval",
    "most-common": "most_common_cell",
}


def _load_run():
    spec = importlib.util.spec_from_file_location("method_run", ROOT / "benchmarks" / "method" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_config(tmp_path) -> dict:
    rows = [{"name": n, "method": m} for n, m in METHOD_ROWS.items()]
    rows[5]["retrieval"] = {"k": 3, "radius_km": 500.0}
    rows[1]["config"] = {"infer": {"hybrid_radius_km": 500.0, "hybrid_candidates": 16}}
    rows.append(
        {
            "name": "ablation-K1",
            "method": "locdiff",
            "group": "ablation",
            "seeds": [0],
            "eval_splits": ["test"],
            "config": {"infer": {"num_samples": 1}},
        }
    )
    return {
        "threads": 1,
        "cache": str(tmp_path / "cache"),
        "data": {
            "store": "file://" + str(tmp_path / "store"),
            "n": 120,
            "seed": 0,
            "embed_dim": 1280,
            "eval_splits": ["test", "test_random", "test_uniform"],
            "extra_splits": ["val"],
        },
        "budget": {
            "preset": "tiny",
            "max_steps": 10,
            "batch_size": 16,
            "lr": 1e-3,
            "warmup_steps": 2,
            "seeds": [0, 1],
        },
        "rows": rows,
    }


@pytest.mark.slow
def test_method_benchmark_end_to_end(tmp_path):
    run = _load_run()
    cfg = _tiny_config(tmp_path)
    results = run.run_benchmark(cfg, log=lambda m: None)

    # every method row, every seed, every split; the ablation row only on its own split and seed
    got = {(r["row"], r["seed"]) for r in results}
    assert got == {(n, s) for n in METHOD_ROWS for s in (0, 1)} | {("ablation-K1", 0)}
    for r in results:
        expected = ["test"] if r["row"] == "ablation-K1" else ["test", "test_random", "test_uniform"]
        assert sorted(r["splits"]) == sorted(expected)
        for split, m in r["splits"].items():
            accs = [m[k] for k in ("acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km")]
            assert all(0.0 <= a <= 1.0 for a in accs)
            assert accs == sorted(accs), (r["row"], split, accs)  # accuracy grows with the threshold
            assert 0.0 <= m["median_km"] <= math.pi * 6371.0088 + 1e-6
            assert 0.0 < m["geoscore"] <= 5000.0
            assert m["n"] == r["sizes"][split] > 0
    # LocDiff's rows carry the coverage of its credible radii, raw and calibrated on `val`
    for r in results:
        if r["method"] == "locdiff":
            assert len(r["radius_scales_val"]) == 2 and min(r["radius_scales_val"]) >= 0
            for m in r["splits"].values():
                assert 0 <= m["coverage50"] <= m["coverage90"] <= 1
                assert 0 <= m["coverage50_cal"] <= 1 and 0 <= m["coverage90_cal"] <= 1
    # the trivial predictor answers one place for every image; seeds do not change it
    mc = [r for r in results if r["row"] == "most-common"]
    assert mc[0]["splits"]["test"] == {
        **mc[1]["splits"]["test"],
        "infer_s": mc[0]["splits"]["test"]["infer_s"],
    }

    table = run.render_tables(results, cfg)
    for name in [*METHOD_ROWS, "ablation-K1"]:
        assert f"| {name} |" in table
    assert table.count("### main:") == 3 and table.count("### ablation:") == 1  # only its own split
    assert "### credible radii" in table

    # a rerun reuses every cached row (same keys, same figures) and the trained LocDiff models
    cached = sorted((tmp_path / "cache" / "results").glob("*.json"))
    assert len(cached) == len(results)
    again = run.run_benchmark(cfg, log=lambda m: None)
    assert [(r["key"], r["splits"]) for r in again] == [(r["key"], r["splits"]) for r in results]
    # seeds 0, 1; K1 and LocDiff-H reuse the LocDiff model of their seed
    assert len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 2


def test_config_rejects_unknown_method(tmp_path):
    run = _load_run()
    path = tmp_path / "bad.toml"
    path.write_text('[data]\nn = 10\n[budget]\nmax_steps = 1\n[[rows]]\nname = "x"\nmethod = "knn"\n')
    with pytest.raises(ValueError, match="allowed: locdiff"):
        run.load_config(path)
