"""The evaluation suite end to end: same-distribution floor vs distorted samples, CLI, report, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_helpers import conditions, synthetic_showers, write_sample

from calofm.cli import main
from calofm.evaluation.classifier import ClassifierConfig
from calofm.evaluation.suite import EvalOptions, check_conditions, compare_samples
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
    opts = EvalOptions(metrics=metrics, classifier=TINY, fpd_samples=(300, 600), kpd_batch=600, progress=False,
                       min_range_showers=100)
    return compare_samples(samples["ref"], samples[name], siw, opts).results


def test_same_distribution_is_at_the_floor_and_wider_showers_are_caught(samples, siw):
    metrics = ("hist", "cls-high", "cls-low", "fpd", "kpd")
    same = _compare(samples, siw, "same", metrics)
    wide = _compare(samples, siw, "wide", metrics)
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


def test_conditions_must_match(samples):
    other = dict(samples["same"])
    other["incident_energy"] = other["incident_energy"].copy()
    other["incident_energy"][5] *= 1.01
    with pytest.raises(ValueError, match="calofm generate --like"):
        check_conditions(samples["ref"], other)
    check_conditions(samples["ref"], samples["same"])


@pytest.fixture(scope="module")
def files(tmp_path_factory, siw):
    d = tmp_path_factory.mktemp("eval")
    cond = conditions(siw, 300, seed=2, energy_gev=(1.0, 1000.0))
    bad = conditions(siw, 300, seed=3, energy_gev=(1.0, 1000.0))
    allegro = load_geometry("allegro")
    return {"ref": write_sample(d / "ref.h5", siw, cond, 20), "gen": write_sample(d / "gen.h5", siw, cond, 21),
            "bad": write_sample(d / "bad.h5", siw, bad, 22),
            "allegro": write_sample(d / "allegro.h5", allegro, conditions(allegro, 300, 4), 23)}


def test_cli_evaluate_writes_metrics_plots_and_report(files, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["evaluate", "--reference", files["ref"], "--generated", files["gen"], "--out", str(out),
               "--metrics", "hist,cls-high,kpd", "--epochs", "2", "--kpd-batch", "150"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["geometries"]["par04_siw"]
    assert entry["threshold_MeV"] == pytest.approx(5e-4)
    assert 0.0 <= entry["cls-high"]["auc"] <= 1.0
    assert entry["noise_floor"]["n_reference"] == 150
    assert "kpd" in entry["noise_floor"] and "fpd" not in entry
    report = (out / "report.md").read_text()
    assert "| S e_ratio |" in report and "noise floor" in report and "| KPD x 1e3 |" in report
    for name in ("e_ratio", "voxel_spectrum", "e_layer_layers", "longitudinal_profile", "radial_profile"):
        assert (out / "par04_siw" / f"{name}.png").stat().st_size > 1000
    assert "report:" in capsys.readouterr().out


def test_cli_evaluate_rejects_other_conditions(files, tmp_path, capsys):
    rc = main(["evaluate", "-r", files["ref"], "-g", files["bad"], "-o", str(tmp_path / "x"), "--metrics", "hist"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "calofm generate --like" in err and len(err.strip().splitlines()) == 1


def test_cli_compare_geometries(files, tmp_path, capsys):
    out = tmp_path / "geo"
    rc = main(["compare-geometries", "--files", files["ref"], files["allegro"], "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())["geometries"]
    assert [g["geometry"] for g in summary] == ["par04_siw", "allegro"]
    for g, geo in zip(summary, (load_geometry("par04_siw"), load_geometry("allegro"))):
        assert g["mean_e_vis_over_e_inc"] == pytest.approx(geo.sampling_fraction, rel=0.1)
        assert 2.0 < g["mean_depth_X0"] < 15.0
    assert (out / "profiles.png").stat().st_size > 1000 and (out / "response.png").stat().st_size > 1000
    assert np.isfinite(summary[0]["mean_r_RM"])
