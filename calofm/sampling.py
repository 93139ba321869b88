"""The whole sampler of a trained model as one module: conditions and noise -> showers in MeV.

``ShowerSampler`` is what ``calofm.generate.ShowerGenerator`` runs batch by batch and what ``calofm export``
traces into one ONNX / TorchScript graph: the ODE solver (or a distilled student's few consistency steps),
the energy model first for the factorised variant, the inverse preprocessing, the per-layer rescaling, the
cell cap and the readout threshold. It holds no Python state that depends on the batch, so a traced copy
takes any batch size. Solvers: ``calofm.diffusion``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from calofm.diffusion import (
    consistency_sample,
    dpmpp_2m_sample,
    edm_constant,
    euler_sample,
    heun_sample,
    karras_sigmas,
    precond_for,
)
from calofm.preprocess import ModelSpace

SAMPLERS = ("heun", "euler", "dpmpp_2m", "consistency")
SOLVERS = {"heun": heun_sample, "euler": euler_sample, "dpmpp_2m": dpmpp_2m_sample}
TEACHER_DEFAULT = ("heun", 32)  # CaloDiT-2's sampler


def is_student(config) -> bool:
    """A consistency-distilled student (``calofm distill``) rather than a diffusion model."""
    return bool(getattr(config, "consistency_sigmas", None))


def default_sampling(config) -> tuple[str, int]:
    """(sampler, steps) a model samples with unless told otherwise: a student its own step count."""
    return ("consistency", len(config.consistency_sigmas)) if is_student(config) else TEACHER_DEFAULT


def network_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations per shower (per network of the factorised variant): Heun 2N - 1, the others N."""
    return 2 * steps - 1 if sampler == "heun" else steps


def student_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """Noise levels of a K-step consistency sampler: the first K points of EDM's K + 1 point grid (sigma_max
    first, sigma_min left out: from there the consistency function is the identity)."""
    return [float(s) for s in karras_sigmas(steps + 1, sigma_min, sigma_max, rho)[:steps]]


def resolve_sampling(config, sampler: str | None, steps: int | None) -> tuple[str, int]:
    """The (sampler, steps) to use, checked against the model: students sample with consistency steps only,
    diffusion models with an ODE solver only."""
    default_sampler, default_steps = default_sampling(config)
    sampler = sampler or default_sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")
    if is_student(config) and sampler != "consistency":
        raise ValueError(f"this model is a consistency-distilled student: it samples with sampler 'consistency' "
                         f"({default_steps} steps by default), not {sampler!r}")
    if not is_student(config) and sampler == "consistency":
        raise ValueError("sampler 'consistency' needs a distilled student (`calofm distill`); this is a "
                         "diffusion model: use heun, euler or dpmpp_2m")
    return sampler, int(steps if steps is not None else default_steps)


def slot_table(config, values: dict[str, float], fill: float) -> torch.Tensor:
    """(n_geometry_slots,) float64: ``values[geometry]`` at each geometry's slot, ``fill`` elsewhere."""
    table = torch.full((config.n_geometry_slots,), fill, dtype=torch.float64)
    for name, slot in config.geometry_slots.items():
        if name in values:
            table[slot] = float(values[name])
    return table


class ShowerSampler(nn.Module):
    """forward(energy GeV, phi, theta, slot, noise[, profile_noise]) -> showers (B, R, P, Z) in MeV.

    ``noise`` (B, R, P, Z) and, factorised, ``profile_noise`` (B, Z + 1) are the initial N(0, I) draws;
    ``generator`` feeds the fresh noise of consistency steps after the first (``torch.randn`` without it, as
    in an exported graph). ``thresholds`` (geometry -> MeV) adds to or overrides the model's.
    ``cell_cap``: no cell above the brightest cell (fraction of E_inc) of the
    geometry's training data where the single-variant model records it; never above the incident energy.
    ``noise_cut`` replaces the model's stored noise cut (cells below noise_cut x eps x E_inc -> 0) for this sampler.
    """

    def __init__(self, net: nn.Module, config, *, sampler: str | None = None, steps: int | None = None,
                 cell_cap: bool = True, thresholds: dict[str, float] | None = None, noise_cut: float | None = None):
        super().__init__()
        self.net, self.config = net, config
        self.sampler, self.steps = resolve_sampling(config, sampler, steps)
        self.space = ModelSpace.from_config(config, noise_cut)
        self.precond = precond_for(net, config)
        self.profile_precond = precond_for(net.energy_net, config) if self.space.factorised else None
        thresholds = {**config.geometry_thresholds, **(thresholds or {})}  # readout thresholds, MeV
        self.register_buffer("thresholds", slot_table(config, thresholds, 0.0), persistent=False)
        cell_max = config.geometry_cell_max if cell_cap else {}
        self.register_buffer("cell_max", slot_table(config, cell_max, math.inf), persistent=False)
        self.checks = True  # value checks that need a host sync (off in an exported graph, which cannot raise)
        # the noise levels as Python floats, fixed here: the same in eager runs and in a traced graph
        consts = [edm_constant(self.precond, k) for k in ("sigma_min", "sigma_max", "rho")]
        if self.sampler == "consistency":
            self.sigmas = student_sigmas(self.steps, *consts)
        else:
            self.sigmas = karras_sigmas(self.steps, *consts).tolist()

    def solve(self, denoiser, noise: torch.Tensor, cond: dict, generator) -> torch.Tensor:
        if self.sampler == "consistency":
            return consistency_sample(denoiser, noise, cond, self.sigmas, sigma_min=denoiser.sigma_min,
                                      generator=generator)
        return SOLVERS[self.sampler](denoiser, noise, cond, sigmas=self.sigmas)

    def forward(self, energy: torch.Tensor, phi: torch.Tensor, theta: torch.Tensor, slot: torch.Tensor,
                noise: torch.Tensor, profile_noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        cond = {"energy": energy.float(), "phi": phi.float(), "theta": theta.float(), "geometry": slot.long()}
        e_mev = energy.double() * 1e3
        threshold = self.thresholds[slot.long()]  # (B,) MeV
        pre = self.space.shower
        if self.space.factorised:
            # the energy model first: the profile (total and layer shares), then the shapes given that profile
            profile = self.solve(self.profile_precond, profile_noise, cond, generator)
            layers = self.space.profile.inverse(profile, e_mev, cond["geometry"], check=self.checks)  # (B, Z) MeV
            shape_cond = {**cond, "profile": profile.float(), "layer_energy": layers.float()}
            y = self.solve(self.precond, noise, shape_cond, generator)
            return pre.inverse(y, e_mev, threshold=threshold, layers=layers).float()
        y = self.solve(self.precond, noise, cond, generator)
        return capped_inverse(pre, y, e_mev, threshold, self.cell_max[slot.long()])


def capped_inverse(pre, y: torch.Tensor, e_mev: torch.Tensor, threshold: torch.Tensor,
                   cell_max: torch.Tensor) -> torch.Tensor:
    """Model space -> MeV (B, R, P, Z) for a model that generates whole showers. No cell can hold more than the
    incident energy (an undertrained model could otherwise overflow exp() in the inverse transform), nor more
    than ``cell_max`` (B,) (the brightest cell of the geometry's training data, docs/generation.md)."""
    top = e_mev.reshape(-1, 1, 1, 1)
    limit = cell_max.reshape(-1, 1, 1, 1) * pre.unit(top, e_mev)
    top = torch.minimum(top, limit.to(top))
    cap = pre.forward(top.expand_as(y), e_mev, check=False, threshold=threshold)
    return pre.inverse(torch.minimum(y, cap).float(), e_mev.float(), threshold=threshold).float()


class BaselineSampler(nn.Module):
    """The sampler of a baseline family (``calofm.models.BaselineModel``), called like ``ShowerSampler``:
    forward(energy GeV, phi, theta, slot, noise, profile_noise, generator) -> showers (B, R, P, Z) in MeV.

    The family's ``generate`` draws all its randomness from ``generator`` (``noise`` is not used: each family
    has its own latent shapes); its model-space showers are inverted, capped and thresholded as the single
    CaloDiT's are. A family that generates MeV itself (``generates_mev``, the parametrised simulator) is
    given the detector cards of the rows' slots (``geometries``: slot -> Geometry) instead.
    """

    def __init__(self, net: nn.Module, config, *, steps: int | None = None, cell_cap: bool = True,
                 thresholds: dict[str, float] | None = None, geometries: dict | None = None,
                 noise_cut: float | None = None):
        super().__init__()
        self.net, self.config = net, config
        self.steps = net.check_steps(steps)
        self.mev = bool(getattr(net, "generates_mev", False))
        if self.mev and noise_cut is not None:
            raise ValueError(f"{net.family} generates MeV itself: it has no noise cut to change")
        self.space = None if self.mev else ModelSpace.from_config(config, noise_cut)
        self.geometries = dict(geometries or {})
        thresholds = {**config.geometry_thresholds, **(thresholds or {})}
        self.register_buffer("thresholds", slot_table(config, thresholds, 0.0), persistent=False)
        cell_max = config.geometry_cell_max if cell_cap else {}
        self.register_buffer("cell_max", slot_table(config, cell_max, math.inf), persistent=False)

    @property
    def sampler(self) -> str:
        return self.net.family

    def forward(self, energy: torch.Tensor, phi: torch.Tensor, theta: torch.Tensor, slot: torch.Tensor,
                noise: torch.Tensor | None = None, profile_noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        del noise, profile_noise  # the family draws its own latents from the generator
        cond = {"energy": energy.float(), "phi": phi.float(), "theta": theta.float(), "geometry": slot.long()}
        e_mev = energy.double() * 1e3
        if self.mev:
            return self.net.generate(cond, generator, steps=self.steps, geometries=self.geometries).float()
        y = self.net.generate(cond, generator, steps=self.steps)
        slot = slot.long()
        return capped_inverse(self.space.shower, y, e_mev, self.thresholds[slot], self.cell_max[slot])
