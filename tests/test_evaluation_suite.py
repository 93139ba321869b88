"""The evaluation suite on samples: the same-distribution floor vs distorted showers, the reference-halves
noise floor, condition checks."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from eval_helpers import conditions, synthetic_showers

from calofm.evaluation import suite
from calofm.evaluation.classifier import ClassifierConfig
from calofm.evaluation.conditions import compare_conditions, pairing_of
from calofm.evaluation.features import apply_threshold, high_level_vector, shower_features
from calofm.evaluation.fpd import fpd
from calofm.evaluation.suite import EvalOptions, check_conditions, compare_samples, evaluate_pair
from calofm.geometry import load_geometry

N = 1200
TINY = ClassifierConfig(hidden=64, n_hidden_layers=1, epochs=10, batch_size=100, lr=1e-3, device="cpu")


@pytest.fixture(scope="module")
def siw():
    return load_geometry("par04_siw")


@pytest.fixture(scope="module")
def samples(siw):
    cond = conditions(siw, N, seed=1, energy_gev=(1.0, 1000.0))

    def make(seed, **distortion):
        return {"showers": synthetic_showers(siw, cond["incident_energy"], seed, **distortion), **cond}

    return {"ref": make(10), "same": make(11), "wide": make(12, width=1.25), "scaled": make(13, scale=1.1),
            "hole": make(14, drop_layer=20)}


def _compare(samples, siw, name, metrics):
    opts = EvalOptions(metrics=metrics, classifier=TINY, fpd_samples=(200, 400), kpd_batch=600, progress=False,
                       min_range_showers=100)
    return compare_samples(samples["ref"], samples[name], siw, opts).results


def test_same_distribution_is_at_the_floor_and_wider_showers_are_caught(samples, siw):
    metrics = ("hist", "cls-high", "cls-low", "kpd")
    same = _compare(samples, siw, "same", metrics)
    wide = _compare(samples, siw, "wide", metrics)
    # FPD on the same 362 features, with fewer batch sizes and batches than the CaloChallenge to stay fast
    thr = siw.card.threshold
    high = {k: high_level_vector(shower_features(apply_threshold(samples[k]["showers"], thr),
                                                 samples[k]["incident_energy"], siw)) for k in ("ref", "same", "wide")}
    for name, res in (("same", same), ("wide", wide)):
        res["fpd"] = dict(zip(("value", "error"), fpd(high["ref"], high[name], 300, 900, num_batches=5, num_points=4)))
    for cls in ("cls-high", "cls-low"):
        assert same[cls]["auc"] < 0.6
        assert wide[cls]["auc"] > 0.8
        assert wide[cls]["jsd"] > same[cls]["jsd"] + 0.2
    assert wide["fpd"]["value"] > 2.5 * same["fpd"]["value"]  # the floor at 1200 showers is large
    assert abs(same["kpd"]["value"]) < 3 * same["kpd"]["error"] + 1e-4
    assert wide["kpd"]["value"] > 10 * abs(same["kpd"]["value"])
    for key in ("width_r", "width_x", "ec_r"):
        assert wide["hist"][key]["separation_power"] > 5 * same["hist"][key]["separation_power"]
    assert wide["hist"]["radial_profile"]["chi2_ndf"] > 20 * max(same["hist"]["radial_profile"]["chi2_ndf"], 1)
    # the energy response is untouched by a wider shower
    assert wide["hist"]["e_ratio"]["separation_power"] < 2 * same["hist"]["e_ratio"]["separation_power"] + 0.01
    assert set(same["energy_ranges"]) == {"1-10 GeV", "10-100 GeV", "100-1000 GeV"}


def test_energy_scale_and_missing_layer_are_caught(samples, siw):
    same = _compare(samples, siw, "same", ("hist", "cls-high"))
    scaled = _compare(samples, siw, "scaled", ("hist",))
    hole = _compare(samples, siw, "hole", ("hist", "cls-high"))
    s_same = same["hist"]["e_ratio"]["separation_power"]
    assert scaled["hist"]["e_ratio"]["separation_power"] > 0.2 > 5 * s_same
    assert scaled["hist"]["e_ratio"]["mean_gen"] / scaled["hist"]["e_ratio"]["mean_ref"] == pytest.approx(1.1, rel=0.02)
    assert hole["hist"]["e_layer"]["per_layer"][20] == 1.0  # nothing in range for the generated sample
    assert same["hist"]["e_layer"]["per_layer"][20] < 0.1
    assert same["cls-high"]["auc"] < 0.6
    assert hole["cls-high"]["auc"] > 0.95


def test_fpd_noise_floor_from_reference_halves(samples, siw, monkeypatch):
    """``evaluate_pair``'s floor (reference half vs half) against a same-distribution and a distorted sample.

    The FPD intercept estimates the distance between the two *empirical* distributions, which for equal
    distributions scales as 1/n_ref + 1/n_gen: halves of N give 4/N, N vs N gives 2/N, so an independent
    same-distribution sample lands at about half the floor, not below it by orders of magnitude nor above it.
    """
    monkeypatch.setattr(suite, "load_sample", lambda path, geometry, max_showers, progress=False, **kw:
                        (samples[path], "par04_siw"))
    monkeypatch.setattr(suite, "fpd", functools.partial(fpd, num_batches=5, num_points=4))  # 20 instead of 200
    opts = EvalOptions(metrics=("fpd",), fpd_samples=(200, 400), progress=False)
    comp, floor, _ = evaluate_pair("ref", "same", "par04_siw", opts)
    assert floor.results["n_reference"] == N // 2
    same, noise = comp.results["fpd"]["value"], floor.results["fpd"]["value"]
    assert noise > 5 * floor.results["fpd"]["error"]  # the floor at 600 showers is well above zero
    assert 0.3 < same / noise < 0.8  # ~0.5 (measured 0.44-0.55 over sample seeds)
    hole = compare_samples(samples["ref"], samples["hole"], siw, opts).results["fpd"]["value"]
    assert hole > 4 * noise  # ~6-8 x


def test_pairing_follows_the_conditions(samples):
    other = dict(samples["same"])
    other["incident_energy"] = other["incident_energy"].copy()
    other["incident_energy"][5] *= 1.01
    with pytest.raises(ValueError, match="calofm generate --like"):
        check_conditions(samples["ref"], other)
    check_conditions(samples["ref"], samples["same"])
    assert pairing_of(samples["ref"], samples["same"]) == "paired"
    assert pairing_of(samples["ref"], other) == "unpaired"  # auto: one row differs, so the samples are independent
    assert pairing_of(samples["ref"], samples["same"], "unpaired") == "unpaired"
    with pytest.raises(ValueError, match="differs from reference at row 5"):
        pairing_of(samples["ref"], other, "paired")
    short = {k: v[:100] for k, v in samples["same"].items()}
    assert pairing_of(samples["ref"], short) == "unpaired"


def test_condition_distributions_are_compared():
    rng = np.random.default_rng(0)

    def sample(n, lo, hi):
        return {"incident_energy": np.exp(rng.uniform(np.log(lo), np.log(hi), n)),
                "incident_phi": rng.uniform(-3.14, 3.14, n), "incident_theta": np.full(n, 1.5708)}

    a, b, c = sample(2000, 1e3, 1e6), sample(1500, 1e3, 1e6), sample(1500, 1e3, 1e4)
    same = compare_conditions(a, b)
    assert same["differ"] == [] and same["incident_energy"]["separation_power"] < 0.02
    assert same["incident_theta"] == pytest.approx({"unit": "rad", "mean_reference": 1.5708, "mean_generated": 1.5708,
                                                    "std_reference": 0.0, "std_generated": 0.0, "separation_power": 0.0,
                                                    "ks_statistic": 0.0, "ks_p_value": 1.0})
    low = compare_conditions(a, c)  # only the bottom third of the log spectrum
    assert low["differ"] == ["incident_energy"] and low["incident_energy"]["ks_statistic"] == pytest.approx(2 / 3,
                                                                                                          abs=0.04)
    assert low["incident_energy"]["separation_power"] > 0.3


def test_options_are_range_checked():
    for bad in ({"threshold": float("nan")}, {"threshold": -1.0}, {"fpd_samples": (0, 0)}, {"fpd_samples": (50, 10)},
                {"fpd_samples": (2.5, 10)}, {"kpd_batch": 1}, {"max_showers": 0}, {"seed": -1},
                {"pairing": "maybe"}, {"min_range_showers": 0}):
        with pytest.raises(ValueError):
            EvalOptions(**bad)
    with pytest.raises(ValueError, match="FPD needs batch sizes 2 <= min <= max"):
        fpd(np.zeros((5, 2)), np.zeros((5, 2)), 0, 0)
