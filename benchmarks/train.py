"""Training throughput per preset: samples/s and the fraction of step time spent waiting for data.

    python benchmarks/train.py [--presets tiny small base] [--batch-size 64] [--workers 1]

Runs the real training loop (calofm.training.loop) on cached simulated Par04 Si-W / ODD / ILD data
and reads the numbers it logs. Target: data waiting < 5 % of the step time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from calofm.config import from_dict
from calofm.training.config import TrainConfig
from calofm.training.loop import Setup, train
from calofm.training.pretrain import build_pretrain_model, save_pretrained
from calofm.training.tracking import read_metrics

STEPS = {"tiny": 40, "small": 30, "base": 8}


def measure(preset: str, batch: int, workers: int, cache: str, out: Path, steps: int) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    log_every = max(steps // 4, 1)
    cfg = from_dict(TrainConfig, {
        "output_dir": str(out), "steps": steps, "batch_size": batch, "log_every": log_every,
        "val_every": 10**6, "save_every": 10**6, "tensorboard": False, "resume": False,
        "model": {"preset": preset},
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["tiny", "small", "base"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cache", default=None, help="simulated data cache (default: a temporary folder)")
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="calofm-bench-")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            r = measure(preset, args.batch_size, args.workers, cache, Path(tmp) / preset, STEPS[preset])
            rows.append((preset, r))
    print(f"\nbatch {args.batch_size}, {args.workers} loader worker(s)")
    print(f"{'preset':>8} {'samples/s':>10} {'s/step':>8} {'data wait':>10} {'target <5%':>11}")
    for preset, r in rows:
        ok = "OK" if r["data_wait"] < 0.05 else "ABOVE"
        print(f"{preset:>8} {r['samples_per_s']:10.1f} {args.batch_size / r['samples_per_s']:8.3f} "
              f"{100 * r['data_wait']:9.2f}% {ok:>11}")


if __name__ == "__main__":
    main()
