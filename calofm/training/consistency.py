"""Consistency distillation (Song et al. 2023, arXiv:2303.01469, Algorithm 2) as a training objective.

The student f_theta (``calofm.diffusion.ConsistencyPrecond``: f(x, sigma_min) = x) learns to map every point
of the teacher's probability-flow ODE path straight to its end. Each sample: a grid point n on EDM's N-point
schedule sigma_min = t_1 < ... < t_N = sigma_max, x_{n+1} = x + t_{n+1} z from a training shower x, one Heun step
of the frozen teacher down to t_n, and the loss

    || f_theta(x_{n+1}, t_{n+1}) - f_theta-(x_hat_n, t_n) ||^2   (mean over cells)

where theta- is the exponential moving average of the student, which the training loop keeps anyway (its
``EMA``, checkpointed with everything else, so a resumed run continues exactly) and which is also the model
saved at the end. The factorised variant distils both networks: the energy model on the shower's profile,
the shape model given the data's profile, as in training.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from calofm.diffusion import EDMPrecond, karras_sigmas, precond_for
from calofm.ema import EMA

MAX_GRID = 10_000


def consistency_grid(n: int, config) -> torch.Tensor:
    """EDM's N noise levels, ascending: sigma_min = t_1 < ... < t_N = sigma_max (float64)."""
    if not 2 <= n <= MAX_GRID:
        raise ValueError(f"the distillation grid needs 2 to {MAX_GRID} points, got {n}")
    return karras_sigmas(n - 1, config.sigma_min, config.sigma_max, config.rho)[:-1].flip(0)


def heun_step(teacher, x: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor, cond: dict) -> torch.Tensor:
    """One step of EDM's Heun solver with the teacher's denoiser from t_hi down to t_lo > 0 (per row)."""
    shape = (-1, *([1] * (x.ndim - 1)))
    hi, lo = t_hi.reshape(shape), t_lo.reshape(shape)
    d_hi = (x - teacher(x, t_hi, **cond)) / hi
    x_euler = x + (lo - hi) * d_hi
    d_lo = (x_euler - teacher(x_euler, t_lo, **cond)) / lo
    return x + (lo - hi) * 0.5 * (d_hi + d_lo)


def consistency_loss(student, target, teacher, x: torch.Tensor, cond: dict, z: torch.Tensor, u: torch.Tensor,
                     grid: torch.Tensor) -> torch.Tensor:
    """Per-sample consistency-distillation loss (B,): ``u`` (B,) uniform in [0, 1) picks the grid step
    n (t_{n+1} -> t_n), ``z`` ~ N(0, I) like x makes x_{n+1} = x + t_{n+1} z."""
    grid = grid.to(device=x.device, dtype=x.dtype)
    n = (u * (len(grid) - 1)).long().clamp(max=len(grid) - 2)  # 0 .. N-2
    t_hi, t_lo = grid[n + 1], grid[n]
    x_hi = x + t_hi.reshape(-1, *([1] * (x.ndim - 1))) * z
    with torch.no_grad():
        x_lo = heun_step(teacher, x_hi, t_hi, t_lo, cond)
        goal = target(x_lo, t_lo, **cond)
    return (student(x_hi, t_hi, **cond) - goal).square().flatten(1).mean(dim=1)


class ConsistencyObjective(nn.Module):
    """forward(x, cond, noise) -> per-sample loss (B,) of the student ``net`` against the frozen ``teacher``,
    with the loop's ``ema`` as the target network; ``parts`` gives the shower and (factorised) profile losses.

    The teacher and the target copy are not submodules: they are not trained, not wrapped for DDP and not in
    checkpoints (the teacher is its own folder, the target is the EMA)."""

    def __init__(self, net: nn.Module, teacher: nn.Module, ema: EMA, grid_points: int):
        super().__init__()
        self.net = net
        target = copy.deepcopy(net).requires_grad_(False).eval()
        self._frozen = {"teacher": teacher.requires_grad_(False).eval(), "target": target}
        self.ema = ema
        self.register_buffer("grid", consistency_grid(grid_points, net.config), persistent=False)

    @property
    def factorised(self) -> bool:
        return bool(getattr(self.net.config, "variant", "single") == "factorised")

    def forward(self, x: torch.Tensor, cond: dict, noise: dict) -> torch.Tensor:
        return sum(self.parts(x, cond, noise).values())

    def parts(self, x: torch.Tensor, cond: dict, noise: dict) -> dict[str, torch.Tensor]:
        teacher, target = self._frozen["teacher"].to(x.device), self._frozen["target"].to(x.device)
        self.ema.copy_to(target)  # theta- <- the current moving average of the student
        cond = {k: v for k, v in cond.items() if k != "drop_cond"}  # the student is distilled conditional
        net, config = self.net, self.net.config
        out = {"shower": consistency_loss(precond_for(net, config), precond_for(target, config),
                                          EDMPrecond(teacher, teacher.config), x, cond, noise["noise"],
                                          noise["u"][:, 0], self.grid)}
        if self.factorised:
            profile_cond = {k: v for k, v in cond.items() if k not in ("profile", "layer_energy")}
            out["profile"] = consistency_loss(
                precond_for(net.energy_net, config), precond_for(target.energy_net, config),
                EDMPrecond(teacher.energy_net, teacher.config), cond["profile"], profile_cond, noise["profile_noise"],
                noise["u"][:, 1], self.grid)
        return out
