"""CaloClouds II and CaloClouds II (CM) (Buhmann, Korol et al., arXiv:2305.04847, 2309.05704): a shower as a point
cloud, a per-point EDM diffusion model and a conditional flow for the shower-level summary, on calofm's mesh.

The paper's model (ILD Si-W ECAL photons; code FLC-QU-hep/CaloClouds-2):

- a shower is a cloud of up to 6000 points (x, y = layer, z, E), Geant4 steps clustered on a grid 36x finer than
  the cells, with a random sub-cell offset added to x and z in training;
- ``PointwiseNet``: six ConcatSquashLinear layers 4 -> 128 -> 256 -> 512 -> 256 -> 128 -> 4 with LeakyReLU, each
  gated and shifted by the context [LeakyReLU(Linear(64 Gaussian Fourier features of ln(sigma)/4, std 16)),
  E_inc, N_points]; every point is denoised on its own (no attention, no latent in CaloClouds II);
- EDM: sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2), Karras preconditioning, Heun sampling with 13 steps (25 network
  passes) on the Karras grid sigma in [0.002, 80], rho 7; RAdam lr 1e-4, batch 128;
- ShowerFlow, trained on its own: a conditional flow for N_points, the energy sum, the centre of gravity and 30
  per-layer hit and energy fractions given E_inc. Sampling: the flow first; then the diffusion for max(N) points;
  the points are sorted on their layer coordinate and the per-layer counts handed out in that order; the energies
  of each layer are rescaled to the flow's layer energy; the (x, z) centre of gravity is shifted to the flow's;
- CaloClouds II (CM): consistency distillation (Song et al. 2023) of the diffusion model: the student starts from
  the teacher, one teacher Heun step between adjacent points of an 18-point Karras grid, an EMA target network,
  L2 loss; sampling is one network pass, x0 = f(sigma_max z, sigma_max).

Here (fields of ``CaloCloudsConfig``; CPU scale by config only, the paper's values in comments):

- points from the mesh: every cell above the noise cut is one point, in mesh units x, y = r (cos phi, sin phi)
  with ring i spanning r in [i, i + 1), z = the layer index, energy = the cell's fraction of E_inc, at most
  ``max_points`` per shower (the most energetic cells; hit cells of Par04 showers: about 260 at 10 GeV, 770 at 100
  GeV, 1230 at 500 GeV). Where a point sits in its cell (``cell_offset``) and why: docs/caloclouds_points.md. Back
  to the mesh, generated points are binned (energies summed per ring, phi bin and layer), then mapped to model
  space with the ShowerPreprocessor (unit 1: fractions of E_inc), which the shared sampler inverts (an empty cell
  is exactly 0 there: the noise cut, >= 1 eps, removes the log floor);
- the network coordinates are x / R, y / R, the layer mapped to (-1, 1) and ln(E / 1e-6 E_inc) / 4 - 1.5 (the paper
  feeds linear MeV); the point loss averages over the real points only (the paper's zero padding counts as points);
- the point network's conditions are calofm's ``condition_features`` (log energy, angles, geometry one-hot) and
  N_points / max_points * 2 - 1;
- ShowerFlow: a zuko neural spline flow with coupling transforms (the paper: Pyro affine couplings and splines,
  10 blocks) over the 45 per-layer hit counts (dequantised with uniform noise), the 45 per-layer energies and the
  transverse centre of gravity, conditioned on ``condition_features``; trained in the same model, its negative
  log-likelihood per dimension summed with the diffusion loss. N_points is the sum of the counts (the paper's
  occupancy calibration of N with polynomial fits is not done);
- one AdamW for both parts (the calofm loop); the distilled student (``distill_from``) keeps its teacher's flow
  frozen (the paper shares one ShowerFlow between CaloClouds II and its CM) and uses the loop's EMA as the target
  network; its consistency loss is averaged over the real points.

All training randomness comes from the step noise: the point noise, the dequantisation uniforms and the sub-cell
offsets are slices of noise["noise"] (4 max_points + 2 Z + 2 numbers per shower), sigma is noise["sigma"], the
student's grid step noise["u"][:, 0].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from transformers import initialization as init

from calofm.diffusion import (
    MAX_GRID,
    ConsistencyPrecond,
    EDMPrecond,
    consistency_grid,
    consistency_sample,
    heun_sample,
    heun_step,
    karras_sigmas,
)
from calofm.models.caloclouds_nets import (
    LOG_FLOOR,
    FourierFeatures,
    PointWiseNet,
    ShowerFlow,
    assemble,
    decode_summary,
    encode_points,
    mesh_to_points,
    normal_to_uniform,
    summary,
)
from calofm.models.shower import (
    COND_FEATURES,
    BaselineModel,
    ShowerModelConfig,
    check_ints,
    condition_features,
    register_family,
)
from calofm.preprocess import ShowerPreprocessor

CELL_OFFSETS = ("uniform", "centre")
_EDM = ("sigma_data", "sigma_min", "sigma_max", "rho")
# what a student must share with its teacher to start from its weights
_ARCHITECTURE = ("mesh_shape", "n_geometry_slots", "max_points", "point_hidden", "time_features", "fourier_scale",
                 "flow_transforms", "flow_hidden", "flow_bins", *_EDM)


class CaloCloudsConfig(ShowerModelConfig):
    """Point cloud size, point network, ShowerFlow, EDM constants and distillation of a CaloClouds checkpoint (the
    mesh, geometry claims and preprocessing fields are ``ShowerModelConfig``'s)."""

    model_type = "caloclouds"
    # cells as fractions of E_inc (log(x / E_inc + eps), standardised): the points are cells above the noise cut
    preprocessing_defaults = {"mode": "fraction", "noise_cut": 2.0}

    max_points: int = 1536  # points per shower, the most energetic hit cells (paper: 6000 Geant4 step clusters)
    cell_offset: str = "uniform"  # where a point sits in its cell in training: "uniform" or "centre"
    point_hidden: tuple[int, ...] = (64, 128, 256, 128, 64)  # ConcatSquash widths (paper: 128, 256, 512, 256, 128)
    time_features: int = 64  # Gaussian Fourier features of c_noise (paper: 64)
    fourier_scale: float = 16.0  # their std (paper: 16)
    flow_transforms: int = 4  # ShowerFlow coupling transforms (paper: 10 blocks)
    flow_hidden: tuple[int, ...] = (64, 64)  # hyper-network widths of each transform
    flow_bins: int = 8  # spline bins
    cog_calibration: bool = True  # shift generated points to the flow's transverse centre of gravity (paper: yes)
    # EDM (CaloClouds II): sigma_data, sampling grid and training noise ln sigma ~ N(P_mean, P_std^2)
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    P_mean: float = -1.2
    P_std: float = 1.2
    sample_steps: int = 13  # Heun steps by default: 25 point-network passes (paper: 13)
    # consistency distillation (CaloClouds II (CM)): the teacher's model folder; set, this model is a 1-step student
    distill_from: str | None = None
    consistency_grid: int = 18  # points of the Karras grid the teacher's ODE is cut into (paper: 18)

    def _normalise(self) -> None:
        self.point_hidden = tuple(self.point_hidden)
        self.flow_hidden = tuple(self.flow_hidden)

    def _check(self) -> None:
        super()._check()
        name = type(self).__name__
        for field in ("max_points", "time_features", "flow_transforms", "sample_steps"):
            check_ints(name, field, [getattr(self, field)])
        for field in ("point_hidden", "flow_hidden"):
            check_ints(name, field, getattr(self, field))
            if not getattr(self, field):
                raise ValueError(f"{name}.{field}: needs at least one hidden width")
        check_ints(name, "flow_bins", [self.flow_bins], low=2)
        check_ints(name, "consistency_grid", [self.consistency_grid], low=2)
        if self.consistency_grid > MAX_GRID:
            raise ValueError(f"{name}.consistency_grid={self.consistency_grid}: at most {MAX_GRID}")
        if self.time_features % 2:
            raise ValueError(f"{name}.time_features={self.time_features}: must be even (cos and sin)")
        if self.cell_offset not in CELL_OFFSETS:
            raise ValueError(f"{name}.cell_offset={self.cell_offset!r}: expected one of {CELL_OFFSETS}")
        if not isinstance(self.cog_calibration, bool):
            raise ValueError(f"{name}.cog_calibration={self.cog_calibration!r}: expected true or false")
        if not 0 < self.fourier_scale < math.inf:
            raise ValueError(f"{name}.fourier_scale={self.fourier_scale}: expected a value > 0")
        if not 0 < self.sigma_min < self.sigma_max or self.sigma_data <= 0 or self.rho <= 0 or self.P_std <= 0:
            raise ValueError(f"{name}: EDM constants need 0 < sigma_min < sigma_max, sigma_data, rho, P_std > 0")
        if self.distill_from is not None and not (isinstance(self.distill_from, str) and self.distill_from):
            raise ValueError(f"{name}.distill_from={self.distill_from!r}: expected a model folder or null")
        n_z, budget = self.mesh_shape[2], math.prod(self.mesh_shape)
        if 4 * self.max_points + 2 * n_z + 2 > budget:
            raise ValueError(f"{name}.max_points={self.max_points}: the step noise holds {budget} numbers per shower, "
                             f"enough for at most {(budget - 2 * n_z - 2) // 4} points")
        pre = self.preprocessing
        cut = pre.get("noise_cut", 0)
        if pre and (pre.get("mode") != "fraction" or pre.get("floor") is not None
                    or not cut >= 1 or not cut * pre.get("eps", 0) >= LOG_FLOOR):
            raise ValueError(f"{name}: needs the 'fraction' preprocessing without floor, noise_cut >= 1 and "
                             f"noise_cut x eps >= {LOG_FLOOR:g} (empty cells must invert to exactly 0), got {pre}")

    @property
    def is_student(self) -> bool:
        return self.distill_from is not None


class PointBatch(NamedTuple):
    """A training batch as points: network coordinates (B, M, 4), mask (B, M), point noise (B, M, 4), point-network
    context (B, C + 1), condition features (B, C) and the ShowerFlow vector (B, 2Z + 2)."""

    points: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor
    context: torch.Tensor
    features: torch.Tensor
    summary: torch.Tensor


def masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, M) per-point values -> (B,) mean over the real points (0 for a shower without any)."""
    m = mask.to(err.dtype)
    return (err * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)


def masked_edm_loss(precond: EDMPrecond, points: torch.Tensor, mask: torch.Tensor, context: torch.Tensor,
                    sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """EDM's loss on point clouds (B,): lambda(sigma) * mean over the real points and their 4 coordinates of
    (D(x + sigma n; sigma) - x)^2, lambda = (sigma^2 + sd^2) / (sigma sd)^2 (``calofm.diffusion.edm_loss`` with a
    mask)."""
    sd = precond.sigma_data
    sigma = sigma.to(points).reshape(-1)
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoised = precond(points + noise.to(points) * sigma[:, None, None], sigma, cond=context)
    return weight * masked_mean((denoised - points).square().mean(dim=-1), mask)


class CaloCloudsModel(BaselineModel):
    """Point network (``point_net``) and ShowerFlow (``flow``); a teacher trains both, a student (``distill_from``)
    distils the point network from its teacher's and keeps the teacher's flow."""

    config_class = CaloCloudsConfig
    base_model_prefix = "caloclouds"
    family = "caloclouds"
    title = "CaloClouds II"  # name in the literature (model cards)
    summary = ("a point cloud of the hit cells: a per-point EDM diffusion network with a conditional flow for the "
               "per-layer hits and energies, or its 1-step consistency-distilled student (Buhmann et al. 2023)")
    default_steps = 13  # the config's sample_steps, 1 for a student (set per instance)
    uses_ema_target = True  # the student's target network is the loop's EMA

    def __init__(self, config: CaloCloudsConfig):
        super().__init__(config)
        self.default_steps = 1 if config.is_student else config.sample_steps
        n_cond = COND_FEATURES + config.n_geometry_slots
        self.point_net = PointWiseNet(4, n_cond + 1, config.point_hidden, config.time_features, config.fourier_scale)
        self.flow = ShowerFlow(2 * config.mesh_shape[2] + 2, n_cond, config.flow_transforms, config.flow_hidden,
                               config.flow_bins)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """PyTorch's default initialisation, as the paper's code and zuko's flows train with (transformers would
        otherwise draw N(0, 0.02)); the fixed Fourier frequencies. Loaded tensors are left alone."""
        if isinstance(module, nn.Linear):  # also zuko's MaskedLinear
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, FourierFeatures):
            init.copy_(module.weight, FourierFeatures.fixed_weight(module.weight.numel(), module.scale))

    # -- data as points ------------------------------------------------------------------------------------------
    def preprocessor(self) -> ShowerPreprocessor:
        if not self.config.preprocessing:
            raise ValueError("caloclouds: config.preprocessing is empty; fit a ShowerPreprocessor with "
                             "CaloCloudsConfig.preprocessing_defaults (the trainer does) and store its state_dict")
        return ShowerPreprocessor.from_dict(self.config.preprocessing)

    def context(self, features: torch.Tensor, n_points: torch.Tensor) -> torch.Tensor:
        """The point network's conditions: ``condition_features`` and N_points / max_points * 2 - 1."""
        n = n_points.to(features.dtype)[:, None] / self.config.max_points * 2 - 1
        return torch.cat([features, n], dim=1)

    def point_batch(self, x: torch.Tensor, cond: dict, noise: dict) -> PointBatch:
        """Model-space showers -> points, their noise and the flow's vector; the batch is cut to its largest
        shower's point count (one host sync)."""
        c = self.config
        b, m, n_z = x.shape[0], c.max_points, c.mesh_shape[2]
        frac = self.preprocessor().inverse(x.float(), torch.ones(b, device=x.device))  # cells / E_inc, 0 = empty
        flat = noise["noise"].flatten(1).float()
        rest = flat[:, 4 * m:]
        offsets = normal_to_uniform(rest[:, 2 * n_z:2 * n_z + 2], 1e-3) if c.cell_offset == "uniform" else None
        xy, layer, energy, mask = mesh_to_points(frac, m, offsets)
        keep = max(int(mask.sum(dim=1).max()), 1)
        xy, layer, energy, mask = xy[:, :keep], layer[:, :keep], energy[:, :keep], mask[:, :keep]
        counts = frac.new_zeros(b, n_z).scatter_add_(1, layer, mask.to(frac.dtype))
        features = condition_features(cond, c.n_geometry_slots)
        u_count, u_empty = normal_to_uniform(rest[:, :n_z], 0.01), normal_to_uniform(rest[:, n_z:2 * n_z], 0)
        vector = summary(frac, counts, u_count, u_empty)
        return PointBatch(encode_points(xy, layer, energy, mask, c.mesh_shape), mask,
                          flat[:, :4 * keep].reshape(b, keep, 4), self.context(features, counts.sum(dim=1)),
                          features, vector)

    # -- training ------------------------------------------------------------------------------------------------
    def losses(self, x: torch.Tensor, cond: dict, noise: dict, ema: dict | None = None) -> dict[str, torch.Tensor]:
        """Teacher: {"points": the masked EDM loss of the point network at sigma = noise["sigma"], "flow": the
        ShowerFlow's negative log-likelihood per dimension}. Student: {"consistency": ``consistency_loss``}."""
        batch = self.point_batch(x, cond, noise)
        if self.config.is_student:
            return {"consistency": self.consistency_loss(batch, noise["u"][:, 0], ema)}
        points = masked_edm_loss(EDMPrecond(self.point_net, self.config), batch.points, batch.mask, batch.context,
                                 noise["sigma"], batch.noise)
        with torch.autocast(x.device.type, enabled=False):  # splines in float32
            flow = -self.flow.log_prob(batch.summary, batch.features) / batch.summary.shape[1]
        return {"points": points, "flow": flow}

    def consistency_loss(self, batch: PointBatch, u: torch.Tensor, ema: dict | None) -> torch.Tensor:
        """Song et al.'s consistency distillation (CaloClouds II's ``Denoiser.consistency_loss``) per shower: u
        picks the step t_{n+1} -> t_n of the ``consistency_grid``-point Karras grid, x_{n+1} = x + t_{n+1} z, one
        Heun step of the teacher gives x_n, and the loss is the mean over real points of
        (f_theta(x_{n+1}, t_{n+1}) - f_ema(x_n, t_n))^2 with f the consistency parameterisation."""
        teacher = self.__dict__.get("_teacher")
        if teacher is None:
            raise ValueError("caloclouds student: no teacher; call init_training(teacher=...) first")
        if ema is None:
            raise ValueError("caloclouds student: the consistency loss needs the EMA target (losses(..., ema=...))")
        pts = batch.points
        teacher.to(pts.device)
        grid = consistency_grid(self.config.consistency_grid, self.config).to(pts)
        n = (u.double() * (len(grid) - 1)).long().clamp(max=len(grid) - 2)
        t_hi, t_lo = grid[n + 1], grid[n]
        x_hi = pts + t_hi[:, None, None] * batch.noise
        cond = {"cond": batch.context}
        student = ConsistencyPrecond(self.point_net, self.config)
        with torch.no_grad():
            x_lo = heun_step(EDMPrecond(teacher.point_net, teacher.config), x_hi, t_hi, t_lo, cond)
            target = {"net." + k[len("point_net."):]: v for k, v in ema.items() if k.startswith("point_net.")}
            goal = torch.func.functional_call(student, target, (x_lo, t_lo), cond)
        return masked_mean((student(x_hi, t_hi, **cond) - goal).square().mean(dim=-1), batch.mask)

    def init_training(self, teacher: BaselineModel | None = None) -> None:
        """A student starts from its teacher's weights (point network and flow), keeps the teacher (frozen, not a
        submodule: not saved, not trained, not in the EMA) and freezes the flow; a teacher trains from scratch."""
        if not self.config.is_student:
            if teacher is not None:
                raise ValueError("caloclouds: a teacher was given but config.distill_from is not set")
            return
        if teacher is None:
            raise ValueError(f"caloclouds student: needs its teacher ({self.config.distill_from})")
        if not isinstance(teacher, CaloCloudsModel) or teacher.config.is_student:
            raise ValueError("caloclouds student: the teacher must be a CaloClouds diffusion model, not a student")
        differ = [f for f in _ARCHITECTURE if getattr(teacher.config, f) != getattr(self.config, f)]
        slots = teacher.config.geometry_slots
        differ += [f"slot of {g}" for g, s in self.config.geometry_slots.items() if slots.get(g, s) != s]
        if differ:
            raise ValueError(f"caloclouds student: differs from its teacher in {', '.join(differ)}")
        self.load_state_dict(teacher.state_dict())
        self.flow.requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher.eval().requires_grad_(False))

    # -- sampling ------------------------------------------------------------------------------------------------
    def network_evaluations(self, steps: int | None = None) -> int:
        """Point-network passes (Heun: 2N - 1 at N steps; a student: 1) plus the ShowerFlow's (2 per transform)."""
        steps = self.check_steps(steps)
        if steps < 1:
            raise ValueError(f"caloclouds samples with at least 1 step, not {steps}")
        return (1 if self.config.is_student else 2 * steps - 1) + self.flow.passes

    @torch.no_grad()
    def generate(self, cond: dict, generator: torch.Generator | None, steps: int | None = None,
                 geometries: dict | None = None) -> torch.Tensor:
        """ShowerFlow -> per-layer counts, layer energies and centre of gravity; the point network for that many
        points (Heun on the Karras grid, or the student's single consistency step); points -> layers by sorted z,
        energies rescaled per layer, centre of gravity shifted, binned; model space (B, R, P, Z)."""
        del geometries
        c = self.config
        n_steps = self.check_steps(steps)
        if n_steps < 1:
            raise ValueError(f"caloclouds samples with at least 1 step, not {n_steps}")
        device, b = cond["energy"].device, cond["energy"].shape[0]
        features = condition_features(cond, c.n_geometry_slots)
        z = torch.randn(b, 2 * c.mesh_shape[2] + 2, generator=generator, device=device)
        with torch.autocast(device.type, enabled=False):
            counts, energies, cog = decode_summary(self.flow.sample(features, z), c.mesh_shape, c.max_points)
        n_points = counts.sum(dim=1)
        m = max(int(n_points.max()), 1)
        noise = torch.randn(b, m, 4, generator=generator, device=device)
        extra = {"cond": self.context(features, n_points)}
        if c.is_student:
            points = consistency_sample(ConsistencyPrecond(self.point_net, c), noise, extra, sigmas=[c.sigma_max],
                                        sigma_min=c.sigma_min)
        else:
            sigmas = karras_sigmas(n_steps, c.sigma_min, c.sigma_max, c.rho)
            points = heun_sample(EDMPrecond(self.point_net, c), noise, extra, sigmas=sigmas)
        frac = assemble(points, counts, energies, cog if c.cog_calibration else None, c.mesh_shape)
        return self.preprocessor().forward(frac, torch.ones(b, device=device), check=False).float()


register_family(CaloCloudsConfig, CaloCloudsModel)
