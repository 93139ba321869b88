"""``calofm compare-geometries``: shower profiles of several detectors side by side.

Longitudinal profiles vs depth in mm and in X0 (``Geometry.X0_eff``), radial profiles vs r in mm and
in R_M (``Geometry.R_M_eff``), each normalised to unit area so visible fractions do not hide the shapes,
and the visible fraction E_vis/E_inc vs incident energy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

N_ENERGY_BINS = 12


def geometry_profiles(path: str | Path, geometry=None, threshold: float | None = None, max_showers=None,
                      extra_dirs=None) -> dict:
    """Mean normalised profiles, shape numbers and E_vis/E_inc vs E of one file (thresholded as in evaluate)."""
    from calofm.data.io import ShowerFile
    from calofm.evaluation.features import apply_threshold
    from calofm.evaluation.suite import resolve_geometry
    from calofm.geometry import load_geometry

    geo = load_geometry(geometry, extra_dirs) if geometry is not None else None
    with ShowerFile(path, geometry=geo, geometry_dirs=extra_dirs) as f:
        geo = geo or resolve_geometry(None, [f.geometry or f.geometry_name], [path, path], extra_dirs)
        thr = geo.card.threshold if threshold is None else threshold
        n = len(f) if max_showers is None else min(max_showers, len(f))
        long_sum, rad_sum = np.zeros(geo.mesh.n_z), np.zeros(geo.mesh.n_r)
        e_inc, e_vis = np.empty(n), np.empty(n)
        for start in range(0, n, 2048):
            batch = f.read(slice(start, min(start + 2048, n)))
            s = apply_threshold(batch["showers"], thr).astype(np.float64)
            tot = s.sum(axis=(1, 2, 3))
            w = 1.0 / np.where(tot > 0, tot, 1.0)  # every shower counts once, whatever its energy
            long_sum += np.einsum("nrpz,n->z", s, w)
            rad_sum += np.einsum("nrpz,n->r", s, w)
            e_inc[start : start + len(s)] = batch["incident_energy"]
            e_vis[start : start + len(s)] = tot
    c = geo.cell_centres()
    z, r = c["z"][0, 0, :], c["r"][:, 0, 0]
    long_p, rad_p = long_sum / long_sum.sum(), rad_sum / rad_sum.sum()
    cum_r = np.cumsum(rad_p)
    return {
        "file": str(path), "geometry": geo.name, "n": n, "threshold_MeV": thr,
        "X0_mm": geo.X0_eff, "R_M_mm": geo.R_M_eff, "dz_mm": geo.mesh.dz, "dr_mm": geo.mesh.dr,
        "z_mm": z, "r_mm": r, "longitudinal": long_p / geo.mesh.dz, "radial": rad_p / geo.mesh.dr,
        "mean_depth_X0": float(np.dot(long_p, z) / geo.X0_eff),
        "mean_r_RM": float(np.dot(rad_p, r) / geo.R_M_eff),
        "r90_RM": float(np.interp(0.9, cum_r, geo.r_edges[1:]) / geo.R_M_eff) if cum_r[-1] >= 0.9 else None,
        "e_inc_GeV": e_inc / 1e3, "e_vis_over_e_inc": e_vis / e_inc,
        "mean_e_vis_over_e_inc": float(np.mean(e_vis / e_inc)),
    }


def _binned_response(e_gev: np.ndarray, ratio: np.ndarray, lo: float, hi: float):
    bins = int(np.clip(len(e_gev) // 10, 1, N_ENERGY_BINS))  # ~10 showers a bin on average, so small files plot too
    edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
    idx = np.clip(np.digitize(e_gev, edges) - 1, 0, bins - 1)
    x, mean, spread = [], [], []
    for b in range(bins):
        sel = ratio[idx == b]
        if len(sel) >= 5:
            x.append(np.sqrt(edges[b] * edges[b + 1]))
            mean.append(sel.mean())
            spread.append(sel.std(ddof=1))
    return np.array(x), np.array(mean), np.array(spread)


def plot_geometries(profiles: list[dict], out_dir: Path) -> list[Path]:
    """Four profile panels and the response plot; returns the written PNG paths."""
    from calofm.evaluation.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for i, p in enumerate(profiles):
        style = {"color": f"C{i}", "label": p["geometry"], "drawstyle": "steps-mid"}
        axes[0, 0].plot(p["z_mm"], p["longitudinal"], **style)
        axes[0, 1].plot(p["z_mm"] / p["X0_mm"], p["longitudinal"] * p["X0_mm"], **style)
        axes[1, 0].plot(p["r_mm"], p["radial"], **style)
        axes[1, 1].plot(p["r_mm"] / p["R_M_mm"], p["radial"] * p["R_M_mm"], **style)
    labels = [("depth z [mm]", "1/E dE/dz [1/mm]"), ("depth [X0]", "1/E dE/dt [1/X0]"),
              ("r [mm]", "1/E dE/dr [1/mm]"), ("r [R_M]", "1/E dE/d(r/R_M)")]
    for ax, (xl, yl) in zip(axes.flat, labels):
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=8)
    axes[0, 0].set_title("longitudinal profile (mean of normalised showers)", fontsize=9)
    axes[1, 0].set_title("radial profile (mean of normalised showers)", fontsize=9)
    paths = [out_dir / "profiles.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    positive = False
    for i, p in enumerate(profiles):
        e = p["e_inc_GeV"]
        x, mean, spread = _binned_response(e, p["e_vis_over_e_inc"], e.min(), e.max() * 1.0001)
        ax.errorbar(x, mean, yerr=spread, color=f"C{i}", marker="o", ms=3, capsize=2, label=p["geometry"])
        positive |= bool((mean > 0).any())
    ax.set_xscale("log")
    ax.set_yscale("log" if positive else "linear")  # a log axis without a positive value cannot be drawn
    ax.set_xlabel("incident energy [GeV]")
    ax.set_ylabel("E_vis / E_inc (bars: spread per bin)")
    ax.legend(fontsize=8)
    paths.append(out_dir / "response.png")
    fig.savefig(paths[1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def compare_geometries(files: list, out_dir: str | Path, geometries: list | None = None, threshold=None,
                       max_showers=None, extra_dirs=None) -> dict:
    """Profiles of several files (one geometry each) -> profiles.png, response.png and summary.json.

    Every file is read and checked before ``out_dir`` is touched; the outputs go through a temporary folder."""
    from calofm.data.output import Staging, catch_interrupts, check_output

    geometries = geometries or [None] * len(files)
    if len(geometries) != len(files):
        raise ValueError(f"{len(geometries)} geometries for {len(files)} files")
    if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0 MeV, not {threshold!r}")
    if max_showers is not None and (isinstance(max_showers, bool) or not isinstance(max_showers, int | np.integer)
                                    or max_showers < 1):
        raise ValueError(f"max_showers must be a whole number >= 1, not {max_showers!r}")
    out_dir = check_output(out_dir, files, kind="report")
    with catch_interrupts():
        profiles = [geometry_profiles(f, g, threshold, max_showers, extra_dirs) for f, g in zip(files, geometries)]
        keys = ("file", "geometry", "n", "threshold_MeV", "X0_mm", "R_M_mm", "dz_mm", "dr_mm", "mean_depth_X0",
                "mean_r_RM", "r90_RM", "mean_e_vis_over_e_inc")
        summary = {"geometries": [{k: p[k] for k in keys} for p in profiles]}
        with Staging(out_dir.parent, out_dir.name, inputs=files) as staging:
            tmp = staging.tmp / "plots"
            tmp.mkdir()
            plot_geometries(profiles, tmp)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            staging.place(tmp, out_dir, "merge")
    return summary
