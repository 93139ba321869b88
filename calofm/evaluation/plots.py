"""PNG plots of a comparison: histograms with gen/ref ratio panels, layer grids, mean profiles.

Log scales where calorimeter people use them: layer and cell energies (log x, log y), profiles (log y).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from calofm.evaluation import features as F
from calofm.evaluation.histograms import SPECS, VOXEL_LABEL, Hist
from calofm.geometry import Geometry

log = logging.getLogger(__name__)

REF_STYLE = {"color": "0.3", "label": "reference"}
GEN_STYLE = {"color": "tab:red", "label": "generated"}
RATIO_RANGE = (0.5, 1.5)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ratio_axes(fig, spec):
    """Main and ratio axes sharing x in one grid cell ``spec``."""
    inner = spec.subgridspec(2, 1, height_ratios=(3, 1), hspace=0.05)
    top = fig.add_subplot(inner[0])
    bottom = fig.add_subplot(inner[1], sharex=top)
    top.tick_params(labelbottom=False)
    return top, bottom


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def draw_hist(top, bottom, h: Hist, xlabel: str, logx: bool = False, logy: bool = False, title: str = "") -> None:
    """Normalised step histograms of reference and generated, gen/ref ratio below."""
    dens = []
    for counts, style in ((h.ref, REF_STYLE), (h.gen, GEN_STYLE)):
        total = counts.sum()
        d = counts / (total * np.diff(h.edges)) if total else np.zeros(len(counts))
        dens.append(d)
        top.stairs(d, h.edges, **style)
    bottom.stairs(_ratio(dens[1], dens[0]), h.edges, color=GEN_STYLE["color"])
    bottom.axhline(1.0, color="0.5", lw=0.8)
    bottom.set_ylim(*RATIO_RANGE)
    bottom.set_yticks([0.5, 1.0, 1.5])
    bottom.set_ylabel("gen/ref", fontsize=8)
    bottom.set_xlabel(xlabel, fontsize=8)
    top.set_ylabel("normalised", fontsize=8)
    if logx:
        top.set_xscale("log")
    if logy:
        top.set_yscale("log")
    for ax in (top, bottom):
        ax.minorticks_off()  # minor log ticks triple the drawing time of the 18-axes layer grids
    if title:
        top.set_title(title, fontsize=9)


def plot_single(h: Hist, xlabel: str, path: Path, logx=False, logy=False, title="") -> Path:
    plt = _pyplot()
    fig = plt.figure(figsize=(5.5, 4.5))
    top, bottom = _ratio_axes(fig, fig.add_gridspec(1, 1)[0])
    draw_hist(top, bottom, h, xlabel, logx, logy, title)
    top.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_grid(hists: list[Hist | None], xlabel: str, path: Path, logx=False, scores=None, n_show=9) -> Path:
    """A 3x3 grid of per-layer histograms for layers spread over the depth (separation power in titles)."""
    plt = _pyplot()
    layers = np.unique(np.linspace(0, len(hists) - 1, n_show).round().astype(int))
    fig = plt.figure(figsize=(13, 11))
    grid = fig.add_gridspec(3, 3, hspace=0.35, wspace=0.3)
    for i, (cell, layer) in enumerate(zip(grid, layers)):
        h = hists[layer]
        top, bottom = _ratio_axes(fig, cell)
        if h is None:
            top.set_title(f"layer {layer}: empty", fontsize=9)
            continue
        s = scores[layer] if scores is not None else None
        title = f"layer {layer}" + (f"  S = {s:.2e}" if s is not None else "")
        draw_hist(top, bottom, h, xlabel, logx=logx, logy=logx, title=title)
        if i == 0:
            top.legend(fontsize=7)
        for ax in (top, bottom):  # fewer tick labels: text layout is most of the drawing time of 18 axes
            ax.tick_params(labelsize=7)
        if not logx:
            top.locator_params(axis="both", nbins=4)
    fig.savefig(path, dpi=80)  # no tight bbox: it doubles the drawing time of an 18-axes figure
    plt.close(fig)
    return path


def plot_separation_per_layer(scores: dict, path: Path, floor: dict | None = None) -> Path:
    """Separation power vs layer for every per-layer feature (noise floor dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, spec in enumerate(s for s in SPECS if s.per_layer):
        color = f"C{i}"
        values = np.array([np.nan if v is None else v for v in scores[spec.key]["per_layer"]], dtype=float)
        ax.plot(values, color=color, label=spec.key)
        if floor is not None:
            fv = np.array([np.nan if v is None else v for v in floor[spec.key]["per_layer"]], dtype=float)
            ax.plot(fv, color=color, ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("layer (z index)")
    ax.set_ylabel("separation power (dotted: reference halves)")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_profiles(ref: dict, gen: dict, geometry: Geometry, out_dir: Path, ranges) -> list[Path]:
    """Mean longitudinal (vs z) and radial (vs r) profiles per energy range, log y, with gen/ref ratios."""
    plt = _pyplot()
    centres = geometry.cell_centres()
    axes_x = {"longitudinal": (centres["z"][0, 0, :], "e_layer", "depth z [mm]"),
              "radial": (centres["r"][:, 0, 0], "radial", "r [mm]")}
    groups = {"all": (np.ones(len(ref["e_inc"]), bool), np.ones(len(gen["e_inc"]), bool))}
    mg = F.energy_masks(gen["e_inc"], ranges, 1)
    for label, mask in F.energy_masks(ref["e_inc"], ranges, 1).items():
        if label in mg and len(ranges) > 1:
            groups[label] = (mask, mg[label])
    paths = []
    for name, (x, key, xlabel) in axes_x.items():
        fig = plt.figure(figsize=(6, 5))
        top, bottom = _ratio_axes(fig, fig.add_gridspec(1, 1)[0])
        for i, (label, (mr, mgen)) in enumerate(groups.items()):
            r, g = ref[key][mr].mean(axis=0), gen[key][mgen].mean(axis=0)
            top.plot(x, r, color=f"C{i}", ls="-", label=f"{label} ref")
            top.plot(x, g, color=f"C{i}", ls="--", label=f"{label} gen")
            bottom.plot(x, _ratio(g, r), color=f"C{i}")
        top.set_yscale("log")
        top.set_ylabel("mean energy per bin [MeV]")
        top.legend(fontsize=7, ncol=2)
        bottom.axhline(1.0, color="0.5", lw=0.8)
        bottom.set_ylim(*RATIO_RANGE)
        bottom.set_ylabel("gen/ref", fontsize=8)
        bottom.set_xlabel(xlabel)
        path = out_dir / f"{name}_profile.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_comparison(comp, geometry: Geometry, out_dir: Path, ranges, floor_scores: dict | None = None) -> list[Path]:
    """Every plot of one comparison into ``out_dir``; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = plot_profiles(comp.ref, comp.gen, geometry, out_dir, ranges)
    if not comp.hists:
        return paths
    scores = comp.results["hist"]
    for spec in SPECS:
        hists = comp.hists[spec.key]
        if spec.per_layer:
            paths.append(plot_layer_grid(hists, spec.label, out_dir / f"{spec.key}_layers.png", logx=spec.logx,
                                         scores=scores[spec.key]["per_layer"]))
        elif hists[0] is not None:
            s = scores[spec.key]["separation_power"]
            paths.append(plot_single(hists[0], spec.label, out_dir / f"{spec.key}.png", title=f"S = {s:.2e}"))
    vox = comp.hists["voxel_spectrum"]
    s = scores["voxel_spectrum"]["separation_power"]
    paths.append(plot_single(vox, VOXEL_LABEL, out_dir / "voxel_spectrum.png", logx=True, logy=True,
                             title=f"all cells pooled, S = {s:.2e}"))
    paths.append(plot_separation_per_layer(scores, out_dir / "separation_per_layer.png", floor_scores))
    log.info("wrote %d plots to %s", len(paths), out_dir)
    return paths
