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
NEEDS_STACK = ("stack", "deploy", "run")


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
    assert firsts.index("deploy") < firsts.index("run")  # `make demo` deploys only the demo deployment
    for cmd in ("runs", "predict", "sample-images", "evaluate", "sql", "deploy", "run", "datasets"):
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
    assert (tmp_path / "map.html").read_text().count("LocdiffMap.init") == 1
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 9  # header + 8 tiles
    assert "tag" in outputs["sql SELECT alias, run, action, created, current FROM aliases"]
    assert "mysample" in outputs["sql SELECT dataset, method, acc_750km, median_km, geoscore FROM metrics"]
    # `runs list` now shows prod's headline metrics from the evaluation above
    code, out, _ = cli("runs", "list", store=tiny_store)
    line = next(ln for ln in out.splitlines() if ln.startswith("prod"))
    assert "mysample" in line and "%" in line
    # the run's name survives in the store: untag it so other tests see the default again
    assert cli("runs", "untag", "prod", store=tiny_store)[0] == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_stack_commands_on_a_temporary_stack(tmp_path, monkeypatch):
    """The README's stack lines for real, in order (`stack up` stands in for `make demo`), on a stack
    whose project folder, Prefect home (server database, default pool), port and store are temporary."""
    from locdiff.stack import free_port

    root = Path(__file__).resolve().parents[2]
    project = tmp_path / "project"
    project.mkdir()
    for name in ("locdiff", "locdiff_core", "pyproject.toml", "prefect.yaml"):
        (project / name).symlink_to(root / name)
    monkeypatch.chdir(project)
    monkeypatch.setenv("LOCDIFF_PROJECT_DIR", str(project))
    monkeypatch.setenv("LOCDIFF_PREFECT_PORT", str(free_port(None)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = "file://" + str(tmp_path / "store")
    monkeypatch.setenv("LOCDIFF_STORAGE", store)
    code, out, err = cli("stack", "up")
    assert code == 0, out + err
    try:
        for argv in readme_commands():
            if argv[0] not in NEEDS_STACK or argv[:2] == ["stack", "down"]:
                continue
            code, out, err = _retry_503(argv)
            assert code == 0, (argv, out, err)
        from locdiff.storage import Store

        assert Store.from_uri(store).latest("runs") is not None  # train-mp16 committed a run
    finally:
        code, out, err = cli("stack", "down")
    assert code == 0, out + err
    assert cli("stack", "status")[0] != 0  # down means down


def _retry_503(argv: list[str]):
    """`cli(*argv)`, retried when the stack's SQLite-backed server answers 503 (busy: seen on a loaded
    2-core machine right after `deploy`); anything else fails at once."""
    import time

    import httpx

    for attempt in range(4):
        try:
            return cli(*argv)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 503 or attempt == 3:
                raise
            time.sleep(5 * (attempt + 1))
    raise AssertionError("unreachable")
