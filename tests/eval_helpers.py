"""A small, self-contained synthetic shower generator for the evaluation tests.

Gamma longitudinal profile in X0 (t_max grows with ln E), core + tail exponential radial profile in
R_M, uniform phi, stochastic energy resolution, and Gamma-distributed cell energies. Knobs distort
the physics (energy scale, radial width, depth, a missing layer) to check that metrics notice.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammainc

from calofm.data.format import FileAttrs
from calofm.data.io import write_showers
from calofm.geometry import Geometry


def conditions(geometry: Geometry, n: int, seed: int, energy_gev=(1.0, 100.0)) -> dict[str, np.ndarray]:
    """Log-uniform incident energies (MeV) and angles within the card's ranges."""
    rng = np.random.default_rng(seed)
    lo, hi = np.log(energy_gev[0]), np.log(energy_gev[1])
    return {
        "incident_energy": (np.exp(rng.uniform(lo, hi, n)) * 1e3).astype(np.float32),
        "incident_phi": rng.uniform(*geometry.card.phi, n).astype(np.float32),
        "incident_theta": rng.uniform(*geometry.card.theta, n).astype(np.float32),
    }


def synthetic_showers(
    geometry: Geometry,
    energy_mev: np.ndarray,
    seed: int,
    scale: float = 1.0,
    width: float = 1.0,
    depth: float = 1.0,
    drop_layer: int | None = None,
    spot_mev: float = 0.01,
) -> np.ndarray:
    """Showers (n, 9, 16, 45) of visible energy in MeV for the given incident energies."""
    rng = np.random.default_rng(seed)
    e = np.asarray(energy_mev, dtype=np.float64)
    n = len(e)
    a = geometry.card.resolution.stochastic
    e_vis = geometry.sampling_fraction * e * (1.0 + a / np.sqrt(e / 1e3) * rng.standard_normal(n)) * scale
    e_vis = np.clip(e_vis, 0.0, None)
    # longitudinal: Gamma(alpha, beta = 0.5) in t = depth / X0 with per-shower fluctuating t_max
    t_max = depth * np.maximum(np.log(e / geometry.Ec_eff) - 0.5, 0.5) * np.exp(0.1 * rng.standard_normal(n))
    alpha = 1.0 + 0.5 * t_max
    t_edges = geometry.z_edges / geometry.X0_eff
    cdf = gammainc(alpha[:, None], 0.5 * t_edges[None, :])
    long = np.diff(cdf, axis=1)  # (n, 45)
    # radial: 80 % core (0.25 R_M) + 20 % tail (1 R_M), exponential in r of the energy per ring
    rm = geometry.R_M_eff * width * np.exp(0.05 * rng.standard_normal(n))
    r = geometry.r_edges[None, :]
    frac = 0.8 * (1 - np.exp(-r / (0.25 * rm[:, None]))) + 0.2 * (1 - np.exp(-r / rm[:, None]))
    rad = np.diff(frac, axis=1)  # (n, 9)
    mean = e_vis[:, None, None, None] * rad[:, :, None, None] * long[:, None, None, :] / 16.0
    mean = np.broadcast_to(mean, (n, 9, 16, 45))
    cells = rng.gamma(np.maximum(mean / spot_mev, 1e-12), spot_mev)
    if drop_layer is not None:
        cells[..., drop_layer] = 0.0
    return cells.astype(np.float32)


def write_sample(path, geometry: Geometry, cond: dict[str, np.ndarray], seed: int, **distortion) -> str:
    """Write a synthetic file with the given conditions; returns the path as a string."""
    showers = synthetic_showers(geometry, cond["incident_energy"], seed, **distortion)
    attrs = FileAttrs(geometry=geometry.name, mesh_dr=geometry.mesh.dr, mesh_dz=geometry.mesh.dz,
                      generator="tests.eval_helpers")
    write_showers(path, showers, cond["incident_energy"], cond["incident_phi"], cond["incident_theta"],
                  attrs=attrs, compression=None)
    return str(path)
