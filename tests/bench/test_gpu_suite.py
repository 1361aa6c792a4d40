"""benchmarks/gpu_suite.py runs every section on the CPU at small sizes and reports finite figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_suite_small_on_cpu(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--device", "cpu", "--small", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["small"] is True
    expected = {
        "encoder": ("images_per_s", "tflops", "ratio_vs_gemm"),
        "train": ("samples_per_s_1proc", "samples_per_s_2proc", "mfu_vs_gemm", "ddp_scaling_vs_1proc"),
        "harmonics": (
            "harmonics_points_per_s", "harmonics_vs_cpu", "infer_images_per_s", "decode_share_of_infer"
        ),
        "search": ("queries_per_s", "tflops", "ratio_vs_gemm"),
    }
    for section, keys in expected.items():
        assert "error" not in res[section], res[section]
        for key in keys:
            value = res[section][key]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (section, key, value)
    # the same device on both sides: the CPU path must agree with itself exactly
    assert res["harmonics"]["harmonics_max_abs_diff"] == 0.0
    assert res["search"]["gallery"] == 20_000 and res["search"]["queries"] == 256
