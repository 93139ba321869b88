"""CaloDiT: a DiT with adaLN-Zero over 3D patches of the (r, phi, z) shower mesh (CaloDiT-2 style).

Order as DiT's models.py: config -> patch embedding -> model (blocks and final layer are shared in
``calofm.models.layers``). The network here is the raw EDM network F; preconditioning, loss and
samplers live in ``calofm.diffusion``.

Two variants share the class and one ``config.json``:

- ``single`` (CaloDiT-2's layout): F denoises the whole shower, cell energies / E_inc in log space.
- ``factorised``: an energy model (``energy_net``, ``calofm.models.energy``) denoises the longitudinal
  profile (total energy and the 45 layer shares); the shower network denoises each layer's normalised
  cell distribution, conditioned on that profile as well. Generation samples the profile first, then
  the shapes, and rescales every layer to its sampled energy exactly (``calofm.generate``).
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from calofm.models.energy import LayerEnergyNet
from calofm.models.layers import (
    ConditionEmbedder,
    DiTBlock,
    FinalLayer,
    ShowerConditions,
    TimestepEmbedder,
    ZeroLinear,
    sincos_pos_embed_3d,
)
from calofm.models.shower import ShowerModelConfig, StrictLoading, check_ints

# Public API: suffixes of the Linear layers peft's LoRA may target (``LoraConfig(target_modules=...)``).
# qkv/proj: attention in every block; fc1/fc2: the block MLPs; adaLN_modulation: the conditioning
# Linears of every block and of the final layer. Renaming any of these breaks saved adapters.
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "adaLN_modulation")
# Named groups of LoRA targets (``calofm adapt --lora-targets``): module-name suffixes per group. "final" is the
# Linear from tokens to cells of both networks, "embedders" the condition MLPs (energy, angles, profile).
LORA_GROUPS = {
    "attention": ("qkv", "proj"),
    "mlp": ("fc1", "fc2"),
    "adaln": ("adaLN_modulation",),
    "final": ("final_layer.linear",),
    "embedders": tuple(f"{c}_embed.mlp.{i}" for c in ("energy", "angle", "theta", "profile") for i in (0, 2, 4)),
}


def lora_target_modules(groups) -> list[str]:
    """peft ``target_modules`` (name suffixes) for the named groups of ``LORA_GROUPS``."""
    unknown = sorted(set(groups) - set(LORA_GROUPS))
    if unknown or not groups:
        raise ValueError(f"LoRA target groups {unknown or list(groups)}: choose from {', '.join(LORA_GROUPS)}")
    return [name for g in LORA_GROUPS if g in groups for name in LORA_GROUPS[g]]


VARIANTS = ("single", "factorised")


class CaloDiTConfig(ShowerModelConfig):
    """Architecture, EDM constants and the data description a CaloDiT checkpoint carries with it (the
    mesh, geometry claims and preprocessing fields are ``ShowerModelConfig``'s)."""

    model_type = "calodit"

    patch_size: tuple[int, int, int] = (3, 2, 3)  # (r, phi, z) cells per token: 3x8x15 = 360 tokens on the mesh
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    mlp_ratio: float = 4.0
    frequency_embedding_size: int = 256
    cond_dropout: float = 0.0  # training-time probability of dropping all conditions (classifier-free guidance)
    variant: str = "single"  # "single" (the whole shower) or "factorised" (energy model + per-layer shapes)
    # energy model of the factorised variant: a DiT over the Z + 1 profile tokens
    energy_hidden_size: int = 64
    energy_num_layers: int = 3
    energy_num_heads: int = 4
    # EDM (Karras et al. 2022) constants as CaloDiT-2, except sigma_data and P_mean. The model space is
    # standardised to unit variance, so sigma_data = 1 (EDM's preconditioning then gives the network
    # unit-variance inputs and targets), and the training noise ln sigma ~ N(P_mean, P_std^2) moves with the
    # data scale: EDM's -1.2 for sigma_data = 0.5 becomes -1.2 + ln 2 = -0.5, the same noise levels relative
    # to the data (measured in docs/fidelity.md). Checkpoints written before carry 0.5 and -1.2 in config.json
    # and load with them.
    sigma_data: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    P_mean: float = -0.5
    P_std: float = 1.2
    # A consistency-distilled student (`calofm distill`) lists the noise levels of its few-step sampler here
    # (the first is sigma_max) and its network is a consistency function; empty for a diffusion model.
    consistency_sigmas: list[float] = field(default_factory=list)
    # factorised: ProfilePreprocessor.state_dict() (per-geometry statistics of the profile vector)
    profile_preprocessing: dict[str, Any] = field(default_factory=dict)

    _CLAIMS = (*ShowerModelConfig._CLAIMS, "profile_preprocessing")

    def _normalise(self) -> None:
        self.patch_size = tuple(self.patch_size)
        self.profile_preprocessing = dict(self.profile_preprocessing or {})
        self.consistency_sigmas = [float(v) for v in (self.consistency_sigmas or [])]

    def _check(self):
        super()._check()

        def ints(name, values, low=1):
            check_ints("CaloDiTConfig", name, values, low)

        ints("patch_size", self.patch_size)
        if len(self.patch_size) != 3:
            raise ValueError("CaloDiTConfig: patch_size needs 3 entries (r, phi, z)")
        if any(p > n for p, n in zip(self.patch_size, self.mesh_shape)):
            raise ValueError(f"CaloDiTConfig: patch_size {self.patch_size} is larger than mesh {self.mesh_shape}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "frequency_embedding_size"):
            ints(name, [getattr(self, name)])
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.hidden_size % 6:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 6 (3 axes x sin/cos positions)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.variant not in VARIANTS:
            raise ValueError(f"CaloDiTConfig.variant={self.variant!r}: expected one of {VARIANTS}")
        for name in ("energy_hidden_size", "energy_num_layers", "energy_num_heads"):
            ints(name, [getattr(self, name)])
        if self.energy_hidden_size % self.energy_num_heads:
            raise ValueError(f"energy_hidden_size {self.energy_hidden_size} is not divisible by "
                             f"{self.energy_num_heads} heads")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0 < self.sigma_min < self.sigma_max or self.sigma_data <= 0 or self.rho <= 0 or self.P_std <= 0:
            raise ValueError("EDM constants: need 0 < sigma_min < sigma_max, sigma_data > 0, rho > 0, P_std > 0")
        cs = self.consistency_sigmas
        if cs and not (cs[0] == self.sigma_max and all(b < a for a, b in zip(cs, cs[1:])) and cs[-1] > self.sigma_min):
            raise ValueError(f"consistency_sigmas {cs}: need a decreasing list from sigma_max={self.sigma_max} "
                             f"staying above sigma_min={self.sigma_min}")
        profile = (self.profile_preprocessing or {}).get("stats", {})
        if set(profile) - set(self.geometry_slots):
            raise ValueError("profile_preprocessing names a geometry that is not in geometry_slots")
        if any(int(e.get("slot", -1)) != self.geometry_slots[n] for n, e in profile.items()):
            raise ValueError("profile_preprocessing: a geometry's statistics carry another slot than geometry_slots")

    def add_geometry(self, name: str, slot: int, threshold: float, cell_max: float | None = None,
                     card_sha256: str | None = None, profile: dict | None = None) -> None:
        """Claim ``slot`` for geometry ``name`` (``ShowerModelConfig.add_geometry``). ``profile``: the
        geometry's ``ProfilePreprocessor`` statistics (factorised variant)."""
        super().add_geometry(name, slot, threshold, cell_max, card_sha256, profile=profile)

    def _claim_extra(self, name: str, profile: dict | None = None) -> None:
        if profile is not None:
            state = dict(self.profile_preprocessing)
            self.profile_preprocessing = {**state, "stats": {**state.get("stats", {}), name: dict(profile)}}

    def keep_geometries(self, names) -> None:
        super().keep_geometries(names)
        if self.profile_preprocessing.get("stats"):
            stats = {k: v for k, v in self.profile_preprocessing["stats"].items() if k in set(names)}
            self.profile_preprocessing = {**self.profile_preprocessing, "stats": stats}

    @property
    def factorised(self) -> bool:
        return self.variant == "factorised"

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Tokens along (r, phi, z): ceil(mesh / patch)."""
        return tuple(-(-n // p) for n, p in zip(self.mesh_shape, self.patch_size))


# ----------------------------------------------------------------------------------------------
# Patch embedding
# ----------------------------------------------------------------------------------------------


def pad_mesh(x: torch.Tensor, pad: tuple[int, int, int]) -> torch.Tensor:
    """Pad (B, R, P, Z) at the end of each axis so patches tile it: phi circularly, r and z with zeros.

    phi is periodic: the cell after the last phi bin is bin 0, so a patch straddling the seam sees
    its real neighbours. Beyond the last r ring and the last z layer there is no detector: zeros.
    """
    pad_r, pad_phi, pad_z = pad
    if pad_phi:
        x = torch.cat([x, x[:, :, :pad_phi]], dim=2)
    return F.pad(x, (0, pad_z, 0, 0, 0, pad_r)) if pad_r or pad_z else x


class PatchEmbed3D(nn.Module):
    """(B, R, P, Z) mesh -> (B, T, D) tokens with a Conv3d whose kernel = stride = patch."""

    def __init__(self, mesh_shape, patch_size, hidden_size):
        super().__init__()
        self.pad = tuple((-n) % p for n, p in zip(mesh_shape, patch_size))
        self.conv = nn.Conv3d(1, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_mesh(x, self.pad).unsqueeze(1)  # (B, 1, R', P', Z')
        return rearrange(self.conv(x), "b d r p z -> b (r p z) d")  # (B, T, D)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class CaloDiTPreTrainedModel(StrictLoading, PreTrainedModel):
    config_class = CaloDiTConfig
    base_model_prefix = "calodit"
    main_input_name = "x"
    _no_split_modules = ["DiTBlock"]
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module):
        """All initialisation (DiT's initialize_weights). Runs in post_init and for missing keys on load.

        Keys on leaf types (transformers 5 skips containers) and uses transformers.initialization, whose
        functions leave already-loaded tensors alone.
        """
        if isinstance(module, ZeroLinear):
            # adaLN-Zero: every block starts as the identity and F outputs 0, so at init D(x) = c_skip x.
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)  # DiT's _basic_init
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv3d):
            # xavier of the flattened (D, patch volume) matrix: DiT treats the patch embedding as a Linear
            fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            init.uniform_(module.weight, -bound, bound)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=0.02)  # DiT's label embedding
        elif isinstance(module, CaloDiTModel):
            # frozen positions are a non-persistent buffer (not in the checkpoint): rebuilt here on every load
            init.copy_(module.pos_embed, module.build_pos_embed().to(module.pos_embed))


class CaloDiTModel(ShowerConditions, CaloDiTPreTrainedModel):
    """Raw network F(x, c_noise, energy, phi, theta, geometry[, profile]) -> (B, R, P, Z) in model space.

    The factorised variant also holds ``energy_net`` (the profile's F) and conditions the shower network on
    the profile: the whole vector (B, Z + 1) through ``profile_embed`` into the adaLN conditioning, and each
    token on its own layers (their share and their energy, which decides how many cells can pass the readout
    threshold) through ``layer_embed``, added to the token like its position.
    """

    def __init__(self, config: CaloDiTConfig):
        super().__init__(config)
        d = config.hidden_size
        self.patch_embed = PatchEmbed3D(config.mesh_shape, config.patch_size, d)
        self.register_buffer("pos_embed", self.build_pos_embed(), persistent=False)  # (1, T, D), frozen
        self.t_embedder = TimestepEmbedder(d, config.frequency_embedding_size)
        # One small MLP per continuous condition, summed with the timestep embedding (CaloDiT-2), and the
        # geometry lookup, which peft can train row by row (trainable_token_indices).
        self.build_condition_embedders(d, config.n_geometry_slots)
        if config.factorised:
            n_layers = config.mesh_shape[2]
            self.profile_embed = ConditionEmbedder(n_layers + 1, d)
            self.layer_embed = nn.Linear(2 * config.patch_size[2], d)  # (share, log energy) of the token's layers
            self.energy_net = LayerEnergyNet(
                n_layers, config.energy_hidden_size, config.energy_num_layers, config.energy_num_heads,
                frequency_embedding_size=config.frequency_embedding_size, n_slots=config.n_geometry_slots,
                cond_dropout=config.cond_dropout)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_attention_heads, config.mlp_ratio) for _ in range(config.num_hidden_layers)
        )
        self.final_layer = FinalLayer(d, math.prod(config.patch_size))
        self.post_init()

    def build_pos_embed(self) -> torch.Tensor:
        """(1, T, D) sin-cos positions; phi uses integer harmonics, so it is periodic with no seam."""
        pos = sincos_pos_embed_3d(self.config.grid_size, self.config.hidden_size, periodic=(False, True, False))
        return pos[None]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, pr*pp*pz) -> (B, R, P, Z), cropping the padding (the wrapped phi copy is dropped)."""
        (gr, gp, gz), (pr, pp, pz) = self.config.grid_size, self.config.patch_size
        x = rearrange(x, "b (r p z) (i j k) -> b (r i) (p j) (z k)", r=gr, p=gp, z=gz, i=pr, j=pp, k=pz)
        n_r, n_phi, n_z = self.config.mesh_shape
        return x[:, :n_r, :n_phi, :n_z]

    def embed_layers(self, profile: torch.Tensor, layer_energy: torch.Tensor) -> torch.Tensor:
        """Per-token embedding (B, T, D) of the token's layers: their profile share (model space) and
        log(1 + E_z / MeV) / 5 (about unit scale); layers beyond the mesh (padding) are 0."""
        (gr, gp, gz), pz = self.config.grid_size, self.config.patch_size[2]
        feats = torch.stack([profile[:, 1:].float(), torch.log1p(layer_energy.float().clamp_min(0)) / 5], dim=-1)
        feats = F.pad(feats, (0, 0, 0, gz * pz - feats.shape[1]))  # (B, gz * pz, 2)
        per_z = self.layer_embed(rearrange(feats, "b (z k) f -> b z (k f)", k=pz).to(self.dtype))  # (B, gz, D)
        return per_z[:, None, None].expand(-1, gr, gp, -1, -1).flatten(1, 3)  # tokens are (r, p, z), z fastest

    def forward(self, x, c_noise, energy, phi, theta, geometry, profile=None, layer_energy=None,
                drop_cond=None) -> torch.Tensor:
        """x (B, R, P, Z) model space, c_noise = ln(sigma)/4 (B,), energy GeV (B,), phi/theta rad (B,),
        geometry slots long (B,); factorised: profile (B, Z + 1) in the profile's model space and the layer
        energies (B, Z) in MeV; drop_cond bool (B,) forces the unconditional branch (CFG)."""
        tokens = self.patch_embed(x.to(self.dtype)) + self.pos_embed  # (B, T, D)
        extra = None
        if self.config.factorised:
            if profile is None or layer_energy is None:
                raise ValueError("the factorised CaloDiT needs the profile (B, Z + 1) and layer energies (B, Z)")
            extra = self.profile_embed(profile.float())
            per_token = self.embed_layers(profile, layer_energy)
            if drop_cond is not None:
                per_token = per_token * (~drop_cond).to(per_token.dtype)[:, None, None]
            tokens = tokens + per_token
        cond = self.embed_conditions(energy, phi, theta, geometry, drop_cond, self.config.cond_dropout, extra)
        c = self.t_embedder(c_noise) + cond  # (B, D)
        # DiT applies SiLU inside every adaLN_modulation; doing it once here keeps adaLN_modulation a plain
        # Linear (a valid LoRA target) with the same function.
        c = F.silu(c)
        for block in self.blocks:
            tokens = block(tokens, c)  # (B, T, D)
        return self.unpatchify(self.final_layer(tokens, c))  # (B, R, P, Z)
