"""The energy model of the energy-factorised variant: a small DiT over the longitudinal profile.

It is the raw EDM network F for the profile vector of a shower, ``calofm.preprocess.ProfilePreprocessor``'s
model space: token 0 is log(E_tot / E_inc), tokens 1..Z the log shares E_z / E_tot of the Z layers, each
standardised per geometry. Every token carries one scalar; attention over the Z + 1 tokens learns the
correlations between layers (a late shower start moves energy from early to late layers together). The
conditions enter through adaLN-Zero exactly as in CaloDiT. The network is tiny next to the shower
network (48 tokens of width 64 against 108-360 of width 96-384), so it adds little to a training step.
"""

from __future__ import annotations

import torch
from torch import nn

from calofm.models.layers import DiTBlock, FinalLayer, ShowerConditions, TimestepEmbedder


class LayerEnergyNet(ShowerConditions, nn.Module):
    """F(y, c_noise, energy, phi, theta, geometry) -> (B, Z + 1) for profile vectors y (B, Z + 1)."""

    def __init__(self, n_layers: int, hidden_size: int = 64, depth: int = 3, num_heads: int = 4,
                 mlp_ratio: float = 4.0, frequency_embedding_size: int = 128, n_slots: int = 8,
                 cond_dropout: float = 0.0):
        super().__init__()
        self.n_tokens = n_layers + 1
        self.cond_dropout = cond_dropout
        self.value_embed = nn.Linear(1, hidden_size)  # the token's scalar
        self.position_embed = nn.Embedding(self.n_tokens, hidden_size)  # which quantity the token is
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size)
        self.build_condition_embedders(hidden_size, n_slots)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, 1)

    def forward(self, y, c_noise, energy, phi, theta, geometry, drop_cond=None) -> torch.Tensor:
        """y (B, Z + 1) model space, c_noise (B,), energy GeV (B,), phi/theta rad (B,), geometry slots (B,)."""
        dtype = self.value_embed.weight.dtype
        tokens = self.value_embed(y.to(dtype)[..., None]) + self.position_embed.weight  # (B, T, D)
        c = self.t_embedder(c_noise) + self.embed_conditions(energy, phi, theta, geometry, drop_cond,
                                                             self.cond_dropout)
        c = torch.nn.functional.silu(c)  # once here, as CaloDiT: adaLN_modulation stays a plain Linear
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.final_layer(tokens, c)[..., 0]  # (B, T)
