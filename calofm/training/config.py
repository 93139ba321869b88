"""Typed training configuration. The defaults are the embedded CPU demo: the ``small`` model
pretrained on simulated Par04 Si-W, ODD and ILD showers in about ten minutes on 2 CPU cores.

Recipes (``recipes/configs/*.yaml``) override any field; ``--key value`` / ``--a.b=value`` on the
command line override the recipe. Unknown keys and wrong types are errors (``calofm.config``); every
number is range-checked when a config is built and again whenever a field is assigned (``Validated``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

TRAIN_SEED_MAX = 2**32 - 1  # accelerate's set_seed seeds numpy's legacy generator, which takes 32 bits
DATA_SEED_MAX = 2**62  # simulation seeds (validation uses seed + 1000; stored as an int64 file attribute)
_MISSING = object()


def check_int(name: str, value, low: int | None = 1, high: int | None = None, optional: bool = False) -> None:
    """``value`` is an int in [low, high] (None: that end open; ``optional``: None is also fine)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rule}, got {value}")


def check_float(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False, optional: bool = False) -> None:
    """``value`` is a finite number in its range (NaN and inf are refused)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value < low or (low_open and value == low))
    too_high = high is not None and (value > high or (high_open and value == high))
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        rule = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {rule}, got {value:g}")


class Validated:
    """Dataclass mixin: ``validate()`` runs after construction and again after every field assignment,
    so a config changed in code (``cfg.steps = 0``) is checked like one read from YAML. A rejected
    assignment leaves the old value in place. Subclasses implement ``validate``."""

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name, value):
        if not self.__dict__.get("_validated"):
            object.__setattr__(self, name, value)
            return
        old = self.__dict__.get(name, _MISSING)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except Exception:
            if old is _MISSING:
                object.__delattr__(self, name)
            else:
                object.__setattr__(self, name, old)
            raise

    def validate(self) -> None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


@dataclass
class SourceConfig(Validated):
    """One geometry's training data: files (e.g. LEMURS parts), or showers simulated on first use."""

    geometry: str  # a card name (found in data.geometry_dirs or the built-in cards) or a .yaml card path
    files: list[str] = field(default_factory=list)  # native/LEMURS .h5; empty -> simulate `samples` showers
    samples: int = 6000  # simulated training showers (when `files` is empty)
    val_samples: int = 300  # simulated validation showers, or rows held out at the end of `files`
    weight: float = 1.0  # mixing weight of this source in every batch (split over its files by rows)
    energy: tuple[float, float] | None = None  # GeV range for simulation; default: the geometry card's
    spectrum: Literal["flat", "log-uniform"] | None = None
    slot: int | None = None  # one-hot slot of this geometry in the model; default: the card's

    def validate(self) -> None:
        if not self.geometry:
            raise ValueError("geometry must be a card name or a .yaml path")
        check_int("samples", self.samples)
        check_int("val_samples", self.val_samples, low=0)
        check_float("weight", self.weight, 0.0, low_open=True)
        check_int("slot", self.slot, low=0, optional=True)
        if self.energy is not None:
            for v in self.energy:
                check_float("energy", v, 0.0, low_open=True)
            if self.energy[0] > self.energy[1]:
                raise ValueError(f"energy range {list(self.energy)} GeV: need lo <= hi")


@dataclass
class DataConfig(Validated):
    sources: list[SourceConfig] = field(default_factory=lambda: [
        SourceConfig(geometry="par04_siw"), SourceConfig(geometry="odd"), SourceConfig(geometry="ild"),
    ])
    geometry_dirs: list[str] = field(default_factory=list)  # extra folders of geometry cards (like --geometry-dir)
    cache_dir: str | None = None  # simulated data cache; default $CALOFM_CACHE or ~/.cache/calofm
    seed: int = 1  # simulation seed (validation uses seed + 1000)
    num_workers: int = 1  # DataLoader worker processes
    stats_samples: int = 2000  # showers per source used to fit the preprocessing statistics

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("data.sources is empty")
        for src in self.sources:
            src.validate()
        check_int("data.seed", self.seed, low=0, high=DATA_SEED_MAX)
        check_int("data.num_workers", self.num_workers, low=0, high=64)
        check_int("data.stats_samples", self.stats_samples)


@dataclass
class PreprocessConfig(Validated):
    """Model-space transforms (calofm.preprocess); means and stds are fitted on the training data."""

    # cell energy / E_inc ("fraction", the default), in MeV, or / its layer's energy ("layer", factorised only:
    # right hit counts but too-broad high-energy showers, docs/fidelity.md)
    mode: Literal["fraction", "absolute", "layer"] | None = None
    eps: float | None = None  # default 1e-6 (fraction, layer) or 1e-3 MeV (absolute)
    # generated cells below noise_cut * eps * unit are set to 0; default 0.75 (factorised) or 2 (single), measured:
    # docs/fidelity.md and docs/pretraining.md
    noise_cut: float | None = None
    # empty-cell floor as a fraction of the readout threshold (instead of eps x unit); default none: a floor
    # helps ILD's hit count and hurts Si-W's and ODD's (docs/fidelity.md)
    floor: float | None = None
    profile_eps: float = 1e-6  # factorised: floor of the layer shares E_z / E_tot
    profile_noise_cut: float = 1.0  # factorised: sampled shares below profile_noise_cut * profile_eps -> 0

    def validate(self) -> None:
        check_float("preprocess.eps", self.eps, 0.0, low_open=True, optional=True)
        check_float("preprocess.noise_cut", self.noise_cut, 0.0, optional=True)
        check_float("preprocess.floor", self.floor, 0.0, 100.0, low_open=True, optional=True)
        check_float("preprocess.profile_eps", self.profile_eps, 0.0, 1.0, low_open=True, high_open=True)
        check_float("preprocess.profile_noise_cut", self.profile_noise_cut, 0.0)


@dataclass
class ModelConfig(Validated):
    preset: str = "small"  # tiny | small | base (calofm.models.PRESETS)
    # "factorised" (default): energy model + per-layer shapes, energy-true; "single": one network for the
    # whole shower (CaloDiT-2's layout). docs/fidelity.md has the measurements behind the default.
    variant: Literal["single", "factorised"] = "factorised"
    hidden_size: int | None = None  # optional overrides of the preset
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    cond_dropout: float | None = None
    P_mean: float | None = None  # EDM training noise: ln sigma ~ N(P_mean, P_std^2) (default: the model config's)
    P_std: float | None = None
    init_from: str | None = None  # start from a pretrained checkpoint (folder or Hub id) instead of scratch
    # "calodit" or a baseline family (calofm.models.FAMILIES; `recipes/train.py --model NAME`); a baseline is built
    # from family_config, whose keys and values its own config class checks (the fields above are CaloDiT's)
    family: str = "calodit"
    family_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        self._validate_family()
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            check_int(f"model.{name}", getattr(self, name), optional=True)
        check_float("model.cond_dropout", self.cond_dropout, 0.0, 1.0, high_open=True, optional=True)
        check_float("model.P_mean", self.P_mean, -10.0, 10.0, optional=True)
        check_float("model.P_std", self.P_std, 0.0, 10.0, low_open=True, optional=True)

    def _validate_family(self) -> None:
        if self.family == "calodit":
            if self.family_config:
                raise ValueError("model.family_config is for the baseline families; CaloDiT takes model.preset, "
                                 "model.hidden_size, ...")
            return
        from calofm.models import FAMILIES, family_classes  # only for a baseline: torch and transformers

        if self.family not in FAMILIES:
            raise ValueError(f"model.family {self.family!r}: choose from {', '.join(FAMILIES)}")
        if self.init_from:
            raise ValueError(f"model.init_from: a {self.family} baseline trains from scratch only")
        try:
            family_classes(self.family)[0](**self.family_config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"model.family_config ({self.family}): {err}") from None


@dataclass
class OptimConfig(Validated):
    lr: float = 2e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0

    def validate(self) -> None:
        check_float("optim.lr", self.lr, 0.0, 1.0, low_open=True)
        check_float("optim.weight_decay", self.weight_decay, 0.0, 1.0)
        for i, beta in enumerate(self.betas):
            check_float(f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_int("optim.warmup_steps", self.warmup_steps, low=0)
        check_float("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float("optim.grad_clip", self.grad_clip, 0.0, low_open=True)


@dataclass
class TrainConfig(Validated):
    output_dir: str = "runs/pretrain"
    seed: int = 0  # batches, noise and initialisation
    steps: int = 1200  # optimiser steps
    batch_size: int = 32  # global batch (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    ema_decay: float = 0.995
    log_every: int = 10
    val_every: int = 200
    save_every: int = 400  # resumable checkpoint (calofm.training.checkpoint)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in output_dir/checkpoints
    stop_at: int | None = None  # end this invocation after this step, with a checkpoint (time-sliced jobs)
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    # None: as `accelerate launch --mixed_precision ...` (or `accelerate config`) says; a value here wins
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        """Every field, nested configs included (lists can change without an assignment)."""
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")
        check_int("seed", self.seed, low=0, high=TRAIN_SEED_MAX)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_every", "save_every", "keep_checkpoints"):
            check_int(name, getattr(self, name))
        check_int("stop_at", self.stop_at, optional=True)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        check_float("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        for part in (self.model, self.data, self.preprocess, self.optim):
            part.validate()
