"""The evaluation suite: load a reference/generated pair, pair or compare their conditions, compute every metric.

``compare_samples`` works on in-memory samples; ``evaluate`` reads files (one pair per geometry),
adds the Geant4-vs-Geant4-like noise floor from two halves of the reference, and writes the report.
Every input is read and checked before the report folder is touched; the report is written through a
temporary folder, so an error or Ctrl-C leaves nothing behind (``calofm.data.output``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from calofm.evaluation import features as F
from calofm.evaluation.classifier import ClassifierConfig, classifier_test, default_config
from calofm.evaluation.conditions import (  # noqa: F401  (check_conditions is public here)
    PAIRINGS,
    check_conditions,
    compare_conditions,
    pairing_of,
    warn_if_different,
)
from calofm.evaluation.fpd import fpd, kpd
from calofm.evaluation.histograms import compare_histograms, voxel_histograms
from calofm.geometry import Geometry, load_geometry

log = logging.getLogger(__name__)

ALL_METRICS = ("hist", "cls-low", "cls-high", "fpd", "kpd")
MIN_SHOWERS = 10  # per file: the noise floor splits the reference in halves, the classifier each into 3 parts


@dataclass
class EvalOptions:
    """Everything that changes a number in the report (recorded in metrics.json)."""

    metrics: tuple[str, ...] = ALL_METRICS
    threshold: float | None = None  # MeV; None: the geometry card's readout threshold
    energy_ranges: tuple[tuple[float, float], ...] = F.ENERGY_RANGES  # GeV
    min_range_showers: int = 100  # energy ranges with fewer reference showers are skipped
    noise_floor: bool = True
    classifier: ClassifierConfig | None = None  # None: full recipe on GPU, CPU recipe otherwise
    fpd_samples: tuple[int, int] = (10_000, 50_000)  # CaloChallenge: min_samples=10000, JetNet max 50000
    kpd_batch: int | None = None  # None: min(10000 (CaloChallenge), sample size), see docs/evaluation.md
    max_showers: int | None = None  # use only the first N showers of each file
    pairing: str = "auto"  # auto: paired if the conditions match row by row; paired: insist; unpaired
    plots: bool = True
    progress: bool = True
    seed: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.metrics) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}")

        def whole(value, low: int) -> bool:
            return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= low

        thr = self.threshold
        if thr is not None and (not isinstance(thr, int | float) or not np.isfinite(thr) or thr < 0):
            raise ValueError(f"threshold must be a finite number >= 0 MeV, not {thr!r}")
        if len(self.fpd_samples) != 2 or not all(whole(v, 2) for v in self.fpd_samples) or \
                self.fpd_samples[0] > self.fpd_samples[1]:
            raise ValueError(f"fpd_samples must be two whole numbers 2 <= min <= max, not {self.fpd_samples!r}")
        for name, low in (("kpd_batch", 2), ("max_showers", MIN_SHOWERS)):
            value = getattr(self, name)
            if value is not None and not whole(value, low):
                raise ValueError(f"{name} must be a whole number >= {low}, not {value!r}")
        if not whole(self.min_range_showers, 1) or not whole(self.seed, 0):
            raise ValueError(f"min_range_showers must be >= 1 and seed >= 0, not {self.min_range_showers!r}, "
                             f"{self.seed!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, not {self.pairing!r}")


@dataclass
class Comparison:
    """Results (JSON-ready) of one reference/generated comparison plus what the plots need."""

    results: dict
    ref: dict[str, np.ndarray] = field(repr=False)
    gen: dict[str, np.ndarray] = field(repr=False)
    hists: dict = field(default_factory=dict, repr=False)


def _classifier_config(options: EvalOptions) -> ClassifierConfig:
    if options.classifier is not None:
        return options.classifier
    return replace(default_config(), seed=options.seed)


def compare_samples(ref: dict, gen: dict, geometry: Geometry, options: EvalOptions | None = None) -> Comparison:
    """All selected metrics for two in-memory samples (dicts like ``read_showers``), thresholds applied here."""
    options = options or EvalOptions()
    thr = geometry.card.threshold if options.threshold is None else options.threshold
    ref_s = F.apply_threshold(ref["showers"], thr)
    gen_s = F.apply_threshold(gen["showers"], thr)
    fr = F.shower_features(ref_s, ref["incident_energy"], geometry)
    fg = F.shower_features(gen_s, gen["incident_energy"], geometry)
    res: dict = {"n_reference": len(ref_s), "n_generated": len(gen_s), "threshold_MeV": thr,
                 "energy": F.energy_summary(fr, fg)}
    out = Comparison(res, fr, fg)
    if "hist" in options.metrics:
        scores, out.hists = compare_histograms(fr, fg, geometry, thr)
        scores["voxel_spectrum"], out.hists["voxel_spectrum"] = voxel_histograms(ref_s, gen_s, thr)
        res["hist"] = scores
        res["energy_ranges"] = _per_range(fr, fg, geometry, thr, options)
    need_high = {"cls-high", "fpd", "kpd"} & set(options.metrics)
    # the classifier needs equal classes: an unpaired sample of another size gives up its extra showers
    n_cls = min(len(ref_s), len(gen_s))
    pick_r, pick_g = (_subset(len(a), n_cls, options.seed + i) for i, a in enumerate((ref_s, gen_s)))
    high_r = F.high_level_vector(fr) if need_high else None
    high_g = F.high_level_vector(fg) if need_high else None
    if "fpd" in options.metrics:
        log.info("FPD on %d x %d high-level features", *high_r.shape)
        value, err = fpd(high_r, high_g, *options.fpd_samples, progress=options.progress)
        res["fpd"] = {"value": value, "error": err, "x1e3": value * 1e3, "error_x1e3": err * 1e3,
                      "batch_sizes": list(options.fpd_samples)}
    if "kpd" in options.metrics:
        batch = options.kpd_batch or min(10_000, len(high_r), len(high_g))
        value, err = kpd(high_r, high_g, batch_size=batch, progress=options.progress)
        res["kpd"] = {"value": value, "error": err, "x1e3": value * 1e3, "error_x1e3": err * 1e3, "batch_size": batch}
    cfg = _classifier_config(options)
    if "cls-high" in options.metrics:
        log.info("classifier on high-level features (%d inputs)", high_r.shape[1])
        res["cls-high"] = classifier_test(high_r[pick_r], high_g[pick_g], cfg, progress=options.progress)
    if "cls-low" in options.metrics:
        scale = float(np.median(fr["e_ratio"])) or 1.0  # visible fraction: voxels/E_inc on the CaloChallenge scale
        low_r = F.low_level_vector(ref_s[pick_r], ref["incident_energy"][pick_r], scale)
        low_g = F.low_level_vector(gen_s[pick_g], gen["incident_energy"][pick_g], scale)
        log.info("classifier on low-level features (%d inputs)", low_r.shape[1])
        res["cls-low"] = classifier_test(low_r, low_g, cfg, progress=options.progress)
        res["cls-low"]["voxel_scale"] = scale
    if n_cls < max(len(ref_s), len(gen_s)) and {"cls-high", "cls-low"} & set(options.metrics):
        res["classifier_showers"] = n_cls
    return out


def _subset(n: int, size: int, seed: int) -> np.ndarray:
    """All rows, or ``size`` of them at random (kept in order)."""
    return np.arange(n) if size >= n else np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _per_range(fr: dict, fg: dict, geometry: Geometry, thr: float, options: EvalOptions) -> dict:
    """Histogram scores and mean features per incident-energy range (only if the file spans several)."""
    mr = F.energy_masks(fr["e_inc"], options.energy_ranges, options.min_range_showers)
    mg = F.energy_masks(fg["e_inc"], options.energy_ranges, 1)
    out = {}
    if len(mr) < 2:
        return out
    for label, mask in mr.items():
        if label not in mg:
            continue
        r, g = F.select(fr, mask), F.select(fg, mg[label])
        scores, _ = compare_histograms(r, g, geometry, thr)
        for value in scores.values():
            value.pop("per_layer", None)
        out[label] = {"n_reference": int(mask.sum()), "n_generated": int(mg[label].sum()), "hist": scores,
                      "mean_reference": F.mean_features(r), "mean_generated": F.mean_features(g)}
    return out


def split_halves(sample: dict, seed: int) -> tuple[dict, dict]:
    """Two disjoint random halves of a sample (same size): the reference-vs-reference noise floor."""
    n = len(sample["incident_energy"])
    idx = np.random.default_rng(seed).permutation(n)
    a, b = np.sort(idx[: n // 2]), np.sort(idx[n // 2 : 2 * (n // 2)])
    return {k: v[a] for k, v in sample.items()}, {k: v[b] for k, v in sample.items()}


def load_sample(path: str | Path, geometry: Geometry | None, max_showers: int | None,
                progress: bool = False, extra_dirs=None) -> tuple[dict, Geometry | str | None]:
    """Read a shower file (optionally its first ``max_showers``) with every check of ``ShowerFile``, the recorded
    geometry against its card included; returns the sample and the file's geometry: its card (found by name or
    stored in the file), else the recorded name, else None."""
    from calofm.data.io import ShowerFile

    with ShowerFile(path, geometry=geometry, geometry_dirs=extra_dirs) as f:
        n = len(f) if max_showers is None else min(max_showers, len(f))
        if n < MIN_SHOWERS:
            raise ValueError(f"{path}: {n} showers; evaluation needs at least {MIN_SHOWERS} per file")
        log.info("reading %d showers from %s", n, path)
        return f.load(limit=n, progress=progress), f.geometry or f.geometry_name


def resolve_geometry(name: str | Geometry | None, recorded: list[Geometry | str | None], paths: list,
                     extra_dirs=None) -> Geometry:
    """The geometry asked for, else the one of the files (``load_sample``): one name, and one card for it."""
    from calofm.cards import same_card

    if name is not None:
        return load_geometry(name, extra_dirs)
    names = {r if isinstance(r, str) else r.name for r in recorded if r is not None}
    if len(names) > 1:
        raise ValueError(f"{paths[0]} and {paths[1]} record different geometries {sorted(names)}")
    if not names:
        raise ValueError(f"{paths[0]}: no geometry recorded in the file; pass --geometry NAME")
    cards = [r for r in recorded if isinstance(r, Geometry)]
    if not cards:
        raise ValueError(f"{paths[0]}: no card for geometry '{names.pop()}' (not built in, not in --geometry-dir, "
                         "not stored in the file); pass --geometry-dir DIR or --geometry CARD.yaml")
    if not all(same_card(c, cards[0]) for c in cards):
        raise ValueError(f"{paths[0]} and {paths[1]} carry different cards of geometry '{cards[0].name}'")
    return cards[0]


def evaluate_pair(reference, generated, geometry=None, options: EvalOptions | None = None, extra_dirs=None):
    """Read, check and compare one reference/generated pair; returns (Comparison, noise floor or None, geometry)."""
    options = options or EvalOptions()
    geo = load_geometry(geometry, extra_dirs) if geometry is not None else None
    ref, ref_geo = load_sample(reference, geo, options.max_showers, options.progress, extra_dirs=extra_dirs)
    gen, gen_geo = load_sample(generated, geo, options.max_showers, options.progress, extra_dirs=extra_dirs)
    geo = geo or resolve_geometry(None, [ref_geo, gen_geo], [reference, generated], extra_dirs)
    pairing = pairing_of(ref, gen, options.pairing, str(reference), str(generated))
    cond = None
    if pairing == "unpaired":
        cond = compare_conditions(ref, gen)
        warn_if_different(cond, str(reference), str(generated))
    log.info("%s: comparing %s with %s (%s)", geo.name, generated, reference, pairing)
    comp = compare_samples(ref, gen, geo, options)
    comp.results["pairing"] = pairing
    if cond is not None:
        comp.results["conditions"] = cond
    floor = None
    if options.noise_floor:
        log.info("%s: noise floor from two halves of %s", geo.name, reference)
        half_a, half_b = split_halves(ref, options.seed + 1)
        floor = compare_samples(half_a, half_b, geo, options)
    return comp, floor, geo


def evaluate(
    reference,
    generated,
    out_dir: str | Path,
    metrics: tuple[str, ...] | list[str] | None = None,
    threshold: float | None = None,
    geometry=None,
    options: EvalOptions | None = None,
    extra_dirs=None,
) -> dict:
    """Evaluate generated against reference files; write metrics.json, plots and report.md; return metrics.json.

    Paths or equal-length lists of paths (one pair per geometry); ``geometry`` a name, a list, or None (from files).
    """
    from calofm.data.output import Staging, catch_interrupts, check_output
    from calofm.evaluation.report import write_report

    refs = [reference] if isinstance(reference, (str, Path)) else list(reference)
    gens = [generated] if isinstance(generated, (str, Path)) else list(generated)
    if len(refs) != len(gens) or not refs:
        raise ValueError(f"need one generated file per reference file, got {len(refs)} and {len(gens)}")
    geos = geometry if isinstance(geometry, (list, tuple)) else [geometry] * len(refs)
    if len(geos) != len(refs):
        raise ValueError(f"{len(geos)} geometries for {len(refs)} file pairs")
    options = options or EvalOptions()
    if metrics is not None:
        options = replace(options, metrics=tuple(metrics))
    if threshold is not None:
        options = replace(options, threshold=threshold)
    out_dir = check_output(out_dir, [*refs, *gens], kind="report")
    with catch_interrupts():
        pairs = []  # every input read and checked, every metric computed, before the report folder is touched
        for ref, gen, geo in zip(refs, gens, geos):
            comp, floor, g = evaluate_pair(ref, gen, geo, options, extra_dirs)
            pairs.append({"reference": str(ref), "generated": str(gen), "geometry": g, "comparison": comp,
                          "floor": floor})
        with Staging(out_dir.parent, out_dir.name, inputs=[*refs, *gens]) as staging:
            metrics = write_report(pairs, staging.tmp / "report", options)
            staging.place(staging.tmp / "report", out_dir, "merge")
    return metrics
