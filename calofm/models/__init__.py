"""Model registry: CaloDiT and the baseline families, CaloDiT's size presets, Auto* registration on import."""

from __future__ import annotations

import importlib
from types import MappingProxyType

from transformers import AutoConfig, AutoModel

from calofm.models.calodit import (
    LORA_GROUPS,
    LORA_TARGETS,
    CaloDiTConfig,
    CaloDiTModel,
    lora_target_modules,
)
from calofm.models.shower import BaselineModel, CheckpointMismatchError, ShowerModelConfig

# Registering here makes AutoConfig/AutoModel.from_pretrained work on any saved CaloDiT once
# calofm.models is imported (no remote code, no trust_remote_code).
AutoConfig.register(CaloDiTConfig.model_type, CaloDiTConfig, exist_ok=True)
AutoModel.register(CaloDiTConfig, CaloDiTModel, exist_ok=True)

# Size presets (DiT's DiT_models). Read-only: build configs with ``preset_config``.
PRESETS = MappingProxyType(
    {
        # unit tests: < 100k parameters, a forward pass in milliseconds
        "tiny": MappingProxyType(
            dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0, frequency_embedding_size=64)
        ),
        # CPU demo: trains meaningfully in ~10 minutes on 2 cores at batch ~64. Compute grows with tokens
        # (attention with their square), so the demo uses larger patches: 3x4x5 cells -> 3x4x9 = 108 tokens,
        # ~4x fewer FLOPs per training step than 360 tokens at the same width (benchmarks/generate.py).
        "small": MappingProxyType(
            dict(
                patch_size=(3, 4, 5),
                hidden_size=96,
                num_hidden_layers=4,
                num_attention_heads=4,
                mlp_ratio=4.0,
                frequency_embedding_size=128,
            )
        ),
        # CaloDiT-2 size: hidden 384, depth 6, 6 heads, patch 3x2x3, MLP ratio 4
        "base": MappingProxyType(dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, mlp_ratio=4.0)),
    }
)


# Every model family calofm trains and samples: registry name -> module. A module defines one config class
# (``model_type`` = the registry name) and one model class, and registers both with Auto* when imported.
FAMILIES = MappingProxyType({
    "calodit": "calofm.models.calodit",  # the foundation model (calofm.models.calodit)
    "calodiffusion": "calofm.models.calodiffusion",  # 3D U-Net DDPM (Amram & Pedro 2023)
    "bibae": "calofm.models.bibae",  # BIB-AE + post-processor (Buhmann et al. 2020)
    "wgan": "calofm.models.wgan",  # conditional WGAN-GP with 3D convolutions (Buhmann et al. 2020)
    "gflash": "calofm.models.gflash",  # the built-in parametrised simulator as a generator (no training)
    "caloflow": "calofm.models.caloflow",  # CaloFlow: layer-energy and voxel flows, MAF teacher, IAF student
    "caloclouds": "calofm.models.caloclouds",  # point cloud + per-point EDM + ShowerFlow (Buhmann et al. 2023)
})
BASELINES = tuple(name for name in FAMILIES if name != "calodit")


def family_classes(name: str) -> tuple[type, type]:
    """(config class, model class) of a registered family (``FAMILIES``; the name is also the model_type)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family '{name}'; available: {', '.join(FAMILIES)}")
    if name == "calodit":
        return CaloDiTConfig, CaloDiTModel
    module = importlib.import_module(FAMILIES[name])
    config_class = next(v for v in vars(module).values() if isinstance(v, type) and
                        getattr(v, "model_type", None) == name and issubclass(v, ShowerModelConfig))
    model_class = next(v for v in vars(module).values() if isinstance(v, type) and
                       getattr(v, "config_class", None) is config_class)
    return config_class, model_class


def preset_config(name: str, **overrides) -> CaloDiTConfig:
    """A fresh CaloDiTConfig for preset ``name`` with field overrides (e.g. geometry_slots)."""
    if name not in PRESETS:
        raise ValueError(f"unknown CaloDiT preset '{name}'; available: {', '.join(PRESETS)}")
    return CaloDiTConfig(**{**PRESETS[name], **overrides})


def create_model(name: str, **overrides) -> CaloDiTModel:
    """A freshly initialised CaloDiTModel of preset ``name``."""
    return CaloDiTModel(preset_config(name, **overrides))


__all__ = [
    "BASELINES",
    "FAMILIES",
    "BaselineModel",
    "ShowerModelConfig",
    "family_classes",
    "LORA_GROUPS",
    "LORA_TARGETS",
    "PRESETS",
    "CaloDiTConfig",
    "CaloDiTModel",
    "CheckpointMismatchError",
    "create_model",
    "lora_target_modules",
    "preset_config",
]

# every family registers with AutoConfig / AutoModel when its module is imported: import them all here, so
# AutoModel.from_pretrained loads any calofm model once calofm.models is imported
for _name in BASELINES:
    family_classes(_name)
