"""Shared transformer layers: adaLN modulation, embedders, attention, MLP, 3D sin-cos positions.

Pure torch + einops, no config objects: every layer takes plain sizes, so other model families
can reuse them. Module names (``qkv``, ``proj``, ``fc1``, ``fc2``) are public API for LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


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
