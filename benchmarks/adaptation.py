"""Does pretraining pay off? Adaptation to ALLEGRO and CLD vs training from scratch, at CPU scale.

    python benchmarks/adaptation.py --base runs/pretrain/model [--geometries allegro cld]
        [--sizes 1000 5000 20000] [--steps 400] [--eval-every 100] [--out runs/bench_adapt]

For each geometry and training-set size it trains pretrained+LoRA, pretrained+full fine-tuning and the
same architecture from scratch with the same loop and budget, and prints per method: trainable
parameters, validation loss and a fidelity metric at every evaluation step, and the steps needed to
reach the scratch model's final validation loss and fidelity. Fidelity = mean separation power of the
CaloChallenge high-level histograms (calofm.evaluation) of generated vs held-out simulated showers:
0 is identical, 1 disjoint. Writes <out>/adaptation.png and <out>/adaptation.json.
Without --base it first pretrains the embedded default (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

METHODS = ("lora", "full", "scratch")


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def fidelity_fn(geometry: str, reference: dict, steps: int):
    """Setup.evaluate: generate showers for the reference's conditions, mean separation power of the features."""
    from calofm.evaluation import EvalOptions, compare_samples
    from calofm.generate import ShowerGenerator
    from calofm.geometry import load_geometry

    geo = load_geometry(geometry)
    options = EvalOptions(metrics=("hist",), plots=False, progress=False, noise_floor=False)

    def evaluate(net, step: int) -> dict:
        gen = ShowerGenerator(net, net.config, device="cpu")
        showers = gen.sample(geometry=geometry, energy_mev=reference["incident_energy"], phi=reference["incident_phi"],
                             theta=reference["incident_theta"], steps=steps, seed=step)
        res = compare_samples(reference, {**reference, "showers": showers}, geo, options).results["hist"]
        sep = [v["separation_power"] for v in res.values() if v.get("separation_power") is not None]
        return {"fidelity": float(np.nanmean(sep))}

    return evaluate


def run_one(geometry, size, method, base, out, args, reference) -> dict:
    from calofm.adapt import AdaptConfig, build_adapt_model, save_adapted, train_config
    from calofm.training.loop import Setup, train

    a = AdaptConfig(geometry=geometry, base=str(base), method="full" if method != "lora" else "lora",
                    from_scratch=method == "scratch", samples=size, val_samples=300, steps=args.steps,
                    val_every=args.eval_every, save_every=10**6, output_dir=str(out), cache_dir=args.cache,
                    log_every=max(args.steps // 20, 1), seed=0)
    if (out / "model").exists():  # finished in an earlier invocation: its folder has everything
        return {**collect(out, geometry), "wall_s": float("nan")}
    build_model = build_adapt_model(a)
    reset_accelerate()
    t0 = time.perf_counter()
    train(train_config(a, build_model.slot), Setup(build=build_model, save=save_adapted(a, build_model),
                                 evaluate=fidelity_fn(geometry, reference, args.sample_steps)))
    return {**collect(out, geometry), "wall_s": time.perf_counter() - t0}


def collect(out: Path, geometry: str) -> dict:
    """A finished run's curves (validation loss, fidelity) and trainable-parameter count, from its folder."""
    from calofm.adapt import ADAPTER_FILE
    from calofm.training.tracking import read_metrics

    # one record per step (the last): a folder may hold an earlier, interrupted attempt's records
    recs = list({r["step"]: r for r in read_metrics(out / "logs" / "metrics.jsonl") if f"val/{geometry}" in r}
                .values())
    info = json.loads((out / "model" / ADAPTER_FILE).read_text())
    return {"steps": [r["step"] for r in recs], "val": [r[f"val/{geometry}"] for r in recs],
            "fidelity": [r["fidelity"] for r in recs], "trainable": info["trainable_parameters"]}


def steps_to_reach(steps, values, target) -> float | None:
    """First step (linear interpolation) where a decreasing-is-better curve reaches ``target``."""
    for i, v in enumerate(values):
        if v <= target:
            if i == 0:
                return float(steps[0])
            s0, s1, v0 = steps[i - 1], steps[i], values[i - 1]
            return float(s0 + (s1 - s0) * (v0 - target) / max(v0 - v, 1e-12))
    return None


def table(results: dict) -> str:
    """Per geometry and data size: curves of each method and the steps it needs to reach scratch's final quality."""
    lines = []
    fmt = lambda x: "never" if x is None else f"{x:.0f}"  # noqa: E731
    for (geometry, size), runs in results.items():
        scratch = runs.get("scratch")
        head = f"\n{geometry}, {size} training showers"
        if scratch:
            head += f" (scratch final: val {scratch['val'][-1]:.4f}, fidelity {scratch['fidelity'][-1]:.4f})"
        lines.append(head)
        steps = next(iter(runs.values()))["steps"]
        lines.append(f"{'method':>8} {'trainable':>10} " + " ".join(f"{'val@' + str(s):>9}" for s in steps)
                     + " " + " ".join(f"{'fid@' + str(s):>9}" for s in steps)
                     + (f" {'steps->scratch val':>18} {'steps->scratch fid':>18}" if scratch else ""))
        for method in (m for m in METHODS if m in runs):
            r = runs[method]
            row = (f"{method:>8} {r['trainable']:>10,} " + " ".join(f"{v:9.4f}" for v in r["val"]) + " "
                   + " ".join(f"{v:9.4f}" for v in r["fidelity"]))
            if scratch:
                reach_v = steps_to_reach(r["steps"], r["val"], scratch["val"][-1])
                reach_f = steps_to_reach(r["steps"], r["fidelity"], scratch["fidelity"][-1])
                row += f" {fmt(reach_v):>18} {fmt(reach_f):>18}"
            lines.append(row)
    return "\n".join(lines)


def data_table(results: dict) -> str:
    """Final quality of every (method, data size) per geometry, and the least data each adapted method needs to
    match scratch trained on each size: the 'far less data' half of the claim."""
    lines = []
    for geometry in dict.fromkeys(g for g, _ in results):
        runs = {(m, size): r for (g, size), by_m in results.items() if g == geometry for m, r in by_m.items()}
        if not runs:
            continue
        lines.append(f"\n{geometry}: final quality by training-set size (same steps for every run)")
        lines.append(f"{'method':>8} {'showers':>8} {'val':>8} {'fidelity':>9}")
        for (m, size), r in sorted(runs.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
            lines.append(f"{m:>8} {size:>8} {r['val'][-1]:8.4f} {r['fidelity'][-1]:9.4f}")
        for (m, size), r in sorted(runs.items(), key=lambda kv: kv[0][1]):
            if m != "scratch":
                continue
            for method in ("lora", "full"):
                enough = [s for (mm, s), rr in runs.items() if mm == method and rr["val"][-1] <= r["val"][-1]
                          and rr["fidelity"][-1] <= r["fidelity"][-1]]
                what = "no size run"
                if enough:
                    what = f"{min(enough)} showers" + (f" ({size / min(enough):.0f}x less data)" if min(enough) < size
                                                       else " (the same data)")
                lines.append(f"  {method} matches scratch@{size} (val and fidelity) with {what}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, axes = plt.subplots(2, len(keys), figsize=(4 * len(keys), 6.5), squeeze=False)
    for j, key in enumerate(keys):
        for method in (m for m in METHODS if m in results[key]):
            r = results[key][method]
            color = f"C{METHODS.index(method)}"  # the same colour for a method in every panel
            axes[0, j].plot(r["steps"], r["val"], marker="o", label=method, color=color)
            axes[1, j].plot(r["steps"], r["fidelity"], marker="o", label=method, color=color)
        axes[0, j].set_title(f"{key[0]}, {key[1]} showers")
        axes[0, j].set_ylabel("validation EDM loss")
        axes[1, j].set_ylabel("mean separation power")
        axes[1, j].set_xlabel("training steps")
        axes[1, j].set_yscale("log")
        axes[0, j].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="pretrained model (default: pretrain the embedded default first)")
    ap.add_argument("--geometries", nargs="*", default=["allegro", "cld"])
    ap.add_argument("--sizes", nargs="*", type=int, default=[1000, 5000, 20000])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--sample-steps", type=int, default=8, help="Heun steps for the fidelity samples")
    ap.add_argument("--reference-samples", type=int, default=400)
    ap.add_argument("--out", default="runs/bench_adapt")
    ap.add_argument("--cache", default=None, help="simulated data cache")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                    help="e.g. only 'scratch' at larger sizes, to compare with adapted runs on less data")
    ap.add_argument("--tables", nargs="*", metavar="DIR",
                    help="no training: print the tables of earlier benchmark output folders together")
    args = ap.parse_args()
    if args.tables:
        results = {}
        for root in map(Path, args.tables):
            for run in sorted(p for p in root.iterdir() if (p / "model" / "calofm_adapter.json").exists()):  # finished
                geometry, size, method = run.name.rsplit("_", 2)
                results.setdefault((geometry, int(size)), {})[method] = collect(run, geometry)
        results = dict(sorted(results.items()))
        if not results:
            raise SystemExit(f"no finished runs (<geometry>_<size>_<method>/) in {args.tables}")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plot(results, Path(args.out) / "adaptation.png")
        print("=== adaptation benchmark ===" + table(results) + "\n" + data_table(results))
        return
    out = Path(args.out)
    base = Path(args.base) if args.base else None
    if base is None:
        from calofm.config import build
        from calofm.training.config import TrainConfig
        from calofm.training.loop import Setup, train
        from calofm.training.pretrain import build_pretrain_model, save_pretrained

        cfg = build(TrainConfig, None, ["--output_dir", str(out / "base")]
                    + (["--data.cache_dir", args.cache] if args.cache else []))
        reset_accelerate()
        base = train(cfg, Setup(build=build_pretrain_model(cfg), save=save_pretrained))
    from calofm.sim import simulate

    results = {}
    for geometry in args.geometries:
        reference = simulate(geometry, args.reference_samples, seed=777)
        for size in args.sizes:
            results[(geometry, size)] = {
                m: run_one(geometry, size, m, base, out / f"{geometry}_{size}_{m}", args, reference)
                for m in METHODS if m in args.methods}
            print(table({(geometry, size): results[(geometry, size)]}), flush=True)
    print("\n=== adaptation benchmark ===" + table(results) + "\n" + data_table(results))
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "adaptation.png")
    (out / "adaptation.json").write_text(json.dumps({f"{g}_{s}": v for (g, s), v in results.items()}, indent=1))
    print(f"\nplot: {out / 'adaptation.png'}")


if __name__ == "__main__":
    main()
