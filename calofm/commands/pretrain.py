"""``recipes/pretrain.py``: options -> TrainConfig -> the pretraining run (calofm.training.pretrain)."""

from __future__ import annotations

import argparse
import logging

from calofm.commands.args import run_reporting_errors
from calofm.config import build
from calofm.training.config import TrainConfig
from calofm.training.loop import Setup, train
from calofm.training.pretrain import build_pretrain_model, save_pretrained


def parse(argv: list[str] | None = None) -> TrainConfig:
    ap = argparse.ArgumentParser(
        prog="recipes/pretrain.py",
        description="Pretrain CaloDiT on several geometries. Any config field can be overridden: --steps 200, "
        "--model.preset base, --data.cache_dir DIR, --optim.lr=3e-4 (see calofm/training/config.py).",
    )
    ap.add_argument("--config", help="recipe YAML (recipes/configs/*.yaml); default: the embedded CPU demo")
    args, overrides = ap.parse_known_args(argv)
    return build(TrainConfig, args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    def pretrain() -> int:
        cfg = parse(argv)
        train(cfg, Setup(build=build_pretrain_model(cfg), save=save_pretrained))
        return 0

    return run_reporting_errors("pretrain", pretrain)
