"""Adapting a pretrained CaloDiT to a new detector: LoRA (peft) or full fine-tuning, same training loop.

The new geometry takes a spare one-hot slot of the base model (its card's slot if free, else the first
free one). LoRA trains low-rank updates of the attention, MLP and adaLN-modulation linears
(``calofm.models.LORA_TARGETS``) and only that slot's row of ``geometry_embed`` (peft trainable tokens),
so the base is untouched: loaded as an adapter, every base geometry is still exactly the base model.
An adapter folder (``calofm.hub.adapters``) holds peft's files, ``calofm_adapter.json`` (base and its
fingerprint, geometry, slot), the geometry's card and checksums. A full fine-tune and ``--merge``'s
standalone model are new networks: they claim only the adapted geometry. ``--from-scratch`` trains the
same architecture from random weights, the comparison the foundation model has to win.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from calofm.config import to_dict
from calofm.hub.adapters import (  # noqa: F401 - the adapter API, re-exported
    ADAPTER_FILE,
    AdapterRouter,
    base_of,
    base_record,
    fingerprint,
    load_adapted,
    load_base,
    open_adapter,
    quiet_peft,
    save_adapter,
)
from calofm.training.config import TRAIN_SEED_MAX, Validated, check_float, check_int

log = logging.getLogger(__name__)
MAX_RANK, MAX_STEPS, MAX_BATCH = 1024, 10**9, 10**6


@dataclass
class AdaptConfig(Validated):
    geometry: str
    base: str = "runs/pretrain/model"  # pretrained model folder or Hub repo id
    method: Literal["lora", "full"] = "lora"
    from_scratch: bool = False  # same architecture, random initial weights (for comparison)
    rank: int = 32
    alpha: float | None = None  # LoRA scaling alpha/rank; default 2 * rank
    # which Linears LoRA adapts (calofm.models.LORA_GROUPS): attention, mlp, adaln, final, embedders
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "mlp", "adaln"])
    samples: int = 5000  # simulated training showers when `data` is empty
    val_samples: int = 300
    data: list[str] = field(default_factory=list)  # shower files of the new detector (native/LEMURS format)
    geometry_dirs: list[str] = field(default_factory=list)  # extra folders of geometry cards (--geometry-dir)
    steps: int = 400
    batch_size: int = 32
    lr: float | None = None  # default: 5e-3 LoRA, 2e-4 full fine-tuning, 2e-3 from scratch (as pretraining)
    warmup_steps: int = 50
    ema_decay: float = 0.99
    seed: int = 0
    output_dir: str | None = None  # default runs/adapt_<geometry>_<method>
    merge: bool = False  # LoRA: also write a merged standalone model to <output_dir>/merged
    cache_dir: str | None = None
    num_workers: int = 1
    log_every: int = 10
    val_every: int = 100
    save_every: int = 500
    stop_at: int | None = None

    def __post_init__(self):
        if self.from_scratch and self.method == "lora":
            self.method = "full"  # there is nothing to adapt: every weight is trained
        super().__post_init__()

    def validate(self) -> None:
        if self.merge and self.kind != "lora":
            raise ValueError("--merge applies to LoRA adapters only (full fine-tuning writes a full model)")
        check_int("rank", self.rank, 1, MAX_RANK)
        from calofm.models import lora_target_modules

        lora_target_modules(self.lora_targets)  # unknown group names are an error here, before any work
        check_float("alpha", self.alpha, 0.0, low_open=True, optional=True)
        check_int("samples", self.samples)
        check_int("val_samples", self.val_samples, low=0)
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_float("lr", self.lr, 0.0, 1.0, low_open=True, optional=True)
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_float("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_int("seed", self.seed, 0, TRAIN_SEED_MAX)
        check_int("num_workers", self.num_workers, 0, 64)
        for name in ("log_every", "val_every", "save_every"):
            check_int(name, getattr(self, name))
        check_int("stop_at", self.stop_at, optional=True)

    @property
    def kind(self) -> str:
        return "scratch" if self.from_scratch else self.method

    @property
    def out(self) -> Path:
        name = Path(self.geometry).stem if self.geometry.endswith((".yaml", ".yml")) else self.geometry
        return Path(self.output_dir or f"runs/adapt_{name}_{self.kind}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"lora": 5e-3, "full": 2e-4, "scratch": 2e-3}[self.kind]


def train_config(a: AdaptConfig, slot: int | None = None):
    """The TrainConfig of an adaptation run (one data source: the new geometry, labelled with ``slot``)."""
    from calofm.training.config import DataConfig, ModelConfig, OptimConfig, SourceConfig, TrainConfig

    source = SourceConfig(geometry=a.geometry, files=list(a.data), samples=a.samples, val_samples=a.val_samples,
                          slot=slot)
    return TrainConfig(
        output_dir=str(a.out), seed=a.seed, steps=a.steps, batch_size=a.batch_size, ema_decay=a.ema_decay,
        log_every=a.log_every, val_every=a.val_every, save_every=a.save_every, stop_at=a.stop_at,
        model=ModelConfig(init_from=a.base),
        data=DataConfig(sources=[source], geometry_dirs=list(a.geometry_dirs), cache_dir=a.cache_dir,
                        num_workers=a.num_workers, seed=a.seed + 7),
        optim=OptimConfig(lr=a.learning_rate, warmup_steps=a.warmup_steps),
    )


def assign_slot(config, geometry) -> int:
    """The one-hot slot for ``geometry`` in a base model: its own if known, its card's if free, else a spare."""
    slots = dict(config.geometry_slots)
    if geometry.name in slots:
        return int(slots[geometry.name])
    used = set(slots.values())
    if geometry.slot not in used and geometry.slot < config.n_geometry_slots:
        return geometry.slot
    free = [s for s in range(config.n_geometry_slots) if s not in used]
    if not free:
        raise ValueError(f"the base model has no spare geometry slot ({config.n_geometry_slots} slots used by "
                         f"{', '.join(sorted(slots))})")
    return free[0]


def lora_wrap(net: nn.Module, slot: int, rank: int, alpha: float | None, targets=("attention", "mlp", "adaln")):
    """peft LoRA on the ``targets`` groups (calofm.models.LORA_GROUPS) plus the new slot's geometry-embedding row
    (of both networks in the factorised variant)."""
    from peft import LoraConfig, get_peft_model

    from calofm.models import lora_target_modules

    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                        target_modules=lora_target_modules(targets), trainable_token_indices={"geometry_embed": [slot]})
    with quiet_peft():
        return get_peft_model(net, config)


def build_adapt_model(a: AdaptConfig):
    """Setup.build for adaptation: base + slot (+ LoRA), or the same architecture from scratch.

    The card, the base model and the slot are resolved here, before any data is read or output written;
    ``build_model.slot`` is the slot the training data must be labelled with (``train_config(a, slot)``).
    """
    from calofm.geometry import load_geometry
    from calofm.models import CaloDiTModel
    from calofm.preprocess import ModelSpace
    from calofm.training.data import cell_maxima, fit_profile

    geometry = load_geometry(a.geometry, a.geometry_dirs)
    base, _, path = load_base(a.base)
    slot = assign_slot(base.config, geometry)

    def build_model(data):
        net = base
        base_space = ModelSpace.from_config(net.config)
        stats_n = train_config(a).data.stats_samples
        cell_max, profile = None, None
        if base_space.factorised:  # the new geometry's own profile statistics (its response and layer shares)
            fit_profile(data.train, stats_n, {geometry.name: slot}, base_space.profile)
            profile = base_space.profile.stats[geometry.name]
        else:
            cell_max = cell_maxima(data.train, stats_n, base_space.shower)[geometry.name]
        net.config.add_geometry(geometry.name, slot, geometry.card.threshold, cell_max, profile=profile)
        space = ModelSpace.from_config(net.config)  # with the new geometry's threshold and statistics
        if a.method == "full":  # full fine-tuning or scratch: a new network, for the new geometry only
            net.config.keep_geometries([geometry.name])
        if a.from_scratch:
            # same architecture and the same model space (preprocessing) as the base, random weights:
            # validation losses of scratch and adapted models are then directly comparable
            net = CaloDiTModel(net.config)
        elif a.method == "lora":
            net = lora_wrap(net, slot, a.rank, a.alpha, a.lora_targets)
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in net.parameters())
        log.info("adapting to %s (slot %d) with %s: %d of %d parameters trainable", geometry.name, slot, a.kind,
                 n_train, n_all)
        build_model.info = {"geometry": geometry.name, "slot": slot, "method": a.kind, **base_record(a.base, path),
                            "threshold": geometry.card.threshold,
                            "cell_max": cell_max, "profile": profile,
                            "rank": a.rank if a.kind == "lora" else None, "trainable_parameters": n_train,
                            "total_parameters": n_all}
        return net, space

    build_model.slot, build_model.geometry = slot, geometry
    return build_model


def save_adapted(a: AdaptConfig, build_model):
    """Setup.save: the adapter folder (LoRA, plus ``<out>/merged`` with --merge) or a full model folder."""
    from calofm.hub.folders import save_model

    def save(net: nn.Module, out: Path, geometries: dict) -> None:
        info = {**build_model.info, "config": to_dict(a)}
        if info["base_path"]:  # found again from anywhere, and after moving base and adapter together
            info["base_relative"] = os.path.relpath(info["base_path"], out.resolve())
        geometry = geometries[build_model.geometry.name]
        if a.kind != "lora":
            save_model(net, out, geometries, info={ADAPTER_FILE: info})
            return
        save_adapter(net, out, info, geometry)
        if a.merge:
            import copy

            merged = copy.deepcopy(net).merge_and_unload()
            merged.config.keep_geometries([geometry.name])  # the merged weights are new for every geometry
            save_model(merged, out.parent / "merged", geometries)
            log.info("merged model written to %s", out.parent / "merged")

    return save
