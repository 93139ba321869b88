"""GFlash shower parameters (Grindhammer-Peters, hep-ex/0001020) for sampling calorimeters.

Formulas as in Geant4's GFlashSamplingShowerParameterisation and its tuning header
(Geant4 11.4.0 source/parameterisations/gflash/, GFlashSamplingShowerParameterisation.cc,
GFlashSamplingShowerTuning.hh), with the unit slips fixed: the critical energy comes from X0 in
g/cm^2 (done in calofm.geometry), and the stochastic term is in GeV^1/2 (see shower.py).
Every function is vectorised over showers (1-D tensors) or spots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calofm.geometry import Geometry


@dataclass(frozen=True)
class Medium:
    """The effective sampling medium GFlash needs (X0-weighted over the stack)."""

    Z: float  # effective atomic number
    Ec: float  # MeV, effective critical energy
    F_S: float  # X0_eff / sampling-cell thickness
    e_mip: float  # e/mip ratio

    @classmethod
    def of(cls, geometry: Geometry) -> Medium:
        return cls(Z=geometry.Z_eff, Ec=geometry.Ec_eff, F_S=geometry.F_S, e_mip=geometry.e_mip)


def longitudinal_means(ln_y: torch.Tensor, m: Medium) -> tuple[torch.Tensor, ...]:
    """<ln T>, <ln alpha>, sigma(ln T), sigma(ln alpha), rho for showers with ln y = ln(E/Ec)."""
    # homogeneous fits (Geant4 GVFlashHomoShowerTuning.hh), then the sampling corrections
    # (GFlashSamplingShowerTuning.hh); Geant4's clamps
    ln_t_hom = torch.log(torch.clamp(ln_y - 0.812, min=0.1))
    ln_a_hom = torch.log(torch.clamp(0.81 + (0.458 + 2.26 / m.Z) * ln_y, min=0.1))
    t_sam = torch.exp(ln_t_hom) - 0.55 / m.F_S - 0.69 * (1 - m.e_mip)
    a_sam = torch.exp(ln_a_hom) - 0.476 / m.F_S
    mu_t = torch.log(torch.clamp(t_sam, min=math.exp(0.1)))
    mu_a = torch.log(torch.clamp(a_sam, min=math.exp(0.1)))
    # sigma = 1/(a + b ln y) is only meaningful where the denominator is large; Geant4 caps sigma at 0.5
    sig_t = 1.0 / torch.clamp(-2.5 + 1.25 * ln_y, min=2.0)
    sig_a = 1.0 / torch.clamp(-0.82 + 0.79 * ln_y, min=2.0)
    rho = torch.clamp(0.784 - 0.023 * ln_y, -0.99, 0.99)
    return mu_t, mu_a, sig_t, sig_a, rho


def draw_longitudinal(ln_y: torch.Tensor, m: Medium, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Correlated log-normal (T, alpha) per shower; returns T, alpha, beta and the mean alpha."""
    mu_t, mu_a, sig_t, sig_a, rho = longitudinal_means(ln_y, m)
    z1 = torch.randn(ln_y.shape, generator=gen, device=ln_y.device, dtype=ln_y.dtype)
    z2 = torch.randn(ln_y.shape, generator=gen, device=ln_y.device, dtype=ln_y.dtype)
    plus, minus = torch.sqrt((1 + rho) / 2), torch.sqrt((1 - rho) / 2)
    t_max = torch.exp(mu_t + sig_t * (plus * z1 + minus * z2)).clamp(min=1.0)
    alpha = torch.exp(mu_a + sig_a * (plus * z1 - minus * z2)).clamp(min=1.1)
    beta = (alpha - 1) / t_max
    return t_max, alpha, beta, torch.exp(mu_a).clamp(min=1.1)


def spot_profile(t_max: torch.Tensor, alpha: torch.Tensor, m: Medium) -> tuple[torch.Tensor, torch.Tensor]:
    """Gamma parameters (alpha_spot, beta_spot) of the spot density along the shower.

    Geant4 GVFlashHomoShowerTuning.hh factors times those of GFlashSamplingShowerTuning.hh.
    """
    t_spot = t_max * (0.698 + 0.00212 * m.Z) * (0.813 + 0.0019 * m.Z)
    a_spot = (alpha * (0.639 + 0.00334 * m.Z) * (0.844 + 0.0026 * m.Z)).clamp(min=1.1)
    return a_spot, (a_spot - 1) / t_spot


def n_spots(energy_gev: torch.Tensor, stochastic: float, factor: float = 1.0) -> torch.Tensor:
    """Spots per shower for sampling calorimeters: 10.3/c_S * E^0.959 (GFlash sampling tuning)."""
    return torch.clamp(torch.round(factor * 10.3 / stochastic * energy_gev**0.959), min=1).long()


def radial_parameters(tau: torch.Tensor, ln_e: torch.Tensor, m: Medium) -> tuple[torch.Tensor, ...]:
    """Core radius R_C, tail radius R_T (units of R_M) and core probability p at scaled depth tau."""
    z = m.Z
    r_core = (0.0251 + 0.00319 * ln_e) + (0.1162 - 0.000381 * z) * tau
    k4 = 0.3585 + 0.0412 * ln_e
    r_tail = (0.659 - 0.00309 * z) * (torch.exp(-2.59 * (tau - 0.645)) + torch.exp(k4 * (tau - 0.645)))
    p3 = 1.313 - 0.0686 * ln_e
    arg = ((0.401 + 0.00187 * z) - tau) / p3
    p_core = (2.632 - 0.00094 * z) * torch.exp(arg - torch.exp(arg))
    # sampling-calorimeter corrections (Geant4 GFlashSamplingShowerTuning)
    fs, one_minus_e = m.F_S, 1 - m.e_mip
    r_core = r_core - 0.0203 * one_minus_e + 0.0397 / fs * torch.exp(-tau)
    r_tail = r_tail - 0.14 * one_minus_e - 0.495 / fs * torch.exp(-tau)
    p_core = p_core + one_minus_e * (0.348 - 0.642 / fs * torch.exp(-((tau - 1) ** 2)))
    r_core = r_core.clamp(min=1e-3)
    return r_core, torch.maximum(r_tail, r_core), p_core.clamp(0.0, 1.0)


def log_gamma_pdf(t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log of the Gamma density beta (beta t)^(alpha-1) exp(-beta t) / Gamma(alpha), t > 0."""
    t = t.clamp(min=1e-6)
    return (alpha - 1) * torch.log(beta * t) + torch.log(beta) - beta * t - torch.lgamma(alpha)
