"""The README's `locdiff` commands, in the order given, against a temporary store holding a tiny
trained run (standing in for `make demo`'s). Commands that need the local stack (`stack ...`, `run
DEPLOYMENT`) are parsed against the CLI (and the deployment's parameters against its flow) here; the
stack and the train-mp16 deployment themselves run in tests/e2e."""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import pytest

from tests.flows.conftest import prefect_harness  # noqa: F401  (session fixture, re-exported)
from tests.product.conftest import cli

README = Path(__file__).resolve().parents[2] / "README.md"
NEEDS_STACK = ("stack", "run")


def readme_commands() -> list[list[str]]:
    """argv of every line that starts with `locdiff` inside the README's ```bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            if line.strip().startswith("locdiff "):
                out.append(shlex.split(line, comments=True)[1:])
    return out


def test_readme_lists_the_product_commands():
    firsts = [c[0] for c in readme_commands() if c]
    for cmd in ("runs", "predict", "sample-images", "evaluate", "sql", "run", "datasets"):
        assert cmd in firsts, cmd
    run = next(c for c in readme_commands() if c[:1] == ["run"])
    assert "encoder=efficientnet-lite0" in run  # the offline encoder: ViT-L-14 weights are not on the machine


def _parse_only(argv: list[str]) -> None:
    """Parse argv with the CLI's click command (options, arguments) without running it."""
    import typer.main

    from locdiff import cli as cli_mod

    cli_mod._mount()
    group = typer.main.get_command(cli_mod.app)
    ctx = group.make_context("locdiff", list(argv), resilient_parsing=False)
    name, cmd, rest = group.resolve_command(ctx, list(argv))
    sub = cmd.make_context(name, rest, parent=ctx)
    if hasattr(cmd, "resolve_command") and rest:  # a sub-app (stack status/down)
        cmd.resolve_command(sub, rest)
    if argv[0] == "run":
        from locdiff.commands.run import _parse_params
        from locdiff.flows.train_mp16 import train_mp16

        params = _parse_params([v for k, v in zip(argv, argv[1:], strict=False) if k in ("-p", "--param")])
        allowed = set(inspect.signature(train_mp16.fn).parameters)
        assert set(params) <= allowed, set(params) - allowed


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path, monkeypatch, tiny_store, prefect_harness):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ran = []
    for argv in readme_commands():
        if argv[0] in NEEDS_STACK:
            _parse_only(argv)
            continue
        code, out, err = cli(*argv, store=tiny_store)
        assert code == 0, (argv, out, err)
        ran.append((argv, out))
    outputs = {" ".join(a[:2]): o for a, o in ran}
    assert "prod ->" in outputs["runs tag"]
    assert (tmp_path / "map.png").exists() and (tmp_path / "predictions.geojson").exists()
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 9  # header + 8 tiles
    assert "tag" in outputs["sql SELECT alias, run, action, created, current FROM aliases"]
    assert "mysample" in outputs["sql SELECT dataset, method, acc_750km, median_km, geoscore FROM metrics"]
    # the run's name survives in the store: untag it so other tests see the default again
    assert cli("runs", "untag", "prod", store=tiny_store)[0] == 0
