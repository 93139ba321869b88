"""Per-shower high-level features of the CaloChallenge (code/HighLevelFeatures.py) on the (r, phi, z) mesh.

A layer is one z slice of the mesh (45 of them). Cell coordinates come from the geometry of the
file (``Geometry.cell_centres``): x = r_c cos(phi_c), y = r_c sin(phi_c) in mm, so features of
different detectors are in their own millimetres.
"""

from __future__ import annotations

import numpy as np

from calofm.geometry import Geometry

EPS = 1e-16  # CaloChallenge adds this to every energy denominator
LOG_EPS = 1e-8  # and this inside log10 of layer and total energies (classifier / FPD inputs)
CHUNK = 2048  # showers per vectorised block: bounds the float64 temporaries to ~100 MB

# CaloChallenge energy ranges for mean showers (GeV)
ENERGY_RANGES: tuple[tuple[float, float], ...] = ((1.0, 10.0), (10.0, 100.0), (100.0, 1000.0))

PER_LAYER = ("e_layer", "ec_x", "ec_y", "ec_r", "width_x", "width_y", "width_r", "sparsity")
PER_SHOWER = ("e_inc", "e_tot", "e_ratio", "n_hits")


def apply_threshold(showers: np.ndarray, threshold: float) -> np.ndarray:
    """Cells below ``threshold`` (MeV) set to 0, as the CaloChallenge does to both files before any feature."""
    showers = np.asarray(showers, dtype=np.float32)
    if threshold <= 0:
        return showers
    return np.where(showers >= threshold, showers, np.float32(0.0))


def _layer_moments(cells: np.ndarray, coord: np.ndarray, e_layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energy-weighted centre and width per layer; cells (n, k, z), coord (k,), e_layer (n, z)."""
    first = np.einsum("nkz,k->nz", cells, coord) / (e_layer + EPS)
    second = np.einsum("nkz,k->nz", cells, coord**2) / (e_layer + EPS)
    var = second - first**2
    # a layer whose energy sits at one coordinate (e.g. one hit) has width 0, not the ~1e-8 * coord that
    # the cancellation leaves: FPD/KPD divide each feature by its reference max, which must not be round-off
    var = np.where(var > 1e-12 * second, var, 0.0)
    return first, np.sqrt(var)


def shower_features(showers: np.ndarray, energy: np.ndarray, geometry: Geometry) -> dict[str, np.ndarray]:
    """Features of thresholded showers (n, 9, 16, 45) MeV with incident energies (n,) MeV.

    Per shower (n,): e_inc, e_tot, e_ratio, n_hits; per layer (n, 45): PER_LAYER (mm, MeV); radial (n, 9).
    """
    showers = np.asarray(showers)
    energy = np.asarray(energy, dtype=np.float64).reshape(-1)
    if showers.ndim != 4 or showers.shape[1:] != tuple(geometry.cell_centres()["r"].shape):
        raise ValueError(f"showers have shape {showers.shape}, expected (N, 9, 16, 45)")
    if len(energy) != len(showers):
        raise ValueError(f"{len(showers)} showers but {len(energy)} incident energies")
    centres = geometry.cell_centres()
    coords = {k: centres[k][:, :, 0].reshape(-1).astype(np.float64) for k in ("x", "y", "r")}
    n, n_r, n_phi, n_z = showers.shape
    out = {k: np.empty((n, n_z)) for k in PER_LAYER}
    out["radial"] = np.empty((n, n_r))
    out["e_tot"], out["n_hits"] = np.empty(n), np.empty(n)
    for start in range(0, n, CHUNK):
        sl = slice(start, start + CHUNK)
        cells = showers[sl].astype(np.float64).reshape(-1, n_r * n_phi, n_z)  # (b, k, z), k = r*16 + phi
        e_layer = cells.sum(axis=1)
        out["e_layer"][sl] = e_layer
        for axis in ("x", "y", "r"):
            out[f"ec_{axis}"][sl], out[f"width_{axis}"][sl] = _layer_moments(cells, coords[axis], e_layer)
        hit = cells > 0
        out["sparsity"][sl] = 1.0 - hit.mean(axis=1)
        out["n_hits"][sl] = hit.sum(axis=(1, 2))
        out["e_tot"][sl] = e_layer.sum(axis=1)
        out["radial"][sl] = cells.reshape(-1, n_r, n_phi, n_z).sum(axis=(2, 3))
    out["e_inc"] = energy
    out["e_ratio"] = out["e_tot"] / energy
    return out


def high_level_vector(features: dict[str, np.ndarray]) -> np.ndarray:
    """The CaloChallenge classifier/FPD input, 1 + 8 * n_layers + 1 columns (362 for 45 layers)."""
    # order of the CaloChallenge's prepare_high_data_for_classifier (energies MeV, lengths mm)
    f = features
    cols = [
        np.log10(f["e_inc"])[:, None],
        np.log10(f["e_layer"] + LOG_EPS),
        f["ec_x"] / 1e2,
        f["ec_y"] / 1e2,
        f["width_x"] / 1e2,
        f["width_y"] / 1e2,
        np.log10(f["e_tot"] + LOG_EPS)[:, None],
        f["sparsity"],
        f["ec_r"] / 1e2,
        f["width_r"] / 1e2,
    ]
    return np.concatenate(cols, axis=1)


def low_level_vector(showers: np.ndarray, energy: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The CaloChallenge low-level classifier input: [log10 E_inc, voxels / (scale * E_inc)], float32.

    ``scale`` (the reference median of E_tot/E_inc, same for both files) puts visible energy on the CaloChallenge scale.
    """
    energy = np.asarray(energy, dtype=np.float64).reshape(-1)
    flat = np.asarray(showers, dtype=np.float32).reshape(len(energy), -1)
    out = np.empty((len(energy), flat.shape[1] + 1), dtype=np.float32)
    out[:, 0] = np.log10(energy)
    out[:, 1:] = flat / (scale * energy[:, None]).astype(np.float32)
    return out


def select(features: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``mask`` of every feature array."""
    return {k: v[mask] for k, v in features.items()}


def energy_masks(
    energy_mev: np.ndarray, ranges: tuple[tuple[float, float], ...] = ENERGY_RANGES, min_showers: int = 1
) -> dict[str, np.ndarray]:
    """Label ('1-10 GeV') -> boolean mask per incident-energy range [lo, hi) GeV holding >= ``min_showers``."""
    e_gev = np.asarray(energy_mev, dtype=np.float64) / 1e3
    out = {}
    for i, (lo, hi) in enumerate(ranges):
        last = i == len(ranges) - 1
        mask = (e_gev >= lo) & ((e_gev <= hi) if last else (e_gev < hi))
        if mask.sum() >= min_showers:
            out[f"{lo:g}-{hi:g} GeV"] = mask
    return out


def mean_features(features: dict[str, np.ndarray]) -> dict[str, float | list[float]]:
    """Means over showers (per layer / radial bin for profile-like features): the 'mean shower' numbers."""
    out: dict[str, float | list[float]] = {}
    for key, values in features.items():
        mean = values.mean(axis=0)
        out[key] = mean.tolist() if np.ndim(mean) else float(mean)
    return out


def energy_summary(ref: dict[str, np.ndarray], gen: dict[str, np.ndarray]) -> dict[str, float]:
    """The first numbers a physicist checks: mean visible energy and the spread of E_vis / E_inc, generated
    over reference (1 = right), with the reference values they are relative to."""
    return {
        "mean_ratio": float(gen["e_tot"].mean() / ref["e_tot"].mean()),
        "spread_ratio": float(np.std(gen["e_ratio"]) / np.std(ref["e_ratio"])),
        "mean_ref_MeV": float(ref["e_tot"].mean()), "spread_ref": float(np.std(ref["e_ratio"])),
    }
