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


GPU_SECTION = "## Train on MP16 on your GPU box"


def gpu_walkthrough() -> list[list[str]]:
    """argv of every line of the README's "Train on MP16 on your GPU box" ```shell block."""
    section = README.read_text().split(GPU_SECTION, 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```shell\n(.*?)```", section, flags=re.S)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def _deployments() -> dict[str, object]:
    """`FLOW/DEPLOYMENT` (as `prefect deployment run` takes it) -> the flow, from prefect.yaml."""
    import importlib

    import yaml

    out = {}
    for d in yaml.safe_load((README.parent / "prefect.yaml").read_text())["deployments"]:
        path, attr = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)
        out[f"{flow.name}/{d['name']}"] = flow
    return out


@pytest.mark.slow
def test_gpu_box_walkthrough_as_far_as_offline_allows(
    tmp_path,
    monkeypatch,
    tiny_store,
    prefect_harness,  # noqa: F811
    http_files,
):
    """The walk-through in order: `make` targets exist; stack, deploy and `prefect deployment run`
    lines parse against the CLI, prefect.yaml and the flows' parameters; the downloads run for real
    from a local mirror of the published lists (MP16, YFCC26k); `sql` answers for a run in flight;
    `runs`, and `evaluate --device auto` on the downloaded YFCC26k, run against a copy of the tiny run."""
    import shutil

    from locdiff.stages.runs import train_run
    from locdiff.storage import Store
    from tests.data.test_sources import flickr_mirror
    from tests.flows.conftest import run_inputs, tiny_config

    store_dir = tmp_path / "store"
    shutil.copytree(tiny_store.removeprefix("file://"), store_dir)
    store = "file://" + str(store_dir)
    mirrors = {}
    for name, lists, size in (("mp16", "mp16", "z"), ("yfcc26k", "yfcc25600", "")):
        flickr_mirror(http_files, f"{lists}_urls.csv", f"{lists}_places365.csv", size)
        mirrors[name] = http_files.root / f"mirror-{name}"
        (http_files.root / "mirror").rename(mirrors[name])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCDIFF_DOWNLOADS", str(tmp_path / "downloads"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a run in flight (stopped at step 20 of 40) whose curves the README's `sql` line reads
    s = Store.from_uri(store)
    emb = s.manifest(s.latest("runs"))["embeddings"]
    cfg = tiny_config(embed_dim=1280, max_steps=40, log_every=2, checkpoint_every=0, seed=5)
    with pytest.raises(RuntimeError, match="stopped at step 20"):
        train_run(s, emb, cfg, **run_inputs(store, emb, cfg), stop_after_steps=20)

    deployments, makefile = _deployments(), (README.parent / "Makefile").read_text()
    outputs = {}
    for argv in gpu_walkthrough():
        if argv[0] == "make":
            assert f"\n{argv[1]}:" in makefile, argv
        elif argv[0] == "source":
            assert argv[1:] == [".venv/bin/activate"]
        elif argv[0] == "eval":  # eval "$(locdiff stack env)"
            _parse_only(shlex.split(argv[1].removeprefix("$(").removesuffix(")"))[1:])
        elif argv[0] == "prefect":
            assert argv[1:3] == ["deployment", "run"] and argv[3] in deployments, argv
            params = {p.split("=", 1)[0] for k, p in zip(argv, argv[1:], strict=False) if k == "--param"}
            assert params <= set(inspect.signature(deployments[argv[3]].fn).parameters)
        elif argv[1] in NEEDS_STACK:
            _parse_only(argv[1:])
        else:
            extra = (
                ["--mirror", str(mirrors[argv[3]]), "--processes", "0"]
                if argv[1:3] == ["datasets", "download"]
                else []
            )
            code, out, err = cli(*argv[1:], *extra, store=store)
            assert code == 0, (argv, out, err)
            outputs[" ".join(argv[1:4])] = out
    for name in ("mp16", "yfcc26k"):  # 4 listed: 1 dead link, 1 without coordinates
        assert Store.from_uri(store).manifest(outputs[f"datasets download {name}"].strip())["rows"] == 2
    assert (
        "train/loss"
        in outputs["sql SELECT step, metric, value FROM curves WHERE in_flight ORDER BY step DESC LIMIT 12"]
    )
    assert "prod ->" in outputs["runs tag latest"]
    evaluated = outputs["evaluate --model prod"]
    assert "yfcc26k" in evaluated and "report:" in evaluated
    assert "gws15k: skipped, not present locally" in evaluated
