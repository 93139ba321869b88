"""``calofm adapt`` and ``recipes/adapt.py``: options -> AdaptConfig -> the adaptation run (calofm.adapt)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, fields

from calofm.adapt import MAX_BATCH, MAX_RANK, MAX_STEPS, AdaptConfig, build_adapt_model, save_adapted, train_config
from calofm.commands.args import add_geometry_dir, float_in, int_in, parse_count, run_reporting_errors
from calofm.config import build
from calofm.training.config import TRAIN_SEED_MAX


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--geometry", required=True, help="the new detector (geometry name or .yaml card)")
    p.add_argument("--samples", type=parse_count, help="simulated training showers when no --data (e.g. 200k)")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="training shower files of the new detector, or a Hub dataset repo ORG/NAME[@REV]")
    p.add_argument("--base", help="pretrained model folder or Hub id (default runs/pretrain/model)")
    p.add_argument("--method", choices=["lora", "full"], help="LoRA adapter (default) or full fine-tuning")
    p.add_argument("--rank", type=int_in(1, MAX_RANK), help="LoRA rank (default 32; docs/fidelity.md measures it)")
    p.add_argument("--lora-targets", nargs="+", metavar="GROUP",
                   help="LoRA target groups: attention mlp adaln final embedders (default: attention mlp adaln)")
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), help="optimiser steps (default 400)")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH))
    p.add_argument("--lr", type=float_in(0.0, 1.0, low_open=True), help="learning rate (default by method)")
    p.add_argument("--out", help="output folder (default runs/adapt_<geometry>_<method>)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write a merged standalone model")
    p.add_argument("--from-scratch", action="store_true", help="train the same architecture without pretraining")
    p.add_argument("--seed", type=int_in(0, TRAIN_SEED_MAX))
    p.add_argument("--cache-dir", help="simulated data cache (default $CALOFM_CACHE or ~/.cache/calofm)")
    p.add_argument("--config", help="YAML with any AdaptConfig fields (command-line options win)")
    add_geometry_dir(p)


def config_from_args(args: argparse.Namespace) -> AdaptConfig:
    overrides = []
    for name, key in (("geometry", "geometry"), ("samples", "samples"), ("base", "base"), ("method", "method"),
                      ("rank", "rank"), ("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("out", "output_dir"), ("seed", "seed"), ("cache_dir", "cache_dir")):
        value = getattr(args, name, None)
        if value is not None:
            overrides += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    for name, key in (("data", "data"), ("geometry_dir", "geometry_dirs")):
        if getattr(args, name, None):
            overrides += [f"--{key}", json.dumps([str(v) for v in getattr(args, name)])]
    if getattr(args, "lora_targets", None):
        overrides += ["--lora_targets", json.dumps(args.lora_targets)]
    if args.merge:
        overrides += ["--merge", "true"]
    if args.from_scratch:
        overrides += ["--from_scratch", "true"]

    @dataclass
    class _Defaults(AdaptConfig):  # `geometry` has no default; build() needs one to start from
        geometry: str = ""

    cfg = build(_Defaults, args.config, overrides)
    return AdaptConfig(**{f.name: getattr(cfg, f.name) for f in fields(AdaptConfig)})


def run(args: argparse.Namespace) -> int:
    from calofm.training.loop import Setup, train

    a = config_from_args(args)
    if not a.geometry:
        raise ValueError("--geometry is required")
    build_model = build_adapt_model(a)
    setup = Setup(build=build_model, save=save_adapted(a, build_model), kind=a.kind)
    final = train(train_config(a, build_model.slot), setup)
    if final is not None:
        info = build_model.info
        print(f"adapted to {info['geometry']} (slot {info['slot']}, {info['method']}, "
              f"{info['trainable_parameters']:,} trainable parameters): {final}")
        print(f"generate with: calofm generate --model {final} --geometry {info['geometry']} --samples 1000 "
              f"--out gen.h5")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="recipes/adapt.py",
                                description="Adapt a pretrained calofm model to a new detector.")
    add_arguments(p)
    args = p.parse_args(argv)
    return run_reporting_errors("adapt", lambda: run(args))
