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


def test_nightly_follows_prod_else_the_newest_run(tmp_path, monkeypatch):
    """evaluate-latest's run choice: the newest run by default; once `prod` names an older run, that
    one; a name passed as run_key resolves too."""
    from locdiff.flows import evaluate_latest as el
    from locdiff.stages.runs import train_run
    from tests.flows.conftest import run_inputs, synthetic_embeddings, tiny_config

    uri = "file://" + str(tmp_path / "store")
    store = Store.from_uri(uri)
    emb = synthetic_embeddings(store, n=120)
    cfg = tiny_config(max_steps=5, checkpoint_every=0, log_every=5)
    inputs = run_inputs(uri, emb, cfg)
    older = train_run(store, emb, cfg, **inputs)
    newer = train_run(store, emb, cfg.replace(train={"seed": 1}), **inputs)
    assert store.latest("runs") == newer != older

    seen = []
    monkeypatch.setattr(el, "evaluate_present", lambda s, rk, *a, **k: (seen.append(rk), ([], ["-"]))[1])
    el.evaluate_latest.fn(datasets=[], storage=uri)
    aliases.tag(store, older, "prod")
    el.evaluate_latest.fn(datasets=[], storage=uri)
    aliases.tag(store, newer, "candidate")
    el.evaluate_latest.fn(datasets=[], storage=uri, run_key="candidate")
    aliases.untag(store, "prod")
    el.evaluate_latest.fn(datasets=[], storage=uri)
    assert seen == [newer, older, newer, newer]
