"""CaloFlow's pieces: the unit-space map of the layer energies, the logit map, and one autoregressive spline
flow that runs as a MAF (the teacher) or as an IAF (the student).

The flows are stacks of zuko's ``MaskedAutoregressiveTransform`` with monotonic rational-quadratic splines
(MADE-RQS, as the paper's nflows ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``). One stack of
blocks f_1 .. f_K maps data to noise, block k in the feature order ascending (k even) or descending (k odd):

- MAF (teacher): ``encode`` z = f_K(...f_1(x)), one MADE pass per block, with the log-Jacobian (the density);
  ``decode`` x = f_1^-1(...f_K^-1(z)), ``passes`` MADE passes per block (the features one by one when fully
  autoregressive): the slow direction, the teacher's sampler (``invert_block``: zuko's inverse, pruned to what
  each pass needs);
- IAF (student): ``iaf_decode`` runs block k as x_i = RQS^-1(z_i; theta_k(z_<i)), the spline's parameters
  read from the block's input instead of its output (the paper's ``IAFRQS`` swaps the elementwise forward and
  inverse the same way): one MADE pass per block, the student's sampler. Block k of the student imitates f_k^-1,
  so a student with the teacher's shapes can start from the teacher's weights.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from zuko.flows import MaskedAutoregressiveTransform
from zuko.transforms import MonotonicRQSTransform
from zuko.utils import unpack

LOG_2PI = math.log(2 * math.pi)


def to_unit_space(e: torch.Tensor, total_scale: float) -> torch.Tensor:
    """Layer energies (B, Z) (any unit, here fractions of E_inc) -> CaloFlow's unit space (B, Z):
    u_0 = sum_j e_j / total_scale (the paper's E_tot / (k E_inc) in units of E_inc), u_i = e_{i-1} / sum_{j>=i-1} e_j
    for i = 1 .. Z-1 (the share of the remaining energy in layer i-1; 0 where nothing remains). Not clamped."""
    total = e.sum(dim=1, keepdim=True)
    remaining = e.flip(1).cumsum(1).flip(1)  # sum_{j >= i} e_j
    rest = torch.where(remaining[:, :-1] > 0, e[:, :-1] / remaining[:, :-1].clamp_min(torch.finfo(e.dtype).tiny),
                       torch.zeros_like(e[:, :-1]))
    return torch.cat([total / total_scale, rest], dim=1)


def from_unit_space(u: torch.Tensor, total_scale: float) -> torch.Tensor:
    """The inverse of ``to_unit_space`` for u in [0, 1]: E_tot = total_scale u_0, layer i takes the share u_{i+1}
    of what the layers before left, the last layer the rest; (B, Z), non-negative, summing to E_tot."""
    total = total_scale * u[:, :1]
    keep = torch.cumprod(1 - u[:, 1:], dim=1)  # share left after layers 0 .. i
    left = torch.cat([torch.ones_like(total), keep], dim=1)  # share left before layer i
    share = torch.cat([u[:, 1:], torch.ones_like(total)], dim=1) * left
    return total * share


def logit(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """logit(alpha + (1 - 2 alpha) v) of v in [0, 1] (the MAF paper's map, CaloFlow's alpha = 1e-6)."""
    v = alpha + (1 - 2 * alpha) * v.clamp(0.0, 1.0)
    return torch.log(v) - torch.log1p(-v)


def inverse_logit(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """(sigmoid(w) - alpha) / (1 - 2 alpha), clipped to [0, 1]."""
    return ((torch.sigmoid(w) - alpha) / (1 - 2 * alpha)).clamp(0.0, 1.0)


def normal_cdf(n: torch.Tensor) -> torch.Tensor:
    """Phi(n): standard normal draws -> uniform draws in [0, 1] (dequantisation noise from the step's normals)."""
    return 0.5 * (1 + torch.erf(n * (1 / math.sqrt(2))))


def invert_block(block: MaskedAutoregressiveTransform, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``block(c).inv(y)``: the features group by group in the block's order, one MADE pass per group (zuko's
    inverse makes the same ``block.passes`` passes). Each pass evaluates only what the group needs: the input
    layer is updated with the newly set features (the context's part computed once), the hidden layers run in
    full, the output layer and the splines only for the group's features. Same values as zuko's full passes,
    ~10x less arithmetic for the default Flow II (the output layer holds 3 bins - 1 rows per feature)."""
    layers, n = list(block.hyper), y.shape[-1]
    first, last = layers[0], layers[-1]
    w_in = first.weight * first.mask
    w_x, pre = w_in[:, :n], F.linear(c, w_in[:, n:], first.bias)  # pre-activation of the input layer at x = 0
    w_out = (last.weight * last.mask).unflatten(0, (n, block.total))  # (features, parameters, hidden)
    b_out = last.bias.unflatten(0, (n, block.total))
    x = torch.zeros_like(y)
    for group in range(block.passes):
        idx = torch.nonzero(block.order == group).squeeze(1)
        h = pre
        for layer in layers[1:-1]:
            h = layer(h)
        phi = torch.einsum("bh,nph->bnp", h, w_out[idx]) + b_out[idx]  # (B, group size, parameters)
        x_group = block.univariate(*unpack(phi, block.shapes)).inv(y[:, idx])
        x = x.index_copy(1, idx, x_group)
        pre = pre + F.linear(x_group, w_x[:, idx])
    return x


class ARFlow(nn.Module):
    """K MADE-RQS blocks over ``features`` with a ``context`` vector; see the module docstring for the three
    directions. Splines act on [-bound, bound] (identity outside: the paper's linear tails, tail bound 14)."""

    def __init__(self, features: int, context: int, transforms: int, hidden: tuple[int, ...], bins: int,
                 bound: float, passes: int | None):
        super().__init__()
        self.features = features
        # zuko derives the MADE masks with torch.unique, which has no meta kernel: under transformers' meta-device
        # construction (from_pretrained) the blocks are built on the CPU, then loaded from the checkpoint
        device = "cpu" if torch.empty(0).device.type == "meta" else None
        with torch.device(device) if device else contextlib.nullcontext():
            ascending = torch.arange(features)
            self.blocks = nn.ModuleList(
                MaskedAutoregressiveTransform(
                    features, context, passes=passes, order=ascending if k % 2 == 0 else ascending.flip(0),
                    univariate=partial(MonotonicRQSTransform, bound=bound), shapes=[(bins,), (bins,), (bins - 1,)],
                    hidden_features=tuple(hidden))
                for k in range(transforms))

    @property
    def passes(self) -> list[int]:
        """Sequential MADE passes of each block's inverse (``decode``)."""
        return [int(b.passes) for b in self.blocks]

    def encode(self, x: torch.Tensor, c: torch.Tensor, states: bool = False):
        """Data -> noise (the MAF's density direction, one pass per block): (z, log|det J|) and, with ``states``,
        the list [x, f_1(x), ..., z] of the K + 1 states."""
        ladj, seen = x.new_zeros(x.shape[0]), [x]
        for block in self.blocks:
            x, part = block(c).call_and_ladj(x)
            ladj = ladj + part
            seen.append(x)
        return (x, ladj, seen) if states else (x, ladj)

    def log_prob(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """log p(x | c) (B,) under the standard normal base."""
        z, ladj = self.encode(x, c)
        return ladj - 0.5 * (z.square() + LOG_2PI).sum(dim=-1)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Noise -> data by the MAF's inverse: sum(self.passes) sequential MADE passes (``invert_block``)."""
        for block in reversed(self.blocks):
            z = invert_block(block, z, c)
        return z

    def iaf_decode(self, z: torch.Tensor, c: torch.Tensor, states: bool = False):
        """Noise -> data with every block read as an IAF block (one MADE pass each); with ``states`` also the list
        [x, ..., z] of the K + 1 states in ``encode``'s order."""
        seen = [z]
        for block in reversed(self.blocks):
            z = block.meta(c, z).inv(z)
            seen.append(z)
        return (z, seen[::-1]) if states else z
