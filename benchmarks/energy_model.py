"""Energy model of the energy-factorised variant: EDM diffusion transformer vs a normalizing flow (issue 12).

    python benchmarks/energy_model.py [--budget-steps 1200] [--long 4] [--flow nsf] [--out runs/bench_energy]
        [--cache DIR] [--heldout 2000]

The energy model samples the longitudinal profile of a shower, ``ProfilePreprocessor``'s model space
(B, 46) = [log(E_tot/E_inc), log(E_z/E_tot + eps) for 45 layers], standardised per geometry, given E_inc,
phi, theta and the geometry slot. Two candidates, trained alone on the same profiles:

    diffusion  ``LayerEnergyNet`` (the demo's size: hidden 64, 3 blocks, 4 heads) as an EDM diffusion model
               with CaloDiT's EDM constants; sampled with Heun at 10 steps (the demo's setting)
    flow       a zuko conditional flow on the same vector, conditioned on [log E_inc/GeV, sin phi, cos phi,
               theta, one-hot slot]; trained by maximum likelihood, sampled in one inverse pass

Data: the default pretraining's simulated Par04 Si-W, ODD and ILD files (6000 showers each, seed 1), profile
statistics fitted as ``calofm.training.data.fit_profile`` does (first 2000 showers per geometry), and held-out
files (seed 2024) whose conditions are given to the models. Both train with the pretraining's optimiser
settings (AdamW lr 2e-3, 100 warm-up steps, cosine, batch 32, gradient clip 1, EMA 0.995) for the same
wall-clock budget: the cost of a step of each model is timed in this process (interleaved rounds, best of 3),
the budget is ``--budget-steps`` steps of the diffusion model and the flow gets as many steps as fit in it;
``--long`` repeats both at that multiple of the budget.

Metrics per geometry on the layer energies after ``ProfilePreprocessor.inverse`` against the held-out showers:

    E ratio     mean E_tot generated / simulated (all, and per E_inc range 1-10 / 10-100 / 100-1000 GeV)
    spread      std of E_tot/E_inc generated / simulated (same ranges)
    S(E_tot)    separation power of E_tot/E_inc (CaloChallenge binning, ``calofm.evaluation.histograms``)
    S(E_z)      mean separation power of the 45 layer-energy histograms (log bins from the readout threshold)
    corr        mean |corr_gen - corr_ref| over the off-diagonal of the 45x45 correlation matrix of E_z/E_inc
    ms/shower   sampling time at batch 250 (one thread), including the inverse transform
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from energy_candidates import (  # noqa: E402
    GEOMETRIES,
    N_LAYERS,
    WIDTH,
    DiffusionEnergyModel,
    FlowEnergyModel,
    Profiles,
    Trainer,
    fit_profiles,
    load_data,
    n_params,
    read_profiles,
    simulated,
    step_costs,
)

from calofm.preprocess import ProfilePreprocessor  # noqa: E402

__all__ = ["GEOMETRIES", "N_LAYERS", "WIDTH", "DiffusionEnergyModel", "FlowEnergyModel", "Profiles", "Trainer",
           "fit_profiles", "load_data", "n_params", "read_profiles", "simulated", "step_costs"]
E_RANGES = ((1.0, 10.0), (10.0, 100.0), (100.0, 1000.0))  # GeV
MIN_RANGE = 10  # showers an energy range needs to be reported


# ----------------------------------------------------------------------------------------------
# Sampling and metrics
# ----------------------------------------------------------------------------------------------


def sample_layers(model: nn.Module, data: Profiles, profile: ProfilePreprocessor, batch: int = 250,
                  seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(model-space samples (N, Z + 1), layer energies (N, Z) MeV, ms per shower) for the conditions of ``data``."""
    gen = torch.Generator().manual_seed(seed)
    ys, layers = [], []
    model.eval()
    t0 = time.perf_counter()
    for start in range(0, len(data), batch):
        rows = slice(start, start + batch)
        y = model.sample(data.cond(rows), gen).double()
        ys.append(y)
        layers.append(profile.inverse(y, data.energy[rows], data.geometry[rows]))
    ms = 1e3 * (time.perf_counter() - t0) / len(data)
    return torch.cat(ys), torch.cat(layers), ms


def _ratios(ref_tot, gen_tot, e_ref, e_gen) -> tuple[float, float]:
    """(mean E_tot, std of E_tot/E_inc), generated / reference."""
    return float(gen_tot.mean() / ref_tot.mean()), float(np.std(gen_tot / e_gen) / np.std(ref_tot / e_ref))


def correlation_distance(ref: np.ndarray, gen: np.ndarray) -> float:
    """Mean |corr_gen - corr_ref| over the off-diagonal pairs of layers that vary in the reference; a layer
    constant in the generated sample counts as uncorrelated there."""

    def corr(x):
        sd = x.std(axis=0)
        z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
        return (z.T @ z) / len(x), sd > 0

    c_ref, ok = corr(ref)
    c_gen, _ = corr(gen)
    pairs = np.triu(np.outer(ok, ok), k=1)
    return float(np.abs(c_gen - c_ref)[pairs].mean())


def layer_metrics(ref_layers: np.ndarray, gen_layers: np.ndarray, e_inc: np.ndarray, geometry: str,
                  gen_energy: np.ndarray | None = None) -> dict:
    """The table's fidelity numbers for one geometry: layer energies (N, Z) MeV of both, E_inc (N,) MeV (of the
    generated rows too unless ``gen_energy`` gives theirs)."""
    from calofm.evaluation.histograms import SPECS, bin_edges, separation_power
    from calofm.geometry import load_geometry

    geo = load_geometry(geometry)
    spec = {s.key: s for s in SPECS}
    threshold = geo.card.threshold
    e_gen = e_inc if gen_energy is None else gen_energy
    ref_tot, gen_tot = ref_layers.sum(1), gen_layers.sum(1)
    out = {}
    out["e_ratio"], out["spread"] = _ratios(ref_tot, gen_tot, e_inc, e_gen)
    for lo, hi in E_RANGES:
        sel, sel_gen = [(e >= lo * 1e3) & (e < hi * 1e3) for e in (e_inc, e_gen)]
        key = f"{lo:g}-{hi:g}"
        out[f"n_{key}"] = int(sel.sum())
        enough = min(sel.sum(), sel_gen.sum()) >= MIN_RANGE
        out[f"e_ratio_{key}"], out[f"spread_{key}"] = (
            _ratios(ref_tot[sel], gen_tot[sel_gen], e_inc[sel], e_gen[sel_gen]) if enough else (math.nan, math.nan))
    ratio_ref, ratio_gen = ref_tot / e_inc, gen_tot / e_gen
    edges = bin_edges(spec["e_ratio"], ratio_ref, geo, threshold)
    out["s_etot"] = separation_power(np.histogram(ratio_ref, edges)[0], np.histogram(ratio_gen, edges)[0])
    s_layer = []
    for z in range(ref_layers.shape[1]):
        edges = bin_edges(spec["e_layer"], ref_layers[:, z], geo, threshold)
        if edges is not None:
            s_layer.append(separation_power(np.histogram(ref_layers[:, z], edges)[0],
                                            np.histogram(gen_layers[:, z], edges)[0]))
    out["s_layer"] = float(np.nanmean(s_layer))
    out["corr"] = correlation_distance(ref_layers / e_inc[:, None], gen_layers / e_gen[:, None])
    return out


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


@dataclass
class FlowSettings:
    kind: str = "nsf"
    transforms: int = 3
    hidden: tuple[int, ...] = (80, 80)
    bins: int = 8
    bound: float = 10.0
    passes: int | None = None
    dequantise: float = 0.1


def builders(profile: ProfilePreprocessor, flow: FlowSettings) -> dict:
    s = asdict(flow)
    return {"diffusion": lambda: DiffusionEnergyModel(),
            "flow": lambda: FlowEnergyModel(profile, **s)}


COLUMNS = (("model", "model", "{}"), ("budget", "budget", "{:g}x"), ("geometry", "geometry", "{}"),
           ("steps", "steps", "{:d}"), ("train_s", "train s", "{:.0f}"), ("params", "params", "{:d}"),
           ("e_ratio", "E ratio", "{:.3f}"), ("spread", "spread", "{:.2f}"),
           ("e_ratio_1-10", "Er 1-10", "{:.3f}"), ("e_ratio_10-100", "Er 10-100", "{:.3f}"),
           ("e_ratio_100-1000", "Er 100-1k", "{:.3f}"), ("spread_1-10", "sp 1-10", "{:.2f}"),
           ("spread_10-100", "sp 10-100", "{:.2f}"), ("spread_100-1000", "sp 100-1k", "{:.2f}"),
           ("s_etot", "S(Etot)", "{:.3f}"), ("s_layer", "S(E_z)", "{:.3f}"), ("corr", "corr", "{:.3f}"),
           ("ms", "ms/shower", "{:.3f}"))


def table(rows: list[dict], markdown: bool = False) -> str:
    """One line per row (model x budget x geometry); "-" for an energy range with too few showers."""
    cells = [[("-" if isinstance(r[k], float) and math.isnan(r[k]) else f.format(r[k])) for k, _, f in COLUMNS]
             for r in rows]
    heads = [h for _, h, _ in COLUMNS]
    if markdown:
        return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
                         + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    return "\n".join(" ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [heads, *cells])


def evaluate(model: nn.Module, held: dict, profile: ProfilePreprocessor) -> dict[str, dict]:
    """Per held-out set: fidelity metrics and ms/shower of ``model`` on its conditions."""
    out = {}
    for label, (geometry, _, data) in held.items():
        _, layers, ms = sample_layers(model, data, profile)
        if not torch.isfinite(layers).all():
            raise RuntimeError(f"{label}: non-finite layer energies sampled")
        out[label] = {**layer_metrics(data.layers.numpy(), layers.numpy(), data.energy.numpy(), geometry), "ms": ms}
    return out


def simulator_floor(cache: str | Path, held: dict, seed: int = 2025) -> list[dict]:
    """The metrics of a second, independent simulated sample (another seed, same size and energy range) against
    each held-out set: what a perfect energy model would score with these sample sizes. Its conditions are not
    paired with the held-out ones, which only the mean-ratio columns notice, through their statistical error."""
    rows = []
    for label, (geometry, energy, data) in held.items():
        other = simulated(geometry, len(data), seed, cache, energy)
        m = layer_metrics(data.layers.numpy(), other.layers.numpy(), data.energy.numpy(), geometry,
                          gen_energy=other.energy.numpy())
        rows.append({"model": "simulator", "budget": math.nan, "geometry": label, "steps": 0, "train_s": math.nan,
                     "params": 0, **m, "ms": math.nan})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-steps", type=int, default=1200, help="the budget: this many diffusion-model steps")
    ap.add_argument("--long", type=float, default=4.0, help="also train at this multiple of the budget (0: no)")
    ap.add_argument("--flow", choices=["nsf", "maf"], default="nsf")
    ap.add_argument("--flow-transforms", type=int, default=3)
    ap.add_argument("--flow-hidden", type=int, nargs="+", default=[80, 80])
    ap.add_argument("--flow-bins", type=int, default=8)
    ap.add_argument("--flow-bound", type=float, default=10.0)
    ap.add_argument("--flow-passes", type=int, default=None, help="2: coupling flow (default: autoregressive)")
    ap.add_argument("--dequantise", type=float, default=0.1)
    ap.add_argument("--heldout", type=int, default=2000)
    ap.add_argument("--low", type=int, default=1000, help="showers of the extra 1-10 GeV held-out sets (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_energy")
    ap.add_argument("--cache", default=None, help="simulated data cache (default: <out>/cache)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or out / "cache"
    train, held = load_data(cache, n_heldout=args.heldout, n_low=args.low)
    profile = fit_profiles(train)
    data = Profiles.cat(list(train.values()))
    y = profile(data.layers, data.energy, data.geometry).float()
    flow = FlowSettings(args.flow, args.flow_transforms, tuple(args.flow_hidden), args.flow_bins, args.flow_bound,
                        args.flow_passes, args.dequantise)
    make = builders(profile, flow)
    cost = step_costs(make, y, data, repeats=5)
    print("seconds per training step (batch 32): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in cost.items()),
          flush=True)
    budgets = [1.0] + ([args.long] if args.long > 0 else [])
    rows = simulator_floor(cache, held)
    print(table(rows), flush=True)
    for budget in budgets:
        seconds = budget * args.budget_steps * cost["diffusion"]
        for name, build in make.items():
            steps = max(1, round(seconds / cost[name]))
            torch.manual_seed(args.seed)
            t = Trainer(build(), y, data, steps, seed=args.seed).run()
            model = t.ema_model()
            torch.save(model.state_dict(), out / f"{name}_x{budget:g}.pt")  # EMA weights, for a later look
            print(f"{name} x{budget:g}: {steps} steps in {t.seconds:.0f} s, final loss "
                  f"{np.mean(t.losses[-50:]):.4f}", flush=True)
            for geo, m in evaluate(model, held, profile).items():
                rows.append({"model": name, "budget": budget, "geometry": geo, "steps": steps,
                             "train_s": t.seconds, "params": n_params(model), **m})
            print(table(rows[-len(held):]), flush=True)
    result = {"step_costs_s": cost, "flow": asdict(flow), "rows": rows}
    (out / "energy_model.json").write_text(json.dumps(result, indent=1))
    print("\n" + table(rows))
    print("\n" + table(rows, markdown=True))


if __name__ == "__main__":
    main()
