"""Consistency distillation of a trained CaloDiT into a 1-4 step student: ``calofm distill``.

The student starts as a copy of the teacher (same architecture, geometry slots, conditions and
preprocessing), gets the consistency boundary parameterisation and learns with
``calofm.training.consistency.ConsistencyObjective`` in the one training loop (Accelerate, exact resume,
several processes). The teacher is a pretrained, fully fine-tuned or merged adapted model; a LoRA adapter
folder is merged first (``calofm adapt --merge``), because a student is one network. The training showers
are simulated with the built-in simulator for every geometry of the teacher, from the cards stored with it
(the teacher defines the targets; the showers only place the noisy starting points). The saved student is
the EMA of the training weights, which is also the target network, with ``consistency_sigmas`` in its
config: ``calofm generate`` then samples with its step count by default.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from calofm.hub.folders import CARDS_DIR, DISTILL_FILE, load_model, require_calodit, save_model
from calofm.hub.loading import is_adapter
from calofm.hub.resolve import resolve
from calofm.training.config import TRAIN_SEED_MAX, Validated, check_float, check_int

log = logging.getLogger(__name__)
STUDENT_STEPS = (1, 2, 4)


@dataclass
class DistillConfig(Validated):
    model: str  # the teacher: a model folder or Hub id
    output_dir: str = "runs/distill"
    student_steps: int = 2  # network evaluations per shower (per network); 2 keeps the teacher's fidelity (docs)
    grid: int = 18  # N, points of the noise grid the teacher's ODE is cut into (Song et al. 2023: 18 on CIFAR-10)
    steps: int = 2000  # optimiser steps (benchmarks/sampling.py: 600 were too few)
    batch_size: int = 32
    lr: float = 4e-4
    warmup_steps: int = 50
    ema_decay: float = 0.99  # mu: the target network and the saved student
    samples: int = 6000  # simulated training showers per geometry of the teacher (pretraining's default)
    val_samples: int = 300
    cache_dir: str | None = None
    seed: int = 0
    num_workers: int = 1
    log_every: int = 10
    val_every: int = 200
    save_every: int = 500
    stop_at: int | None = None

    def validate(self) -> None:
        if self.student_steps not in STUDENT_STEPS:
            raise ValueError(f"student_steps must be one of {STUDENT_STEPS}, got {self.student_steps!r}")
        from calofm.diffusion import MAX_GRID

        check_int("grid", self.grid, 2, MAX_GRID)
        check_int("steps", self.steps, 1, 10**9)
        check_int("batch_size", self.batch_size, 1, 10**6)
        check_float("lr", self.lr, 0.0, 1.0, low_open=True)
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_float("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_int("samples", self.samples)
        check_int("val_samples", self.val_samples, low=0)
        check_int("seed", self.seed, 0, TRAIN_SEED_MAX)
        check_int("num_workers", self.num_workers, 0, 64)
        for name in ("log_every", "val_every", "save_every"):
            check_int(name, getattr(self, name))
        check_int("stop_at", self.stop_at, optional=True)


def load_teacher(spec: str):
    """(teacher network, its folder) of a model folder or Hub id; a LoRA adapter is refused with the fix."""
    path = resolve(spec)
    if is_adapter(path):
        raise ValueError(f"{spec}: is a LoRA adapter; distil one network: merge it first (`calofm adapt ... --merge` "
                         "writes <out>/merged) or distil its base")
    net, _, folder = load_model(path)
    require_calodit(net, spec, "calofm distill")
    if getattr(net.config, "consistency_sigmas", None):
        raise ValueError(f"{spec}: is already a distilled student; distil its teacher instead")
    return net, Path(folder)


def train_config(d: DistillConfig, teacher, folder: Path):
    """The TrainConfig of a distillation run: one simulated source per geometry of the teacher, with its slot
    and the card stored with the teacher."""
    from calofm.training.config import DataConfig, OptimConfig, SourceConfig, TrainConfig

    sources = []
    for name, slot in sorted(teacher.config.geometry_slots.items(), key=lambda kv: kv[1]):
        card = folder / CARDS_DIR / f"{name}.yaml"
        sources.append(SourceConfig(geometry=str(card) if card.is_file() else name, samples=d.samples,
                                    val_samples=d.val_samples, slot=int(slot)))
    return TrainConfig(
        output_dir=d.output_dir, seed=d.seed, steps=d.steps, batch_size=d.batch_size, ema_decay=d.ema_decay,
        log_every=d.log_every, val_every=d.val_every, save_every=d.save_every, stop_at=d.stop_at,
        data=DataConfig(sources=sources, cache_dir=d.cache_dir, num_workers=d.num_workers),  # pretraining's data
        optim=OptimConfig(lr=d.lr, warmup_steps=d.warmup_steps, schedule="constant"),
    )


def make_student(teacher: nn.Module, student_steps: int) -> nn.Module:
    """A copy of the teacher whose config marks it a consistency student with ``student_steps`` steps."""
    from calofm.sampling import student_sigmas

    student = copy.deepcopy(teacher).requires_grad_(True).train()
    c = student.config
    c.consistency_sigmas = student_sigmas(student_steps, c.sigma_min, c.sigma_max, c.rho)
    c._check()
    return student


def distill_setup(d: DistillConfig, teacher: nn.Module, folder: Path, spec: str):
    """Setup (build, save, objective) of the training loop for distilling ``teacher``."""
    from calofm.hub.adapters import base_record
    from calofm.preprocess import ModelSpace
    from calofm.training.consistency import ConsistencyObjective
    from calofm.training.loop import Setup

    def build(data):
        missing = sorted(set(teacher.config.geometry_slots) - set(data.geometries))
        if missing:
            raise ValueError(f"{spec}: no training data for geometries {missing}")
        student = make_student(teacher, d.student_steps)
        n = sum(p.numel() for p in student.parameters())
        log.info("distilling %s (%d parameters) into a %d-step student", spec, n, d.student_steps)
        return student, ModelSpace.from_config(student.config)

    def save(net: nn.Module, out: Path, geometries: dict) -> None:
        from calofm.config import to_dict

        info = {"teacher": base_record(spec, folder), "student_steps": d.student_steps,
                "consistency_sigmas": list(net.config.consistency_sigmas), "config": to_dict(d)}
        save_model(net, out, geometries, info={DISTILL_FILE: info})

    return Setup(build=build, save=save, kind="distilled",
                 objective=lambda net, ema: ConsistencyObjective(net, teacher, ema, d.grid))


def distill(d: DistillConfig) -> Path | None:
    """Run (or resume) a distillation; the student's folder (``<output_dir>/model``), None when stopped early."""
    from calofm.data.output import check_output
    from calofm.training.loop import train

    teacher, folder = load_teacher(d.model)
    check_output(Path(d.output_dir), [folder], kind="run")  # never onto, into or around the teacher
    cfg = train_config(d, teacher, folder)
    return train(cfg, distill_setup(d, teacher, folder, d.model))
