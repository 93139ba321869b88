"""Histograms of the high-level features with CaloChallenge binning, separation power, chi2/ndf and W1.

The CaloChallenge binning (code/evaluate_plotting_helper.py) is for DS2 in deposited energy. Two generalisations:
E_tot/E_inc uses ``linspace(0.5, 1.5, 101)`` times the reference median (our files hold visible energy,
E_tot/E_inc ~ 0.025 for Si-W), and every millimetre range is scaled by r_max / 41.85 mm (the DS2 mesh
radius), so a geometry with DS2 cells gets exactly the CaloChallenge bins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import wasserstein_distance

from calofm.geometry import Geometry

log = logging.getLogger(__name__)

DS2_R_MAX = 41.85  # mm, outer radius of the CaloChallenge DS2 mesh
VOXEL_CHUNK = 1024


@dataclass(frozen=True)
class HistSpec:
    key: str  # feature name in ``shower_features``
    label: str  # axis label for plots and reports
    per_layer: bool
    logx: bool = False


SPECS: tuple[HistSpec, ...] = (
    HistSpec("e_ratio", "E_tot / E_inc", False),
    HistSpec("n_hits", "cells above threshold", False),
    HistSpec("e_layer", "E_layer [MeV]", True, logx=True),
    HistSpec("ec_x", "centre of energy x [mm]", True),
    HistSpec("ec_y", "centre of energy y [mm]", True),
    HistSpec("ec_r", "centre of energy r [mm]", True),
    HistSpec("width_x", "width x [mm]", True),
    HistSpec("width_y", "width y [mm]", True),
    HistSpec("width_r", "width r [mm]", True),
    HistSpec("sparsity", "sparsity (fraction of empty cells)", True),
)
VOXEL_LABEL = "cell energy [MeV]"


@dataclass
class Hist:
    """One pair of histograms on common edges (raw counts, in-range entries only)."""

    edges: np.ndarray
    ref: np.ndarray
    gen: np.ndarray
    extra: dict = field(default_factory=dict)


def separation_power(h1: np.ndarray, h2: np.ndarray) -> float:
    """S = 1/2 sum (h1 - h2)^2 / (h1 + h2) on histograms normalised to unit sum: 0 identical, 1 disjoint.

    An empty histogram against a non-empty one scores 1 (nothing in common); two empty ones give NaN.
    """
    s1, s2 = float(np.sum(h1)), float(np.sum(h2))
    if s1 == 0 and s2 == 0:
        return float("nan")
    if s1 == 0 or s2 == 0:
        return 1.0
    p, q = np.asarray(h1) / s1, np.asarray(h2) / s2
    return float(0.5 * np.sum((p - q) ** 2 / (p + q + 1e-16)))


def chi2_ndf(h1: np.ndarray, h2: np.ndarray) -> float:
    """Two-sample chi2 / ndf of unweighted histograms with different totals (bins with entries; ndf = bins - 1)."""
    h1, h2 = np.asarray(h1, dtype=np.float64), np.asarray(h2, dtype=np.float64)
    n1, n2 = h1.sum(), h2.sum()
    used = (h1 + h2) > 0
    if n1 == 0 or n2 == 0 or used.sum() < 2:
        return float("nan")
    chi2 = np.sum((h1[used] / n1 - h2[used] / n2) ** 2 / (h1[used] / n1**2 + h2[used] / n2**2))
    return float(chi2 / (used.sum() - 1))


def profile_chi2_ndf(ref: np.ndarray, gen: np.ndarray) -> float:
    """chi2/ndf of mean profiles (n, bins) from the standard errors of both means; bins without spread skipped."""
    var = ref.var(axis=0, ddof=1) / len(ref) + gen.var(axis=0, ddof=1) / len(gen)
    used = var > 0
    if not used.any():
        return float("nan")
    return float(np.mean((ref.mean(axis=0)[used] - gen.mean(axis=0)[used]) ** 2 / var[used]))


def _low_edge(values: np.ndarray, threshold: float) -> float:
    if threshold > 0:
        return threshold
    positive = values[values > 0]
    return float(positive.min()) if positive.size else 1e-6


def bin_edges(spec: HistSpec, ref: np.ndarray, geometry: Geometry, threshold: float) -> np.ndarray | None:
    """Edges for one feature column of the reference (None if the reference has nothing to bin)."""
    k = float(geometry.r_edges[-1]) / DS2_R_MAX
    if spec.key == "e_ratio":
        return np.linspace(0.5, 1.5, 101) * float(np.median(ref))
    if spec.key == "n_hits":
        top = max(float(ref.max()), 1.0)
        return np.linspace(0.0, top * 1.05, 51)
    if spec.key == "e_layer":
        lo, hi = _low_edge(ref, threshold), float(ref.max(initial=0.0))
        return np.logspace(np.log10(lo), np.log10(hi), 40) if hi > lo else None
    if spec.key in ("ec_x", "ec_y"):
        return np.linspace(-30.0, 30.0, 101) * k
    if spec.key in ("width_x", "width_y"):
        return np.linspace(0.0, 30.0, 101) * k
    if spec.key == "ec_r":
        return np.linspace(0.0, 42.0, 101) * k
    if spec.key == "width_r":
        return np.linspace(0.0, 20.0, 101) * k
    if spec.key == "sparsity":
        return np.linspace(0.0, 1.0, 21)
    raise KeyError(f"no binning for feature '{spec.key}'")


def _scores(edges: np.ndarray | None, ref: np.ndarray, gen: np.ndarray) -> tuple[Hist | None, float, float]:
    if edges is None:
        return None, float("nan"), float("nan")
    h = Hist(edges, np.histogram(ref, edges)[0], np.histogram(gen, edges)[0])
    return h, separation_power(h.ref, h.gen), chi2_ndf(h.ref, h.gen)


def _w1_rel(ref: np.ndarray, gen: np.ndarray) -> float:
    """Wasserstein-1 distance in units of the reference standard deviation (NaN for a constant reference)."""
    sd = float(np.std(ref))
    return float(wasserstein_distance(ref, gen) / sd) if sd > 0 else float("nan")


def compare_histograms(
    ref: dict[str, np.ndarray], gen: dict[str, np.ndarray], geometry: Geometry, threshold: float
) -> tuple[dict, dict[str, list[Hist | None]]]:
    """Scores per feature (JSON-ready) and the histograms (for plots) of reference vs generated features.

    Per-layer features give the mean over layers (as the CaloChallenge) and the list; ``w1_rel`` is W1 / sigma_ref.
    """
    scores: dict[str, dict] = {}
    hists: dict[str, list[Hist | None]] = {}
    for spec in SPECS:
        r, g = ref[spec.key], gen[spec.key]
        if not spec.per_layer:
            h, s, c = _scores(bin_edges(spec, r, geometry, threshold), r, g)
            hists[spec.key] = [h]
            scores[spec.key] = {"separation_power": s, "chi2_ndf": c, "w1_rel": _w1_rel(r, g),
                                "w1": float(wasserstein_distance(r, g)),
                                "mean_ref": float(r.mean()), "mean_gen": float(g.mean())}
            continue
        per_s, per_c, per_w, layer_hists = [], [], [], []
        for layer in range(r.shape[1]):
            h, s, c = _scores(bin_edges(spec, r[:, layer], geometry, threshold), r[:, layer], g[:, layer])
            layer_hists.append(h)
            per_s.append(s)
            per_c.append(c)
            per_w.append(_w1_rel(r[:, layer], g[:, layer]))
        hists[spec.key] = layer_hists
        scores[spec.key] = {"separation_power": _nanmean(per_s), "chi2_ndf": _nanmean(per_c),
                            "w1_rel": _nanmean(per_w), "per_layer": [_clean(v) for v in per_s]}
    # profiles per unit incident energy, so the spread of E_inc does not swamp the shape differences
    for name, key in (("longitudinal_profile", "e_layer"), ("radial_profile", "radial")):
        r_prof, g_prof = ref[key] / ref["e_inc"][:, None], gen[key] / gen["e_inc"][:, None]
        scores[name] = {"chi2_ndf": profile_chi2_ndf(r_prof, g_prof)}
    return scores, hists


def voxel_histograms(ref_showers: np.ndarray, gen_showers: np.ndarray, threshold: float) -> tuple[dict, Hist]:
    """Cell-energy spectrum of all cells pooled, ``logspace(log10 threshold, log10 ref max, 50)``, and its S."""
    top = float(max(ref_showers.max(initial=0.0), 0.0))
    lo = threshold if threshold > 0 else _min_positive(ref_showers)
    if top <= lo:
        empty = np.zeros(1, dtype=np.int64)
        return {"separation_power": float("nan"), "chi2_ndf": float("nan")}, Hist(np.array([lo, lo]), empty, empty)
    edges = np.logspace(np.log10(lo), np.log10(top), 50)
    counts = [np.zeros(len(edges) - 1, dtype=np.int64) for _ in range(2)]
    for showers, c in zip((ref_showers, gen_showers), counts):
        for start in range(0, len(showers), VOXEL_CHUNK):
            c += np.histogram(showers[start : start + VOXEL_CHUNK], edges)[0]
    h = Hist(edges, counts[0], counts[1])
    return {"separation_power": separation_power(h.ref, h.gen), "chi2_ndf": chi2_ndf(h.ref, h.gen)}, h


def _min_positive(showers: np.ndarray) -> float:
    best = np.inf
    for start in range(0, len(showers), VOXEL_CHUNK):
        block = showers[start : start + VOXEL_CHUNK]
        positive = block[block > 0]
        if positive.size:
            best = min(best, float(positive.min()))
    return best if np.isfinite(best) else 1e-6


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def _clean(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)
