"""`make demo`: the main calofm job end to end on the embedded default, on a CPU.

simulate (every geometry) -> validate -> pretrain (Par04 Si-W, ODD, ILD) -> generate -> evaluate
-> adapt to ALLEGRO (LoRA) -> generate -> evaluate -> model cards. Everything lands in demo_out/ (--out).
Each stage is the library call behind the corresponding CLI command or recipe.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PRETRAIN_GEOMETRIES = ("par04_siw", "odd", "ild")
ADAPT_GEOMETRY = "allegro"


def stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def simulate_all(out: Path, n: int) -> dict[str, Path]:
    from calofm.data.io import validate_file
    from calofm.geometry import load_all
    from calofm.sim import simulate_to_file

    files, rows = {}, []
    for name in load_all():
        path = out / "data" / f"{name}.h5"
        t0 = time.perf_counter()
        if not path.exists():
            simulate_to_file(path, name, n, seed=11, progress=False)
        s = validate_file(path)
        rows.append((name, s, time.perf_counter() - t0))
        files[name] = path
    print(f"{'geometry':>12} {'showers':>8} {'E_inc GeV':>14} {'E_vis/E_inc':>11} {'hits/shower':>11} {'time s':>7}")
    for name, s, dt in rows:
        lo, hi = s["E_inc_GeV"]
        print(f"{name:>12} {s['showers']:8d} {lo:6.1f}-{hi:7.1f} {s['E_sum/E_inc']:11.4f} "
              f"{s['hits_per_shower']:11.1f} {dt:7.1f}")
    return files


def cli(*args: str) -> None:
    from calofm.cli import main

    rc = main([str(a) for a in args])
    if rc:
        raise SystemExit(f"demo: `calofm {' '.join(map(str, args))}` failed with exit code {rc}")


def pretrain(out: Path, steps: int | None) -> Path:
    from calofm.config import build
    from calofm.training.config import TrainConfig
    from calofm.training.loop import Setup, train
    from calofm.training.pretrain import build_pretrain_model, save_pretrained

    overrides = ["--output_dir", str(out / "pretrain"), "--data.cache_dir", str(out / "cache")]
    if steps:
        overrides += ["--steps", str(steps)]
    cfg = build(TrainConfig, None, overrides)  # the embedded default, in demo_out/
    final = out / "pretrain" / "model"
    if final.exists():
        print(f"reusing {final}")
        return final
    return train(cfg, Setup(build=build_pretrain_model(cfg), save=save_pretrained))


def generate_and_evaluate(model: Path, geometry: str, out: Path, n_ref: int, steps: int, metrics: str) -> Path:
    from calofm.sim import simulate_to_file

    ref = out / "reference" / f"{geometry}.h5"
    if not ref.exists():  # held out: a seed no training file used
        simulate_to_file(ref, geometry, n_ref, seed=2024, progress=False)
    gen = out / "generated" / f"{geometry}.h5"
    cli("generate", "--model", model, "--geometry", geometry, "--like", ref, "--steps", steps, "--out", gen,
        "--seed", 1, "--overwrite")
    report = out / "evaluation" / geometry
    # FPD batches of 1000-5000 resampled showers suit 1000-shower samples (CaloChallenge: 10k-50k of 100k)
    cli("-q", "evaluate", "--reference", ref, "--generated", gen, "--out", report, "--metrics", metrics,
        "--fpd-samples", "1000:5000")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--samples", type=int, default=1000, help="showers simulated per geometry for the overview")
    # the factorised default costs 1.2x the single variant per step: 1000 + 335 steps take the time 1200 + 400
    # did, the budget benchmarks/fidelity.py compares the variants at (docs/fidelity.md)
    ap.add_argument("--pretrain-steps", type=int, default=1000, help="pretraining steps (embedded default: 1200)")
    ap.add_argument("--adapt-steps", type=int, default=335, help="adaptation steps (calofm adapt's default: 400)")
    ap.add_argument("--eval-samples", type=int, default=500, help="held-out reference showers per geometry")
    ap.add_argument("--sample-steps", type=int, default=10, help="Heun steps for generation (CaloDiT-2: 32)")
    ap.add_argument("--metrics", default="all", help="metrics for calofm evaluate")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    t_start = time.perf_counter()

    t = stage("1. simulate and validate every geometry")
    files = simulate_all(out, args.samples)
    cli("compare-geometries", "--files", *files.values(), "--out", out / "plots")
    print(f"profiles of all geometries: {out / 'plots'}  ({time.perf_counter() - t:.0f} s)")

    t = stage("2. pretrain on Par04 Si-W, ODD and ILD (embedded default)")
    model = pretrain(out, args.pretrain_steps)
    print(f"pretrained model: {model}  ({time.perf_counter() - t:.0f} s)")

    t = stage("3. generate and evaluate each pretraining geometry")
    reports = {g: generate_and_evaluate(model, g, out, args.eval_samples, args.sample_steps, args.metrics)
               for g in PRETRAIN_GEOMETRIES}
    print(f"({time.perf_counter() - t:.0f} s)")

    t = stage(f"4. adapt to {ADAPT_GEOMETRY} with LoRA, generate and evaluate")
    adapter = out / "adapt" / "model"
    if not adapter.exists():
        extra = ["--steps", args.adapt_steps] if args.adapt_steps else []
        cli("adapt", "--geometry", ADAPT_GEOMETRY, "--base", model, "--out", out / "adapt",
            "--cache-dir", out / "cache", *extra)
    reports[ADAPT_GEOMETRY] = generate_and_evaluate(adapter, ADAPT_GEOMETRY, out, args.eval_samples,
                                                    args.sample_steps, args.metrics)
    print(f"({time.perf_counter() - t:.0f} s)")

    stage("5. model cards (written locally; calofm push would upload them)")
    cli("card", model, "--metrics", *(reports[g] / "metrics.json" for g in PRETRAIN_GEOMETRIES))
    cli("card", adapter, "--metrics", reports[ADAPT_GEOMETRY] / "metrics.json")

    print(f"\n=== done in {(time.perf_counter() - t_start) / 60:.1f} min ===")
    summary(reports)


def summary(reports: dict[str, Path]) -> None:
    """One line per geometry from each report's metrics.json: energy, spread, hits, classifiers, FPD/KPD
    beside the floor (the same metric between two halves of the reference)."""
    import json

    from calofm.evaluation.summary import fidelity_row, format_rows

    rows = [{"geometry": g, **fidelity_row(json.loads((r / "metrics.json").read_text())["geometries"][g])}
            for g, r in reports.items()]
    print(format_rows(rows))
    print("reports: " + ", ".join(str(r / "report.md") for r in reports.values()))


if __name__ == "__main__":
    main()
