"""The GPU suite: one script, under 10 minutes on one GPU node, for the first GPU machine we get.

Sections (each one independent: a section that fails records its error and the others still run):

1. ``encoder``: image-encoder throughput (open_clip ``ViT-L-14``, random weights, bf16 autocast on
   CUDA), images/s and achieved TFLOP/s (FLOPs of one forward pass counted by
   ``torch.utils.flop_counter``) against a bf16 GEMM measured in the same process.
2. ``train``: samples/s of the real training loop (``locdiff_core.train.train``) at the ``mp16``
   preset's network on synthetic data, model FLOPs utilisation (6 x linear MACs per sample) against
   the same GEMM and the device's nominal bf16 peak; then the same under torchrun on every visible GPU
   (DDP, nccl), with the scaling ratio to one process.
3. ``harmonics``: ``real_sph_harm`` at L = 64 on the device against the CPU path in the same run
   (checked to agree first), and inference as ``predict``/``serve``/evaluation run it at the ``mp16``
   preset (K samples x S steps on the device, then the decoder, which runs on the CPU): images/s and
   the decoder's share of that time.
4. ``search``: exact top-k inner-product search of 25,600 queries over 4.72 M fp16 rows x 768 (the
   retrieval index at MP16 size), queries/s and achieved TFLOP/s against a fp16 GEMM.

``--small`` shrinks every size so the whole suite runs on a CPU in well under a minute (the test
``tests/bench/test_gpu_suite.py`` runs ``--device cpu --small``); the torchrun section then runs two
gloo processes on the CPU. Prints one line per figure and, with ``--json PATH``, writes them all.

Run on a GPU box: ``.venv/bin/python benchmarks/gpu_suite.py --json gpu_suite.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_train import NOMINAL_BF16_TFLOPS, linear_macs, matmul_reference, sync  # noqa: E402

# (full, small) sizes of each section
SIZES = {
    "encoder_model": ("ViT-L-14", "ViT-S-32"),
    "encoder_batch": (256, 2),
    "encoder_reps": (10, 1),
    "train_preset": ("mp16", "tiny"),
    "train_steps": (60, 4),
    "train_rows": (200_000, 2_000),
    "harm_degree": (64, 16),
    "harm_points": (100_000, 2_000),
    "infer_images": (1024, 8),
    "search_gallery": (4_720_000, 20_000),
    "search_queries": (25_600, 256),
    "search_dim": (768, 64),
}


def size(name: str, small: bool):
    return SIZES[name][1 if small else 0]


def timed(fn, device, reps: int = 1) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def nominal_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


def bench_encoder(device, small: bool) -> dict:
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    name, batch = size("encoder_model", small), size("encoder_batch", small)
    model = open_clip.create_model(name, pretrained=None).visual.to(device).eval()
    px = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
    x = torch.randn(batch, 3, px, px, device=device)
    bf16 = device.type == "cuda"

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x)

    with FlopCounterMode(display=False) as counter:
        forward()
    flops = counter.get_total_flops()
    per_batch = timed(forward, device, size("encoder_reps", small))
    ref = matmul_reference(device, torch.bfloat16 if bf16 else torch.float32)
    achieved = flops / per_batch
    return {
        "model": name,
        "batch": batch,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "images_per_s": batch / per_batch,
        "tflops": achieved / 1e12,
        "ratio_vs_gemm": achieved / ref,
    }


def _train_config(device_name: str, small: bool, steps: int):
    from locdiff_core.config import get_preset

    return get_preset(
        size("train_preset", small),
        train={
            "device": device_name,
            "max_steps": steps,
            "warmup_steps": 1,
            "log_every": steps,
            "eval_every": 0,
            "checkpoint_every": 0,
        },
    )


def _train_data(cfg, rows: int):
    from locdiff_core.data import GeoEmbeddings
    from locdiff_core.sphere import sample_uniform

    g = torch.Generator().manual_seed(0)
    lat, lon = sample_uniform(rows, generator=g)
    return GeoEmbeddings(torch.randn(rows, cfg.embed_dim, generator=g).half(), lat, lon)


def train_samples_per_s(device_name: str, small: bool) -> tuple[float, object]:
    """samples/s of the real loop in this process (all ranks' samples under torchrun)."""
    from locdiff_core.train import distributed_rank_world, train

    steps = size("train_steps", small)
    cfg = _train_config(device_name, small, steps)
    data = _train_data(cfg, size("train_rows", small))
    train(cfg, data, max_steps=1)  # warm-up: allocations, kernels, process group buffers
    cuda = device_name == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync(device)
    t0 = time.perf_counter()
    train(cfg, data)
    sync(device)
    elapsed = time.perf_counter() - t0
    _, world = distributed_rank_world()
    # every rank computes its 1/world slice of the same global batch
    return steps * cfg.train.batch_size / elapsed, cfg


def bench_train(device, small: bool) -> dict:
    from locdiff_core.checkpoint import build_model

    samples_s, cfg = train_samples_per_s(device.type, small)
    macs = linear_macs(build_model(cfg))
    achieved = 6 * macs * samples_s
    bf16 = device.type == "cuda"
    ref = matmul_reference(device, torch.bfloat16 if bf16 else torch.float32)
    out = {
        "preset": size("train_preset", small),
        "L": cfg.max_degree,
        "batch": cfg.train.batch_size,
        "samples_per_s_1proc": samples_s,
        "model_tflops": achieved / 1e12,
        "mfu_vs_gemm": achieved / ref,
    }
    peak = nominal_peak(device)
    if peak:
        out["mfu_vs_nominal_bf16"] = achieved / peak
    nproc = torch.cuda.device_count() if device.type == "cuda" else 2
    if nproc >= 2:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "ddp.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(nproc), __file__, "--ddp-worker", str(result), "--device", device.type]
            cmd += ["--small"] if small else []
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
            if proc.returncode:
                raise RuntimeError(f"torchrun x{nproc} failed: {proc.stderr[-1500:]}")
            ddp = json.loads(result.read_text())
        out[f"samples_per_s_{nproc}proc"] = ddp["samples_per_s"]
        out["ddp_scaling_vs_1proc"] = ddp["samples_per_s"] / samples_s
        out["ddp_efficiency"] = out["ddp_scaling_vs_1proc"] / nproc
    return out


def ddp_worker(result_path: str, device_name: str, small: bool) -> None:
    import torch.distributed as dist

    if device_name == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device_name == "cuda" else "gloo")
    try:
        samples_s, _ = train_samples_per_s(device_name, small)
        if dist.get_rank() == 0:
            Path(result_path).write_text(json.dumps({"samples_per_s": samples_s}))
    finally:
        dist.destroy_process_group()


def bench_harmonics(device, small: bool) -> dict:
    from locdiff_core.harmonics import real_sph_harm
    from locdiff_core.sphere import sample_uniform

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    L, n = size("harm_degree", small), size("harm_points", small)
    lat, lon = sample_uniform(n, generator=g)
    lat, lon = lat.float(), lon.float()
    ref = real_sph_harm(lat, lon, L)
    got = real_sph_harm(lat.to(device), lon.to(device), L)
    err = (got.cpu().double() - ref.double()).abs().max().item()
    if not math.isfinite(err) or err > 1e-3:
        raise RuntimeError(f"harmonics on {device} disagree with the CPU path: max |diff| {err:.3g}")
    t_dev = timed(lambda: real_sph_harm(lat.to(device), lon.to(device), L), device, 3)
    t_cpu = timed(lambda: real_sph_harm(lat, lon, L), cpu, 3)

    # inference as predict/serve/evaluation run it: sampling on the device, decoding on the CPU
    from locdiff_core.checkpoint import build_model
    from locdiff_core.sampling import Predictor

    cfg = _train_config(device.type, small, 1)
    B = size("infer_images", small)
    predictor = Predictor(cfg, build_model(cfg).to(device))
    emb = torch.randn(B, cfg.embed_dim, generator=g).to(device)
    t_infer = timed(lambda: predictor.predict(emb), device)
    codes = predictor.shdd.encode(*sample_uniform(B, generator=g))
    t_decode = timed(lambda: predictor.shdd.decode(codes, rho_km=cfg.infer.rho_km), cpu)
    return {
        "L": L,
        "points": n,
        "harmonics_points_per_s": n / t_dev,
        "harmonics_vs_cpu": t_cpu / t_dev,
        "harmonics_max_abs_diff": err,
        "infer_L": cfg.max_degree,
        "infer_images_per_s": B / t_infer,
        "infer_samples_x_steps": f"{cfg.infer.num_samples}x{cfg.infer.num_steps}",
        "decode_share_of_infer": t_decode / t_infer,
    }


def bench_search(device, small: bool) -> dict:
    from locdiff_core.retrieval import normalize_rows, search_inner_product

    G, Q, E = size("search_gallery", small), size("search_queries", small), size("search_dim", small)
    g = torch.Generator(device=device).manual_seed(0)
    gallery = torch.empty(G, E, dtype=torch.float16, device=device)
    for s in range(0, G, 1 << 20):  # fill in blocks: no float32 copy of the whole gallery
        block = torch.randn(min(1 << 20, G - s), E, generator=g, device=device)
        gallery[s : s + block.shape[0]] = normalize_rows(block).half()
    queries = normalize_rows(torch.randn(Q, E, generator=g, device=device))
    # correctness first: the top-1 of a few queries against a plain full matmul
    probe = queries[:8]
    want = (probe @ gallery.float().T if G * E < 1 << 27 else None)
    sims, idx = search_inner_product(queries, gallery, 10)
    if want is not None and not torch.equal(want.argmax(1).cpu(), idx[:8, 0].cpu()):
        raise RuntimeError("search_inner_product's top-1 disagrees with a plain matmul")
    t = timed(lambda: search_inner_product(queries, gallery, 10), device)
    achieved = 2 * Q * G * E / t
    ref = matmul_reference(device, torch.float16 if device.type == "cuda" else torch.float32)
    return {
        "gallery": G,
        "queries": Q,
        "dim": E,
        "queries_per_s": Q / t,
        "seconds": t,
        "tflops": achieved / 1e12,
        "ratio_vs_gemm": achieved / ref,
    }


SECTIONS = {
    "encoder": bench_encoder,
    "train": bench_train,
    "harmonics": bench_harmonics,
    "search": bench_search,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default_device, choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke run of every section)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.device, args.small)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible here (use --device cpu --small for a smoke run)")
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"gpu_suite: torch {torch.__version__}, device {name}, small={args.small}")
    results, failed = {"device": name, "small": args.small}, []
    for section in args.only.split(","):
        if section not in SECTIONS:
            print(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
            return 2
        t0 = time.perf_counter()
        try:
            results[section] = SECTIONS[section](device, args.small)
        except Exception as exc:  # a failed section must not cost the others their (GPU) time
            results[section] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(section)
            traceback.print_exc()
        results[section]["wall_s"] = time.perf_counter() - t0
        figures = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results[section].items()
        )
        print(f"[{section}] {figures}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
