"""WGAN: a conditional Wasserstein GAN with gradient penalty and 3D convolutions (Buhmann et al., "Getting
High", arXiv:2005.05334, ILD photons; public code FLC-QU-hep/getting_high, WGAN/).

Order as DiT's models.py: config -> generator -> critic -> energy constrainer -> model.

The paper's model, on 30 x 30 x 30 cells of linear energies (MeV):

- generator: a latent z (100, uniform) and the incident energy, each through a ConvTranspose3d from 1^3 to
  4^3 cells (128 filters each), concatenated (256), then ConvTranspose3d layers with 128/64/32 filters
  (kernel 4, stride 2, each with LayerNorm and ReLU) and a last one to one channel with a ReLU (3.7M parameters);
- critic: four Conv3d with kernels (X, 2, 2), X = 10/6/4/4 along the layers, stride 2 across the layer plane
  (LayerNorm, LeakyReLU 0.2), flattened to 90 values, concatenated with E, then FC 91-100-200-100-75-1 (250k);
- constrainer: a small 3D-conv regressor of E from the shower, trained on real showers, whose error on generated
  showers compared with its error on real ones, kappa |(E - C(fake))^2 - (E - C(real))^2|, joins the generator
  loss: the model's answer to the energy condition;
- WGAN-GP losses, critic D(fake) - D(real) + lambda GP (lambda 10 in the paper, 5 in the public script), generator
  -D(fake) + the constrainer term; Adam (0.5, 0.9), critic lr 1e-5 with 5 critic steps per generator step
  (generator lr 1e-4), batch 50.

Here, scaled down for CPU by config only (``WGANConfig``), on calofm's (r, phi, z) = 9 x 16 x 45 mesh:

- model space, not linear energies: log(cell / E_inc + eps), standardised (``preprocessing_defaults``), as every
  family, so one sampler inverts it, applies the readout threshold, the noise cut and the cell cap; the generator
  therefore ends without a ReLU (an empty cell is the log floor, set to zero by the noise cut);
- the generator's first grid is ceil(mesh / 2^n) cells for n upsamplings (2 x 2 x 6 for three), the output
  (16 x 16 x 48) is cropped to the mesh; the condition is the shared condition vector (log energy, phi, theta,
  geometry one-hot, ``condition_features``) instead of the bare energy, and the latent is standard normal;
- the critic's kernels are (2, 2, X) on (r, phi, z): X along the 45 layers as in the paper, stride 2 in phi (16
  bins tile exactly, no seam), stride 1 in r (9 rings only); the flattened 1 x 5 x 1 x 25 map and the condition
  vector feed the MLP;
- the constrainer regresses ln(E / GeV) with MSE from the model-space shower and the other conditions (phi,
  theta, geometry: the visible energy fraction depends on the detector); the paper regresses E in GeV (L1 in the
  public script);
- one optimiser (calofm's loop): critic, generator and constrainer update together on every step, the generator's
  terms evaluating critic and constrainer with detached parameters. The paper's 5 critic steps per generator step
  and separate learning rates cannot be expressed with one AdamW: the critic's parameters get gradients from the
  critic terms only, and Adam is invariant to a loss weight on them, so there is no ``n_critic`` knob and the
  updates are simultaneous.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from calofm.models.shower import (
    COND_FEATURES,
    BaselineModel,
    ShowerModelConfig,
    check_ints,
    condition_features,
    frozen,
    register_family,
)

LEAKY_SLOPE = 0.2  # LeakyReLU slope of critic and constrainer (paper)


def conv_out(shape, kernel, stride, padding=0) -> tuple[int, ...]:
    """Output grid of a Conv3d (no dilation) on ``shape``; ints broadcast over the three axes."""
    k, s, p = ((v,) * 3 if isinstance(v, int) else v for v in (kernel, stride, padding))
    return tuple((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip(shape, k, s, p))


def critic_grids(mesh, kernels_z) -> list[tuple[int, int, int]]:
    """Grids after each critic convolution: kernel (2, 2, kz), stride (1, 2, 1) except the last (1, 1, 1)."""
    grids, shape = [], tuple(mesh)
    for i, kz in enumerate(kernels_z):
        shape = conv_out(shape, (2, 2, kz), (1, 1 if i == len(kernels_z) - 1 else 2, 1))
        grids.append(shape)
    return grids


def constrainer_grids(mesh, n_convs: int) -> list[tuple[int, int, int]]:
    """Grids after each constrainer convolution: kernel 3, stride 2, padding 1, the last kernel 2, stride 1."""
    grids, shape = [], tuple(mesh)
    for i in range(n_convs):
        shape = conv_out(shape, 2, 1) if i == n_convs - 1 else conv_out(shape, 3, 2, 1)
        grids.append(shape)
    return grids


class WGANConfig(ShowerModelConfig):
    """Sizes and loss weights of the WGAN (paper values in the comments; defaults are CPU-sized)."""

    model_type = "wgan"
    # the trainer fits ShowerPreprocessor(**preprocessing_defaults) on the training data (the shared model space)
    preprocessing_defaults = {"mode": "fraction", "noise_cut": 2.0}

    latent_dim: int = 100  # paper 100 (uniform in [-1, 1]); here standard normal, sliced from the step noise
    # generator: the width of the concatenated projections, then the ConvTranspose3d widths (paper 256/128/64/32)
    generator_channels: tuple[int, ...] = (64, 32, 16, 8)
    critic_channels: tuple[int, ...] = (8, 16, 32)  # paper 32/64/128, then a conv to 1 channel
    critic_kernels_z: tuple[int, ...] = (10, 6, 4, 4)  # kernel along the layers of each critic conv (paper)
    critic_hidden: tuple[int, ...] = (100, 200, 100, 75)  # the critic's MLP widths (paper)
    constrainer_channels: tuple[int, ...] = (8, 16, 8)  # paper 16/32/16
    constrainer_hidden: int = 64  # paper 100
    gp_lambda: float = 10.0  # gradient-penalty weight (paper 10)
    # kappa: weight of the constrainer term. The paper's 0.01 is per GeV^2 of (E - C)^2; here errors are in ln E,
    # and (Delta E)^2 = E^2 (Delta ln E)^2, so at E ~ 30 GeV the paper's weight is ~ 0.01 x 30^2 ~ 10
    energy_weight: float = 10.0

    def _normalise(self) -> None:
        for name in ("generator_channels", "critic_channels", "critic_kernels_z", "critic_hidden",
                     "constrainer_channels"):
            setattr(self, name, tuple(getattr(self, name)))

    def _check(self) -> None:
        super()._check()
        name = type(self).__name__
        for field_name in ("generator_channels", "critic_channels", "critic_kernels_z", "critic_hidden",
                           "constrainer_channels"):
            check_ints(name, field_name, getattr(self, field_name))
        check_ints(name, "latent_dim", [self.latent_dim])
        check_ints(name, "constrainer_hidden", [self.constrainer_hidden])
        if self.latent_dim > math.prod(self.mesh_shape):
            raise ValueError(f"{name}.latent_dim={self.latent_dim}: at most {math.prod(self.mesh_shape)} "
                             "(the latent is sliced from the step noise of one shower)")
        if len(self.generator_channels) < 2 or self.generator_channels[0] % 2:
            raise ValueError(f"{name}.generator_channels={self.generator_channels}: need >= 2 entries, the first "
                             "even (two projections of half its width)")
        if len(self.critic_kernels_z) != len(self.critic_channels) + 1:
            raise ValueError(f"{name}: critic_kernels_z needs one entry per critic conv "
                             f"(len(critic_channels) + 1 = {len(self.critic_channels) + 1})")
        if min(min(g) for g in critic_grids(self.mesh_shape, self.critic_kernels_z)) < 1:
            raise ValueError(f"{name}: critic convolutions {self.critic_kernels_z} shrink the mesh "
                             f"{self.mesh_shape} to nothing")
        if len(self.critic_hidden) < 1 or len(self.constrainer_channels) < 2:
            raise ValueError(f"{name}: need >= 1 critic_hidden width and >= 2 constrainer_channels")
        if min(min(g) for g in constrainer_grids(self.mesh_shape, len(self.constrainer_channels))) < 1:
            raise ValueError(f"{name}: {len(self.constrainer_channels)} constrainer convolutions shrink the mesh "
                             f"{self.mesh_shape} to nothing")
        for field_name in ("gp_lambda", "energy_weight"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name}.{field_name}={value!r}: expected a finite number >= 0")

    @property
    def n_cond(self) -> int:
        """Width of the condition vector (``condition_features``)."""
        return COND_FEATURES + self.n_geometry_slots


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """(latent (B, L), condition vector (B, C)) -> (B, R, P, Z) in model space.

    Each input is a ConvTranspose3d from 1^3 cells to the first grid (the paper's 4^3 projection), the two maps
    are concatenated, upsampled by ConvTranspose3d (kernel 4, stride 2) with LayerNorm over the grid and ReLU,
    and a last ConvTranspose3d (kernel 3) gives one channel, cropped to the mesh.
    """

    def __init__(self, mesh, latent_dim: int, n_cond: int, channels):
        super().__init__()
        self.mesh = tuple(mesh)
        grid = tuple(-(-n // 2 ** (len(channels) - 1)) for n in mesh)  # first grid: ceil(mesh / 2^n_up)
        self.latent_proj = nn.ConvTranspose3d(latent_dim, channels[0] // 2, grid, bias=False)
        self.cond_proj = nn.ConvTranspose3d(n_cond, channels[0] // 2, grid, bias=False)
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            grid = tuple(2 * n for n in grid)
            layers += [nn.ConvTranspose3d(c_in, c_out, 4, 2, 1, bias=False), nn.LayerNorm(grid), nn.ReLU()]
        layers.append(nn.ConvTranspose3d(channels[-1], 1, 3, 1, 1))  # no ReLU: model space is unbounded
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.latent_proj(z[:, :, None, None, None]),
                       self.cond_proj(c[:, :, None, None, None])], dim=1)  # (B, C0, r0, p0, z0)
        n_r, n_phi, n_z = self.mesh
        return self.main(h)[:, 0, :n_r, :n_phi, :n_z]  # (B, R, P, Z)


# ----------------------------------------------------------------------------------------------
# Critic
# ----------------------------------------------------------------------------------------------


class Critic(nn.Module):
    """(shower (B, R, P, Z), condition vector (B, C)) -> score (B,).

    Conv3d with kernels (2, 2, kz) (the paper's (kz, 2, 2) with the layers last), LayerNorm over the grid and
    LeakyReLU, a last conv to one channel; the flattened map and the condition vector go through the MLP.
    No batch statistics anywhere: the gradient penalty needs a per-sample critic.
    """

    def __init__(self, mesh, channels, kernels_z, hidden, n_cond: int):
        super().__init__()
        grids = critic_grids(mesh, kernels_z)
        widths = (1, *channels, 1)
        self.convs = nn.ModuleList(
            nn.Conv3d(c_in, c_out, (2, 2, kz), (1, 1 if i == len(kernels_z) - 1 else 2, 1), bias=False)
            for i, (c_in, c_out, kz) in enumerate(zip(widths, widths[1:], kernels_z))
        )
        self.norms = nn.ModuleList(nn.LayerNorm(g) for g in grids[:-1])
        sizes = (math.prod(grids[-1]) + n_cond, *hidden)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(sizes[-1], 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)  # (B, 1, R, P, Z)
        for conv, norm in zip(self.convs, self.norms):
            h = F.leaky_relu(norm(conv(h)), LEAKY_SLOPE)
        h = torch.cat([self.convs[-1](h).flatten(1), c.to(h.dtype)], dim=1)  # (B, r*p*z + C)
        for fc in self.fcs:
            h = F.leaky_relu(fc(h), LEAKY_SLOPE)
        return self.out(h)[:, 0]  # (B,)


# ----------------------------------------------------------------------------------------------
# Energy constrainer
# ----------------------------------------------------------------------------------------------


class Constrainer(nn.Module):
    """(shower (B, R, P, Z), conditions other than the energy (B, C - 1)) -> predicted ln(E / GeV) (B,).

    Conv3d (kernel 3, stride 2) with LayerNorm and LeakyReLU, a last Conv3d (kernel 2), flattened, concatenated
    with phi, theta and the geometry one-hot, then Linear-LeakyReLU-Linear (the paper's regressor, whose input is
    the shower alone; here the detector decides which fraction of E is visible)."""

    def __init__(self, mesh, channels, hidden: int, n_cond: int):
        super().__init__()
        grids = constrainer_grids(mesh, len(channels))
        widths = (1, *channels)
        self.convs = nn.ModuleList(
            nn.Conv3d(c_in, c_out, 2, 1, bias=False) if i == len(channels) - 1
            else nn.Conv3d(c_in, c_out, 3, 2, 1, bias=False)
            for i, (c_in, c_out) in enumerate(zip(widths, widths[1:]))
        )
        self.norms = nn.ModuleList(nn.LayerNorm(g) for g in grids[:-1])
        self.fc = nn.Linear(channels[-1] * math.prod(grids[-1]) + n_cond - 1, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, c_other: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)  # (B, 1, R, P, Z)
        for conv, norm in zip(self.convs, self.norms):
            h = F.leaky_relu(norm(conv(h)), LEAKY_SLOPE)
        h = torch.cat([self.convs[-1](h).flatten(1), c_other.to(h.dtype)], dim=1)
        return self.out(F.leaky_relu(self.fc(h), LEAKY_SLOPE))[:, 0]  # (B,)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class WGANModel(BaselineModel):
    """Generator, critic and energy constrainer of a conditional WGAN-GP, trained together by one optimiser."""

    config_class = WGANConfig
    family = "wgan"
    title = "WGAN"  # name in the literature (model cards)
    summary = ("a conditional WGAN-GP with 3D convolutions and an energy constrainer (Buhmann et al. 2020)")
    default_steps = 1
    base_model_prefix = "wgan"

    def __init__(self, config: WGANConfig):
        super().__init__(config)
        mesh, n_cond = config.mesh_shape, config.n_cond
        self.generator = Generator(mesh, config.latent_dim, n_cond, config.generator_channels)
        self.critic = Critic(mesh, config.critic_channels, config.critic_kernels_z, config.critic_hidden, n_cond)
        self.constrainer = Constrainer(mesh, config.constrainer_channels, config.constrainer_hidden, n_cond)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """The paper's initialisation (DCGAN's): convolution and Linear weights N(0, 0.02), biases 0; LayerNorm
        weight 1, bias 0. transformers.initialization leaves tensors loaded from a checkpoint alone."""
        if isinstance(module, nn.Conv3d | nn.ConvTranspose3d | nn.Linear):
            init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def conditions(self, cond: dict) -> torch.Tensor:
        """The shared condition vector (B, 4 + n_slots) in the model's dtype."""
        return condition_features(cond, self.config.n_geometry_slots).to(self.dtype)

    def losses(self, x: torch.Tensor, cond: dict, noise: dict) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,) of one step (summed and minimised by the loop):

        - critic: D(fake) - D(real), fake detached (trains the critic);
        - gp: lambda (|grad_x D(x_hat)| - 1)^2 at x_hat = u real + (1 - u) fake, u = noise["u"][:, 0];
        - generator: -D(fake) with the critic's parameters detached (trains the generator only);
        - energy: kappa |(y - C(fake))^2 - (y - C(real))^2|, y = ln(E / GeV), constrainer detached;
        - constrainer: (y - C(real))^2 (trains the constrainer on real showers only).
        """
        cfg = self.config
        x = x.to(self.dtype)
        c = self.conditions(cond)
        z = noise["noise"].flatten(1)[:, : cfg.latent_dim].to(self.dtype)  # (B, L) standard normal
        fake = self.generator(z, c)  # (B, R, P, Z)

        d_real = self.critic(x, c)
        d_fake = self.critic(fake.detach(), c)
        alpha = noise["u"][:, 0].to(x.dtype).reshape(-1, 1, 1, 1)
        with torch.enable_grad():  # also in a no_grad validation pass: the penalty is a gradient
            x_hat = (alpha * x + (1 - alpha) * fake.detach()).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.critic(x_hat, c).sum(), x_hat, create_graph=True)
        gp = (grad.float().flatten(1).norm(dim=1) - 1).square()

        y = torch.log(cond["energy"].float().clamp_min(1e-4))  # ln(E / GeV)
        c_other = c[:, 1:]  # phi, theta, geometry: the constrainer must find the energy in the shower
        err_real = (self.constrainer(x, c_other).float() - y).square()
        err_fake_g = (frozen(self.constrainer, fake, c_other).float() - y).square()
        return {
            "critic": (d_fake - d_real).float(),
            "gp": cfg.gp_lambda * gp,
            "generator": -frozen(self.critic, fake, c).float(),
            "energy": cfg.energy_weight * (err_fake_g - err_real.detach()).abs(),
            "constrainer": err_real,
        }

    @torch.no_grad()
    def generate(self, cond: dict, generator: torch.Generator | None, steps: int | None = None,
                 geometries: dict | None = None) -> torch.Tensor:
        """One generator pass: (B, R, P, Z) model-space showers for ``cond``, latents from ``generator``."""
        del geometries  # the generator needs only the slot
        self.check_steps(steps)
        c = self.conditions(cond)
        z = torch.randn(c.shape[0], self.config.latent_dim, generator=generator, device=c.device)
        return self.generator(z.to(self.dtype), c).float()

    def network_evaluations(self, steps: int | None = None) -> int:
        self.check_steps(steps)
        return 1


register_family(WGANConfig, WGANModel)
