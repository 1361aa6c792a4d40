"""Every CLI command with hostile arguments answers with one line (a usage error, or ``error:`` + a
hint) and exit 1 or 2, never a traceback: names with a trailing newline, URLs where files go, FIFOs,
empty SQL, refused store paths, checkpoints whose config does not match their weights or whose weights
are NaN, and flows that cannot reach a Prefect server. (Commands that start long-lived things — ``stack
up``, ``demo``, ``deploy`` — are given only arguments that fail before anything starts.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from locdiff.inference import load_checkpoint
from locdiff.storage import Store
from locdiff_core.checkpoint import to_bytes
from tests.product.conftest import cli, write_image


def _bad_checkpoints(store_uri: str, run_key: str, folder) -> dict[str, str]:
    state = load_checkpoint(Store.from_uri(store_uri), run_key)
    nan = {**state, "ema": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                            for k, v in state["ema"].items()}}  # fmt: skip
    model = state["config"]["model"]
    cfg = {**state["config"], "model": {**model, "cond_dim": 2 * model["cond_dim"]}}  # weights unchanged
    paths = {}
    for name, ck in (("nan", nan), ("mismatch", {**state, "config": cfg})):
        paths[name] = str(folder / f"{name}.pt")
        (folder / f"{name}.pt").write_bytes(to_bytes(ck))
    return paths


def test_hostile_arguments_give_one_line_errors(tmp_path, tiny_store, run_key, monkeypatch):
    monkeypatch.setenv("LOCDIFF_PROJECT_DIR", str(tmp_path))  # no stack here: nothing is running
    img = str(write_image(tmp_path / "a.jpg"))
    os.mkfifo(tmp_path / "pipe.csv")
    (tmp_path / "m.csv").write_text("id,path,lat,lon\na,a.jpg,1,2\n")
    ck = _bad_checkpoints(tiny_store, run_key, tmp_path)
    loc = "locdiffstore://"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cases = {
        "version --bogus": (["version", "--bogus"], "No such option"),
        "sql empty": (["sql", ""], "the SQL query is empty"),
        "sql blank": (["sql", "  \n"], "the SQL query is empty"),
        "sql refused store read": (["sql", f"select * from read_csv('{loc}/etc/passwd')"], "SQL refused"),
        "sql refused parquet": (["sql", f"select * from read_parquet('{loc}x/y.parquet')"], "SQL refused"),
        "sql write": (["sql", "COPY (select 1) TO 'x.csv'"], "SQL refused"),
        "sql -o s3": (["sql", "select 1", "-o", "s3://bucket/x.csv"], "not a URL"),
        "sql -o no folder": (["sql", "select 1", "-o", str(tmp_path / "no" / "x.csv")], "does not exist"),
        "sql -o folder": (["sql", "select 1", "-o", str(tmp_path)], "is a folder"),
        "sql bad format": (["sql", "select 1", "-f", "xml"], "unknown --format"),
        "sql bad storage": (["sql", "select 1", "--storage", "ftp://x"], "unsupported storage URI"),
        "train bad preset": (["train", "--preset", "nope"], "preset"),
        "train bad override": (["train", "--set", "train={bad"], "train must be"),
        "evaluate unknown run": (["evaluate", "--run", "nope"], "nope"),
        "evaluate newline name": (["evaluate", "--run", "prod\n"], "prod"),
        "predict missing input": (["predict", str(tmp_path / "nope.jpg")], "no such file"),
        "predict unknown model": (["predict", img, "--model", "nope"], "nope"),
        "predict NaN weights": (
            ["predict", img, "--checkpoint", ck["nan"], "--encoder", "efficientnet-lite0"], "NaN"),
        "predict config/weights mismatch": (
            ["predict", img, "--checkpoint", ck["mismatch"], "--encoder", "efficientnet-lite0"],
            "do not fit its config"),
        "predict checkpoint is a folder": (["predict", img, "--checkpoint", str(tmp_path)], "run key"),
        "predict bad out": (["predict", img, "--out", str(tmp_path / "x.xml")], "--out"),
        "predict bad device": (["predict", img, "--device", "tpu"], "device"),
        "predict batch 0": (["predict", img, "--batch-size", "0"], "batch-size"),
        "sample-images under a file": (["sample-images", str(tmp_path / "a.jpg" / "x")], "a.jpg"),
        "serve unknown model": (["serve", "--model", "nope", "--port", port], "nope"),
        "serve port 0": (["serve", "--port", "0"], "port"),
        "serve bad port": (["serve", "--port", "99999"], "port"),
        "serve bad host": (["serve", "--host", "no such host!", "--port", port], "host"),
        "datasets list bad storage": (["datasets", "list", "--storage", "gopher://x"], "storage"),
        "prepare newline name": (["datasets", "prepare", "a\n", "--manifest", str(tmp_path / "m.csv")],
                                 "name"),
        "prepare name with space": (["datasets", "prepare", "a b", "--manifest", str(tmp_path / "m.csv")],
                                    "name"),
        "prepare missing manifest": (["datasets", "prepare", "x", "--manifest", str(tmp_path / "n.csv")],
                                     "not found"),
        "prepare fifo manifest": (["datasets", "prepare", "x", "--manifest", str(tmp_path / "pipe.csv")],
                                  "not a regular file"),
        "prepare missing root": (["datasets", "prepare", "x", "--manifest", str(tmp_path / "m.csv"),
                                  "--images-root", str(tmp_path / "none")], "not a folder"),
        "prepare skip share 2": (["datasets", "prepare", "x", "--manifest", str(tmp_path / "m.csv"),
                                  "--max-skip-share", "2"], "max-skip-share"),
        "synth newline name": (["datasets", "synth", "x\n", "--rows", "10", "--dim", "4"], "name"),
        "synth zero rows": (["datasets", "synth", "x", "--rows", "0"], "rows"),
        "stack up bad port": (["stack", "up", "--port", "port"], "port"),
        "runs tag newline name": (["runs", "tag", "latest", "prod\n"], "invalid model name"),
        "runs tag unknown run": (["runs", "tag", "nope", "prod"], "nope"),
        "runs tag reserved": (["runs", "tag", "latest", "latest"], "reserved"),
        "runs untag newline": (["runs", "untag", "prod\n"], "invalid model name"),
        "runs list bad storage": (["runs", "list", "--storage", "s3://"], "bucket"),
        "run without a stack": (["run", "nope/nope"], "stack up"),
        "demo bad preset": (["demo", "--preset", "nope"], "preset"),
        "demo without prefect.yaml": (["demo"], "no prefect.yaml"),
        "deploy without prefect.yaml": (["deploy", "--name", "nope"], "no prefect.yaml"),
        "stack down bad grace": (["stack", "down", "--grace", "soon"], "grace"),
    }  # fmt: skip
    failures = []
    for what, (args, words) in cases.items():
        try:
            code, out, err = cli(*args, store=tiny_store)
        except BaseException as exc:  # noqa: BLE001 - a traceback is what this test is here to catch
            failures.append(f"{what}: {type(exc).__name__}: {exc}"[:300])
            continue
        finally:
            if (tmp_path / ".prefect" / "stack").exists():  # a command started a stack: stop it
                from locdiff.stack import Stack

                Stack().down(grace_s=5)
                failures.append(f"{what}: started the local stack")
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        one_line = [ln for ln in lines if ln.startswith("error: ") or "Error" in ln]
        if code not in (1, 2) or "Traceback" in err or not one_line or words.lower() not in err.lower():
            failures.append(f"{what}: exit {code}, stderr {err[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_flows_without_a_prefect_server_say_start_the_stack(tmp_path):
    """No stack and a temporary Prefect server that does not answer in time (here: 0 s): one line that
    says to run `locdiff stack up`, not Prefect's RuntimeError."""
    code = (
        "from prefect import flow\n"
        "from locdiff.commands.run import _run_flow_in_process\n"
        "from locdiff.errors import UserError\n"
        "@flow\n"
        "def f():\n"
        "    return 1\n"
        "try:\n"
        "    _run_flow_in_process(f)\n"
        "except UserError as exc:\n"
        "    print('USERERROR', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0",
        LOCDIFF_PROJECT_DIR=str(tmp_path),
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "USERERROR no Prefect server" in res.stdout, res.stderr[-2000:]
    assert "locdiff stack up" in res.stdout


def test_missing_column_hint_names_options_that_exist(tmp_path):
    """The missing-column error names --lat-col & co., and they do exist and work."""
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.jpg", color=(200, 10, 10))
    m = tmp_path / "m.csv"
    m.write_text("pid,file,y,x\np1,a.jpg,10,20\np2,b.jpg,-5,7\n")
    store = "file://" + str(tmp_path / "store")
    code, _, err = cli("datasets", "prepare", "cols", "--manifest", str(m), store=store)
    assert code == 2 and "missing column(s) lat, lon" in err and "--lat-col" in err, err
    code, out, err = cli(
        "datasets", "prepare", "cols", "--manifest", str(m), "--lat-col", "y", "--lon-col", "x",
        "--id-col", "pid", "--image-col", "file", store=store,
    )  # fmt: skip
    assert code == 0, err
    key = out.strip().splitlines()[-1]
    assert Store.from_uri(store).manifest(key)["rows"] == 2


def test_deploy_names_are_checked_before_a_server_starts():
    from pathlib import Path

    from locdiff.commands.run import _check_deployments
    from locdiff.errors import UserError

    root = Path(__file__).resolve().parents[2]
    _check_deployments(root, ["demo", "default"])
    with pytest.raises(UserError, match=r"no deployment named 'nope'.*prefect.yaml") as info:
        _check_deployments(root, ["demo", "nope"])
    assert "demo" in info.value.hint
