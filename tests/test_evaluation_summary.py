"""The fidelity line: energy ratio and spread from features, and the row read back from metrics.json."""

import math

import numpy as np

from calofm.evaluation.features import energy_summary
from calofm.evaluation.summary import fidelity_row, format_rows


def test_energy_summary_is_the_exact_ratio_of_means_and_spreads():
    rng = np.random.default_rng(0)
    e_inc = rng.uniform(1e3, 1e5, 500)
    ratio_ref = 0.025 * (1 + 0.02 * rng.standard_normal(500))
    ref = {"e_tot": ratio_ref * e_inc, "e_ratio": ratio_ref}
    gen = {"e_tot": 1.1 * ratio_ref * e_inc, "e_ratio": 1.1 * ratio_ref}  # 10 % too much, spread scales too
    s = energy_summary(ref, gen)
    assert math.isclose(s["mean_ratio"], 1.1, rel_tol=1e-12)
    assert math.isclose(s["spread_ratio"], 1.1, rel_tol=1e-12)
    assert math.isclose(s["spread_ref"], np.std(ratio_ref), rel_tol=1e-12)


def test_fidelity_row_reads_metrics_and_marks_missing_as_nan():
    entry = {
        "energy": {"mean_ratio": 1.02, "spread_ratio": 0.9},
        "hist": {"n_hits": {"separation_power": 0.1}, "e_ratio": {"separation_power": 0.3},
                 "ec_r": {"separation_power": float("nan")}},
        "cls-high": {"auc": 0.7}, "fpd": {"x1e3": 12.0}, "noise_floor": {"fpd": {"x1e3": 3.0}},
    }
    r = fidelity_row(entry)
    assert r["e_ratio"] == 1.02 and r["spread"] == 0.9 and r["s_hits"] == 0.1
    assert math.isclose(r["mean_s"], 0.2)  # NaN separation powers are left out of the mean
    assert r["auc_high"] == 0.7 and math.isnan(r["auc_low"]) and r["fpd_floor"] == 3.0 and math.isnan(r["kpd"])
    text = format_rows([{"geometry": "odd", **r}])
    assert text.splitlines()[1].split()[:3] == ["odd", "1.020", "0.90"]
