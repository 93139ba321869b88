"""Typed training configuration. The defaults are the embedded CPU demo: the ``small`` model
pretrained on simulated Par04 Si-W, ODD and ILD showers in about ten minutes on 2 CPU cores.

Recipes (``recipes/configs/*.yaml``) override any field; ``--key value`` / ``--a.b=value`` on the
command line override the recipe. Unknown keys and wrong types are errors (``calofm.config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SourceConfig:
    """One geometry's training data: files (e.g. LEMURS parts), or showers simulated on first use."""

    geometry: str
    files: list[str] = field(default_factory=list)  # native/LEMURS .h5; empty -> simulate `samples` showers
    samples: int = 6000  # simulated training showers (when `files` is empty)
    val_samples: int = 300  # simulated validation showers, or rows held out at the end of `files`
    weight: float = 1.0  # mixing weight of this source in every batch
    energy: tuple[float, float] | None = None  # GeV range for simulation; default: the geometry card's
    spectrum: Literal["flat", "log-uniform"] | None = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [
        SourceConfig(geometry="par04_siw"), SourceConfig(geometry="odd"), SourceConfig(geometry="ild"),
    ])
    cache_dir: str | None = None  # simulated data cache; default $CALOFM_CACHE or ~/.cache/calofm
    seed: int = 1  # simulation seed (validation uses seed + 1000)
    num_workers: int = 1  # DataLoader worker processes
    stats_samples: int = 2000  # showers per source used to fit the preprocessing statistics


@dataclass
class PreprocessConfig:
    """Model-space transforms (calofm.preprocess); means and stds are fitted on the training data."""

    # cell energy / E_inc, in MeV, or / its layer's energy; default: "fraction" (single), "layer" (factorised)
    mode: Literal["fraction", "absolute", "layer"] | None = None
    eps: float | None = None  # default 1e-6 (fraction, layer) or 1e-3 MeV (absolute)
    noise_cut: float = 2.0  # generated cells below noise_cut * eps * unit are set to 0
    profile_eps: float = 1e-6  # factorised: floor of the layer shares E_z / E_tot
    profile_noise_cut: float = 1.0  # factorised: sampled shares below profile_noise_cut * profile_eps -> 0

    def __post_init__(self):
        if self.eps is not None and not 0 < self.eps < 1e3:
            raise ValueError(f"preprocess.eps must be in (0, 1000), got {self.eps}")
        if not 0 <= self.noise_cut < 1e6 or not 0 <= self.profile_noise_cut < 1e6:
            raise ValueError("preprocess.noise_cut and profile_noise_cut must be >= 0")
        if not 0 < self.profile_eps < 1:
            raise ValueError(f"preprocess.profile_eps must be in (0, 1), got {self.profile_eps}")


@dataclass
class ModelConfig:
    preset: str = "small"  # tiny | small | base (calofm.models.PRESETS)
    # "single": one network for the whole shower (CaloDiT-2); "factorised": energy model + per-layer shapes
    variant: Literal["single", "factorised"] = "single"
    hidden_size: int | None = None  # optional overrides of the preset
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    cond_dropout: float | None = None
    P_mean: float | None = None  # EDM training noise: ln sigma ~ N(P_mean, P_std^2) (default: the model config's)
    P_std: float | None = None
    init_from: str | None = None  # start from a pretrained checkpoint (folder or Hub id) instead of scratch


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"
    seed: int = 0  # batches, noise and initialisation
    steps: int = 1200  # optimiser steps
    batch_size: int = 32  # global batch (all processes, all accumulation micro-steps)
    grad_accum: int = 1
    ema_decay: float = 0.995
    log_every: int = 10
    val_every: int = 200
    save_every: int = 400  # accelerate save_state (resumable checkpoint)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir/checkpoints
    stop_at: int | None = None  # end this invocation after this step, with a checkpoint (time-sliced jobs)
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    # None: as `accelerate launch --mixed_precision ...` (or `accelerate config`) says; a value here wins
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not self.data.sources:
            raise ValueError("data.sources is empty")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
