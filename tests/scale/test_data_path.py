"""The memory-mapped data path: synthetic artifacts, .npy arrays beside the Parquet parts, batches read
across parts, the device-resident copy yielding the same batches, and the same training trajectory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locdiff.datasets.synth import SYNTHETIC_NOTE, synth_embeddings
from locdiff.embedstore import embedding_parts, iter_embeddings, load_embeddings, open_embeddings
from locdiff.stages.runs import load_geo, load_geo_in_memory, resolve_config
from locdiff.stages.targets import build_targets, load_targets
from locdiff.storage import Store
from locdiff_core.data import BatchSampler
from locdiff_core.train import train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    store = Store.from_uri(str(tmp_path_factory.mktemp("store")))
    key = synth_embeddings(store, "unit", rows=500, dim=16, seed=3, part_rows=128)  # 4 parts
    return store, key


def test_synth_writes_parquet_and_arrays(synth):
    store, key = synth
    man = store.manifest(key)
    assert man["rows"] == 500 and man["dim"] == 16 and man["synthetic"] and man["note"] == SYNTHETIC_NOTE
    assert len(embedding_parts(store, key)) == 4
    assert sum(f.startswith("arrays/") for f in store.files(key)) == 12  # emb, lat, lon per part
    again = synth_embeddings(store, "unit", rows=500, dim=16, seed=3, part_rows=128)
    assert again == key


def test_mapped_rows_equal_the_parquet_rows(synth):
    store, key = synth
    data = open_embeddings(store, key, "train")
    assert all(isinstance(p.emb, np.memmap) for p in data.parts)  # nothing copied up front
    _, emb, lat, lon = load_embeddings(store, key, "train")
    assert len(data) == len(emb)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:200]
    got = data.gather(idx, ("emb", "lat_deg", "lon_deg"))
    assert torch.equal(got["emb"].float(), emb[idx])
    assert torch.equal(got["lat_deg"], lat[idx]) and torch.equal(got["lon_deg"], lon[idx])
    # one batch draws from every part, not from one part at a time
    part, _ = data._locate(BatchSampler(len(data), 64).draw(torch.Generator().manual_seed(1)))
    assert set(part.tolist()) == {0, 1, 2, 3}


def test_target_cache_arrays_align(synth):
    store, key = synth
    tkey = build_targets(store, key, max_degree=4)
    data = open_embeddings(store, key, "val", targets_key=tkey)
    _, codes = load_targets(store, tkey, split="val")
    got = data.gather(torch.arange(len(data)), ("codes",))["codes"]
    assert torch.equal(got, codes)


def test_device_resident_copy_and_in_memory_load_train_identically(synth):
    """The same trajectory from the memory-mapped parts, their device-resident copy (here on cpu) and
    the in-memory table."""
    store, key = synth
    tkey = build_targets(store, key, max_degree=8)
    config = resolve_config("tiny", {"train": {"max_steps": 6, "batch_size": 32}}, embed_dim=16)
    mapped = load_geo(store, key, "train", tkey)
    resident = mapped.to_device("cpu")
    assert torch.equal(
        resident.gather(torch.arange(50), ("emb",))["emb"], mapped.gather(torch.arange(50), ("emb",))["emb"]
    )
    runs = [
        train(config, mapped).checkpoint,
        train(config, mapped, data_device="cpu").checkpoint,
        train(config, load_geo_in_memory(store, key, "train", tkey)).checkpoint,
    ]
    for other in runs[1:]:
        for name, w in runs[0]["model"].items():
            assert torch.equal(w, other["model"][name]), name


def test_synth_command(tmp_path):
    from typer.testing import CliRunner

    from locdiff.cli import app

    out = CliRunner().invoke(
        app, ["datasets", "synth", "cli", "--rows", "50", "--dim", "8", "--storage", str(tmp_path)]
    )
    assert out.exit_code == 0, out.output
    key = out.output.strip().splitlines()[-1]
    assert key.startswith("embeddings/cli/synthetic/")
    man = Store.from_uri(str(tmp_path)).manifest(key)
    assert man["rows"] == 50 and man["dim"] == 8 and man["synthetic"] is True


@pytest.mark.parametrize("split", [None, "test"])
def test_iter_embeddings_blocks_are_load_embeddings_cut(synth, split):
    """Evaluation's reader: blocks of exactly block_rows rows across part boundaries, same rows and order."""
    store, key = synth
    ids, emb, lat, lon = load_embeddings(store, key, split)
    for block in (1, 37, 128, 10_000):
        n, blocks = iter_embeddings(store, key, split, block)
        got = list(blocks)
        assert n == len(ids) and [len(b[0]) for b in got[:-1]] == [block] * (len(got) - 1)
        assert 0 < len(got[-1][0]) <= block
        assert [i for b in got for i in b[0]] == ids
        assert np.array_equal(np.concatenate([b[1] for b in got]), emb.numpy())
        assert got[0][1].dtype == np.float32 and got[0][2].dtype == np.float64
        assert np.array_equal(np.concatenate([b[2] for b in got]), lat.numpy())
        assert np.array_equal(np.concatenate([b[3] for b in got]), lon.numpy())
    with pytest.raises(LookupError, match="no embeddings of split"):
        iter_embeddings(store, key, "nope")


def test_evaluation_in_blocks_equals_one_block(synth, monkeypatch):
    """Evaluation reads its split a block at a time: blocks of whole inference batches predict what one
    block does (one generator across blocks), so the block size changes memory, not results."""
    import locdiff.stages.evals as evals
    from locdiff.stages.runs import train_run
    from tests.flows.conftest import run_inputs, tiny_config

    store, key = synth
    config = tiny_config(embed_dim=16, max_steps=4, batch_size=32)
    config = config.replace(infer={"batch_size": 16})
    run = train_run(store, key, config, **run_inputs(store.root, key, config), name="blocks")
    tables = []
    n_test = len(load_embeddings(store, key, "test")[0])
    for block_rows in (1 << 16, 16):  # the whole split at once, then blocks of one inference batch
        monkeypatch.setattr(evals, "EVAL_BLOCK_ROWS", block_rows)
        ev = evals.evaluate_run(store, run, key, split="test", baselines=["most-common-region"])
        tables.append(store.read_table(ev, "predictions.parquet"))
        store.delete(ev)
    assert n_test > 16 and tables[0].num_rows == 2 * n_test
    assert repr(tables[0].to_pylist()) == repr(tables[1].to_pylist())  # exact floats, NaN equal to NaN
