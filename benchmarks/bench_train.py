"""Training throughput of LocDiff per preset: samples/s, peak memory, where the time goes, FLOP/s.

For each preset (``tiny``, ``cpu``, and a few steps of ``default``) in a fresh subprocess:
- samples/s of the real ``locdiff_core.train.train`` loop (synthetic embeddings, uniform locations);
- a per-phase breakdown of the same step (targets = SHDD encode, anchors = resampling + their harmonics
  inside SHDD-KL, network forward+backward, optimizer + EMA), timed phase by phase;
- peak resident memory of the process (ru_maxrss; on CUDA also torch.cuda.max_memory_allocated);
- achieved FLOP/s of the network (6 × linear-layer MACs per sample, forward + backward) against a
  plain matmul measured in the same process: on CPU an fp32 GEMM, on CUDA a bf16 GEMM (and the
  device's nominal dense bf16 peak where known). The CUDA path (bf16 autocast, TF32) runs only when a
  GPU is present.

Run: ``.venv/bin/python benchmarks/bench_train.py [--presets tiny,cpu,default] [--loss mse+kl]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# nominal dense bf16 tensor-core peaks (vendor datasheets), TFLOP/s
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def linear_macs(model) -> int:
    """Multiply-accumulates per sample of every nn.Linear (the network's FLOPs are 2 × this per pass)."""
    import torch

    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_reference(device, dtype, n: int = 2048, reps: int = 5) -> float:
    """Achieved FLOP/s of a square GEMM in this process (the hardware reference)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_setup(preset: str, steps: int, n_data: int, **overrides):
    """A preset timed as is (no evaluation, no checkpoints, one warm-up step) and ``n_data`` random
    embeddings at uniform points, and the generator that drew them: the training benchmarks' set-up."""
    import torch

    from locdiff_core.config import get_preset
    from locdiff_core.sphere import sample_uniform
    from locdiff_core.train import GeoEmbeddings

    timed = dict(max_steps=steps, warmup_steps=1, log_every=steps, eval_every=0, checkpoint_every=0)
    cfg = get_preset(preset, train=timed, **overrides)
    g = torch.Generator().manual_seed(0)
    lat, lon = sample_uniform(n_data, generator=g)
    return cfg, GeoEmbeddings(torch.randn(n_data, cfg.embed_dim, generator=g), lat, lon), g


def run_one(preset: str, steps: int, loss_kind: str, n_data: int) -> dict:
    import torch

    from locdiff_core.checkpoint import build_model
    from locdiff_core.device import resolve_device
    from locdiff_core.diffusion import NoiseSchedule
    from locdiff_core.shdd import SHDD
    from locdiff_core.train import (
        AnchorPools,
        compute_loss,
        ema_update,
        sample_anchors,
        train,
    )

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg, data, g = bench_setup(preset, steps, n_data, loss={"kind": loss_kind})
    lat, lon = data.lat_deg, data.lon_deg
    device = resolve_device(cfg.train.device)

    # 1) the real loop
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg, data, max_steps=1)  # warm-up (allocations, kernels)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = train(cfg, data)
    loop_s = time.perf_counter() - t0
    samples_per_s = steps * cfg.train.batch_size / loop_s

    # 2) the same step, phase by phase
    tc = cfg.train
    model = build_model(cfg).to(device)
    ema = build_model(cfg).to(device).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    schedule, shdd = NoiseSchedule(cfg.diffusion), SHDD(cfg.max_degree)
    use_bf16 = device.type == "cuda" and tc.amp in ("auto", "bf16")
    phases = {
        "targets": 0.0,
        "anchors": 0.0,
        "network_fwd_bwd": 0.0,
        "loss_fwd_bwd": 0.0,
        "optimizer_ema": 0.0,
    }
    dlat, dlon = lat.double(), lon.double()
    pools = AnchorPools.default(cfg, data)
    n_phase = max(2, min(steps, 10))
    for i in range(n_phase + 1):
        record = i > 0  # first iteration warms up
        t = time.perf_counter()
        idx = torch.randint(0, n_data, (tc.batch_size,), generator=g)
        x0 = (shdd.scale * shdd.encode(dlat[idx], dlon[idx])).to(device=device, dtype=torch.float32)
        sync(device)
        t1 = time.perf_counter()
        anchors = sample_anchors(cfg, dlat[idx], dlon[idx], pools, g) if loss_kind != "mse" else None
        t2 = time.perf_counter()
        ts = schedule.sample_timesteps(tc.batch_size, generator=g).to(device)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g).to(device), ts)
        emb = data.emb[idx].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = model(x_t, ts, emb)
        pred_leaf = pred.float().detach().requires_grad_(True)
        sync(device)
        t3 = time.perf_counter()
        loss, _ = compute_loss(cfg, shdd, pred_leaf, x0, anchors)
        loss.backward()
        sync(device)
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        pred.float().backward(pred_leaf.grad)
        sync(device)
        t5 = time.perf_counter()
        opt.step()
        ema_update(ema, model, 0.999)
        sync(device)
        t6 = time.perf_counter()
        if record:
            phases["targets"] += t1 - t
            phases["anchors"] += t2 - t1
            phases["network_fwd_bwd"] += (t3 - t2) + (t5 - t4)
            phases["loss_fwd_bwd"] += t4 - t3
            phases["optimizer_ema"] += t6 - t5
    total = sum(phases.values())
    share = {k: v / total for k, v in phases.items()}

    macs = linear_macs(model)
    net_flops = 6 * macs * samples_per_s  # forward (2·MACs) + backward (4·MACs) per sample
    ref_dtype = torch.bfloat16 if use_bf16 else torch.float32
    ref = matmul_reference(device, ref_dtype)
    out = {
        "preset": preset,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "precision": "bf16 autocast" if use_bf16 else "fp32",
        "L": cfg.max_degree,
        "D": cfg.dim,
        "embed_dim": cfg.embed_dim,
        "widths": list(cfg.model.widths),
        "batch": tc.batch_size,
        "loss": loss_kind,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "warmup_s": warm,
        "samples_per_s": samples_per_s,
        "phase_share": share,
        "loss_share_anchors_harmonics": share["targets"] + share["anchors"] + share["loss_fwd_bwd"],
        "network_share": share["network_fwd_bwd"],
        "net_gflops": net_flops / 1e9,
        "matmul_ref_gflops": ref / 1e9,
        "ratio_vs_matmul": net_flops / ref,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": res.curves["train"][-1]["loss"] if res.curves["train"] else None,
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name()
        nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
        if nominal:
            out["ratio_vs_nominal_bf16_peak"] = net_flops / (nominal * 1e12)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,cpu,default")
    ap.add_argument("--loss", default="mse+kl", choices=["mse", "kl", "mse+kl"])
    ap.add_argument("--steps", default="tiny=30,cpu=10,default=3", help="steps per preset")
    ap.add_argument("--n-data", type=int, default=20_000)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = dict(kv.split("=") for kv in args.steps.split(","))
    if args.one:
        print(json.dumps(run_one(args.one, int(steps.get(args.one, 5)), args.loss, args.n_data)))
        return
    import torch

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if not torch.cuda.is_available():
        print("no GPU here: the bf16/TF32 path and the device-peak ratio are not exercised in this run")
    for preset in args.presets.split(","):
        cmd = [sys.executable, __file__, "--one", preset, "--loss", args.loss, "--steps", args.steps]
        cmd += ["--n-data", str(args.n_data)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(f"{preset}: FAILED\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ph = ", ".join(f"{k} {v:.0%}" for k, v in r["phase_share"].items())
        print(
            f"\n[{r['preset']}] {r['device']} {r['precision']}  L={r['L']} (D={r['D']}) E={r['embed_dim']} "
            f"widths={r['widths']} batch={r['batch']} loss={r['loss']} params={r['params'] / 1e6:.2f}M\n"
            f"  {r['samples_per_s']:.0f} samples/s over {r['steps']} steps; "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB"
            + (f", peak CUDA {r['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in r else "")
            + f"\n  time shares: {ph}\n"
            f"  loss side (targets + anchors + KL/harmonics) {r['loss_share_anchors_harmonics']:.0%} "
            f"vs network {r['network_share']:.0%}\n"
            f"  network {r['net_gflops']:.1f} GFLOP/s vs {r['matmul_ref_gflops']:.1f} GFLOP/s GEMM "
            f"in this process: ratio {r['ratio_vs_matmul']:.2f}"
            + (
                f"; vs nominal bf16 peak {r['ratio_vs_nominal_bf16_peak']:.3f}"
                if "ratio_vs_nominal_bf16_peak" in r
                else ""
            )
        )


if __name__ == "__main__":
    main()
