"""``recipes/train.py --model NAME``: train any registered family (CaloDiT or a baseline) on the same data.

The recipe is ``recipes/configs/baselines/NAME.yaml`` unless ``--config`` names another; ``--key value``
overrides any field as in pretraining. CaloDiT trains exactly as ``recipes/pretrain.py`` does.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from calofm.commands.args import run_reporting_errors
from calofm.config import ConfigError, build
from calofm.training.config import TrainConfig


def parse(argv: list[str] | None = None, config_dir: Path | None = None) -> TrainConfig:
    from calofm.models import FAMILIES

    ap = argparse.ArgumentParser(
        prog="recipes/train.py",
        description="Train a model family on the common task (CaloDiT or a baseline). Any config field can be "
        "overridden: --steps 200, --model.family_config.latent_dim=64 (see calofm/training/config.py).",
    )
    ap.add_argument("--model", required=True, choices=list(FAMILIES), help="model family (calofm.models.FAMILIES)")
    ap.add_argument("--config", help="recipe YAML; default recipes/configs/baselines/<model>.yaml")
    args, overrides = ap.parse_known_args(argv)
    path = args.config
    if path is None and config_dir is not None and (Path(config_dir) / f"{args.model}.yaml").is_file():
        path = Path(config_dir) / f"{args.model}.yaml"
    cfg = build(TrainConfig, path, [*overrides, f"--model.family={args.model}"])
    if cfg.model.family != args.model:  # pragma: no cover - the override above wins
        raise ConfigError(f"{path}: model.family is {cfg.model.family!r}, not {args.model!r}")
    return cfg


def main(argv: list[str] | None = None, config_dir: Path | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def train_family() -> int:
        from calofm.models import family_classes
        from calofm.training.baselines import baseline_setup, write_untrained
        from calofm.training.loop import Setup, train
        from calofm.training.pretrain import build_pretrain_model, save_pretrained

        cfg = parse(argv, config_dir)
        if cfg.model.family == "calodit":
            train(cfg, Setup(build=build_pretrain_model(cfg), save=save_pretrained, kind="scratch"))
        elif not family_classes(cfg.model.family)[1].trainable:
            print(f"{cfg.model.family} has nothing to train: wrote {write_untrained(cfg)}")
        else:
            train(cfg, baseline_setup(cfg))
        return 0

    return run_reporting_errors("train", train_family)
