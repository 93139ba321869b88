"""CaloDiffusion (Amram & Pedro, arXiv:2308.03876): a DDPM with a cylindrical 3D U-Net on the voxel mesh.

As the paper (datasets 1 and 2 settings):

- model space: the "logit" mode of ``calofm.preprocess.ShowerPreprocessor`` (cells / (maxdep E_inc), logit with
  alpha = 1e-6, standardised), which is the paper's ``logit-norm`` shower map;
- network: ``calodiffusion_nets.CondUNet3D`` on the paper's axis order (z, alpha, r), the shower plus constant
  radial and layer coordinate channels as input (``R_Z_INPUT``), cylindrical convolutions, GroupNorm ResNet
  blocks, residual linear attention after every level and in the middle; time embedding of
  sigma = sqrt(1 - abar_t) (``TIME_EMBED: sigma``);
- diffusion: discrete DDPM, cosine beta schedule (Nichol & Dhariwal, s = 0.008, betas clipped to
  [1e-4, 0.9999]), T = 400, epsilon-prediction with the mean squared error;
- sampling: ancestral DDPM; ``sample_offset`` = 2 skips the two noisiest steps (t = T-1, T-2: the chain starts
  from pure noise at t = T-3), "necessary to prevent instabilities" (the paper's README), so 398 network passes.

Differences: the energy condition is calofm's shared ``condition_features`` (log energy, angles and geometry
one-hot) through the paper's condition MLP instead of its scalar log10(E/E_min)/log10(E_max/E_min); the
radial coordinate channel assumes equal-width rings (bin centres / last centre, as the paper's datasets 2 and
3); the CPU default U-Net is narrower than the paper's [16, 16, 16, 32] and its condition vector 64 wide,
not 128 (``layer_sizes`` and ``cond_dim`` give the paper's); ``generate(steps=K)`` with K < T respaces the
schedule (Nichol & Dhariwal): K timesteps evenly spread over [0, T-1], the same abar at those steps, and the
``sample_offset`` noisiest of them skipped as at K = T, which is the paper's sampler exactly.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from einops import rearrange
from torch import nn
from transformers import initialization as init

from calofm.models.calodiffusion_nets import CondUNet3D, level_sizes
from calofm.models.shower import (
    COND_FEATURES,
    BaselineModel,
    ShowerModelConfig,
    check_ints,
    condition_features,
    register_family,
)


class CaloDiffusionConfig(ShowerModelConfig):
    """U-Net widths, attention and diffusion settings of a CaloDiffusion checkpoint (the mesh, geometry claims
    and preprocessing fields are ``ShowerModelConfig``'s)."""

    model_type = "calodiffusion"
    # the trainer fits ShowerPreprocessor(**preprocessing_defaults) on the training data: the paper's logit map
    # with MAXDEP = 2 (datasets 2 and 3) and alpha = 1e-6; noise_cut 2 as calofm's other models (the paper has
    # no noise cut: its readout cut ECUT is far above the empty-cell floor, calofm's thresholds are not)
    preprocessing_defaults = {"mode": "logit", "eps": 1e-6, "maxdep": 2.0, "noise_cut": 2.0}

    layer_sizes: tuple[int, ...] = (8, 8, 16, 16)  # init conv width, then one width per level (paper: 16,16,16,32)
    cond_dim: int = 64  # time (sigma) + condition embedding, half each (paper: 128)
    resnet_groups: int = 8  # GroupNorm groups of the ResNet blocks (every width must be divisible by it)
    attn_heads: int = 1  # linear attention heads and width per head (paper: 1 x 32)
    attn_dim_head: int = 32
    block_attention: bool = True  # residual linear attention after each level (BLOCK_ATTN)
    mid_attention: bool = True  # ... and between the two middle ResNet blocks (MID_ATTN)
    compress_z: bool = True  # downsampling halves z as well as alpha and r (COMPRESS_Z)
    coordinate_channels: bool = True  # constant radius and layer channels concatenated to the input (R_Z_INPUT)
    num_timesteps: int = 400  # T of the discrete DDPM (NSTEPS)
    cosine_s: float = 0.008  # offset s of the cosine schedule
    sample_offset: int = 2  # the noisiest sampling steps skipped (the chain starts from noise at t = T-1-offset)

    def _normalise(self) -> None:
        self.layer_sizes = tuple(self.layer_sizes)

    def _check(self) -> None:
        super()._check()
        name = type(self).__name__
        check_ints(name, "layer_sizes", self.layer_sizes)
        if len(self.layer_sizes) < 2:
            raise ValueError(f"{name}.layer_sizes={self.layer_sizes}: need the init width and at least one level")
        for field in ("cond_dim", "resnet_groups", "attn_heads", "attn_dim_head"):
            check_ints(name, field, [getattr(self, field)])
        if self.cond_dim % 4:
            raise ValueError(f"{name}.cond_dim={self.cond_dim}: must be divisible by 4 (two MLPs halving it)")
        if any(w % self.resnet_groups for w in self.layer_sizes):
            raise ValueError(f"{name}.layer_sizes={self.layer_sizes}: every width must be divisible by "
                             f"resnet_groups={self.resnet_groups}")
        for field in ("block_attention", "mid_attention", "compress_z", "coordinate_channels"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{name}.{field}={getattr(self, field)!r}: expected true or false")
        check_ints(name, "num_timesteps", [self.num_timesteps], low=2)
        if not 0 < self.cosine_s < 1:
            raise ValueError(f"{name}.cosine_s={self.cosine_s}: expected a value in (0, 1)")
        check_ints(name, "sample_offset", [self.sample_offset], low=0)
        if self.sample_offset >= self.num_timesteps:
            raise ValueError(f"{name}.sample_offset={self.sample_offset}: must be below num_timesteps")
        z, a, r = reversed(self.mesh_shape)  # mesh (r, phi, z) -> the network's (z, alpha, r)
        level_sizes((z, a, r), len(self.layer_sizes) - 1, self.compress_z)  # raises if the mesh is too small


@lru_cache(maxsize=8)
def cosine_schedule(num_timesteps: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(betas, abar) (T,) float64 on the CPU: Nichol & Dhariwal's abar(t) = cos^2((t/T + s)/(1 + s) pi/2)
    normalised to abar(0) = 1, betas = 1 - abar(t+1)/abar(t) clipped to [1e-4, 0.9999], and abar_t recomputed
    as the product of (1 - beta) up to and including step t (t = 0 .. T-1), as the paper's code."""
    x = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
    f = f / f[0]
    betas = (1 - f[1:] / f[:-1]).clamp(1e-4, 0.9999)
    return betas, torch.cumprod(1 - betas, dim=0)


class CaloDiffusionModel(BaselineModel):
    """Epsilon-prediction network eps(x_t, sigma_t, conditions) plus the DDPM loss and ancestral sampler."""

    config_class = CaloDiffusionConfig
    base_model_prefix = "calodiffusion"
    family = "calodiffusion"
    title = "CaloDiffusion"  # name in the literature (model cards)
    summary = ("a 3D U-Net with cylindrical convolutions trained as a DDPM with a cosine schedule (Amram & Pedro "
               "2023)")
    default_steps = 400  # the config's num_timesteps (set per instance)

    def __init__(self, config: CaloDiffusionConfig):
        super().__init__(config)
        self.default_steps = config.num_timesteps
        n_r, n_phi, n_z = config.mesh_shape
        self.unet = CondUNet3D(
            in_channels=3 if config.coordinate_channels else 1, shape=(n_z, n_phi, n_r),
            layer_sizes=config.layer_sizes, cond_dim=config.cond_dim,
            n_features=COND_FEATURES + config.n_geometry_slots, groups=config.resnet_groups,
            attn_heads=config.attn_heads, attn_dim_head=config.attn_dim_head,
            block_attention=config.block_attention, mid_attention=config.mid_attention,
            compress_z=config.compress_z)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """PyTorch's default initialisation, as the paper trains with (transformers would otherwise draw
        N(0, 0.02)); transformers.initialization leaves loaded tensors alone."""
        if isinstance(module, (nn.Linear, nn.Conv3d, nn.ConvTranspose3d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * math.prod(module.weight.shape[2:])
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """Constant (B, 2, Z, A, R) channels: ring centre / last ring centre, and layer index / Z (the paper's
        scaled R and Z images), in x's dtype and device."""
        b, _, n_z, n_a, n_r = x.shape
        r = (torch.arange(n_r, device=x.device, dtype=x.dtype) + 0.5) / max(n_r - 0.5, 0.5)
        z = torch.arange(n_z, device=x.device, dtype=x.dtype) / n_z
        return torch.stack([r.expand(n_z, n_a, n_r), z[:, None, None].expand(n_z, n_a, n_r)])[None].expand(
            b, -1, -1, -1, -1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Predicted noise (B, R, P, Z) for x_t (B, R, P, Z) in model space, sigma_t = sqrt(1 - abar_t) (B,) and
        ``condition_features`` (B, 4 + n_slots)."""
        h = rearrange(x.to(self.dtype), "b r p z -> b 1 z p r")
        if self.config.coordinate_channels:
            h = torch.cat([h, self.coordinates(h)], dim=1)
        out = self.unet(h, sigma.to(self.dtype), features.to(self.dtype))
        return rearrange(out, "b 1 z p r -> b r p z")

    def schedule(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        betas, abar = cosine_schedule(self.config.num_timesteps, float(self.config.cosine_s))
        return betas.to(device), abar.to(device)

    def losses(self, x: torch.Tensor, cond: dict, noise: dict) -> dict[str, torch.Tensor]:
        """{"diffusion": (B,)}: mean over cells of (eps_theta(x_t, sigma_t) - eps)^2 with x_t = sqrt(abar_t) x +
        sqrt(1 - abar_t) eps, t = floor(u T) from noise["u"][:, 0] and eps = noise["noise"]."""
        T = self.config.num_timesteps
        t = (noise["u"][:, 0].double() * T).floor().long().clamp(0, T - 1)
        abar = self.schedule(x.device)[1][t].float()
        eps = noise["noise"].float()
        x_t = abar.sqrt().reshape(-1, 1, 1, 1) * x.float() + (1 - abar).sqrt().reshape(-1, 1, 1, 1) * eps
        pred = self(x_t, (1 - abar).sqrt(), condition_features(cond, self.config.n_geometry_slots))
        return {"diffusion": (pred.float() - eps).square().mean(dim=(1, 2, 3))}

    def timesteps(self, steps: int | None = None) -> list[int]:
        """The timesteps of a ``steps``-point schedule (evenly spread over 0..T-1, all of them at steps = T) that
        the sampler evaluates: all but the ``sample_offset`` noisiest, ascending."""
        T, offset = self.config.num_timesteps, self.config.sample_offset
        steps = T if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not offset < steps <= T:
            raise ValueError(f"calodiffusion samples with {offset + 1}..{T} steps (a respacing of its T={T} "
                             f"DDPM steps, the {offset} noisiest skipped), not {steps!r}")
        grid = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().tolist()
        return grid[: steps - offset]

    def network_evaluations(self, steps: int | None = None) -> int:
        return len(self.timesteps(steps))

    @torch.no_grad()
    def generate(self, cond: dict, generator: torch.Generator | None, steps: int | None = None,
                 geometries: dict | None = None) -> torch.Tensor:
        """Ancestral DDPM sampling (Ho et al. Algorithm 2) over ``timesteps(steps)``, from pure noise; between
        evaluated timesteps s < t the step uses alpha = abar_t / abar_s, beta = 1 - alpha and the posterior
        variance beta (1 - abar_s) / (1 - abar_t) (abar_s = 1 before t = 0, where no noise is added)."""
        del geometries
        taus = self.timesteps(steps)
        device = cond["energy"].device
        abar = cosine_schedule(self.config.num_timesteps, float(self.config.cosine_s))[1].tolist()
        features = condition_features(cond, self.config.n_geometry_slots)
        shape = (cond["energy"].shape[0], *self.config.mesh_shape)
        x = torch.randn(shape, generator=generator, device=device)
        for i in reversed(range(len(taus))):
            ab_t = abar[taus[i]]
            ab_s = abar[taus[i - 1]] if i > 0 else 1.0
            alpha = ab_t / ab_s
            sigma = torch.full((shape[0],), math.sqrt(1 - ab_t), device=device)
            eps = self(x, sigma, features).float()
            x = (x - (1 - alpha) / math.sqrt(1 - ab_t) * eps) / math.sqrt(alpha)
            if i > 0:
                std = math.sqrt((1 - alpha) * (1 - ab_s) / (1 - ab_t))
                x = x + std * torch.randn(shape, generator=generator, device=device)
        return x


register_family(CaloDiffusionConfig, CaloDiffusionModel)
