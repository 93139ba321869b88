"""The networks and distribution distances of the BIB-AE family (``calofm.models.bibae``).

Plain sizes, no config objects. Every 3D block is conv -> LayerNorm over the block's spatial shape -> LeakyReLU,
as the ILD BIB-AE does (its LayerNorm([D, H, W]) normalises each channel of a shower over the volume). Convolutions
with a 3x3x3 kernel pad phi circularly (the cell after the last phi bin is bin 0) and r, z with zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ZeroConv3d(nn.Conv3d):
    """A Conv3d that the model's ``_init_weights`` sets to zero (the post-processor's last layer: it starts as
    the identity). A leaf type, so transformers' per-module initialisation sees it."""


def conv_out(shape, kernel: int, stride: int) -> tuple[int, ...]:
    """Spatial shape after a ``MeshConv`` (padding kernel // 2 on every axis)."""
    pad = kernel // 2
    return tuple((n + 2 * pad - kernel) // stride + 1 for n in shape)


class MeshConv(nn.Module):
    """Conv3d over (B, C, R, P, Z) with circular padding along phi and zero padding along r and z."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, zero: bool = False):
        super().__init__()
        self.pad = kernel // 2
        self.conv = (ZeroConv3d if zero else nn.Conv3d)(cin, cout, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad
        if p:
            x = torch.cat([x[:, :, :, -p:], x, x[:, :, :, :p]], dim=3)  # phi wraps around
            x = F.pad(x, (p, p, 0, 0, p, p))  # z, (phi done), r: no detector beyond the mesh
        return self.conv(x)


class ConvBlock(nn.Module):
    """MeshConv -> LayerNorm over the output's spatial shape -> LeakyReLU."""

    def __init__(self, cin: int, cout: int, shape_in, kernel: int = 3, stride: int = 1, slope: float = 0.2):
        super().__init__()
        self.out_shape = conv_out(shape_in, kernel, stride)
        self.conv = MeshConv(cin, cout, kernel, stride)
        self.norm = nn.LayerNorm(list(self.out_shape))
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), self.slope)


def mlp(sizes, slope: float = 0.2) -> nn.Sequential:
    """Linear layers through ``sizes`` with LeakyReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """(B, R, P, Z) shower + (B, C) conditions -> mu, logvar (B, latent). Stride-2 conv blocks (the last one
    stride 1, as the paper's fourth), flatten, concatenate the conditions, two FC layers, two linear heads."""

    def __init__(self, mesh, channels, hidden: int, n_cond: int, latent: int):
        super().__init__()
        blocks, cin, shape = [], 1, tuple(mesh)
        for i, c in enumerate(channels):
            blocks.append(ConvBlock(cin, c, shape, stride=2 if i < len(channels) - 1 else 1))
            cin, shape = c, blocks[-1].out_shape
        self.blocks = nn.ModuleList(blocks)
        self.fc = mlp([cin * math.prod(shape) + n_cond, hidden, hidden])
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.unsqueeze(1)  # (B, 1, R, P, Z)
        for block in self.blocks:
            h = block(h)
        h = F.leaky_relu(self.fc(torch.cat([h.flatten(1), c.to(h.dtype)], dim=1)), 0.2)  # (B, hidden)
        return self.mu(h), self.logvar(h).clamp(-12.0, 8.0)  # clamp: exp(logvar) stays finite in bf16


class Decoder(nn.Module):
    """(B, latent + C) -> (B, R, P, Z): FC layers to a coarse grid ceil(mesh / 2^n), n ConvTranspose3d blocks
    doubling it, crop to the mesh, 3x3x3 refinement blocks, a last conv to one channel (linear output)."""

    def __init__(self, mesh, z_in: int, hidden: int, channels, refine):
        super().__init__()
        self.mesh = tuple(mesh)
        n_up = len(channels)
        self.grid = tuple(-(-m // 2**n_up) for m in mesh)
        self.c0 = channels[0]
        self.fc = mlp([z_in, hidden, hidden, self.c0 * math.prod(self.grid)])
        ups, norms, cin, shape = [], [], self.c0, self.grid
        for c in channels:
            ups.append(nn.ConvTranspose3d(cin, c, kernel_size=4, stride=2, padding=1))
            shape = tuple(2 * s for s in shape)
            norms.append(nn.LayerNorm(list(shape)))
            cin = c
        self.ups, self.up_norms = nn.ModuleList(ups), nn.ModuleList(norms)
        blocks = []
        for c in refine:
            blocks.append(ConvBlock(cin, c, self.mesh))
            cin = c
        self.refine = nn.ModuleList(blocks)
        self.out = MeshConv(cin, 1)

    def forward(self, zc: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.fc(zc), 0.2).view(-1, self.c0, *self.grid)  # (B, c0, r, p, z)
        for up, norm in zip(self.ups, self.up_norms):
            h = F.leaky_relu(norm(up(h)), 0.2)
        r, p, z = self.mesh
        h = h[:, :, :r, :p, :z]  # crop the doubled grid to the mesh
        for block in self.refine:
            h = block(h)
        return self.out(h).squeeze(1)  # (B, R, P, Z)


class PairCritic(nn.Module):
    """The BIB-AE image critic: scores a pair (input shower a, candidate b) given the conditions; real pairs are
    (x, x), fake pairs (x, reconstruction). Conv blocks see b and b - a (the paper's critic has a branch on b
    and one on b - a), then FC layers with the conditions concatenated, as its energy input."""

    def __init__(self, mesh, channels, hidden: int, n_cond: int):
        super().__init__()
        blocks, cin, shape = [], 2, tuple(mesh)
        for c in channels:
            blocks.append(ConvBlock(cin, c, shape, stride=2))
            cin, shape = c, blocks[-1].out_shape
        self.blocks = nn.ModuleList(blocks)
        self.fc = mlp([cin * math.prod(shape) + n_cond, hidden, hidden, 1])

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = torch.stack([b, b - a], dim=1)  # (B, 2, R, P, Z)
        for block in self.blocks:
            h = block(h)
        return self.fc(torch.cat([h.flatten(1), c.to(h.dtype)], dim=1)).squeeze(1)  # (B,)


class LatentCritic(nn.Module):
    """Scores single latent values (the paper's 1 -> 50 -> 100 -> 50 -> 1 MLP applied to every latent
    coordinate): (B, L) -> (B, L)."""

    def __init__(self, hidden):
        super().__init__()
        self.net = mlp([1, *hidden, 1], slope=0.01)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.unsqueeze(-1)).squeeze(-1)


class PostProcessor(nn.Module):
    """1x1x1 convolutions with LayerNorm, conditioned through an MLP on (total energy of the decoded shower,
    conditions) broadcast to every cell after the first layer; residual (y + delta) with the last layer zero,
    so it starts as the identity (the paper first trains it towards the identity with an MSE)."""

    def __init__(self, mesh, channels: int, layers: int, n_cond: int):
        super().__init__()
        shape, half = list(mesh), channels // 2
        self.cond = nn.Sequential(mlp([n_cond + 1, half, half, half], slope=0.01), nn.LeakyReLU(0.01))
        self.first = nn.Conv3d(1, channels, 1)
        self.first_norm = nn.LayerNorm(shape)
        convs = [nn.Conv3d(channels + half, channels, 1)]  # merges the condition channels
        convs += [nn.Conv3d(channels, channels, 1) for _ in range(layers - 3)]
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(nn.LayerNorm(shape) for _ in convs)
        self.last = ZeroConv3d(channels, 1, 1)

    def forward(self, y: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """y (B, R, P, Z) decoder output, feats (B, 1 + C): [total-energy feature, conditions]."""
        e = self.cond(feats.to(y.dtype))[:, :, None, None, None].expand(-1, -1, *y.shape[1:])  # (B, C/2, R, P, Z)
        h = F.leaky_relu(self.first_norm(self.first(y.unsqueeze(1))), 0.01)
        h = torch.cat([h, e.to(h.dtype)], dim=1)
        for conv, norm in zip(self.convs, self.norms):
            h = F.leaky_relu(norm(conv(h)), 0.01)
        return y + self.last(h).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------


def mmd_rows(a: torch.Tensor, b: torch.Tensor, alphas) -> torch.Tensor:
    """Per-row parts (B,) of the biased MMD^2 between samples a (B, D) and b (B, D) with Gaussian kernels
    exp(-alpha |u - v|^2) summed over ``alphas``: their mean over rows is the batch MMD^2
    (mean K_aa + mean K_bb - 2 mean K_ab)."""
    a, b = a.float(), b.float()
    d_aa, d_bb, d_ab = torch.cdist(a, a).square(), torch.cdist(b, b).square(), torch.cdist(a, b).square()
    out = torch.zeros(a.shape[0], device=a.device)
    for alpha in alphas:
        k_aa, k_bb, k_ab = (-alpha * d_aa).exp(), (-alpha * d_bb).exp(), (-alpha * d_ab).exp()
        out = out + k_aa.mean(1) + k_bb.mean(1) - k_ab.mean(1) - k_ab.mean(0)
    return out


def sorted_kernel_mmd(a: torch.Tensor, b: torch.Tensor, kernel: int, stride: int, cutoff: int,
                      alpha: float) -> torch.Tensor:
    """The paper's sorted-kernel MMD on cell values, per shower (B,): sort each shower's cells (descending),
    cut both sorted lists into windows of ``kernel`` values starting every ``stride`` below ``cutoff``, and
    average over windows the MMD^2 between the two windows' sets of values (Gaussian kernel exp(-alpha d^2))."""
    a = a.float().flatten(1).sort(dim=1, descending=True).values
    b = b.float().flatten(1).sort(dim=1, descending=True).values
    k = min(kernel, a.shape[1])
    n_win = len(range(0, max(1, min(cutoff, a.shape[1] - k + 1)), stride))
    wa, wb = a.unfold(1, k, stride)[:, :n_win], b.unfold(1, k, stride)[:, :n_win]  # (B, W, k)

    def gram(u, v):
        return torch.exp(-alpha * (u[..., :, None] - v[..., None, :]).square()).mean(dim=(-2, -1))  # (B, W)

    return (gram(wa, wa) + gram(wb, wb) - 2 * gram(wa, wb)).mean(dim=1)
