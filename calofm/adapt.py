"""Adapting a pretrained CaloDiT to a new detector: LoRA (peft) or full fine-tuning, same training loop.

The new geometry takes a spare one-hot slot of the base model (its card's slot if free, else the first
free one). LoRA trains low-rank updates of the attention, MLP and adaLN-modulation linears
(``calofm.models.LORA_TARGETS``) and only that slot's row of ``geometry_embed`` (peft trainable tokens),
so the base is untouched and other geometries are exactly the base model with the adapter disabled.
An adapter folder holds peft's files plus ``calofm_adapter.json`` (base, geometry, slot, base
fingerprint); ``--merge`` also writes a standalone merged model. ``--from-scratch`` trains the same
architecture from random weights, the comparison the foundation model has to win.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from calofm.cli import add_geometry_dir, parse_count, run_reporting_errors
from calofm.config import build, to_dict

log = logging.getLogger(__name__)
ADAPTER_FILE = "calofm_adapter.json"


@dataclass
class AdaptConfig:
    geometry: str
    base: str = "runs/pretrain/model"  # pretrained model folder or Hub repo id
    method: Literal["lora", "full"] = "lora"
    from_scratch: bool = False  # same architecture, random initial weights (for comparison)
    rank: int = 8
    alpha: float | None = None  # LoRA scaling alpha/rank; default 2 * rank
    # which Linears LoRA adapts (calofm.models.LORA_GROUPS): attention, mlp, adaln, final, embedders
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "mlp", "adaln"])
    samples: int = 5000  # simulated training showers when `data` is empty
    val_samples: int = 300
    data: list[str] = field(default_factory=list)  # shower files of the new detector (native/LEMURS format)
    steps: int = 400
    batch_size: int = 32
    lr: float | None = None  # default: 2e-3 LoRA, 2e-4 full fine-tuning, 2e-3 from scratch (as pretraining)
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
        if self.rank < 1:
            raise ValueError("rank must be >= 1")
        from calofm.models import lora_target_modules

        lora_target_modules(self.lora_targets)  # unknown group names are an error here, before any work
        if self.from_scratch and self.method == "lora":
            self.method = "full"  # there is nothing to adapt: every weight is trained
        if self.merge and self.method != "lora":
            raise ValueError("--merge applies to LoRA adapters only (full fine-tuning writes a full model)")

    @property
    def kind(self) -> str:
        return "scratch" if self.from_scratch else self.method

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/adapt_{self.geometry}_{self.kind}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"lora": 2e-3, "full": 2e-4, "scratch": 2e-3}[self.kind]


def train_config(a: AdaptConfig):
    """The TrainConfig of an adaptation run (one data source: the new geometry)."""
    from calofm.training.config import DataConfig, ModelConfig, OptimConfig, SourceConfig, TrainConfig

    source = SourceConfig(geometry=a.geometry, files=list(a.data), samples=a.samples, val_samples=a.val_samples)
    return TrainConfig(
        output_dir=str(a.out), seed=a.seed, steps=a.steps, batch_size=a.batch_size, ema_decay=a.ema_decay,
        log_every=a.log_every, val_every=a.val_every, save_every=a.save_every, stop_at=a.stop_at,
        model=ModelConfig(init_from=a.base),
        data=DataConfig(sources=[source], cache_dir=a.cache_dir, num_workers=a.num_workers, seed=a.seed + 7),
        optim=OptimConfig(lr=a.learning_rate, warmup_steps=a.warmup_steps),
    )


# ----------------------------------------------------------------------------------------------
# Slots, fingerprints, LoRA
# ----------------------------------------------------------------------------------------------


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


def fingerprint(model_dir: Path) -> str:
    """sha256 of the base weights file: an adapter is only valid on exactly this base."""
    h = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def lora_wrap(net: nn.Module, slot: int, rank: int, alpha: float | None, targets=("attention", "mlp", "adaln")):
    """peft LoRA on the ``targets`` groups (calofm.models.LORA_GROUPS) plus the new slot's geometry-embedding row
    (of both networks in the factorised variant)."""
    from peft import LoraConfig, get_peft_model

    from calofm.models import lora_target_modules

    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                        target_modules=lora_target_modules(targets), trainable_token_indices={"geometry_embed": [slot]})
    with quiet_peft():
        return get_peft_model(net, config)


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 calls transformers' deprecated ``is_gradient_checkpointing``: hide that FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _load_base(base: str, geometry, dtype=torch.float32):
    from calofm.generate import resolve
    from calofm.geometry import MESH_SHAPE
    from calofm.models import CaloDiTModel

    path = resolve(base)
    if (path / "adapter_config.json").exists():
        raise ValueError(f"{base}: is an adapter, not a base model (merge it first with --merge)")
    net = CaloDiTModel.from_pretrained(path, dtype=dtype)
    if tuple(net.config.mesh_shape) != MESH_SHAPE:
        raise ValueError(f"{base}: mesh {tuple(net.config.mesh_shape)} does not match the data mesh {MESH_SHAPE}")
    if not net.config.preprocessing:
        raise ValueError(f"{base}: has no preprocessing statistics (not a trained calofm model)")
    return net, path


def build_adapt_model(a: AdaptConfig, geometry_dirs=None):
    """Setup.build for adaptation: base + slot (+ LoRA), or the same architecture from scratch."""
    from calofm.geometry import load_geometry
    from calofm.models import CaloDiTModel
    from calofm.preprocess import ModelSpace
    from calofm.training.data import cell_maxima, fit_profile

    geometry = load_geometry(a.geometry, geometry_dirs)

    def build_model(data):
        net, path = _load_base(a.base, geometry)
        slot = assign_slot(net.config, geometry)
        net.config.geometry_slots = {**net.config.geometry_slots, geometry.name: slot}
        net.config.geometry_thresholds = {**net.config.geometry_thresholds, geometry.name: geometry.card.threshold}
        space = ModelSpace.from_config(net.config)
        stats_n = train_config(a).data.stats_samples
        cell_max, profile = None, None
        if space.factorised:  # the new geometry's own profile statistics (its response and layer shares)
            fit_profile(data.train, stats_n, {geometry.name: slot}, space.profile)
            net.config.profile_preprocessing = space.profile.state_dict()
            profile = space.profile.stats[geometry.name]
        else:
            cell_max = cell_maxima(data.train, stats_n, space.shower)[geometry.name]
            net.config.geometry_cell_max = {**net.config.geometry_cell_max, geometry.name: cell_max}
        if a.from_scratch:
            # same architecture and the same model space (preprocessing) as the base, random weights:
            # validation losses of scratch and adapted models are then directly comparable
            config = net.config
            config.geometry_slots = {geometry.name: slot}
            config.geometry_thresholds = {geometry.name: geometry.card.threshold}
            config.geometry_cell_max = {geometry.name: cell_max} if cell_max is not None else {}
            if profile is not None:
                config.profile_preprocessing = {**config.profile_preprocessing,
                                                "stats": {geometry.name: profile}}
            net = CaloDiTModel(config)
        elif a.method == "lora":
            net = lora_wrap(net, slot, a.rank, a.alpha, a.lora_targets)
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in net.parameters())
        log.info("adapting to %s (slot %d) with %s: %d of %d parameters trainable", geometry.name, slot, a.kind,
                 n_train, n_all)
        local = Path(a.base).expanduser()
        build_model.info = {"geometry": geometry.name, "slot": slot, "base": str(a.base), "method": a.kind,
                            "base_path": str(local.resolve()) if local.is_dir() else None,
                            "fingerprint": fingerprint(path), "threshold": geometry.card.threshold,
                            "cell_max": cell_max, "profile": profile,
                            "rank": a.rank if a.kind == "lora" else None, "trainable_parameters": n_train,
                            "total_parameters": n_all}
        return net, space

    return build_model


def save_adapted(a: AdaptConfig, build_model):
    def save(net: nn.Module, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        net.save_pretrained(out)
        info = dict(build_model.info)
        if info["base_path"]:  # found again from anywhere, and after moving base and adapter together
            info["base_relative"] = os.path.relpath(info["base_path"], out.resolve())
        (out / ADAPTER_FILE).write_text(json.dumps({**info, "config": to_dict(a)}, indent=1))
        if a.merge:
            merged = merge(net)
            merged.save_pretrained(out.parent / "merged")
            log.info("merged model written to %s", out.parent / "merged")

    return save


def merge(peft_model) -> nn.Module:
    """A standalone CaloDiTModel with the LoRA updates and the trained slot row folded in."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def base_of(adapter: Path, info: dict) -> str:
    """Where an adapter's base model is: next to the adapter as it was when trained, at its absolute
    path, else as given at training time (a Hub repo id, or a path from the working directory)."""
    for key, root in (("base_relative", adapter), ("base_path", Path("/"))):
        if info.get(key) and (root / info[key]).is_dir():
            return str(root / info[key])
    return info["base"]


def load_adapted(path: str | Path, dtype=torch.float32, merged: bool = True) -> nn.Module:
    """Base model + adapter folder; merged into a plain CaloDiTModel unless ``merged=False`` (a PeftModel)."""
    from peft import PeftModel

    from calofm.geometry import load_geometry

    path = Path(path)
    info_file = path / ADAPTER_FILE
    if not info_file.exists():
        raise ValueError(f"{path}: {ADAPTER_FILE} is missing (not a calofm adapter)")
    info = json.loads(info_file.read_text())
    geometry = load_geometry(info["geometry"])
    net, base_path = _load_base(base_of(path, info), geometry, dtype=dtype)
    if fingerprint(base_path) != info["fingerprint"]:
        raise ValueError(f"{path}: adapter was trained on a different base model than {info['base']} "
                         f"(weights fingerprint differs)")
    net.config.geometry_slots = {**net.config.geometry_slots, info["geometry"]: int(info["slot"])}
    net.config.geometry_thresholds = {**net.config.geometry_thresholds, info["geometry"]: float(info["threshold"])}
    if info.get("cell_max") is not None:  # adapters written before calofm recorded it sample without the cap
        net.config.geometry_cell_max = {**net.config.geometry_cell_max, info["geometry"]: float(info["cell_max"])}
    if info.get("profile") is not None:  # factorised: the new geometry's profile statistics
        state = dict(net.config.profile_preprocessing)
        state["stats"] = {**state.get("stats", {}), info["geometry"]: info["profile"]}
        net.config.profile_preprocessing = state
    with quiet_peft():
        model = PeftModel.from_pretrained(net, path)
    model.eval()
    return model.merge_and_unload() if merged else model


# ----------------------------------------------------------------------------------------------
# CLI: calofm adapt / recipes/adapt.py
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--geometry", required=True, help="the new detector (geometry name or .yaml card)")
    p.add_argument("--samples", type=parse_count, help="simulated training showers when no --data (e.g. 200k)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="training shower files of the new detector")
    p.add_argument("--base", help="pretrained model folder or Hub id (default runs/pretrain/model)")
    p.add_argument("--method", choices=["lora", "full"], help="LoRA adapter (default) or full fine-tuning")
    p.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    p.add_argument("--lora-targets", nargs="+", metavar="GROUP",
                   help="LoRA target groups: attention mlp adaln final embedders (default: attention mlp adaln)")
    p.add_argument("--steps", type=int, help="optimiser steps (default 400)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate (default by method)")
    p.add_argument("--out", help="output folder (default runs/adapt_<geometry>_<method>)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write a merged standalone model")
    p.add_argument("--from-scratch", action="store_true", help="train the same architecture without pretraining")
    p.add_argument("--seed", type=int)
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
    if args.data:
        overrides += ["--data", json.dumps(args.data)]
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
    return AdaptConfig(**{k: v for k, v in vars(cfg).items()})


def run(args: argparse.Namespace) -> int:
    from calofm.training.loop import Setup, train

    a = config_from_args(args)
    if not a.geometry:
        raise ValueError("--geometry is required")
    build_model = build_adapt_model(a, getattr(args, "geometry_dir", None))
    final = train(train_config(a), Setup(build=build_model, save=save_adapted(a, build_model)))
    if final is not None:
        info = build_model.info
        print(f"adapted to {info['geometry']} (slot {info['slot']}, {info['method']}, "
              f"{info['trainable_parameters']:,} trainable parameters): {final}")
        print(f"generate with: calofm generate --model {final} --geometry {info['geometry']} --samples 1000 "
              f"--out gen.h5")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="recipes/adapt.py", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_reporting_errors("adapt", lambda: run(args))
