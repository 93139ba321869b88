"""Fidelity of each model variant at the demo's training budget: are the showers right?

    python benchmarks/fidelity.py [--variants single factorised] [--long factorised --long-budget 4]
        [--eval-showers 2000] [--sample-steps 10] [--out runs/bench_fidelity] [--cache DIR]

For every variant: pretrain the embedded default (Par04 Si-W, ODD, ILD) with the same wall-clock budget
as the demo's single-variant run (the step count is scaled by the measured cost of a training step, timed
in this process, variants interleaved), adapt to ALLEGRO with the demo's LoRA settings (same scaling),
then generate showers with the conditions of 2000 held-out simulated showers per geometry (``--like``)
and compare with ``calofm evaluate``. One table row per variant and geometry:

    E ratio    mean visible energy, generated / simulated (target 1.00 +- 0.03)
    spread     std of E_vis/E_inc, generated / simulated (target 0.8 - 1.25)
    S(hits)    separation power of the number of hit cells (target <= 0.15)
    mean S     mean separation power of all CaloChallenge high-level histograms
    AUC lo/hi  classifier on cells / on high-level features (0.5 = indistinguishable)
    FPD, KPD   x1e3, each beside its floor: the same metric between two halves of the reference
    ms/shower  generation time at the demo's sampler settings, batch 250, on this machine, measured in a
               last pass over all finished runs (``--table`` repeats only that pass: run it alone)

``--long`` adds a row at ``--long-budget`` times the budget for one variant (the trend with training).
Finished stages are reused when the script is run again (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PRETRAIN = ("par04_siw", "odd", "ild")
ADAPT = "allegro"
DEMO_PRETRAIN_STEPS, DEMO_ADAPT_STEPS = 1200, 400  # the embedded default and `calofm adapt`'s default


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def step_costs(variants, cache: str, repeats: int = 3, steps: int = 12) -> dict[str, float]:
    """Seconds per training step of each variant (small preset, batch 32, real data), best of ``repeats``
    interleaved rounds, so a busy machine slows every variant alike."""
    import torch

    from calofm.config import build
    from calofm.training.config import TrainConfig
    from calofm.training.data import prepare_data
    from calofm.training.objective import DiffusionObjective
    from calofm.training.pretrain import build_pretrain_model

    setups = {}
    for v in variants:
        cfg = build(TrainConfig, None, ["--data.cache_dir", cache, "--model.variant", v])
        data = prepare_data(cfg.data, progress=False)
        net, space = build_pretrain_model(cfg)(data)
        batch = data.train.__getitems__([(17 * i) % len(data.train) for i in range(32)])
        batch = {k: torch.as_tensor(b) for k, b in batch.items()}
        setups[v] = (DiffusionObjective(net).train(), space, batch, torch.optim.AdamW(net.parameters(), 1e-4))
    return time_steps(setups, repeats, steps)


def time_steps(setups: dict, repeats: int, steps: int) -> dict[str, float]:
    """{name: seconds per optimiser step}, best of ``repeats`` interleaved rounds of ``steps`` steps of each
    (objective, model space, batch, optimiser) in ``setups``."""
    from types import SimpleNamespace

    from calofm.diffusion import EDM_DEFAULTS, edm_constant
    from calofm.training.objective import step_noise

    best = {name: float("inf") for name in setups}
    for _ in range(repeats):
        for name, (objective, space, batch, opt) in setups.items():
            edm = SimpleNamespace(**{k: edm_constant(objective.net, k) for k in EDM_DEFAULTS})  # as the loop draws
            t0 = time.perf_counter()
            for k in range(steps):
                x, cond = space.inputs(batch, "cpu")
                width = space.profile.width if space.factorised else None
                noise = step_noise(x.shape, width, 0, k, 0, 1, edm, 0.0, "cpu")
                loss = objective(x, cond, noise).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            best[name] = min(best[name], (time.perf_counter() - t0) / steps)
    return best


def pretrain(variant: str, steps: int, out: Path, cache: str) -> Path:
    from calofm.config import build
    from calofm.training.config import TrainConfig
    from calofm.training.loop import Setup, train
    from calofm.training.pretrain import build_pretrain_model, save_pretrained

    final = out / "model"
    if not final.exists():
        cfg = build(TrainConfig, None, ["--output_dir", str(out), "--data.cache_dir", cache, "--model.variant",
                                        variant, "--steps", str(steps), "--tensorboard", "false"])
        reset_accelerate()
        train(cfg, Setup(build=build_pretrain_model(cfg), save=save_pretrained))
    return final


def adapt(base: Path, steps: int, out: Path, cache: str) -> Path:
    from calofm.cli import main

    final = out / "model"
    if not final.exists():
        reset_accelerate()
        rc = main(["-q", "adapt", "--geometry", ADAPT, "--base", str(base), "--out", str(out), "--cache-dir", cache,
                   "--steps", str(steps)])
        if rc:
            raise SystemExit(f"adaptation failed ({rc})")
    return final


def reference(geometry: str, n: int, out: Path) -> Path:
    from calofm.sim import simulate_to_file

    path = out / "reference" / f"{geometry}_{n}.h5"
    if not path.exists():  # held out: a seed no training file uses
        simulate_to_file(path, geometry, n, seed=2024, progress=False)
    return path


def generate(model: Path, geometry: str, ref: Path, out: Path, steps: int) -> Path:
    from calofm.cli import main

    path = out / f"{geometry}.h5"
    if not path.exists():
        rc = main(["-q", "generate", "--model", str(model), "--geometry", geometry, "--like", str(ref), "--steps",
                   str(steps), "--out", str(path), "--seed", "1", "--batch-size", "250", "--overwrite"])
        if rc:
            raise SystemExit(f"generation failed ({rc})")
    return path


def ms_per_shower(model: Path, geometry: str, steps: int, n: int = 500, batch: int = 250) -> float:
    """Sampling time (ms/shower) through ``calofm.load(...).sample`` at batch ``batch``, after one warm-up
    batch; measured in the final pass, when no training runs beside it."""
    import numpy as np

    import calofm

    gen = calofm.load(str(model), device="cpu")
    energy = np.geomspace(1.0, 1000.0, batch)
    kw = {"geometry": geometry, "energy_gev": energy, "phi": 0.0, "theta": 1.5708, "steps": steps}
    gen.sample(**kw, seed=0)
    t0 = time.perf_counter()
    for k in range(n // batch):
        gen.sample(**kw, seed=k + 1)
    return 1e3 * (time.perf_counter() - t0) / (n // batch * batch)


def evaluate(ref: Path, gen: Path, out: Path) -> dict:
    from calofm.cli import main

    if not (out / "metrics.json").exists():
        rc = main(["-q", "evaluate", "--reference", str(ref), "--generated", str(gen), "--out", str(out),
                   "--fpd-samples", "1000:2000", "--no-plots"])
        if rc:
            raise SystemExit(f"evaluation failed ({rc})")
    return json.loads((out / "metrics.json").read_text())


def row(report: dict, geometry: str) -> dict:
    from calofm.evaluation.summary import fidelity_row

    return fidelity_row(report["geometries"][geometry])


def table(rows: list[dict]) -> str:
    head = (f"{'variant':>11} {'budget':>6} {'geometry':>9} {'E ratio':>7} {'spread':>6} {'S(hits)':>7} "
            f"{'mean S':>6} {'AUC lo':>6} {'AUC hi':>6} {'FPD x1e3':>17} {'KPD x1e3':>15} {'ms/shower':>9}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['variant']:>11} {r['budget']:>5g}x {r['geometry']:>9} {r['e_ratio']:7.3f} {r['spread']:6.2f} "
            f"{r['s_hits']:7.3f} {r['mean_s']:6.3f} {r['auc_low']:6.3f} {r['auc_high']:6.3f} "
            f"{r['fpd']:8.1f} ({r['fpd_floor']:6.1f}) {r['kpd']:6.2f} ({r['kpd_floor']:5.2f}) {r['ms']:9.1f}")
    return "\n".join(lines)


def run_variant(variant: str, budget: float, cost: dict, args, out: Path, adapt_too: bool = True) -> list[dict]:
    scale = budget * cost["single"] / cost[variant]  # same seconds as the demo's single-variant run
    tag = f"{variant}_x{budget:g}"
    pre_steps, ad_steps = round(DEMO_PRETRAIN_STEPS * scale), round(DEMO_ADAPT_STEPS * scale)
    print(f"\n=== {tag}: pretrain {pre_steps} steps, adapt {ad_steps} steps ===", flush=True)
    base = pretrain(variant, pre_steps, out / tag / "pretrain", args.cache)
    adapter = adapt(base, ad_steps, out / tag / "adapt", args.cache) if adapt_too else None
    rows = []
    for geometry in (*PRETRAIN, ADAPT) if adapt_too else PRETRAIN:
        model = adapter if geometry == ADAPT else base
        ref = reference(geometry, args.eval_showers, out)
        gen = generate(model, geometry, ref, out / tag / "generated", args.sample_steps)
        report = evaluate(ref, gen, out / tag / "evaluation" / geometry)
        rows.append({"variant": variant, "budget": budget, "geometry": geometry, "model": str(model),
                     "pretrain_steps": pre_steps, "adapt_steps": ad_steps, **row(report, geometry)})
    (out / tag / "rows.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=["single", "factorised"], choices=["single", "factorised"])
    ap.add_argument("--long", choices=["single", "factorised"], help="variant to also train at --long-budget")
    ap.add_argument("--long-budget", type=float, default=4.0)
    ap.add_argument("--long-no-adapt", action="store_true", help="the long row for the pretraining geometries only")
    ap.add_argument("--eval-showers", type=int, default=2000)
    ap.add_argument("--sample-steps", type=int, default=10, help="Heun steps (the demo's)")
    ap.add_argument("--out", default="runs/bench_fidelity")
    ap.add_argument("--cache", default=None, help="simulated data cache (default: <out>/cache)")
    ap.add_argument("--table", action="store_true", help="no training: time and tabulate the finished runs")
    args = ap.parse_args()
    out = Path(args.out)
    args.cache = args.cache or str(out / "cache")
    cost_file = out / "step_costs.json"
    if not cost_file.exists():
        out.mkdir(parents=True, exist_ok=True)
        cost_file.write_text(json.dumps(step_costs(sorted({"single", *args.variants, args.long or "single"}),
                                                   args.cache)))
    cost = json.loads(cost_file.read_text())
    print("seconds per training step (small, batch 32): " + ", ".join(f"{k} {v:.3f}" for k, v in cost.items()))
    if not args.table:
        for variant in args.variants:
            run_variant(variant, 1.0, cost, args, out)
        if args.long:
            run_variant(args.long, args.long_budget, cost, args, out, adapt_too=not args.long_no_adapt)
    # the table: every finished run in the folder, timed now (run the variants in parallel processes if
    # you like, then `--table` alone on a quiet machine for the ms/shower column)
    rows = [r for f in sorted(out.glob("*_x*/rows.json")) for r in json.loads(f.read_text())]
    for r in rows:
        r["ms"] = ms_per_shower(Path(r["model"]), r["geometry"], args.sample_steps)
    (out / "fidelity.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table(rows))

if __name__ == "__main__":
    main()
