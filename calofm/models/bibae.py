"""BIB-AE with a post-processor for calorimeter showers (Buhmann et al., arXiv:2005.05334, "Getting High";
latent sampling: "Decoding Photons", arXiv:2102.12491), on calofm's (r, phi, z) mesh.

The paper's model (ILD Si-W ECAL photons, a 30x30x30 grid, code FLC-QU-hep/getting_high BIBAE/):

- a conditional VAE: a 3D conv encoder (LayerNorm, LeakyReLU 0.2) gives mean and log-variance of only 24 latent
  dimensions; the other 488 of the 512 the decoder reads are free N(0, 1) noise. The decoder (FC layers, then
  ConvTranspose3d up to the grid and 3D convs) ends in a ReLU on linear cell energies (MeV);
- losses: KLD x 0.05, MMD between the latents and N(0, 1) x 100, a WGAN-GP critic on the latent values x 100
  and a WGAN-GP critic on pairs (input, input) vs (input, reconstruction) conditioned on the energy x 1
  (gradient-penalty lambda 10); no pixel-wise reconstruction term;
- a post-processor: six 1x1x1 convolutions (128 channels) with LayerNorm, conditioned through an MLP on the
  decoded shower's total energy and the incident energy, trained on the detached reconstruction with a
  sorted-kernel MMD on the cell values x 5 (plus an MSE to its input) after 100 epochs of MSE only;
- Adam, lr 5e-4 (decay 0.95 per epoch), batch 8, five critic steps per generator step, separate optimisers;
- sampling: N(0, 1) on all latents, decoder, post-processor: 1 decoder pass + 1 post-processor pass. The
  follow-up samples the encoded latents from a density fitted on the training set's latent space instead.

Here, scaled down for CPU by config only (defaults below; the paper's values in comments) and changed so it fits
calofm's one loop and sampler:

- model space, not linear energies: the shower is log(cell / E_inc + eps), standardised (``preprocessing_defaults``),
  and the decoder's output is linear (no ReLU), so the shared ``ShowerPreprocessor.inverse`` makes the MeV showers,
  and the readout threshold, noise cut and cell cap are applied by the one sampler as for every family;
- one AdamW over all parameters, one critic update per step: critics train on the detached fakes while the
  generator's adversarial terms evaluate the critics with detached parameters (no gradient to them);
- the latent MMD and critic act on the encoded dimensions only (the free ones are N(0, 1) by construction), and
  the latent critic's gradient penalty is on each latent value (the critic is a function of one value);
- a reconstruction term in model space (``recon_weight``, 0 in the paper): the per-shower Euclidean distance
  |recon - x|, in the units of the critic's Wasserstein estimate. At CPU scale (one critic update per step instead
  of five) the image critic alone pushes the reconstruction around before it has learned anything; this term
  makes the reconstruction fall from the first steps;
- the post-processor is residual with a zero last layer, so it starts as the identity the paper's 100 MSE epochs
  train it towards, and is trained from the first step on the detached decoder output (the loop passes no step
  count); ``post_processor = False`` leaves it out (a plain BIB-AE, 1 network pass). Its energy input is the
  visible energy fraction of the decoded shower computed through the preprocessing inverse, and it also sees the
  other conditions (angles, geometry);
- the encoded-latent density is a per-geometry diagonal Gaussian KDE over at most ``density_size`` stored
  encoder means (``fit_latent_density``; ``finish_training`` fits it on the training set), used when
  ``latent_sampling = "density"``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init

from calofm.models.bibae_nets import (
    Decoder,
    Encoder,
    LatentCritic,
    PairCritic,
    PostProcessor,
    ZeroConv3d,
    mmd_rows,
    sorted_kernel_mmd,
)
from calofm.models.shower import (
    COND_FEATURES,
    BaselineModel,
    ShowerModelConfig,
    check_ints,
    condition_features,
    frozen,
    register_family,
)

LATENT_SAMPLING = ("prior", "density")
_TUPLES = ("encoder_channels", "decoder_channels", "refine_channels", "critic_channels", "latent_critic_hidden")
_WEIGHTS = ("kld_weight", "latent_mmd_weight", "latent_adv_weight", "adv_weight", "gp_lambda", "recon_weight",
            "hit_mmd_weight", "pp_mse_weight")


class BIBAEConfig(ShowerModelConfig):
    """BIB-AE + post-processor: latent sizes, network widths, loss weights and latent sampling."""

    model_type = "bibae"
    preprocessing_defaults = {"mode": "fraction", "noise_cut": 2.0}

    latent_encoded: int = 24  # encoded latent dimensions (paper 24)
    latent_free: int = 104  # free N(0, 1) dimensions the decoder also reads (paper 488 of 512)
    encoder_channels: tuple[int, ...] = (8, 16, 16)  # conv blocks, stride 2 but the last (paper 8, 16, 32, 64)
    encoder_hidden: int = 128  # FC width after the convs (paper 4000)
    decoder_hidden: int = 128  # FC width before the coarse grid (paper 4000)
    decoder_channels: tuple[int, ...] = (16, 16)  # ConvTranspose3d stages, each doubling the grid (paper 2)
    refine_channels: tuple[int, ...] = (16,)  # 3x3x3 conv blocks on the mesh (paper 8, 16, 32, 16)
    critic_channels: tuple[int, ...] = (16, 32)  # image critic's stride-2 conv blocks (paper 128, 128, 128)
    critic_hidden: int = 64  # image critic's FC width (paper 256)
    latent_critic_hidden: tuple[int, ...] = (50, 100, 50)  # paper
    post_processor: bool = True  # train and apply the post-processor
    pp_channels: int = 32  # post-processor channels (paper 128)
    pp_layers: int = 4  # post-processor 1x1x1 convolutions, first and last included (paper 6)
    # loss weights (paper values; recon_weight and pp_mse_weight see the module docstring)
    kld_weight: float = 0.05
    latent_mmd_weight: float = 100.0
    latent_adv_weight: float = 100.0
    adv_weight: float = 1.0
    gp_lambda: float = 10.0
    recon_weight: float = 1.0  # |recon - x| per shower (paper 0: no reconstruction term)
    hit_mmd_weight: float = 5.0
    pp_mse_weight: float = 1.0  # the paper code's MSE between post-processor output and input
    latent_mmd_alphas: tuple[float, ...] = (1.0, 0.01)  # Gaussian kernels exp(-alpha d^2) of the latent MMD
    # sorted-kernel MMD: windows of `kernel` sorted cells every `stride` below `cutoff` (paper 100, 25, 2000 of
    # 27000 cells; here 6480 cells); alpha in model-space units (paper 200 on MeV: a kernel width ~0.05 MeV,
    # here ~0.3 of the standardised log spread)
    hit_mmd_kernel: int = 50
    hit_mmd_stride: int = 25
    hit_mmd_cutoff: int = 1000
    hit_mmd_alpha: float = 5.0
    latent_sampling: str = "prior"  # "prior": N(0, 1); "density": the fitted per-geometry KDE
    density_size: int = 1024  # stored encoder means per geometry (the buffers' fixed size)
    density_bandwidth: float = 1.0  # factor on Scott's rule

    def _normalise(self) -> None:
        for name in _TUPLES:
            setattr(self, name, tuple(getattr(self, name)))
        self.latent_mmd_alphas = tuple(float(a) for a in self.latent_mmd_alphas)

    def _check(self) -> None:
        super()._check()
        name = type(self).__name__
        for field_name in ("latent_encoded", "encoder_hidden", "decoder_hidden", "critic_hidden", "hit_mmd_kernel",
                           "hit_mmd_stride", "hit_mmd_cutoff", "density_size"):
            check_ints(name, field_name, [getattr(self, field_name)])
        check_ints(name, "latent_free", [self.latent_free], low=0)
        check_ints(name, "pp_channels", [self.pp_channels], low=2)
        check_ints(name, "pp_layers", [self.pp_layers], low=3)
        for field_name in _TUPLES:
            values = getattr(self, field_name)
            check_ints(name, field_name, values)
            if not values and field_name != "refine_channels":
                raise ValueError(f"{name}.{field_name}: needs at least one entry")
        if not isinstance(self.post_processor, bool):
            raise ValueError(f"{name}.post_processor={self.post_processor!r}: expected true or false")
        for field_name in _WEIGHTS:
            if not 0 <= getattr(self, field_name) < math.inf:
                raise ValueError(f"{name}.{field_name}={getattr(self, field_name)!r}: expected a finite value >= 0")
        if not self.latent_mmd_alphas or not all(0 < a < math.inf for a in self.latent_mmd_alphas):
            raise ValueError(f"{name}.latent_mmd_alphas={self.latent_mmd_alphas}: expected positive values")
        for field_name in ("hit_mmd_alpha", "density_bandwidth"):
            if not 0 < getattr(self, field_name) < math.inf:
                raise ValueError(f"{name}.{field_name}={getattr(self, field_name)!r}: expected a finite value > 0")
        if self.latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"{name}.latent_sampling={self.latent_sampling!r}: expected one of {LATENT_SAMPLING}")
        if 2 * self.latent_encoded + self.latent_free > math.prod(self.mesh_shape):
            raise ValueError(f"{name}: 2 latent_encoded + latent_free must fit in the step noise "
                             f"({math.prod(self.mesh_shape)} values per shower)")


class BIBAEModel(BaselineModel):
    """Encoder, decoder, post-processor, image and latent critics, and the fitted latent density (buffers)."""

    config_class = BIBAEConfig
    family = "bibae"
    title = "BIB-AE"  # name in the literature (model cards)
    summary = ("a conditional VAE with latent and image WGAN-GP critics and a post-processor network (Buhmann et al. "
               "2020)")
    default_steps = 1
    base_model_prefix = "bibae"

    def __init__(self, config: BIBAEConfig):
        super().__init__(config)
        mesh, n_cond = config.mesh_shape, COND_FEATURES + config.n_geometry_slots
        le, z_all = config.latent_encoded, config.latent_encoded + config.latent_free
        self.encoder = Encoder(mesh, config.encoder_channels, config.encoder_hidden, n_cond, le)
        self.decoder = Decoder(mesh, z_all + n_cond, config.decoder_hidden, config.decoder_channels,
                               config.refine_channels)
        self.critic = PairCritic(mesh, config.critic_channels, config.critic_hidden, n_cond)
        self.latent_critic = LatentCritic(config.latent_critic_hidden)
        self.post = PostProcessor(mesh, config.pp_channels, config.pp_layers, n_cond) if config.post_processor else None
        # KDE of the encoded latents per geometry slot: stored encoder means, how many, bandwidth per dimension
        slots, size = config.n_geometry_slots, config.density_size
        self.register_buffer("density_points", torch.zeros(slots, size, le))
        self.register_buffer("density_count", torch.zeros(slots, dtype=torch.long))
        self.register_buffer("density_scale", torch.zeros(slots, le))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, ZeroConv3d):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv3d, nn.ConvTranspose3d)):
            init.kaiming_uniform_(module.weight, a=0.2, nonlinearity="leaky_relu")
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BIBAEModel):
            for buf in (module.density_points, module.density_count, module.density_scale):
                init.zeros_(buf)

    # -- pieces ---------------------------------------------------------------------------------
    def cond_features(self, cond: dict) -> torch.Tensor:
        return condition_features(cond, self.config.n_geometry_slots)  # (B, 4 + slots)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-space showers (B, R, P, Z) and condition features -> mu, logvar (B, latent_encoded)."""
        return self.encoder(x.to(self.dtype), c)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """All latents (B, latent_encoded + latent_free) and condition features -> (B, R, P, Z) model space."""
        return self.decoder(torch.cat([z, c], dim=1).to(self.dtype))

    def energy_feature(self, y: torch.Tensor) -> torch.Tensor:
        """log10 of the shower's visible energy in units of the preprocessing (E_inc in "fraction" mode) through
        the preprocessing inverse (its noise cut included, the readout threshold not), (B, 1); about -2 to 0."""
        pre = self.config.preprocessing or {}
        mean, std, eps = pre.get("mean", 0.0), pre.get("std", 1.0), pre.get("eps", 1e-6)
        rel = (torch.exp(y.detach().float() * std + mean) - eps).clamp_min(0.0)
        rel = torch.where(rel >= pre.get("noise_cut", 0.0) * eps, rel, torch.zeros_like(rel))
        return torch.log10(rel.flatten(1).sum(dim=1, keepdim=True).clamp_min(1e-6))

    def postprocess(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.post(y, torch.cat([self.energy_feature(y), c], dim=1))

    def latents(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's latent draws sliced out of noise["noise"]: reparameterisation eps, free latents and prior
        samples of the encoded latents (for MMD and critic), each (B, ...)."""
        le, lf = self.config.latent_encoded, self.config.latent_free
        flat = noise.flatten(1)
        return flat[:, :le], flat[:, le:le + lf], flat[:, le + lf:2 * le + lf]

    # -- training ------------------------------------------------------------------------------
    def losses(self, x: torch.Tensor, cond: dict, noise: dict) -> dict[str, torch.Tensor]:
        cfg, c = self.config, self.cond_features(cond)
        eps, free, prior = self.latents(noise["noise"])
        u_img, u_lat = noise["u"][:, 0], noise["u"][:, 1]
        mu, logvar = (t.float() for t in self.encode(x, c))
        z = mu + torch.exp(0.5 * logvar) * eps.float()  # (B, latent_encoded)
        recon = self.decode(torch.cat([z, free.float()], dim=1), c)  # (B, R, P, Z)
        out = {
            "kld": cfg.kld_weight * (-0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(dim=1)),
            "latent_mmd": cfg.latent_mmd_weight * mmd_rows(z, prior, cfg.latent_mmd_alphas),
        }
        if cfg.recon_weight > 0:
            # the Euclidean distance over all cells: the units of the critic's Wasserstein estimate, whose input
            # gradient the penalty holds at norm 1, so recon_weight and adv_weight compare directly (a per-cell
            # mean would be ~sqrt(cells) times weaker than the critic's still random gradient early on)
            out["recon"] = cfg.recon_weight * ((recon.float() - x.float()).square().flatten(1).sum(dim=1) + 1e-8).sqrt()
        # Critics: WGAN-GP losses on detached fakes. Generator terms: through the critic with detached parameters,
        # minus its detached score of the real samples (the same gradient; the value is the weighted Wasserstein
        # estimate instead of the critic's arbitrary offset). The latent critic scores every encoded value.
        z_fake, prior = z.detach(), prior.float()
        real_l = self.latent_critic(prior).mean(dim=1)
        out["latent_critic"] = self.latent_critic(z_fake).mean(dim=1) - real_l
        out["latent_gp"] = cfg.gp_lambda * self._latent_gp(prior, z_fake, u_lat)
        out["latent_adv"] = cfg.latent_adv_weight * (real_l.detach() - frozen(self.latent_critic, z).mean(dim=1))
        # image critic on pairs: real (x, x), fake (x, reconstruction)
        x_c, fake = x.detach().float(), recon.detach().float()
        real = self.critic(x_c, x_c, c)
        out["critic"] = self.critic(x_c, fake, c) - real
        out["gp"] = cfg.gp_lambda * self._image_gp(x_c, fake, c, u_img)
        out["adv"] = cfg.adv_weight * (real.detach() - frozen(self.critic, x_c, recon.float(), c))
        if self.post is not None:  # trained on the detached reconstruction (no gradient to the BIB-AE)
            pp = self.postprocess(recon.detach(), c).float()
            out["pp_mmd"] = cfg.hit_mmd_weight * sorted_kernel_mmd(pp, x_c, cfg.hit_mmd_kernel, cfg.hit_mmd_stride,
                                                                   cfg.hit_mmd_cutoff, cfg.hit_mmd_alpha)
            out["pp_mse"] = cfg.pp_mse_weight * (pp - fake).square().flatten(1).mean(dim=1)
        return out

    def _image_gp(self, x, fake, c, u):
        """(|grad D| - 1)^2 per shower at u (x, x) + (1 - u) (x, fake): the pair's second member interpolates."""
        with torch.enable_grad():
            a = x.clone().requires_grad_(True)
            b = (u[:, None, None, None] * x + (1 - u[:, None, None, None]) * fake).requires_grad_(True)
            score = self.critic(a, b, c)
            ga, gb = torch.autograd.grad(score.sum(), (a, b), create_graph=True)
        norm = (ga.float().square().flatten(1).sum(1) + gb.float().square().flatten(1).sum(1)).sqrt()
        return (norm - 1).square()

    def _latent_gp(self, real, fake, u):
        """(|D'(t)| - 1)^2 per latent value at t = u real + (1 - u) fake, averaged per shower."""
        with torch.enable_grad():
            t = (u[:, None] * real + (1 - u[:, None]) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.latent_critic(t).sum(), t, create_graph=True)
        return (grad.float().abs() - 1).square().mean(dim=1)

    # -- latent density --------------------------------------------------------------------------
    @torch.no_grad()
    def fit_latent_density(self, mu: torch.Tensor, slots: torch.Tensor) -> None:
        """Store a diagonal Gaussian KDE of the encoded means ``mu`` (N, latent_encoded) per geometry slot
        (N,): at most ``density_size`` means per slot (evenly spaced through the given order when there are
        more), bandwidth per dimension = std x n^(-1/(d+4)) (Scott) x ``density_bandwidth``. Slots absent from
        ``slots`` keep their fit."""
        le, n_slots = self.config.latent_encoded, self.config.n_geometry_slots
        if mu.ndim != 2 or mu.shape[1] != le or slots.shape != mu.shape[:1]:
            raise ValueError(f"fit_latent_density: need mu (N, {le}) and slots (N,), got {tuple(mu.shape)} and "
                             f"{tuple(slots.shape)}")
        mu, slots = mu.to(self.density_points), slots.long().to(self.density_points.device)
        if not torch.isfinite(mu).all() or ((slots < 0) | (slots >= n_slots)).any():
            raise ValueError(f"fit_latent_density: mu must be finite and slots in [0, {n_slots})")
        for s in torch.unique(slots).tolist():
            pts = mu[slots == s]
            n = min(pts.shape[0], self.config.density_size)
            keep = torch.linspace(0, pts.shape[0] - 1, n, device=pts.device).round().long()
            scale = pts.std(dim=0, unbiased=False) * n ** (-1.0 / (le + 4)) * self.config.density_bandwidth
            self.density_points[s].zero_()
            self.density_points[s, :n] = pts[keep]
            self.density_count[s] = n
            self.density_scale[s] = scale

    @torch.no_grad()
    def finish_training(self, data, space, samples: int) -> None:
        """Fit the latent density on the encoder means of the first ``samples`` showers of every training file."""
        device, was_training = self.density_points.device, self.training
        self.eval()
        mus, slots = [], []
        for k, size in enumerate(data.sizes):
            offset, n = int(data.offsets[k]), min(int(size), samples)
            for start in range(0, n, 256):
                x, cond = space.inputs(data.__getitems__(list(range(offset + start, offset + min(start + 256, n)))),
                                       device)
                mus.append(self.encode(x, self.cond_features(cond))[0].float())
                slots.append(cond["geometry"])
        self.train(was_training)
        if mus:
            self.fit_latent_density(torch.cat(mus), torch.cat(slots))

    def sample_latents(self, slots: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """All latents (B, latent_encoded + latent_free) for geometry slots (B,): the encoded part from N(0, 1)
        or, with ``latent_sampling = "density"``, from the fitted KDE of the rows' geometries."""
        b, device = slots.shape[0], slots.device
        le, lf = self.config.latent_encoded, self.config.latent_free
        z_enc = torch.randn(b, le, generator=generator, device=device)
        if self.config.latent_sampling == "density":
            count = self.density_count[slots]
            if (count == 0).any():
                missing = sorted(set(slots[count == 0].tolist()))
                raise ValueError(f"latent_sampling='density' but no latent density is fitted for geometry slot(s) "
                                 f"{missing}: call fit_latent_density (or finish_training) first")
            pick = (torch.rand(b, generator=generator, device=device) * count).long().clamp_max(count - 1)
            z_enc = self.density_points[slots, pick].float() + self.density_scale[slots].float() * z_enc
        free = torch.randn(b, lf, generator=generator, device=device)
        return torch.cat([z_enc, free], dim=1)

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, cond: dict, generator: torch.Generator | None, steps: int | None = None,
                 geometries: dict | None = None) -> torch.Tensor:
        """Latents (prior or fitted density), one decoder pass, one post-processor pass -> (B, R, P, Z)."""
        self.check_steps(steps)
        c = self.cond_features(cond)
        y = self.decode(self.sample_latents(cond["geometry"].long(), generator), c)
        if self.post is not None:
            y = self.postprocess(y, c)
        return y.float()

    def network_evaluations(self, steps: int | None = None) -> int:
        return 2 if self.post is not None else 1


register_family(BIBAEConfig, BIBAEModel)
