"""Training a baseline family (``calofm.models.FAMILIES``) in the one loop, like CaloDiT.

``recipes/train.py --model NAME`` builds the family's model from ``model.family_config`` with the run's
geometry slots and thresholds, fits its preprocessing (the family's ``preprocessing_defaults``) on the training
data as pretraining does, and trains it with ``calofm.training.loop.train`` (same batches, noise, EMA,
checkpoints and exact resume). A family without trainable weights (the parametrised simulator) is written
straight away: it is the model the cards describe.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from calofm.hub.folders import save_model
from calofm.preprocess import ModelSpace, ShowerPreprocessor
from calofm.training.config import TrainConfig
from calofm.training.data import RunData, cell_maxima, fit_preprocessor
from calofm.training.loop import Setup
from calofm.training.objective import BaselineObjective

log = logging.getLogger(__name__)


def baseline_config(cfg: TrainConfig, geometries: dict, pre: ShowerPreprocessor | None, cell_max: dict):
    """The family's config: ``model.family_config`` plus the run's geometry claims and preprocessing."""
    from calofm.models import family_classes

    config_class, _ = family_classes(cfg.model.family)
    return config_class(**cfg.model.family_config,
                        geometry_slots={n: g.slot for n, g in geometries.items()},
                        geometry_thresholds={n: g.card.threshold for n, g in geometries.items()},
                        geometry_cell_max=cell_max, preprocessing=pre.state_dict() if pre is not None else {})


def baseline_setup(cfg: TrainConfig) -> Setup:
    """The loop's Setup for a trainable baseline family."""
    from calofm.models import family_classes

    config_class, model_class = family_classes(cfg.model.family)
    run: dict = {}

    def build(data: RunData) -> tuple[nn.Module, ModelSpace]:
        n = cfg.data.stats_samples
        pre = fit_preprocessor(data.train, n, ShowerPreprocessor(**config_class.preprocessing_defaults))
        net = model_class(baseline_config(cfg, data.geometries, pre, cell_maxima(data.train, n, pre)))
        teacher_path = getattr(net.config, "distill_from", None)
        net.init_training(teacher=load_teacher(teacher_path, cfg.model.family) if teacher_path else None)
        log.info("%s: %.3fM parameters", cfg.model.family, sum(p.numel() for p in net.parameters()) / 1e6)
        space = ModelSpace.from_config(net.config)
        run.update(data=data, space=space)
        return net, space

    def save(net: nn.Module, out: Path, geometries: dict) -> None:
        net.finish_training(run["data"].train, run["space"], cfg.data.stats_samples)  # e.g. a latent density
        save_model(net, out, geometries)

    return Setup(build=build, save=save, kind="scratch",
                 objective=lambda net, ema: BaselineObjective(net, ema))


def load_teacher(path: str, family: str):
    """The trained model a family distils from (``config.distill_from``): a model folder or Hub id of the
    same family, frozen."""
    from calofm.hub.folders import load_model

    teacher = load_model(path)[0]
    if getattr(teacher, "family", None) != family:
        raise ValueError(f"{path}: is a {teacher.config.model_type} model, not a {family} teacher")
    return teacher.eval().requires_grad_(False)


def write_untrained(cfg: TrainConfig) -> Path:
    """A family with nothing to train (``trainable = False``): its model folder for the run's geometries."""
    from calofm.data.output import check_output
    from calofm.models import family_classes
    from calofm.training.data import source_geometry

    out = Path(cfg.output_dir)
    check_output(out, [], kind="run")
    final = out / "model"
    if final.exists():
        raise ValueError(f"{final}: exists already; use another output_dir")
    geometries = {}
    for src in cfg.data.sources:
        g = source_geometry(src, cfg.data.geometry_dirs)[1]
        geometries[g.name] = g
    net = family_classes(cfg.model.family)[1](baseline_config(cfg, geometries, None, {}))
    save_model(net, final, geometries)
    return final
