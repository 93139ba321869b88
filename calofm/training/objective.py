"""The training objective of a CaloDiT of either variant, as one module with one forward per step.

Accelerate prepares this module (not the bare network): under DDP every gradient must come from one
forward of the prepared module, and the factorised variant trains two networks (shower and energy
model) at once. The noise of every micro-step is drawn on the device from a generator keyed by
``(seed, micro-step)`` for the global micro-batch, and each process keeps its own rows, so W processes
reproduce a 1-process run and a resumed run continues the same loss curve.
"""

from __future__ import annotations

import torch
from torch import nn

from calofm.diffusion import EDMPrecond, draw_sigma_noise, edm_loss


def step_noise(x_shape, profile_width: int | None, seed: int, micro: int, rank: int, world: int, precond,
               drop_p: float, device) -> dict[str, torch.Tensor]:
    """sigma, noise, condition-dropout mask (and the profile's sigma and noise) of this process's rows of
    global micro-batch ``micro``, drawn on ``device``. On a GPU no tensor crosses from the host."""
    per = x_shape[0]
    global_b = per * world
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + micro) % 2**63)
    proto = torch.empty(global_b, *x_shape[1:], device=device)
    sigma, noise = draw_sigma_noise(proto, gen, precond.P_mean, precond.P_std)
    drop = torch.rand(global_b, generator=gen, device=device) < drop_p  # drawn always: the same stream for any p
    out = {"sigma": sigma, "noise": noise, **({"drop": drop} if drop_p > 0 else {})}
    if profile_width is not None:
        proto = torch.empty(global_b, profile_width, device=device)
        out["profile_sigma"], out["profile_noise"] = draw_sigma_noise(proto, gen, precond.P_mean, precond.P_std)
    # two uniforms per row, drawn last so the draws above stay as they were: where a consistency-distillation
    # step falls on its noise grid (shower, profile)
    out["u"] = torch.rand(global_b, 2, generator=gen, device=device)
    rows = slice(rank * per, (rank + 1) * per)
    return {k: v[rows] for k, v in out.items()}


class DiffusionObjective(nn.Module):
    """Per-sample EDM loss (B,) of the shower network, plus the energy model's on the profile (factorised)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def factorised(self) -> bool:
        return bool(getattr(self.net.config, "variant", "single") == "factorised")

    def forward(self, x: torch.Tensor, cond: dict, noise: dict) -> torch.Tensor:
        """x (B, R, P, Z) model space; cond from ``ModelSpace.inputs``; noise from ``step_noise``.

        The shower loss plus, factorised, the profile loss, per sample. Each is ~1 at initialisation (EDM's
        weighting with sigma_data = 1 on unit-variance data), so neither part dominates.
        """
        return sum(self.parts(x, cond, noise).values())

    def parts(self, x: torch.Tensor, cond: dict, noise: dict) -> dict[str, torch.Tensor]:
        """The losses separately: {"shower": (B,)} and, factorised, {"profile": (B,)}."""
        net = self.net
        if "drop" in noise:
            cond = {**cond, "drop_cond": noise["drop"]}
        out = {"shower": edm_loss(EDMPrecond(net), x, cond, sigma=noise["sigma"], noise=noise["noise"])}
        if self.factorised:
            profile_cond = {k: v for k, v in cond.items() if k not in ("profile", "layer_energy")}
            out["profile"] = edm_loss(EDMPrecond(net.energy_net, net.config), cond["profile"], profile_cond,
                                      sigma=noise["profile_sigma"], noise=noise["profile_noise"])
        return out


class BaselineObjective(nn.Module):
    """The training loss of a baseline family (``calofm.models.BaselineModel``): the sum of its per-sample
    losses, from the same per-step noise as CaloDiT's (``step_noise``)."""

    def __init__(self, net: nn.Module, ema=None):
        super().__init__()
        self.net = net
        self.ema = ema  # the loop's EMA (calofm.ema.EMA): a family's target network (``uses_ema_target``)

    def forward(self, x: torch.Tensor, cond: dict, noise: dict) -> torch.Tensor:
        kw = {"ema": self.ema.shadow} if getattr(self.net, "uses_ema_target", False) else {}
        return sum(self.net.losses(x, cond, noise, **kw).values())

    def parts(self, x: torch.Tensor, cond: dict, noise: dict) -> dict[str, torch.Tensor]:
        """{"shower": (B,)}: the whole loss, for validation. Gradients stay on (a gradient penalty needs them)."""
        with torch.enable_grad():
            return {"shower": self.forward(x, cond, noise).detach()}
