"""Vectorised GFlash-style electromagnetic shower generator on the particle-aligned mesh.

For a batch of showers (torch, any device):

1. Longitudinal: correlated log-normal (T, alpha) per shower; photons first travel an
   exponential conversion depth (mean 9/7 X0). Energy follows Gamma(alpha, beta) in X0.
2. Spots: N = 10.3/a * E^0.959 spots per shower, their depths drawn from GFlash's spot
   profile and weighted so that the energy still follows the shower's own profile.
3. Lateral: each spot takes the core (R_C) or tail (R_T) component of GFlash's two-component
   radial profile at its scaled depth tau, r = R_M R sqrt(u/(1-u)), and a uniform azimuth.
4. Geometry: depth in X0 maps to mm along the particle through the layer stack. The mesh
   follows the particle, so for polar angle theta the detector layers are tilted in the mesh:
   a point (x, z) of the mesh lies at depth d = z sin(theta) + x cos(theta) behind the front
   face. Spots with d < 0 or d > stack depth leak out; the rest deposit in the section at d,
   whose EM sampling fraction turns deposited into visible energy. Spots outside the 9 x 16 x 45
   mesh (r >= 9 dr, z >= 45 dz) leak out of the mesh.
5. Sampling fluctuations per occupied cell: deposited E' ~ Gamma(E/a_eff^2, scale a_eff^2) in
   GeV, so the sum over a shower has sigma/E = a_eff/sqrt(E[GeV]) exactly; an inclined particle
   crosses each layer over 1/sin(theta) more absorber, a_eff = a / sqrt(sin theta). Then the
   constant term (one gain per shower), and the readout threshold on visible energy.

Output: (B, 9, 16, 45) in MeV of visible energy (like LEMURS), or of deposited energy
(sampling-fraction corrected, like CaloChallenge) with ``energy_scale="deposited"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calofm.geometry import MESH_SHAPE, Geometry
from calofm.sim.gflash import (
    Medium,
    draw_longitudinal,
    n_spots,
    radial_parameters,
    spot_profile,
)

N_CELLS = math.prod(MESH_SHAPE)
PHOTON_CONVERSION_X0 = 9.0 / 7.0  # mean photon conversion depth in X0 (Geant4 GFlashHomoShowerParameterisation.cc)
# Above this many spots a shower is simulated cell by cell (binned); below, spot by spot. The binned
# cost is fixed by the 6480 cells, the spot cost grows with E^0.959 (crossover measured, benchmarks/simulate.py).
BINNED_ABOVE_SPOTS = 3000


def standard_gamma(shape: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gamma(shape, 1) samples by Marsaglia and Tsang's squeeze method (ACM TOMS 26 (2000) 363).

    The same distribution as ``torch._standard_gamma``, but built from vectorised normal and
    uniform draws, which on CPU runs about 1.4x faster for the millions of spots per batch.
    Each round accepts more than 95 % of what is left. Shapes below 1 use the boost
    Gamma(a) = Gamma(a + 1) U^(1/a).
    """
    opts = dict(device=shape.device, dtype=shape.dtype)
    boost = shape < 1
    d = torch.where(boost, shape + 1, shape) - 1.0 / 3.0
    c = torch.rsqrt(9 * d)

    def draw(d, c):  # one round: candidates d v and whether each is accepted
        x = torch.randn(len(d), generator=gen, **opts)
        u = torch.rand(len(d), generator=gen, **opts)
        v = (1 + c * x) ** 3
        accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d * (1 - v + torch.log(v.clamp(min=1e-30))))
        return d * v, accept

    out, accept = draw(d, c)
    todo = torch.nonzero(~accept).squeeze(1)
    while len(todo):
        value, accept = draw(d[todo], c[todo])
        out[todo[accept]] = value[accept]
        todo = todo[~accept]
    if bool(boost.any()):
        u = torch.rand(len(shape), generator=gen, **opts)
        out = torch.where(boost, out * u.pow(1 / shape), out)
    return out.clamp_(min=torch.finfo(shape.dtype).tiny)  # as torch does: tiny shapes underflow to 0 otherwise


@dataclass(frozen=True)
class SimOptions:
    particle: str = "gamma"  # "gamma", "e-" or "e+"
    energy_scale: str = "visible"  # "visible" or "deposited"
    spot_factor: float = 1.0  # multiplies GFlash's number of spots
    threshold: bool = True  # apply the geometry's readout threshold
    method: str = "auto"  # "spots" (one by one), "binned" (Poisson counts per cell) or "auto" (by spot count)
    max_spots: int = 4_000_000  # spots per internal sub-batch (memory bound, ~0.5 GB)

    def __post_init__(self):
        if self.particle not in ("gamma", "e-", "e+"):
            raise ValueError(f"particle must be gamma, e- or e+, not {self.particle!r}")
        if self.energy_scale not in ("visible", "deposited"):
            raise ValueError(f"energy_scale must be visible or deposited, not {self.energy_scale!r}")
        if self.method not in ("auto", "spots", "binned"):
            raise ValueError(f"method must be auto, spots or binned, not {self.method!r}")
        if self.spot_factor <= 0:
            raise ValueError("spot_factor must be > 0")


class ShowerSimulator:
    """Parametrised EM showers for one geometry; ``__call__`` simulates a batch."""

    def __init__(self, geometry: Geometry, options: SimOptions | None = None, device: str | torch.device = "cpu"):
        self.geometry, self.options = geometry, options or SimOptions()
        self.device = torch.device(device)
        self.medium = Medium.of(geometry)
        prof = geometry.depth_profile()
        f64 = dict(device=self.device, dtype=torch.float64)
        self.edges = torch.tensor(prof["edges"], **f64)  # section edges along the detector normal, mm
        self.x0 = torch.tensor(prof["X0"], **f64)
        self.r_m = torch.tensor(prof["R_M"], **f64)
        self.f_em = torch.tensor(prof["f_em"], **f64)
        thick = self.edges[1:] - self.edges[:-1]
        self.x0_edges = torch.cat([self.edges.new_zeros(1), torch.cumsum(thick / self.x0, 0)])
        self.depth = float(self.edges[-1])
        mesh = geometry.mesh
        self.dr, self.dz = mesh.dr, mesh.dz
        self.n_r, self.n_phi, self.n_z = mesh.n_r, mesh.n_phi, mesh.n_z
        self.stochastic = geometry.card.resolution.stochastic
        self.constant = geometry.card.resolution.constant
        self.threshold = geometry.card.threshold if self.options.threshold else 0.0

    # -- depth maps -----------------------------------------------------------------------------
    def _section(self, d: torch.Tensor) -> torch.Tensor:
        """Index of the stack section at normal depth d (mm); beyond the back: the last one."""
        edges = self.edges.to(d.dtype)
        return torch.clamp(torch.searchsorted(edges, d.contiguous(), right=True) - 1, 0, len(self.x0) - 1)

    def depth_to_mm(self, t_x0: torch.Tensor) -> torch.Tensor:
        """Inverse of the cumulative-X0 map along the detector normal: X0 -> mm (material extended past the back)."""
        return self._x0_to_mm(t_x0)[0]

    def _x0_to_mm(self, t_x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``depth_to_mm`` and the index of the section the depth falls in."""
        if len(self.x0) == 1:
            return t_x0 * float(self.x0[0]), torch.zeros_like(t_x0, dtype=torch.long)
        e, x0e, x0 = self.edges.to(t_x0.dtype), self.x0_edges.to(t_x0.dtype), self.x0.to(t_x0.dtype)
        k = torch.clamp(torch.searchsorted(x0e, t_x0.contiguous(), right=True) - 1, 0, len(x0) - 1)
        return e[k] + (t_x0 - x0e[k]) * x0[k], k

    def x0_of_mm(self, d: torch.Tensor) -> torch.Tensor:
        """Cumulative X0 at normal depth d (mm), the inverse of ``depth_to_mm``."""
        if len(self.x0) == 1:
            return d / float(self.x0[0])
        k = self._section(d)
        e, x0e, x0 = self.edges.to(d.dtype), self.x0_edges.to(d.dtype), self.x0.to(d.dtype)
        return x0e[k] + (d - e[k]) / x0[k]

    def _local(self, table: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Per-section value (R_M, f_em) at normal depth d."""
        if len(self.x0) == 1:
            return torch.full_like(d, float(table[0]))
        return table.to(d.dtype)[self._section(d)]

    # -- simulation -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self, energy_gev: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Showers (B, 9, 16, 45) MeV for incident energies (GeV) and angles (rad); phi is recorded only."""
        del phi  # the mesh is aligned with the particle: the azimuth of incidence does not change the shower
        e_gev = energy_gev.to(self.device, torch.float64)
        theta = theta.to(self.device, torch.float64)
        n = len(e_gev)
        par = self._shower_parameters(e_gev, theta, generator)
        binned = self._use_binned(par["n_spots"])
        parts = []  # (shower indices, their per-cell deposited and visible energy (len, 6480, 2))
        idx = torch.nonzero(binned).squeeze(1)
        if len(idx):
            parts.append((idx, self._deposit_binned({k: v[idx] for k, v in par.items()}, generator)))
        idx = torch.nonzero(~binned).squeeze(1)
        # spots one by one, in sub-batches bounded by the number of spots (memory)
        cum = torch.cumsum(par["n_spots"][idx], 0).cpu()
        start = 0
        while start < len(idx):
            base = int(cum[start - 1]) if start else 0
            stop = max(int(torch.searchsorted(cum, base + self.options.max_spots, right=True)), start + 1)
            sub = idx[start:stop]
            parts.append((sub, self._deposit_spots({k: v[sub] for k, v in par.items()}, generator)))
            start = stop
        if len(parts) == 1:  # the common case: no copy
            energy = parts[0][1]
        else:
            energy = torch.zeros(n, N_CELLS, 2, dtype=torch.float32, device=self.device)
            for rows, part in parts:
                energy[rows] = part
        return self._readout(energy, theta, generator).view(n, *MESH_SHAPE)

    def _use_binned(self, counts: torch.Tensor) -> torch.Tensor:
        method = self.options.method
        if method == "auto":
            return counts > BINNED_ABOVE_SPOTS
        return torch.full_like(counts, method == "binned", dtype=torch.bool)

    def _shower_parameters(self, e_gev, theta, gen) -> dict[str, torch.Tensor]:
        """Per-shower random parameters (float64): profile, conversion depth, spot profile, spot count."""
        m = self.medium
        ln_y = torch.log(e_gev * 1e3 / m.Ec)
        t_max, alpha, beta, mean_alpha = draw_longitudinal(ln_y, m, gen)
        u0 = torch.rand(len(e_gev), generator=gen, device=self.device, dtype=torch.float64)
        t0 = -PHOTON_CONVERSION_X0 * torch.log1p(-u0) if self.options.particle == "gamma" else torch.zeros_like(u0)
        a_spot, b_spot = spot_profile(t_max, alpha, m)
        return {
            "e_gev": e_gev, "theta": theta, "t_max": t_max, "alpha": alpha, "beta": beta, "t0": t0,
            "a_spot": a_spot, "b_spot": b_spot,
            "k_tau": (alpha - 1) / alpha * mean_alpha / (mean_alpha - 1) / t_max,  # tau = depth * k_tau
            "n_spots": n_spots(e_gev, self.stochastic, self.options.spot_factor),
        }

    def _deposit_spots(self, par, gen) -> torch.Tensor:
        """Draw every spot; returns per-cell deposited and visible energy (n, 6480, 2), GeV."""
        dev, n, m = self.device, len(par["e_gev"]), self.medium
        f32 = dict(device=dev, dtype=torch.float32)
        shower = torch.repeat_interleave(torch.arange(n, device=dev), par["n_spots"])
        n_tot = len(shower)
        # the weight Gamma(s; alpha, beta) / Gamma(s; alpha_s, beta_s) is exp(d_alpha ln s - d_beta s) up to a
        # per-shower constant, which the per-shower normalisation removes
        per = torch.stack([par["a_spot"], par["b_spot"], par["alpha"] - par["a_spot"], par["beta"] - par["b_spot"],
                           par["k_tau"], torch.log(par["e_gev"]), torch.sin(par["theta"]), torch.cos(par["theta"]),
                           par["t0"]]).float()
        # one contiguous gather per column (a row gather leaves strided columns that slow every op after it)
        a_s, b_s, d_a, d_b, k_t, ln_e, sin_t, cos_t, t_start = (c.index_select(0, shower) for c in per)
        s = standard_gamma(a_s, gen) / b_s  # depth after the shower start, X0
        w = torch.exp(torch.clamp(d_a * torch.log(s.clamp(min=1e-6)) - d_b * s, -60.0, 60.0))
        w_sum = torch.zeros(n, **f32).index_add_(0, shower, w)
        e_spot = w * (par["e_gev"].float() / w_sum).index_select(0, shower)  # GeV, sums to E per shower

        # lateral position from the radial profile at the spot's scaled depth tau
        r_core, r_tail, p_core = radial_parameters(s * k_t, ln_e, m)
        u = torch.rand(3, n_tot, generator=gen, **f32)
        uu = u[1].clamp(max=1 - 1e-6)
        rho_rm = torch.where(u[0] < p_core, r_core, r_tail) * torch.sqrt(uu / (1 - uu))  # Moliere radii
        az = (2 * u[2] - 1) * math.pi

        # X0 along the axis -> mm (and the section there, for its Moliere radius), tilted layers, leakage,
        # local sampling fraction
        d_axis, k = self._x0_to_mm((t_start + s) * sin_t)
        z = d_axis / sin_t  # path length along the particle, mm
        rho = rho_rm * self.r_m.to(z.dtype)[k]
        d_n = d_axis + rho * torch.cos(az) * cos_t  # depth behind the front face, mm
        i_r = (rho / self.dr).long()
        i_z = (z / self.dz).long()
        i_phi = ((az + math.pi) * (self.n_phi / (2 * math.pi))).long().clamp_(0, self.n_phi - 1)
        inside = (d_n >= 0) & (d_n <= self.depth) & (i_r < self.n_r) & (i_z < self.n_z)
        # spots that leak out go to one extra bin past the end (cheaper than dropping them with a mask)
        cell = torch.where(inside, shower * N_CELLS + (i_r * self.n_phi + i_phi) * self.n_z + i_z, n * N_CELLS)
        energy = torch.stack([e_spot, e_spot * self._local(self.f_em, d_n.clamp(0, self.depth))], 1)
        out = torch.zeros(n * N_CELLS + 1, 2, **f32).index_add_(0, cell, energy)  # deposited, visible
        return out[:-1].view(n, N_CELLS, 2)

    def _deposit_binned(self, par, gen) -> torch.Tensor:
        """Same model for showers with many spots: Poisson spot counts per cell around their expectation.

        Expected energy and spot count per cell follow from the closed-form Gamma CDF (depth) and the
        radial CDF r^2/(r^2+R^2); counts n ~ Poisson(N_cell) give each cell E_cell n/N_cell, rescaled
        so the shower keeps its expected contained energy (as the spot method does). The tilted layers
        are evaluated at cell centres.
        """
        dev, n, m = self.device, len(par["e_gev"]), self.medium
        f64 = dict(device=dev, dtype=torch.float64)
        sin_t, cos_t = torch.sin(par["theta"])[:, None], torch.cos(par["theta"])[:, None]
        z_edges = torch.arange(self.n_z + 1, **f64) * self.dz  # along the particle, mm
        # shower depth (X0 after the start) at the z-cell edges, on the axis
        s_edges = (self.x0_of_mm(z_edges[None] * sin_t) / sin_t - par["t0"][:, None]).clamp(min=0)  # (n, 46)

        def cdf(a, b):
            return torch.special.gammainc(a[:, None], b[:, None] * s_edges)

        p_e = torch.diff(cdf(par["alpha"], par["beta"]), dim=1)  # (n, 45) energy fraction per z cell
        p_s = torch.diff(cdf(par["a_spot"], par["b_spot"]), dim=1)  # spot fraction per z cell
        s_mid = 0.5 * (s_edges[:, 1:] + s_edges[:, :-1])
        r_core, r_tail, p_core = radial_parameters(s_mid * par["k_tau"][:, None],
                                                   torch.log(par["e_gev"])[:, None], m)  # (n, 45)
        z_mid = 0.5 * (z_edges[1:] + z_edges[:-1])
        r_m = self._local(self.r_m, z_mid[None] * sin_t)  # (n, 45) mm
        r = torch.arange(self.n_r + 1, **f64)[None, None] * self.dr / r_m[..., None]  # (n, 45, 10) in R_M
        r2 = r**2
        frac = p_core[..., None] * r2 / (r2 + r_core[..., None] ** 2) + (1 - p_core[..., None]) * r2 / (
            r2 + r_tail[..., None] ** 2)
        p_r = torch.diff(frac, dim=2).transpose(1, 2)  # (n, 9, 45)
        e_cell = (par["e_gev"][:, None, None] * p_e[:, None] * p_r / self.n_phi)[:, :, None].expand(
            -1, -1, self.n_phi, -1)  # (n, 9, 16, 45) GeV
        n_cell = (par["n_spots"].double()[:, None, None] * p_s[:, None] * p_r / self.n_phi)[:, :, None].expand(
            -1, -1, self.n_phi, -1)
        counts = torch.poisson(n_cell.float().contiguous(), generator=gen).double()
        dep = torch.where(n_cell > 0, e_cell * counts / n_cell.clamp(min=1e-30), torch.zeros_like(e_cell))
        # tilted detector at cell centres: leakage through the front/back faces, local sampling fraction
        c = self.geometry.cell_centres()
        x_c = torch.as_tensor(c["x"], **f64)[None]
        d_n = torch.as_tensor(c["z"], **f64)[None] * sin_t[..., None, None] + x_c * cos_t[..., None, None]
        inside = (d_n >= 0) & (d_n <= self.depth)
        expected = (e_cell * inside).sum((1, 2, 3))
        dep = dep * inside
        dep = dep * (expected / dep.sum((1, 2, 3)).clamp(min=1e-30))[:, None, None, None]
        vis = dep * self._local(self.f_em, d_n.clamp(0, self.depth))
        return torch.stack([dep, vis], -1).float().reshape(n, N_CELLS, 2)

    def _readout(self, energy, theta, gen) -> torch.Tensor:
        """Sampling fluctuations on occupied cells, constant term, readout threshold, output scale (MeV).

        ``energy`` (n, 6480, 2) holds each cell's deposited and visible energy in GeV.
        """
        n = len(energy)
        energy = energy.reshape(-1, 2)
        occ = torch.nonzero(energy[:, 0] > 0).squeeze(1)
        dep, vis = energy[occ].unbind(1)
        shower = occ // N_CELLS
        a_eff2 = (self.stochastic**2 / torch.sin(theta).clamp(min=0.05)).float()[shower]
        fluct = standard_gamma(dep / a_eff2, gen) * a_eff2 / dep
        gain = (1 + self.constant * torch.randn(n, generator=gen, device=self.device)).clamp(min=0.0)
        scale = fluct * gain[shower]
        vis_mev = vis * scale * 1e3
        keep = vis_mev >= self.threshold
        value = vis_mev if self.options.energy_scale == "visible" else dep * scale * 1e3
        out = torch.zeros(n * N_CELLS, dtype=torch.float32, device=self.device)
        out[occ[keep]] = value[keep]
        return out.view(n, N_CELLS)
