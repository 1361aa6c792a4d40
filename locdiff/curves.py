"""Training curves while a run is in flight: how often they are shown, and the chart that shows them.

The training stage (``locdiff.stages.runs.train_run``) writes its curves so far every
:func:`live_every` steps to the run's in-flight area (``<key>/_live/curves.parquet``, read by the
catalog's ``curves`` view with ``in_flight = true``) and hands them to a callback; the train task
draws them with :func:`chart_markdown` into one Prefect artifact that it refreshes in place.
"""

from __future__ import annotations

import math

LIVE_CURVES = "curves.parquet"  # under the run's in-flight area (Store.live / ArtifactWriter.write_live)
LIVE_REFRESHES_PER_EVAL = 10  # without periodic validation: every 10th logged step


def live_every(train_config) -> int:
    """Steps between two refreshes of the in-flight curves: every validation (``eval_every``) when it
    comes within 10 logged rows, else every 10th logged row (``log_every``); 0 when nothing is logged."""
    log_every, eval_every = int(train_config.log_every), int(train_config.eval_every)
    if not log_every:
        return 0
    every = LIVE_REFRESHES_PER_EVAL * log_every
    return min(every, eval_every) if eval_every else every


def eta_seconds(curves: dict, max_steps: int, batch_size: int) -> float | None:
    """Seconds left at the last logged throughput (samples/s of the last train row), None before it."""
    rows = curves.get("train") or []
    if not rows or not rows[-1].get("samples_per_s"):
        return None
    return max(0, max_steps - int(rows[-1]["step"])) * batch_size / float(rows[-1]["samples_per_s"])


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def chart_png(curves: dict, title: str = "") -> bytes:
    """Four small panels against the step: loss (total, MSE, KL; log scale), learning rate, samples/s
    and the validation median error (km; empty without a ``val`` split)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from locdiff.report import png_bytes

    train, val = curves.get("train") or [], curves.get("val") or []
    fig, axes = plt.subplots(1, 4, figsize=(12, 2.6), dpi=80)
    steps = [r["step"] for r in train]
    ax = axes[0]
    for name, label in (("loss", "total"), ("mse", "MSE"), ("kl", "KL")):
        pts = [(r["step"], r[name]) for r in train if name in r and r[name] > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=label, lw=1.2)
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper right")
    panels = (
        (axes[1], steps, [r.get("lr", math.nan) for r in train], "learning rate"),
        (axes[2], steps, [r.get("samples_per_s", math.nan) for r in train], "samples/s"),
        (axes[3], [r["step"] for r in val], [r.get("median_km", math.nan) for r in val], "val median (km)"),
    )
    for a, x, y, label in panels:
        a.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, lw=1.2)
        a.set_title(label, fontsize=9)
    axes[0].set_title("loss", fontsize=9)
    for a in axes:
        a.set_xlabel("step", fontsize=8)
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
    if not val:
        axes[3].text(0.5, 0.5, "no val split", ha="center", va="center", transform=axes[3].transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = png_bytes(fig)
    plt.close(fig)
    return png


def chart_markdown(run_key: str, curves: dict, max_steps: int, batch_size: int) -> str:
    """The chart (inline PNG) under one line of the latest figures: step, losses, lr, samples/s, ETA and
    the latest validation median."""
    from locdiff.report import data_uri

    train, val = curves.get("train") or [], curves.get("val") or []
    last = train[-1] if train else {}
    step = int(last.get("step", 0))
    figures = [f"step **{step:,} / {max_steps:,}**"]
    for name, fmt in (
        ("loss", ".4g"),
        ("mse", ".4g"),
        ("kl", ".4g"),
        ("lr", ".2e"),
        ("samples_per_s", ",.0f"),
    ):
        if name in last:
            figures.append(f"{name} {last[name]:{fmt}}")
    figures.append(f"ETA {_duration(eta_seconds(curves, max_steps, batch_size))}")
    if val:
        figures.append(f"val median {val[-1].get('median_km', math.nan):,.0f} km (step {val[-1]['step']:,})")
    return (
        f"### Training `{run_key}`\n\n"
        + " · ".join(figures)
        + f"\n\n![training curves]({data_uri(chart_png(curves, run_key))})\n\n"
        + f"In flight: `locdiff sql \"SELECT * FROM curves WHERE key = '{run_key}'\"`\n"
    )
