"""Shared transformer layers: adaLN modulation, embedders, attention, MLP, DiT blocks, 3D sin-cos positions.

Plain sizes, no config objects, so every network of calofm (the CaloDiT shower network, the layer-energy
network, baselines) reuses them. Module names (``qkv``, ``proj``, ``fc1``, ``fc2``, ``adaLN_modulation``)
are public API for LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine of token features. x (B, T, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ZeroLinear(nn.Linear):
    """A Linear that the model's ``_init_weights`` sets to exactly zero (adaLN-Zero, final layer).

    A leaf type on purpose: transformers 5 skips container modules in ``post_init``, so zero-init
    keyed on a block class would silently not happen (huggingface/transformers#42418).
    """


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------


def sinusoidal_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT/transformer sinusoidal features of a float (B,) tensor -> (B, dim), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Noise level c_noise = ln(sigma)/4 -> (B, D): sinusoidal features, then Linear-SiLU-Linear (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, scale: float = 1000.0):
        super().__init__()
        # c_noise spans about [-1.55, 1.10] for sigma in [0.002, 80]; x1000 (as CaloDiT-2 does) maps it onto
        # the range of DiT's integer timesteps, which the 10000-period sinusoids resolve well.
        self.scale = scale
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        freq = sinusoidal_features(c_noise * self.scale, self.frequency_embedding_size)  # (B, F) float32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class ConditionEmbedder(nn.Module):
    """A continuous condition (B, n_in) -> (B, D) with its own 3-layer MLP (CaloDiT-2 style)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.mlp(cond.to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------
# Transformer pieces
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention: fused ``qkv`` Linear, SDPA kernel, ``proj`` Linear."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, D/H)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class Mlp(nn.Module):
    """Token-wise feed-forward: ``fc1`` -> GELU(tanh) -> ``fc2`` (DiT/ViT)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(GradientCheckpointingLayer):
    """Transformer block with adaLN-Zero: shift/scale/gate for attention and for the MLP from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = ZeroLinear(hidden_size, 6 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear from each token to its ``out_features`` values (a patch of cells)."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = ZeroLinear(hidden_size, 2 * hidden_size)
        self.linear = ZeroLinear(hidden_size, out_features)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, out_features)


class ShowerConditions:
    """Mixin for networks conditioned like CaloDiT-2: one MLP per continuous condition plus a geometry lookup.

    ``build_condition_embedders`` creates ``energy_embed`` (log E/GeV), ``angle_embed`` (sin, cos phi),
    ``theta_embed`` (rad) and ``geometry_embed`` (one row per one-hot slot; peft can train single rows).
    """

    def build_condition_embedders(self, hidden_size: int, n_slots: int) -> None:
        self.energy_embed = ConditionEmbedder(1, hidden_size)
        self.angle_embed = ConditionEmbedder(2, hidden_size)  # continuous across phi = +-pi
        self.theta_embed = ConditionEmbedder(1, hidden_size)
        self.geometry_embed = nn.Embedding(n_slots, hidden_size)  # a one-hot times a matrix is this lookup

    def embed_conditions(self, energy, phi, theta, geometry, drop_cond=None, cond_dropout: float = 0.0, extra=None):
        """Sum of the condition embeddings (B, D), plus ``extra`` (B, D) if given (another condition's
        embedding); rows with drop_cond True are zeroed (unconditional). In training mode rows are dropped at
        random with probability ``cond_dropout`` unless a mask is given."""
        energy, phi, theta = energy.float(), phi.float(), theta.float()
        cond = (
            self.energy_embed(torch.log(energy)[:, None])
            + self.angle_embed(torch.stack([torch.sin(phi), torch.cos(phi)], dim=-1))
            + self.theta_embed(theta[:, None])
            + self.geometry_embed(geometry)
        )
        if extra is not None:
            cond = cond + extra
        if drop_cond is None and self.training and cond_dropout > 0:
            drop_cond = torch.rand(cond.shape[0], device=cond.device) < cond_dropout
        if drop_cond is not None:
            cond = cond * (~drop_cond).to(cond.dtype)[:, None]
        return cond


# ----------------------------------------------------------------------------------------------
# Positional embedding
# ----------------------------------------------------------------------------------------------


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Positions (N,) -> (N, dim): [sin(pos w_i), cos(pos w_i)] with DiT's geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    args = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _sincos_periodic(n: int, dim: int) -> torch.Tensor:
    """n positions on a circle -> (n, dim): [sin(2 pi k j/n), cos(2 pi k j/n)] with integer harmonics k.

    Integer harmonics make the code exactly periodic: position n is position 0, and moving by one
    position is the same rotation of each (sin, cos) pair everywhere, the seam included. Only k <= n/2
    are distinct on n points, so the harmonics cycle through 1..max(1, n//2).
    """
    k = 1 + torch.arange(dim // 2, dtype=torch.float64) % max(1, n // 2)
    args = 2 * math.pi * torch.arange(n, dtype=torch.float64)[:, None] * k[None] / n
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int, periodic: tuple[bool, bool, bool]) -> torch.Tensor:
    """Frozen 3D sin-cos positions for a (R, P, Z) token grid -> (R*P*Z, dim), row-major in (r, phi, z).

    ``dim`` is split in three equal chunks, one per axis, in axis order; a periodic axis uses integer
    harmonics of its period (``_sincos_periodic``), the others DiT's geometric frequencies.
    """
    if dim % 6:
        raise ValueError(f"hidden size {dim} must be divisible by 6 for a 3D sin-cos position embedding")
    chunks = []
    for axis, (n, circ) in enumerate(zip(grid, periodic)):
        emb = _sincos_periodic(n, dim // 3) if circ else _sincos_1d(torch.arange(n), dim // 3)  # (n, dim/3)
        shape = [1, 1, 1, dim // 3]
        shape[axis] = n
        chunks.append(emb.reshape(shape).expand(*grid, dim // 3))
    return torch.cat(chunks, dim=-1).reshape(-1, dim).float()  # (T, D)
