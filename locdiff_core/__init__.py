"""LocDiff core: pure math and models (torch/numpy/stdlib only)."""
