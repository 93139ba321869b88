"""Training throughput per preset: samples/s and the fraction of step time spent waiting for data.

    python benchmarks/train.py [--presets tiny small base] [--variants single factorised] [--batch-size 64]
        [--workers 1] [--compare GIT_REF]

Runs the real training loop (calofm.training.loop) on cached simulated Par04 Si-W / ODD / ILD data
and reads the numbers it logs. Target: data waiting < 5 % of the step time. ``--compare REF`` also runs
this measurement on the code of an earlier commit (a temporary git worktree, same data, interleaved
with this checkout's runs) and prints the two side by side: the before/after of a change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = {"tiny": 40, "small": 30, "base": 8}
ROOT = Path(__file__).resolve().parents[1]


def measure(preset: str, batch: int, workers: int, cache: str, out: Path, steps: int, variant: str | None
            ) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from calofm.config import from_dict
    from calofm.training.config import TrainConfig
    from calofm.training.loop import Setup, train
    from calofm.training.pretrain import build_pretrain_model, save_pretrained
    from calofm.training.tracking import read_metrics

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    log_every = max(steps // 4, 1)
    # variant None: the code's own default (commits before the variants existed know no such key)
    model = {"preset": preset} if variant is None else {"preset": preset, "variant": variant}
    cfg = from_dict(TrainConfig, {
        "output_dir": str(out), "steps": steps, "batch_size": batch, "log_every": log_every,
        "val_every": 10**6, "save_every": 10**6, "tensorboard": False, "resume": False,
        "model": model,
        "data": {"cache_dir": cache, "num_workers": workers, "stats_samples": 500,
                 "sources": [{"geometry": g, "samples": 3000, "val_samples": 64}
                             for g in ("par04_siw", "odd", "ild")]},
    })
    start = time.perf_counter()
    train(cfg, Setup(build=build_pretrain_model(cfg), save=save_pretrained))
    wall = time.perf_counter() - start
    recs = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if "samples_per_s" in r][1:]  # skip warm-up
    return {"samples_per_s": float(np.mean([r["samples_per_s"] for r in recs])),
            "data_wait": float(np.mean([r["data_wait"] for r in recs])), "wall": wall}


def measure_at(ref: str, tree: Path, preset: str, args, cache: str, out: Path) -> dict:
    """``measure`` with the code of the git worktree ``tree`` (an earlier commit), in a subprocess."""
    code = (f"import json, sys; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r}); "
            f"from train import measure; print(json.dumps(measure({preset!r}, {args.batch_size}, {args.workers}, "
            f"{cache!r}, __import__('pathlib').Path({str(out)!r}), {STEPS[preset]}, None)))")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tree)
    if res.returncode:
        raise SystemExit(f"measurement at {ref} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["tiny", "small", "base"])
    ap.add_argument("--variants", nargs="*", default=["single"], choices=["single", "factorised"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell, interleaved; the best is kept")
    ap.add_argument("--compare", metavar="GIT_REF", help="also measure this earlier commit (single variant)")
    ap.add_argument("--cache", default=None, help="simulated data cache (default: a temporary folder)")
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="calofm-bench-")
    rows: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = None
        if args.compare:
            tree = Path(tmp) / "ref"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.compare],
                           check=True, capture_output=True)
        try:
            for rep in range(args.repeats):
                for preset in args.presets:
                    cells = [("this", v) for v in args.variants] + ([(args.compare, "single")] if tree else [])
                    for code, variant in cells:
                        out = Path(tmp) / f"{preset}_{variant}_{rep}_{code == 'this'}"
                        if code == "this":
                            r = measure(preset, args.batch_size, args.workers, cache, out, STEPS[preset], variant)
                        else:
                            r = measure_at(code, tree, preset, args, cache, out)
                        key = (preset, code, variant)
                        if key not in rows or r["samples_per_s"] > rows[key]["samples_per_s"]:
                            rows[key] = r
        finally:
            if tree is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    print(f"\nbatch {args.batch_size}, {args.workers} loader worker(s), best of {args.repeats}")
    print(f"{'preset':>8} {'code':>12} {'variant':>10} {'samples/s':>10} {'s/step':>8} {'data wait':>10} "
          f"{'target <5%':>11}")
    for (preset, code, variant), r in rows.items():
        ok = "OK" if r["data_wait"] < 0.05 else "ABOVE"
        print(f"{preset:>8} {code[:12]:>12} {variant:>10} {r['samples_per_s']:10.1f} "
              f"{args.batch_size / r['samples_per_s']:8.3f} {100 * r['data_wait']:9.2f}% {ok:>11}")


if __name__ == "__main__":
    main()
