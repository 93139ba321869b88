"""Incident conditions of a reference/generated pair: paired (the same conditions row by row, as written by
``calofm generate --like``) or unpaired (two independent samples), and the comparison of their distributions.

Paired samples differ only in their showers. Unpaired samples (a Geant4 sample against a generated one of the
same spectrum, two simulator seeds) are compared at the distribution level; their condition distributions
are compared too and reported, with a warning when they differ, since every shower metric then mixes shower
and spectrum differences.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.stats import ks_2samp

from calofm.evaluation.histograms import separation_power

log = logging.getLogger(__name__)

COND_RTOL = 1e-5  # float32 round-off of stored conditions
KEYS = (("incident_energy", "MeV"), ("incident_phi", "rad"), ("incident_theta", "rad"))
PAIRINGS = ("auto", "paired", "unpaired")
DIFFER_P = 1e-3  # KS p-value below which the condition distributions are said to differ


def conditions_match(ref: dict, gen: dict) -> bool:
    """Same number of showers and the same conditions row by row (up to float32 round-off)."""
    if len(ref["incident_energy"]) != len(gen["incident_energy"]):
        return False
    return all(np.allclose(np.asarray(ref[k], np.float64), np.asarray(gen[k], np.float64), rtol=COND_RTOL, atol=1e-6)
               for k, _ in KEYS)


def check_conditions(ref: dict, gen: dict, ref_name: str = "reference", gen_name: str = "generated") -> None:
    """The generated sample must hold the reference's incident energies and angles, in the same order."""
    hint = f"generate with `calofm generate --like {ref_name}`, or compare them unpaired (--pairing unpaired)"
    if len(ref["incident_energy"]) != len(gen["incident_energy"]):
        raise ValueError(f"{gen_name} has {len(gen['incident_energy'])} showers, {ref_name} has "
                         f"{len(ref['incident_energy'])}; paired evaluation needs the same conditions: {hint}")
    for key, unit in KEYS:
        a, b = np.asarray(ref[key], np.float64), np.asarray(gen[key], np.float64)
        bad = ~np.isclose(a, b, rtol=COND_RTOL, atol=1e-6)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{gen_name}: {key} differs from {ref_name} at row {i} ({b[i]:.6g} vs {a[i]:.6g} "
                             f"{unit}; {int(bad.sum())} rows differ): {hint}")


def pairing_of(ref: dict, gen: dict, asked: str = "auto", ref_name: str = "reference",
               gen_name: str = "generated") -> str:
    """'paired' or 'unpaired': ``auto`` pairs samples whose conditions match row by row; ``paired`` insists."""
    if asked not in PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, not {asked!r}")
    if asked == "paired":
        check_conditions(ref, gen, ref_name, gen_name)
        return "paired"
    return "paired" if asked == "auto" and conditions_match(ref, gen) else "unpaired"


def _edges(key: str, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    both = np.concatenate([a, b])
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        return None
    if key == "incident_energy" and lo > 0:
        return np.logspace(np.log10(lo), np.log10(hi), 41)
    return np.linspace(lo, hi, 41)


def compare_conditions(ref: dict, gen: dict) -> dict:
    """Per condition: mean and spread of each sample, separation power (40 common bins) and the two-sample
    Kolmogorov-Smirnov statistic and p-value; ``differ`` lists the conditions with p < 1e-3."""
    out: dict = {"differ": []}
    for key, unit in KEYS:
        a, b = np.asarray(ref[key], np.float64), np.asarray(gen[key], np.float64)
        edges = _edges(key, a, b)
        sep = 0.0 if edges is None else separation_power(np.histogram(a, edges)[0], np.histogram(b, edges)[0])
        ks = ks_2samp(a, b)
        out[key] = {"unit": unit, "mean_reference": float(a.mean()), "mean_generated": float(b.mean()),
                    "std_reference": float(a.std()), "std_generated": float(b.std()),
                    "separation_power": float(sep), "ks_statistic": float(ks.statistic), "ks_p_value": float(ks.pvalue)}
        if ks.pvalue < DIFFER_P:
            out["differ"].append(key)
    return out


def warn_if_different(cond: dict, ref_name: str, gen_name: str) -> None:
    if cond["differ"]:
        worst = ", ".join(f"{k} (KS p = {cond[k]['ks_p_value']:.1e})" for k in cond["differ"])
        log.warning("%s and %s have different condition distributions: %s; every metric mixes shower and "
                    "spectrum differences", gen_name, ref_name, worst)
