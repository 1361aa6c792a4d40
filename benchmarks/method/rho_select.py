"""The decoder's filter (cap / heat) and radius rho on a trained run: chosen on ``val``, reported on
``test``. The K samples of each image are drawn once per split and the averaged codes decoded with every
setting, so the rows differ only in decoding. Also the reliability of the first mode's mass on both
splits (truth in mode 1's basin; ``locdiff_core.metrics.in_first_basin``).

    .venv/bin/python benchmarks/method/rho_select.py --storage file://PATH --run RUN_KEY [--rho 0 300 1000]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from locdiff.embedstore import load_embeddings
    from locdiff.inference import load_predictor
    from locdiff.storage import Store
    from locdiff_core.metrics import (
        geolocation_metrics,
        in_first_basin,
        mass_reliability,
        reliability_summary,
    )
    from locdiff_core.sampling import sample_x0

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--rho", type=float, nargs="+", default=[0.0, 100.0, 300.0, 1000.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    store = Store.from_uri(args.storage)
    predictor = load_predictor(store, args.run)
    emb_key = store.manifest(args.run)["embeddings"]
    inf, shdd = predictor.config.infer, predictor.shdd
    basin = 2 * shdd.half_width_km()
    settings = [("cap", 0.0)] + [(k, r) for k in ("cap", "heat") for r in args.rho if r > 0]
    results: dict = {}
    for split in ("val", "test"):
        _, emb, lat, lon = load_embeddings(store, emb_key, split)
        gen = torch.Generator().manual_seed(args.seed)
        codes = []
        for s in range(0, emb.shape[0], inf.batch_size):
            x0 = sample_x0(predictor.model, predictor.schedule, emb[s : s + inf.batch_size].float(),
                           num_samples=inf.num_samples, num_steps=inf.num_steps, sampler=inf.sampler,
                           eta=inf.eta, guidance=inf.guidance, generator=gen)
            codes.append(x0.mean(dim=1) / shdd.scale)
        codes = torch.cat(codes).double()
        for kind, rho in settings:
            dec = shdd.decode(codes, rho_km=rho, filter=kind, anchors=predictor.anchors, top_k=inf.top_k)
            m = geolocation_metrics(lat, lon, dec.lat_deg.double(), dec.lon_deg.double())
            hit = in_first_basin(lat, lon, dec.modes_lat_deg, dec.modes_lon_deg, basin)
            rel = mass_reliability(dec.modes_mass[:, 0], hit)
            results[(split, kind, rho)] = (m, rel, reliability_summary(rel))
    best = min(settings, key=lambda s: results[("val", *s)][0]["median_km"])
    print(f"run {args.run}; L = {shdd.max_degree}; basin = {basin:,.0f} km; K = {inf.num_samples}, "
          f"S = {inf.num_steps}; chosen on val by median km: filter {best[0]}, rho {best[1]:g} km\n")
    print("| split | filter | rho km | 25 km | 200 km | 750 km | 2500 km | median km | mass ECE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for split in ("val", "test"):
        for kind, rho in settings:
            m, _, summ = results[(split, kind, rho)]
            mark = " (chosen)" if (kind, rho) == best else ""
            print(f"| {split} | {kind}{mark} | {rho:g} | {100 * m['acc_25km']:.1f} | "
                  f"{100 * m['acc_200km']:.1f} | {100 * m['acc_750km']:.1f} | {100 * m['acc_2500km']:.1f} | "
                  f"{m['median_km']:,.0f} | {summ['mass_ece']:.3f} |")
    for split in ("val", "test"):
        _, rel, summ = results[(split, *best)]
        print(f"\nmode1_mass reliability on {split} ({best[0]}, rho {best[1]:g} km): "
              f"ECE {summ['mass_ece']:.3f}, largest gap in bins with >= 50 images "
              f"{summ['mass_max_gap']:.3f}\n")
        print("| mode1_mass bin | images | mean mass % | truth in basin % | gap (points) |")
        print("|---|---|---|---|---|")
        for r in rel:
            print(f"| {r['lo']:.1f}-{r['hi']:.1f} | {r['n']} | {100 * r['mean_mass']:.1f} | "
                  f"{100 * r['hit_rate']:.1f} | {100 * (r['hit_rate'] - r['mean_mass']):+.1f} |")


if __name__ == "__main__":
    main()
