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

from calofm.diffusion import EDMPrecond, consistency_grid, consistency_loss, precond_for
from calofm.ema import EMA


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
