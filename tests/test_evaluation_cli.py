"""``calofm evaluate`` and ``calofm compare-geometries`` end to end on small synthetic files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from eval_helpers import conditions, write_sample

from calofm.cli import main
from calofm.geometry import load_geometry


@pytest.fixture(scope="module")
def siw():
    return load_geometry("par04_siw")


@pytest.fixture(scope="module")
def files(tmp_path_factory, siw):
    d = tmp_path_factory.mktemp("eval")
    cond = conditions(siw, 300, seed=2, energy_gev=(1.0, 1000.0))
    bad = conditions(siw, 300, seed=3, energy_gev=(1.0, 1000.0))
    allegro = load_geometry("allegro")
    return {"ref": write_sample(d / "ref.h5", siw, cond, 20), "gen": write_sample(d / "gen.h5", siw, cond, 21),
            "bad": write_sample(d / "bad.h5", siw, bad, 22),
            "small": write_sample(d / "small.h5", siw, conditions(siw, 200, seed=5, energy_gev=(1.0, 1000.0)), 24),
            "low": write_sample(d / "low.h5", siw, conditions(siw, 300, seed=6, energy_gev=(1.0, 10.0)), 25),
            "allegro": write_sample(d / "allegro.h5", allegro, conditions(allegro, 300, 4), 23)}


def test_cli_evaluate_writes_metrics_plots_and_report(files, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["evaluate", "--reference", files["ref"], "--generated", files["gen"], "--out", str(out),
               "--metrics", "hist,cls-high,kpd", "--epochs", "2", "--kpd-batch", "150"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["geometries"]["par04_siw"]
    assert entry["pairing"] == "paired" and "conditions" not in entry  # generated with the reference's conditions
    assert entry["threshold_MeV"] == pytest.approx(5e-4)
    assert entry["noise_floor"]["n_reference"] == 150
    assert "kpd" in entry["noise_floor"] and "fpd" not in entry
    # gen and ref share the distribution: with 60 + 60 validation showers the null AUC has sigma ~0.05
    cls, floor_cls = entry["cls-high"], entry["noise_floor"]["cls-high"]
    assert abs(cls["auc"] - 0.5) < 0.2
    assert cls["jsd"] == pytest.approx((math.log(2) - cls["runs"][0]["bce"]) / math.log(2), rel=1e-9)
    report = (out / "report.md").read_text()
    assert f"| AUC high-level (cls-high) | {cls['auc']:.4f} | {floor_cls['auc']:.4f} |" in report  # json = report
    assert "| S e_ratio |" in report and "noise floor" in report and "| KPD x 1e3 |" in report
    for name in ("e_ratio", "voxel_spectrum", "e_layer_layers", "longitudinal_profile", "radial_profile"):
        assert (out / "par04_siw" / f"{name}.png").stat().st_size > 1000
    assert "report:" in capsys.readouterr().out


def test_cli_evaluate_paired_mode_rejects_other_conditions(files, tmp_path, capsys):
    rc = main(["evaluate", "-r", files["ref"], "-g", files["bad"], "-o", str(tmp_path / "x"), "--metrics", "hist",
               "--pairing", "paired"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "calofm generate --like" in err[0] and err[0].startswith(
        f"calofm evaluate: error: {files['bad']}: incident_energy differs from {files['ref']} at row 0")
    assert not (tmp_path / "x").exists()  # checked before the report folder exists


def test_cli_evaluate_compares_independent_samples_unpaired(files, tmp_path, capsys, caplog):
    out = tmp_path / "unpaired"
    rc = main(["evaluate", "-r", files["ref"], "-g", files["small"], "-o", str(out), "--metrics", "hist,cls-high",
               "--epochs", "1", "--no-plots", "--no-noise-floor"])
    assert rc == 0, capsys.readouterr().err
    entry = json.loads((out / "metrics.json").read_text())["geometries"]["par04_siw"]
    assert entry["pairing"] == "unpaired" and (entry["n_reference"], entry["n_generated"]) == (300, 200)
    assert entry["classifier_showers"] == 200 and 0.3 < entry["cls-high"]["auc"] < 0.7  # one distribution
    assert entry["conditions"]["differ"] == [] and entry["conditions"]["incident_energy"]["ks_p_value"] > 1e-3
    assert "has different condition distributions" not in caplog.text
    assert "Unpaired: two independent samples" in (out / "report.md").read_text()
    assert "par04_siw: " in capsys.readouterr().out
    rc = main(["evaluate", "-r", files["ref"], "-g", files["low"], "-o", str(tmp_path / "low"), "--metrics", "hist",
               "--no-plots", "--no-noise-floor"])
    assert rc == 0
    entry = json.loads((tmp_path / "low" / "metrics.json").read_text())["geometries"]["par04_siw"]
    assert entry["conditions"]["differ"] == ["incident_energy"]  # 1-10 GeV against 1-1000 GeV
    assert entry["conditions"]["incident_energy"]["mean_generated"] < entry["conditions"]["incident_energy"][
        "mean_reference"] / 10
    assert "different condition distributions: incident_energy (KS p = " in caplog.text
    assert "**Warning:** the condition distributions differ" in (tmp_path / "low" / "report.md").read_text()
    assert "conditions differ: incident_energy" in capsys.readouterr().out
    rc = main(["evaluate", "-r", files["ref"], "-g", files["gen"], "-o", str(tmp_path / "p"), "--metrics", "hist",
               "--no-plots", "--no-noise-floor", "--pairing", "unpaired"])  # forced: even matching conditions
    assert rc == 0
    entry = json.loads((tmp_path / "p" / "metrics.json").read_text())["geometries"]["par04_siw"]
    assert entry["pairing"] == "unpaired" and entry["conditions"]["incident_energy"]["ks_statistic"] == 0.0


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


def test_cli_evaluate_several_geometries_in_one_report(files, tmp_path, capsys):
    out = tmp_path / "multi"
    rc = main(["-q", "evaluate", "-r", files["ref"], "-g", files["gen"], "-r", files["allegro"], "-g", files["allegro"],
               "-o", str(out), "--metrics", "hist", "--no-plots", "--no-noise-floor"])
    assert rc == 0, capsys.readouterr().err
    entries = json.loads((out / "metrics.json").read_text())["geometries"]
    assert list(entries) == ["par04_siw", "allegro"]
    assert entries["allegro"]["hist"]["e_ratio"]["separation_power"] == 0.0  # a file against itself
    assert entries["par04_siw"]["hist"]["e_ratio"]["separation_power"] > 0.0
    report = (out / "report.md").read_text()
    assert "## par04_siw" in report and "## allegro" in report


def test_metrics_are_chosen_with_spaces_or_commas():
    from calofm.cli import build_parser
    from calofm.commands.evaluate import options_from_args

    def options(*metrics):
        argv = ["evaluate", "-r", "a.h5", "-g", "b.h5", "-o", "out", *(["--metrics", *metrics] if metrics else [])]
        return options_from_args(build_parser(only="evaluate").parse_args(argv))

    assert options("hist", "fpd,kpd", "hist").metrics == ("hist", "fpd", "kpd")
    assert options("all").metrics == options().metrics and "cls-low" in options().metrics
    with pytest.raises(SystemExit):
        options("fid")
