"""Model names: tag/untag are committed alias artifacts; names resolve for predict/evaluate/nightly;
the history is a DuckDB view."""

from __future__ import annotations

import pytest

from locdiff.catalog import connect
from locdiff.errors import UserError
from locdiff.stages import aliases
from locdiff.storage import Store
from tests.product.conftest import cli


def test_tag_untag_resolve_and_history(tmp_path, tiny_store, run_key):
    store = Store.from_uri(tiny_store)
    assert aliases.default_run(store) == run_key  # no prod yet: the newest run
    k1 = aliases.tag(store, run_key, "candidate")
    assert store.exists(k1) and store.manifest(k1)["upstream"] == [run_key]
    assert aliases.resolve_run(store, "candidate") == run_key
    assert aliases.resolve_run(store, run_key) == run_key
    aliases.untag(store, "candidate")
    assert aliases.resolve_alias(store, "candidate") is None
    with pytest.raises(UserError, match="no model is named 'candidate'"):
        aliases.resolve_run(store, "candidate")
    with pytest.raises(UserError, match="no model is named"):
        aliases.untag(store, "candidate")
    with pytest.raises(UserError, match="invalid model name"):
        aliases.tag(store, run_key, "bad/name")
    with pytest.raises(UserError, match="no committed run"):
        aliases.tag(store, "runs/x/0123456789abcdef", "prod2")

    con = connect(store)
    rows = con.execute(
        "SELECT alias, run, action, current FROM aliases WHERE alias = 'candidate' ORDER BY created"
    ).fetchall()
    assert rows == [("candidate", run_key, "tag", False), ("candidate", None, "untag", True)]


def test_runs_cli_list_tag_untag(tiny_store, run_key):
    code, out, err = cli("runs", "tag", run_key, "staging", store=tiny_store)
    assert code == 0, err
    assert f"staging -> {run_key}" in out
    code, out, err = cli("runs", "list", store=tiny_store)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if run_key in ln)
    assert "staging" in line and "efficientnet-lite0" in line and "tiny" in line and " 20 " in line
    code, out, err = cli("sql", "SELECT alias, action FROM aliases WHERE current", store=tiny_store)
    assert code == 0 and "staging" in out, err
    code, out, err = cli("runs", "untag", "staging", store=tiny_store)
    assert code == 0 and "staging removed" in out, err
    code, out, err = cli("runs", "untag", "staging", store=tiny_store)
    assert code == 2 and "error: no model is named 'staging'" in err and "Traceback" not in err
    code, out, err = cli("runs", "tag", "runs/nope/0123456789abcdef", "prod", store=tiny_store)
    assert code == 2 and "no committed run" in err


def test_nightly_follows_prod(tmp_path, tiny_store, run_key, monkeypatch):
    """evaluate-latest's run choice: prod when tagged (a different, older run here), else the newest."""
    from locdiff.flows import evaluate_latest as el

    seen = {}

    def fake_evaluate_present(storage, rk, enc, datasets, baselines):
        seen["run"] = rk
        return [], ["skipped"]

    monkeypatch.setattr(el, "evaluate_present", fake_evaluate_present)
    store = Store.from_uri(tiny_store)
    out = el.evaluate_latest.fn(datasets=[], storage=tiny_store)
    assert seen["run"] == run_key and out["run"] == run_key
    aliases.tag(store, run_key, "prod")
    try:
        el.evaluate_latest.fn(datasets=[], storage=tiny_store, run_key="prod")
        assert seen["run"] == run_key
        el.evaluate_latest.fn(datasets=[], storage=tiny_store)
        assert seen["run"] == run_key
    finally:
        aliases.untag(store, "prod")
