"""Every model family on one CPU-scale task with the same wall-clock training budget: which is best?

    python benchmarks/baselines.py [--budget-minutes 4] [--families calodit calodiffusion bibae wgan caloflow ...]
        [--pretrained demo_out/pretrain/model] [--eval-showers 1000] [--sample-steps calodiffusion=50]
        [--out runs/bench_baselines] [--cache DIR]

The task: Par04 Si-W photons at 1-1000 GeV, the demo's 6000 simulated training showers (shared cache).
Each trainable family is trained from scratch with ``recipes/train.py``'s code for the same number of
seconds: its step count is the budget divided by its own cost per training step, measured in this process
(families interleaved, best of 3 rounds, so a busy machine slows every family alike). CaloDiT is trained
twice: from scratch like the others, and as the demo's pretrained model (Par04 Si-W, ODD and ILD)
fine-tuned on Par04 Si-W with the same budget (``--pretrained``). A family with a distilled student
(CaloFlow's IAF, CaloClouds' consistency model) gets a second stage after its teacher: the student, distilled
from that teacher for the same budget again (its own step cost, measured once the teacher exists). GFlash is the
simulator that made the data: its row is the reference against itself, with its own speed.

Then every model generates showers with the conditions of ``--eval-showers`` held-out simulated ones
(``--like``) and ``calofm evaluate`` scores them. Columns: parameters, training seconds and steps, ms/shower
at batch 100 (measured in a last pass over all finished rows, one after another), network evaluations per
shower, energy ratio, AUC low/high, FPD and KPD (x1e3) beside the reference-halves floor, mean separation
power of the high-level histograms. Finished stages are reused when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import evaluate, reference, reset_accelerate, row, time_steps  # noqa: E402

GEOMETRY = "par04_siw"
FAMILIES = ("calodit", "calodiffusion", "bibae", "wgan", "caloflow", "caloclouds", "gflash")
CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "baselines"
STUDENTS = {  # family -> its recipe's overrides for the distilled student of the teacher in a model folder
    "caloflow": lambda teacher: ["--model.family_config.stage=student",
                                 f"--model.family_config.distill_from={teacher}"],
    "caloclouds": lambda teacher: [f"--model.family_config.distill_from={teacher}"],
}


def recipe_args(family: str, out: Path, cache: str, extra=()) -> list[str]:
    """Command line of the family's recipe on the common task (one source: Par04 Si-W, the demo's data)."""
    return ["--model", family, "--output_dir", str(out), "--data.cache_dir", cache, "--tensorboard", "false",
            f"--data.sources=[{{geometry: {GEOMETRY}}}]", *extra]


def step_costs(stages: dict, cache: str, repeats: int = 3, steps: int = 6) -> dict[str, float]:
    """Seconds per optimiser step of each trainable stage {name: (family, recipe overrides)} at its recipe's
    batch size on the task's data."""
    import torch

    from calofm.commands.train import parse
    from calofm.ema import EMA
    from calofm.training.baselines import baseline_setup
    from calofm.training.data import prepare_data
    from calofm.training.objective import DiffusionObjective
    from calofm.training.pretrain import build_pretrain_model

    setups = {}
    for name, (family, extra) in stages.items():
        cfg = parse(recipe_args(family, Path("unused"), cache, extra), CONFIGS)
        data = prepare_data(cfg.data, progress=False)
        if family == "calodit":
            net, space = build_pretrain_model(cfg)(data)
            objective = DiffusionObjective(net)
        else:
            setup = baseline_setup(cfg)
            net, space = setup.build(data)
            objective = setup.make_objective(net, EMA(net, 0.999))  # a distilling family reads the EMA
        batch = data.train.__getitems__([(17 * i) % len(data.train) for i in range(cfg.batch_size)])
        batch = {k: torch.as_tensor(b) for k, b in batch.items()}
        setups[name] = (objective.train(), space, batch, torch.optim.AdamW(net.parameters(), 1e-4))
    return time_steps(setups, repeats, steps)


def measured_costs(stages: dict, cache: str, out: Path) -> dict[str, float]:
    """Step costs of ``stages`` (see step_costs), measured once and kept in <out>/step_costs.json."""
    cost_file = out / "step_costs.json"
    costs = json.loads(cost_file.read_text()) if cost_file.exists() else {}
    missing = {name: stage for name, stage in stages.items() if name not in costs}
    if missing:
        costs.update(step_costs(missing, cache))
        out.mkdir(parents=True, exist_ok=True)
        cost_file.write_text(json.dumps(costs))
    return costs


def train(family: str, steps: int, out: Path, cache: str, extra=()) -> tuple[Path, float]:
    """(model folder, training seconds) of the family's recipe (with overrides ``extra``) run for ``steps``."""
    from calofm.commands.train import main

    final, record = out / "model", out / "bench.json"
    if not final.exists():
        reset_accelerate()
        t0 = time.perf_counter()
        if main(recipe_args(family, out, cache, [*extra, "--steps", str(steps)]), CONFIGS):
            raise SystemExit(f"training {family} failed")
        record.write_text(json.dumps({"train_s": time.perf_counter() - t0}))
    return final, json.loads(record.read_text())["train_s"]


def fine_tune(base: Path, steps: int, out: Path, cache: str) -> tuple[Path, float]:
    """The pretrained CaloDiT fully fine-tuned on the task's geometry for ``steps``."""
    from calofm.cli import main

    final, record = out / "model", out / "bench.json"
    if not final.exists():
        reset_accelerate()
        t0 = time.perf_counter()
        if main(["-q", "adapt", "--geometry", GEOMETRY, "--base", str(base), "--out", str(out), "--method", "full",
                 "--cache-dir", cache, "--steps", str(steps)]):
            raise SystemExit("fine-tuning the pretrained model failed")
        record.write_text(json.dumps({"train_s": time.perf_counter() - t0}))
    return final, json.loads(record.read_text())["train_s"]


def generate(model: Path, ref: Path, out: Path, steps: int | None) -> Path:
    from calofm.cli import main

    path = out / f"{GEOMETRY}.h5"
    if not path.exists():
        args = ["-q", "generate", "--model", str(model), "--geometry", GEOMETRY, "--like", str(ref), "--out", str(path),
                "--seed", "1", "--batch-size", "100", "--overwrite"]
        if main(args + (["--steps", str(steps)] if steps else [])):
            raise SystemExit(f"generation with {model} failed")
    return path


def ms_per_shower(model: Path, steps: int | None, n: int = 200, batch: int = 100) -> tuple[float, int]:
    """(ms/shower at batch ``batch`` after a warm-up batch, network evaluations per shower)."""
    import numpy as np

    import calofm

    gen = calofm.load(str(model), device="cpu")
    _, steps, nfe = gen.sampling(steps=steps)
    kw = {"geometry": GEOMETRY, "energy_gev": np.geomspace(1.0, 1000.0, batch), "phi": 0.0, "theta": 1.5708,
          "steps": steps, "batch_size": batch}
    gen.sample(**kw, seed=0)
    t0 = time.perf_counter()
    for k in range(n // batch):
        gen.sample(**kw, seed=k + 1)
    return 1e3 * (time.perf_counter() - t0) / (n // batch * batch), nfe


def parameters(model: Path) -> int:
    import calofm

    return sum(p.numel() for p in calofm.load(str(model), device="cpu").net.parameters())


def table(rows: list[dict]) -> str:
    head = (f"{'model':>24} {'params':>9} {'train s':>7} {'steps':>6} {'ms/shower':>9} {'NFE':>4} {'E ratio':>7} "
            f"{'AUC lo':>6} {'AUC hi':>6} {'FPD x1e3':>17} {'KPD x1e3':>15} {'mean S':>6}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['name']:>24} {r['params']:9,d} {r['train_s']:7.0f} {r['steps']:6d} {r['ms']:9.2f} {r['nfe']:4d} "
            f"{r['e_ratio']:7.3f} {r['auc_low']:6.3f} {r['auc_high']:6.3f} {r['fpd']:8.1f} ({r['fpd_floor']:6.1f}) "
            f"{r['kpd']:6.2f} ({r['kpd_floor']:5.2f}) {r['mean_s']:6.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--budget-minutes", type=float, default=4.0, help="training wall clock of every family")
    ap.add_argument("--pretrained", help="pretrained CaloDiT to fine-tune on the task (e.g. demo_out/pretrain/model)")
    ap.add_argument("--eval-showers", type=int, default=1000)
    ap.add_argument("--sample-steps", nargs="*", default=[], metavar="FAMILY=N",
                    help="sampling steps per row: a family or <family>_student (default: each model's own)")
    ap.add_argument("--out", default="runs/bench_baselines")
    ap.add_argument("--cache", default=None, help="simulated data cache (default: <out>/cache)")
    args = ap.parse_args()
    out = Path(args.out)
    cache = args.cache or str(out / "cache")
    sample_steps = {k: int(v) for k, v in (s.split("=") for s in args.sample_steps)}
    costs = measured_costs({f: (f, ()) for f in args.families if f != "gflash"}, cache, out)
    print("seconds per training step: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()), flush=True)
    budget = 60.0 * args.budget_minutes
    ref = reference(GEOMETRY, args.eval_showers, out)
    runs = []  # (row name, folder tag, model folder, training seconds, steps)
    for family in args.families:
        steps = max(1, round(budget / costs[family])) if family in costs else 0
        print(f"\n=== {family}: {steps} steps ===", flush=True)
        if family == "gflash":
            model, seconds = train(family, 1, out / family, cache)
            runs.append(("gflash (the simulator)", family, model, 0.0, 0))
            continue
        model, seconds = train(family, steps, out / family, cache)
        runs.append((f"{family} (scratch)", family, model, seconds, steps))
        if family == "calodit" and args.pretrained:
            model, seconds = fine_tune(Path(args.pretrained), steps, out / "calodit_pretrained", cache)
            runs.append(("calodit (pretrained+full)", "calodit_pretrained", model, seconds, steps))
        if family in STUDENTS:  # distilled from the teacher just trained, for the same budget again
            tag, extra = f"{family}_student", STUDENTS[family](model)
            cost = measured_costs({tag: (family, extra)}, cache, out)[tag]
            steps = max(1, round(budget / cost))
            print(f"\n=== {tag}: {steps} steps at {cost:.3f} s ===", flush=True)
            model, seconds = train(family, steps, out / tag, cache, extra)
            runs.append((f"{family} (student)", tag, model, seconds, steps))
    rows = []
    for name, tag, model, seconds, steps in runs:
        gen = generate(model, ref, out / tag / "generated", sample_steps.get(tag))
        report = evaluate(ref, gen, out / tag / "evaluation")
        rows.append({"name": name, "tag": tag, "model": str(model), "train_s": seconds, "steps": steps,
                     "params": parameters(model), **row(report, GEOMETRY)})
    for r in rows:  # timing last, one model after another, nothing training beside it
        r["ms"], r["nfe"] = ms_per_shower(Path(r["model"]), sample_steps.get(r["tag"]))
    (out / "baselines.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
