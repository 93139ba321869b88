"""The 3D U-Net of CaloDiffusion (Amram & Pedro, arXiv:2308.03876; ``CondUnet`` of the paper's code).

Works on (B, C, Z, A, R) tensors, the paper's axis order (layer z, angle alpha = phi, radius r);
``calofm.models.calodiffusion`` rearranges calofm's (B, R, P, Z) mesh into it. Pieces, as the paper:

- cylindrical convolutions: circular padding along alpha (the angle wraps around), zero padding along z and r;
- ResNet blocks: two (conv 3x3x3 -> GroupNorm -> SiLU) blocks, the conditioning vector added (SiLU -> Linear)
  after the first, a 1x1x1 convolution on the skip when the width changes;
- a residual LinearAttention (with a GroupNorm pre-norm) after each level and in the middle;
- downsampling by a (3, 4, 4) convolution with stride (2 if compress_z else 1, 2, 2); upsampling by the
  transposed convolution with ``output_padding`` (and a z kernel of 3 or 4) chosen so odd sizes come back exactly;
- conditions: sigma = sqrt(1 - abar_t) through an MLP (1 -> cond/4 -> cond/2 -> cond/2, GELU) and the
  condition features through a like MLP, concatenated to a ``cond_dim`` vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def circular_alpha_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad (B, C, Z, A, R) by ``pad`` cells on each side of the alpha axis with the cells from its other end."""
    return F.pad(x, (0, 0, pad, pad, 0, 0), mode="circular") if pad else x


class CylindricalConv(nn.Module):
    """Conv3d over (z, alpha, r) with circular padding along alpha and zero padding along z and r."""

    def __init__(self, c_in: int, c_out: int, kernel_size=3, stride=1, padding=1, bias: bool = True):
        super().__init__()
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.alpha_pad = pad[1]
        self.conv = nn.Conv3d(c_in, c_out, kernel_size, stride=stride, padding=(pad[0], 0, pad[2]), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(circular_alpha_pad(x, self.alpha_pad))


class CylindricalConvTranspose(nn.Module):
    """ConvTranspose3d with kernel (kz, 4, 4), padding 1, circular along alpha: the input is padded circularly by
    one cell along alpha and the transposed convolution crops kernel - 1 there, which is the transposed
    convolution of a periodic signal (the paper's ``CylindricalConvTrans``)."""

    def __init__(self, dim: int, kernel_z: int, stride_z: int, output_padding: tuple[int, int, int]):
        super().__init__()
        self.conv = nn.ConvTranspose3d(dim, dim, (kernel_z, 4, 4), stride=(stride_z, 2, 2), padding=(1, 3, 1),
                                       output_padding=output_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(circular_alpha_pad(x, 1))


def down_size(size: tuple[int, int, int], compress_z: bool) -> tuple[int, int, int]:
    """(Z, A, R) after one downsampling: z halved (rounded up) with compress_z, alpha and r halved (rounded down)."""
    z, a, r = size
    return (-(-z // 2) if compress_z else z, a // 2, r // 2)


def level_sizes(shape: tuple[int, int, int], levels: int, compress_z: bool) -> list[tuple[int, int, int]]:
    """(Z, A, R) at each of the U-Net's levels (downsampling between consecutive levels)."""
    sizes = [tuple(shape)]
    for _ in range(levels - 1):
        if min(sizes[-1][1:]) < 2:
            raise ValueError(f"the mesh cannot be downsampled {levels - 1} times: (z, alpha, r) = {sizes[-1]} "
                             f"at level {len(sizes)} (fewer levels, i.e. a shorter layer_sizes)")
        sizes.append(down_size(sizes[-1], compress_z))
    return sizes


def upsample(dim: int, target: tuple[int, int, int], compress_z: bool) -> CylindricalConvTranspose:
    """The transposed convolution back to ``target`` (Z, A, R) from ``down_size(target)``: with compress_z the z
    kernel is 4 for an even target and 3 for an odd one; an odd alpha or r gets output_padding 1."""
    kernel_z = (4 if target[0] % 2 == 0 else 3) if compress_z else 3
    return CylindricalConvTranspose(dim, kernel_z, 2 if compress_z else 1, (0, target[1] % 2, target[2] % 2))


class ConvBlock(nn.Module):
    """Cylindrical conv 3x3x3 -> GroupNorm -> SiLU."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.proj = CylindricalConv(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.proj(x)))


class ResnetBlock(nn.Module):
    """Two ConvBlocks, the conditioning (B, cond_dim) added per channel after the first; residual skip."""

    def __init__(self, c_in: int, c_out: int, groups: int, cond_dim: int | None = None):
        super().__init__()
        self.cond = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, c_out)) if cond_dim else None
        self.block1 = ConvBlock(c_in, c_out, groups)
        self.block2 = ConvBlock(c_out, c_out, groups)
        self.res_conv = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.block1(x)
        if self.cond is not None:
            h = h + self.cond(c)[:, :, None, None, None]
        return self.block2(h) + self.res_conv(x)


class LinearAttention(nn.Module):
    """Linear attention over all cells (Shen et al.): softmax of q over features and of k over positions, so the
    cost is linear in the number of cells; 1x1x1 projections, GroupNorm(1) on the output."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv3d(dim, 3 * hidden, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv3d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, a, r = x.shape[2:]
        q, k, v = (rearrange(t, "b (h d) z a r -> b h d (z a r)", h=self.heads) for t in self.to_qkv(x).chunk(3, 1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # (B, H, D, D)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(rearrange(out, "b h e (z a r) -> b (h e) z a r", z=z, a=a, r=r))


class ResidualAttention(nn.Module):
    """x + LinearAttention(GroupNorm(1)(x)) (the paper's Residual(PreNorm(LinearAttention)))."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.attn = LinearAttention(dim, heads, dim_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


def embedding_mlp(n_in: int, n_out: int) -> nn.Sequential:
    """The paper's non-sinusoidal embedding: Linear(n_in, n_out/2) -> GELU -> Linear -> GELU -> Linear(n_out)."""
    return nn.Sequential(nn.Linear(n_in, n_out // 2), nn.GELU(), nn.Linear(n_out // 2, n_out), nn.GELU(),
                         nn.Linear(n_out, n_out))


class CondUNet3D(nn.Module):
    """x (B, in_channels, Z, A, R), sigma (B,), condition features (B, n_features) -> (B, 1, Z, A, R).

    ``layer_sizes`` [w0, w1, ..., wn]: ``init_conv`` to w0, then n levels; level i goes from w_i to w_{i+1}
    channels and all but the last are followed by a downsampling. The up path mirrors it with the skips
    concatenated, and a final unconditioned ResNet block and 1x1x1 convolution give one channel.
    """

    def __init__(self, in_channels: int, shape: tuple[int, int, int], layer_sizes, cond_dim: int, n_features: int,
                 groups: int, attn_heads: int, attn_dim_head: int, block_attention: bool, mid_attention: bool,
                 compress_z: bool):
        super().__init__()
        widths = list(layer_sizes)
        pairs = list(zip(widths[:-1], widths[1:]))
        sizes = level_sizes(shape, len(pairs), compress_z)

        def attention(dim, on):
            return ResidualAttention(dim, attn_heads, attn_dim_head) if on else nn.Identity()

        self.time_mlp = embedding_mlp(1, cond_dim // 2)
        self.cond_mlp = embedding_mlp(n_features, cond_dim // 2)
        self.init_conv = CylindricalConv(in_channels, widths[0], 3, padding=1)
        self.downs = nn.ModuleList(
            nn.ModuleList([
                ResnetBlock(w_in, w_out, groups, cond_dim),
                ResnetBlock(w_out, w_out, groups, cond_dim),
                attention(w_out, block_attention),
                CylindricalConv(w_out, w_out, (3, 4, 4), stride=(2 if compress_z else 1, 2, 2), padding=1)
                if i < len(pairs) - 1 else nn.Identity(),
            ])
            for i, (w_in, w_out) in enumerate(pairs)
        )
        mid = widths[-1]
        self.mid_block1 = ResnetBlock(mid, mid, groups, cond_dim)
        self.mid_attn = attention(mid, mid_attention)
        self.mid_block2 = ResnetBlock(mid, mid, groups, cond_dim)
        self.ups = nn.ModuleList(
            nn.ModuleList([
                ResnetBlock(2 * w_out, w_in, groups, cond_dim),
                ResnetBlock(w_in, w_in, groups, cond_dim),
                attention(w_in, block_attention),
                upsample(w_in, sizes[i - 1], compress_z) if i > 0 else nn.Identity(),
            ])
            for i, (w_in, w_out) in reversed(list(enumerate(pairs)))
        )
        self.final_block = ResnetBlock(widths[0], widths[0], groups)
        self.final_conv = nn.Conv3d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        c = torch.cat([self.time_mlp(sigma[:, None]), self.cond_mlp(features)], dim=-1)  # (B, cond_dim)
        x = self.init_conv(x)
        skips = []
        for block1, block2, attn, down in self.downs:
            x = attn(block2(block1(x, c), c))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, c)), c)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat([x, skips.pop()], dim=1), c)
            x = up(attn(block2(x, c)))
        return self.final_conv(self.final_block(x))
