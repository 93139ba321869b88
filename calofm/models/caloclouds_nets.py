"""CaloClouds networks and the mesh <-> point-cloud conversion (used by ``calofm.models.caloclouds``).

- ``PointWiseNet``: CaloClouds II's per-point network (``PointwiseNet_kDiffusion``): ConcatSquashLinear layers with
  LeakyReLU, each gated and shifted by the context [time embedding, shower conditions]; no point sees another.
- ``ShowerFlow``: the conditional flow over the shower summary (per-layer hit counts, per-layer energies, centre
  of gravity), a zuko neural spline flow with coupling transforms (CaloClouds II: a Pyro coupling/spline flow).
- ``mesh_to_points`` / ``points_to_mesh``: one point per hit cell at (x, y) = r (cos phi, sin phi) in mesh units
  (ring width 1, ring i spans [i, i + 1)), layer index z and the cell's energy; back by summing point energies
  per (ring, phi bin, layer). ``encode_points`` / ``summary`` give the networks' O(1) coordinates, ``assemble``
  turns generated points into a mesh the way CaloClouds II calibrates them (layers by sorted z, energies per layer).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import zuko
from torch import nn

LOG_FLOOR = 1e-6  # energy fractions of E_inc in the log codes are relative to this (the preprocessing's eps)
E_SCALE, E_SHIFT = 4.0, 1.5  # log code of an energy fraction f: ln(f / LOG_FLOOR) / 4 - 1.5, about [-1.3, 1.5]
EMPTY_CUT = 2.0  # a decoded layer energy below 2 LOG_FLOOR is an empty layer (see ``summary``)


def energy_code(f: torch.Tensor) -> torch.Tensor:
    return torch.log(f / LOG_FLOOR) / E_SCALE - E_SHIFT


def energy_decode(code: torch.Tensor) -> torch.Tensor:
    return torch.exp(E_SCALE * (code + E_SHIFT)) * LOG_FLOOR


def normal_to_uniform(n: torch.Tensor, margin: float) -> torch.Tensor:
    """N(0, 1) -> U(0, 1) (the normal CDF), clamped to [margin, 1 - margin]: the step noise's uniform draws."""
    return (0.5 * (1 + torch.erf(n / math.sqrt(2)))).clamp(margin, 1 - margin)


# ----------------------------------------------------------------------------------------------
# Mesh <-> points
# ----------------------------------------------------------------------------------------------


def mesh_to_points(frac: torch.Tensor, max_points: int, offsets: torch.Tensor | None = None):
    """Cells (B, R, P, Z) (energy fractions of E_inc, 0 = empty) -> one point per hit cell, the most energetic
    ``max_points`` of a shower first: xy (B, M, 2) in mesh units, layer (B, M) long, energy (B, M), mask (B, M)
    bool (True for the real points, which come first). ``offsets`` (B, 2) in (0, 1): where in its cell every
    point of a shower sits along r and phi (in cell widths); None: the cell centre (0.5, 0.5)."""
    b, n_r, n_phi, n_z = frac.shape
    flat = frac.flatten(1)
    energy, idx = flat.topk(min(max_points, flat.shape[1]), dim=1)  # descending: the padding comes last
    mask = energy > 0
    ring, phi_bin, layer = idx // (n_phi * n_z), (idx // n_z) % n_phi, idx % n_z
    off = frac.new_full((b, 2), 0.5) if offsets is None else offsets.to(frac)
    r = ring.to(frac.dtype) + off[:, :1]
    phi = (phi_bin.to(frac.dtype) + off[:, 1:]) * (2 * math.pi / n_phi)
    xy = torch.stack([r * phi.cos(), r * phi.sin()], dim=-1)
    zero = torch.zeros_like(energy)
    return xy * mask[..., None], torch.where(mask, layer, 0), torch.where(mask, energy, zero), mask


def points_to_mesh(xy: torch.Tensor, layer: torch.Tensor, energy: torch.Tensor, mask: torch.Tensor,
                   mesh_shape) -> torch.Tensor:
    """Points -> (B, R, P, Z): energies summed per (ring floor(r), phi bin, layer); points beyond the last ring go
    to the last ring (the mesh holds the whole shower); masked points add nothing."""
    n_r, n_phi, n_z = mesh_shape
    ring = torch.linalg.vector_norm(xy, dim=-1).floor().long().clamp(0, n_r - 1)
    phi = torch.remainder(torch.atan2(xy[..., 1], xy[..., 0]), 2 * math.pi)
    phi_bin = torch.remainder((phi * (n_phi / (2 * math.pi))).floor().long(), n_phi)
    flat = (ring * n_phi + phi_bin) * n_z + layer.clamp(0, n_z - 1)
    out = energy.new_zeros(energy.shape[0], n_r * n_phi * n_z)
    out.scatter_add_(1, flat, torch.where(mask, energy, torch.zeros_like(energy)))
    return out.reshape(-1, n_r, n_phi, n_z)


def encode_points(xy, layer, energy, mask, mesh_shape) -> torch.Tensor:
    """The point network's coordinates (B, M, 4), each about [-1, 1]: x / R, y / R, the layer centre mapped to
    (-1, 1) and the log code of the energy; padding points are 0."""
    n_r, _, n_z = mesh_shape
    z = (layer.to(xy.dtype) + 0.5) / n_z * 2 - 1
    e = energy_code(energy.clamp_min(LOG_FLOOR))
    feats = torch.cat([xy / n_r, z[..., None], e[..., None]], dim=-1)
    return feats * mask[..., None]


def summary(frac: torch.Tensor, counts: torch.Tensor, u_count: torch.Tensor, u_empty: torch.Tensor) -> torch.Tensor:
    """The ShowerFlow's vector (B, 2Z + 2): per-layer hit counts, per-layer energies and the transverse centre of
    gravity, each coordinate about [-2, 2].

    counts n (B, Z): 4 log1p(n + u) / log1p(R P) - 2, dequantised by u (B, Z) uniform, so floor(expm1(.)) is n;
    energies E_z / E_inc: the log code of E_z + LOG_FLOOR (1 + u') with u' (B, Z) uniform, so an empty layer is a
    continuous band below 2 LOG_FLOOR and any hit layer (cells >= the noise cut >= LOG_FLOOR) lies above it;
    centre of gravity: energy-weighted (x, y) of the cell centres in mesh units (0 for an empty shower)."""
    _, n_r, n_phi, _ = frac.shape
    h = 4 * torch.log1p(counts.to(frac.dtype) + u_count) / math.log1p(n_r * n_phi) - 2
    g = energy_code(frac.sum(dim=(1, 2)) + LOG_FLOOR * (1 + u_empty))
    r = torch.arange(n_r, device=frac.device, dtype=frac.dtype) + 0.5
    phi = (torch.arange(n_phi, device=frac.device, dtype=frac.dtype) + 0.5) * (2 * math.pi / n_phi)
    per_cell = frac.sum(dim=3)  # (B, R, P)
    total = per_cell.sum(dim=(1, 2))
    cx = (per_cell * (r[:, None] * phi.cos()[None])).sum(dim=(1, 2))
    cy = (per_cell * (r[:, None] * phi.sin()[None])).sum(dim=(1, 2))
    cog = torch.stack([cx, cy], dim=1) / total.clamp_min(torch.finfo(frac.dtype).tiny)[:, None]
    return torch.cat([h, g, cog], dim=1)


def decode_summary(v: torch.Tensor, mesh_shape, max_points: int):
    """ShowerFlow vector (B, 2Z + 2) -> per-layer counts (B, Z) long with at most ``max_points`` in all (scaled
    down proportionally when above), layer energies (B, Z) as fractions of E_inc, centre of gravity (B, 2)."""
    n_r, n_phi, n_z = mesh_shape
    cells = n_r * n_phi
    v = v.float()
    counts = torch.expm1((v[:, :n_z].clamp(-2, 2) + 2) / 4 * math.log1p(cells)).floor().clamp(0, cells)
    total = counts.sum(dim=1, keepdim=True)
    counts = torch.where(total > max_points, (counts * (max_points / total.clamp_min(1))).floor(), counts).long()
    raw = energy_decode(v[:, n_z:2 * n_z].clamp(max=math.log(2 / LOG_FLOOR) / E_SCALE - E_SHIFT))  # at most 2 E_inc
    energies = torch.where(raw >= EMPTY_CUT * LOG_FLOOR, raw - 1.5 * LOG_FLOOR, torch.zeros_like(raw))
    return counts, energies, v[:, 2 * n_z:2 * n_z + 2]


def assemble(points: torch.Tensor, counts: torch.Tensor, energies: torch.Tensor, cog: torch.Tensor | None,
             mesh_shape) -> torch.Tensor:
    """Generated point coordinates (B, M, 4) and the flow's shower summary -> cells (B, R, P, Z), fractions of E_inc
    (CaloClouds II's calibration, ``gen_showers_batch``): the first sum(counts) points of a shower are sorted on
    their z and the per-layer counts are handed out in that order; each layer's point energies are rescaled to the
    layer's energy; with ``cog`` the points are shifted so their energy-weighted (x, y) is the flow's; binned."""
    b, m, _ = points.shape
    n_r, _, n_z = mesh_shape
    points = points.float()
    arange = torch.arange(m, device=points.device)
    valid = arange[None] < counts.sum(dim=1, keepdim=True)
    key = torch.where(valid, points[..., 2], torch.full_like(points[..., 2], math.inf))
    order = key.argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, arange.expand(b, m).contiguous())  # rank of each point in z
    layer = torch.searchsorted(counts.cumsum(dim=1).contiguous(), rank, right=True).clamp_max(n_z - 1)
    weight = energy_decode(points[..., 3].clamp(-6.0, 2.0)) * valid  # relative energies within a layer, > 0
    sums = weight.new_zeros(b, n_z).scatter_add_(1, layer, weight)
    energy = weight * energies.gather(1, layer) / sums.gather(1, layer).clamp_min(torch.finfo(weight.dtype).tiny)
    xy = points[..., :2] * n_r
    if cog is not None:
        total = energy.sum(dim=1, keepdim=True)
        own = (energy[..., None] * xy).sum(dim=1) / total.clamp_min(torch.finfo(energy.dtype).tiny)
        xy = xy + torch.where(total > 0, cog.float() - own, torch.zeros_like(own))[:, None]
    return points_to_mesh(xy, layer, energy, valid, mesh_shape)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


class FourierFeatures(nn.Module):
    """Gaussian Fourier features of c_noise (k-diffusion's ``FourierFeatures``, std = ``scale``): [cos, sin] of
    2 pi c w. The frequencies w are fixed (never trained) and the same for every model of a config: drawn from a
    generator seeded 0 (``fixed_weight``), a persistent buffer so a checkpoint carries them."""

    def __init__(self, out_features: int, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("weight", self.fixed_weight(out_features // 2, self.scale))

    @staticmethod
    def fixed_weight(n: int, scale: float) -> torch.Tensor:
        return torch.randn(n, generator=torch.Generator().manual_seed(0)) * scale

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * c_noise.float()[:, None] * self.weight.float()[None]
        return torch.cat([f.cos(), f.sin()], dim=-1)


class ConcatSquashLinear(nn.Module):
    """Linear(x) * sigmoid(W_g ctx + b_g) + W_b ctx (FFJORD's ConcatSquash, as CaloClouds): the context gates and
    shifts every output unit; x (B, M, in), ctx (B, 1, C) -> (B, M, out). Computed as one batched matmul with the
    gate folded into a per-shower weight, x (W^T g) + (b g + W_b ctx): the same function with less memory traffic
    over the points (about 20% faster on a CPU)."""

    def __init__(self, dim_in: int, dim_out: int, dim_ctx: int):
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(dim_ctx, dim_out)
        self.hyper_bias = nn.Linear(dim_ctx, dim_out, bias=False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.hyper_gate(ctx))  # (B, 1, out)
        bias = self.layer.bias * gate + self.hyper_bias(ctx)
        return torch.baddbmm(bias.to(x.dtype), x, (self.layer.weight.t()[None] * gate).to(x.dtype))


class PointWiseNet(nn.Module):
    """The EDM network F(x, c_noise, cond) of CaloClouds II on points (B, M, 4): time embedding = LeakyReLU(Linear(
    Fourier features of c_noise)), context = [time embedding, cond], then ConcatSquashLinear layers through
    ``hidden`` widths with LeakyReLU between them (none after the last); no residual (CaloClouds II)."""

    def __init__(self, point_dim: int, cond_dim: int, hidden, time_features: int, fourier_scale: float):
        super().__init__()
        self.time_embed = FourierFeatures(time_features, fourier_scale)
        self.time_linear = nn.Linear(time_features, time_features)
        widths = (point_dim, *hidden, point_dim)
        ctx = time_features + cond_dim
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b, ctx) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.time_linear.weight.dtype
        t = F.leaky_relu(self.time_linear(self.time_embed(c_noise).to(dtype)))
        ctx = torch.cat([t, cond.to(t.dtype)], dim=-1)[:, None]  # (B, 1, C)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx)
            if i < len(self.layers) - 1:
                h = F.leaky_relu(h)
        return h


class ShowerFlow(nn.Module):
    """p(summary | conditions): a zuko NSF (monotonic rational-quadratic splines on [-5, 5], linear outside) of
    ``transforms`` coupling transforms (``passes=2``: half the features condition the other half, the halves
    alternating), each hyper-network an MLP of ``hidden`` widths fed with the context."""

    def __init__(self, features: int, context: int, transforms: int, hidden, bins: int):
        super().__init__()
        self.transforms = transforms
        # zuko derives its masks with torch.unique, which has no meta kernel: transformers' from_pretrained builds
        # the model on the meta device, so the flow is built on the CPU then (and its weights loaded as usual)
        meta = torch.get_default_device().type == "meta"
        with torch.device("cpu") if meta else contextlib.nullcontext():
            self.flow = zuko.flows.NSF(features, context, bins=bins, transforms=transforms, passes=2,
                                       hidden_features=tuple(hidden))

    @property
    def passes(self) -> int:
        """Hyper-network passes of one sampling (the inverse: 2 per coupling transform)."""
        return 2 * self.transforms

    def log_prob(self, v: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.flow(context.float()).log_prob(v.float())

    def sample(self, context: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x = T^-1(z) for base draws z (B, D) ~ N(0, I) (given, so a torch.Generator drives the sampling)."""
        return self.flow(context.float()).transform.inv(z.float())
