"""``calofm distill``: options -> DistillConfig -> consistency distillation (calofm.distill)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields

from calofm.commands.args import float_in, int_in, parse_count
from calofm.config import build
from calofm.distill import STUDENT_STEPS, DistillConfig
from calofm.training.config import TRAIN_SEED_MAX


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="the teacher: a pretrained, fully fine-tuned or merged model folder, or a Hub id")
    p.add_argument("--out", required=True, help="run folder; the student lands in <out>/model")
    p.add_argument("--student-steps", type=int, choices=STUDENT_STEPS,
                   help="network evaluations per shower of the student (default 2)")
    p.add_argument("--steps", type=int_in(1, 10**9), help="optimiser steps (default 2000)")
    p.add_argument("--grid", type=int_in(2, 10_000), help="points of the teacher's noise grid (default 18)")
    p.add_argument("--samples", type=parse_count, help="simulated training showers per geometry (default 6000)")
    p.add_argument("--batch-size", type=int_in(1, 10**6))
    p.add_argument("--lr", type=float_in(0.0, 1.0, low_open=True), help="learning rate (default 4e-4)")
    p.add_argument("--ema-decay", type=float_in(0.0, 1.0, high_open=True),
                   help="decay of the target network, which is also the saved student (default 0.99)")
    p.add_argument("--seed", type=int_in(0, TRAIN_SEED_MAX))
    p.add_argument("--cache-dir", help="simulated data cache (default $CALOFM_CACHE or ~/.cache/calofm)")
    p.add_argument("--config", help="YAML with any DistillConfig fields (command-line options win)")


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    overrides = []
    for name, key in (("model", "model"), ("out", "output_dir"), ("student_steps", "student_steps"),
                      ("steps", "steps"), ("grid", "grid"), ("samples", "samples"), ("batch_size", "batch_size"),
                      ("lr", "lr"), ("ema_decay", "ema_decay"), ("seed", "seed"), ("cache_dir", "cache_dir")):
        value = getattr(args, name, None)
        if value is not None:
            overrides += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]

    @dataclass
    class _Defaults(DistillConfig):  # `model` has no default; build() needs one to start from
        model: str = ""

    cfg = build(_Defaults, args.config, overrides)
    return DistillConfig(**{f.name: getattr(cfg, f.name) for f in fields(DistillConfig)})


def run(args: argparse.Namespace) -> int:
    from calofm.distill import distill

    d = config_from_args(args)
    final = distill(d)
    if final is not None:
        print(f"distilled {d.model} into a {d.student_steps}-step student: {final}")
        print(f"generate with: calofm generate --model {final} --geometry NAME --samples 1000 --out gen.h5")
    return 0
