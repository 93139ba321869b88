"""Wall time of each evaluation metric for N vs N showers (default 10k vs 10k, Par04 Si-W, 1 GeV - 1 TeV).

    python benchmarks/evaluate.py [--samples 10000] [--geometry par04_siw] [--metrics hist,fpd,...]

Both samples come from the built-in simulator (different seeds, same conditions). Times exclude the
noise floor, which repeats every metric on two halves of the reference (roughly another 0.5-1x).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from calofm.evaluation import features as F
from calofm.evaluation.classifier import classifier_test, default_config
from calofm.evaluation.fpd import fpd, kpd
from calofm.evaluation.histograms import compare_histograms, voxel_histograms
from calofm.geometry import load_geometry
from calofm.sim import simulate

ALL = ("features", "hist", "fpd", "kpd", "cls-high", "cls-low", "plots")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--geometry", default="par04_siw")
    ap.add_argument("--metrics", default=",".join(ALL))
    args = ap.parse_args()
    chosen = args.metrics.split(",")
    geo = load_geometry(args.geometry)
    cfg = default_config()
    print(f"{args.samples} vs {args.samples} showers, {geo.name}; {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, classifier {cfg.device} width {cfg.hidden} x {cfg.epochs} epochs")
    t0 = time.perf_counter()
    ref = simulate(geo, args.samples, energy=(1.0, 1000.0), seed=1)
    gen = {**ref, "showers": _resimulate(geo, ref)}  # same conditions, new showers
    print(f"(simulating both samples took {time.perf_counter() - t0:.1f} s)")
    thr = geo.card.threshold
    times: dict[str, float] = {}
    results: dict[str, str] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - start
        return out

    rs = F.apply_threshold(ref["showers"], thr)
    gs = F.apply_threshold(gen["showers"], thr)
    fr, fg = timed("features", lambda: (F.shower_features(rs, ref["incident_energy"], geo),
                                        F.shower_features(gs, gen["incident_energy"], geo)))
    hr, hg = F.high_level_vector(fr), F.high_level_vector(fg)
    comp = None
    if "hist" in chosen:
        scores, hists = timed("hist", lambda: compare_histograms(fr, fg, geo, thr))
        vox, hists["voxel_spectrum"] = timed("hist (voxel spectrum)", lambda: voxel_histograms(rs, gs, thr))
        scores["voxel_spectrum"] = vox
        results["hist"] = f"S(E_tot/E_inc) {scores['e_ratio']['separation_power']:.2e}"
        comp = (scores, hists)
    if "fpd" in chosen:
        v, e = timed("fpd", lambda: fpd(hr, hg))
        results["fpd"] = f"FPD x1e3 = {v * 1e3:.3f} ± {e * 1e3:.3f}"
    if "kpd" in chosen:
        v, e = timed("kpd", lambda: kpd(hr, hg, batch_size=min(10_000, len(hr))))
        results["kpd"] = f"KPD x1e3 = {v * 1e3:.4f} ± {e * 1e3:.4f}"
    if "cls-high" in chosen:
        r = timed("cls-high", lambda: classifier_test(hr, hg, cfg))
        results["cls-high"] = f"AUC {r['auc']:.3f}, JSD {r['jsd']:.3f}"
    if "cls-low" in chosen:
        scale = float(np.median(fr["e_ratio"]))
        lr = F.low_level_vector(rs, ref["incident_energy"], scale)
        lg = F.low_level_vector(gs, gen["incident_energy"], scale)
        r = timed("cls-low", lambda: classifier_test(lr, lg, cfg))
        results["cls-low"] = f"AUC {r['auc']:.3f}, JSD {r['jsd']:.3f}"
    if "plots" in chosen and comp is not None:
        import tempfile
        from pathlib import Path

        from calofm.evaluation.plots import plot_comparison
        from calofm.evaluation.suite import Comparison

        with tempfile.TemporaryDirectory() as tmp:
            c = Comparison({"hist": comp[0]}, fr, fg, comp[1])
            timed("plots", lambda: plot_comparison(c, geo, Path(tmp), F.ENERGY_RANGES))
    print(f"\n{'metric':<24}{'seconds':>9}  result")
    for name, sec in times.items():
        print(f"{name:<24}{sec:>9.1f}  {results.get(name, '')}")
    print(f"{'total':<24}{sum(times.values()):>9.1f}")


def _resimulate(geo, ref: dict) -> np.ndarray:
    """New showers for exactly the reference's conditions (what `calofm generate --like` guarantees)."""
    from calofm.sim import ShowerSimulator

    sim = ShowerSimulator(geo)
    gen = torch.Generator().manual_seed(12345)
    out = []
    for start in range(0, len(ref["incident_energy"]), 1024):
        sl = slice(start, start + 1024)
        e = torch.from_numpy(ref["incident_energy"][sl].astype(np.float32) / 1e3)
        out.append(sim(e, torch.from_numpy(ref["incident_theta"][sl]), torch.from_numpy(ref["incident_phi"][sl]),
                       gen).cpu().numpy())
    return np.concatenate(out)


if __name__ == "__main__":
    main()
