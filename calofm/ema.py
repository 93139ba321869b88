"""Exponential moving average of model weights, checkpointable with Accelerate."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of the trainable floating-point weights: ema <- decay ema + (1 - decay) weights.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates so that early,
    random weights are forgotten quickly. ``state_dict``/``load_state_dict`` make it a valid
    ``accelerator.register_for_checkpointing`` object; ``copy_to`` writes the average into a model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise KeyError(f"EMA holds weights the model does not have: {missing[:5]}")
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise KeyError("EMA checkpoint does not match the model's trainable weights")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self
