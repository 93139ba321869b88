"""The bad-input battery: every command that reads shower files, on every corrupt file (tests/bad_files.py).

Each run must exit nonzero with exactly one line on stderr naming the file and the problem, no traceback,
no output left behind, and every input byte for byte as it was. Bad numeric options are refused by argparse
naming the option, before anything is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bad_files import (
    CALOCHALLENGE,
    NATIVE,
    PARQUET,
    assert_one_error_line,
    checksums,
    good_file,
    make_bad_calochallenge,
    make_bad_files,
    make_bad_parquet,
)

from calofm.cli import main

# a numpy warning would be a second line on stderr
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    files = {"native": make_bad_files(folder / "native"), "calochallenge": make_bad_calochallenge(folder / "cc"),
             "parquet": make_bad_parquet(folder / "pq"),
             "good": good_file(folder / "good.h5"), "good64": good_file(folder / "good64.h5", seed=1, dtype="f8")}
    return folder, files, checksums(folder)


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


# command name as printed -> argv for (input file, a good file, an empty output folder)
NATIVE_COMMANDS = {
    "validate": ("validate", lambda f, good, out: ["validate", f]),
    "convert-calochallenge": ("convert", lambda f, good, out: ["convert", f, out / "o.hdf5", "--to", "calochallenge",
                                                               "--scale", "2"]),
    "convert-parquet": ("convert", lambda f, good, out: ["convert", f, out / "o_pq", "--to", "parquet"]),
    "evaluate-reference": ("evaluate", lambda f, good, out: ["evaluate", "-r", f, "-g", good, "-o", out / "report",
                                                             "--metrics", "hist", "--no-plots", "--no-noise-floor"]),
    "evaluate-generated": ("evaluate", lambda f, good, out: ["evaluate", "-r", good, "-g", f, "-o", out / "report",
                                                             "--metrics", "hist", "--no-plots", "--no-noise-floor"]),
    "compare-geometries": ("compare-geometries", lambda f, good, out: ["compare-geometries", "--files", good, f,
                                                                       "--out", out / "plots"]),
}


def run_bad(capsys, tmp_path, inputs, command: str, argv, bad) -> None:
    folder, _, before = inputs
    out = tmp_path / "outputs"
    out.mkdir()
    capsys.readouterr()
    assert main(["-q", *map(str, argv)]) == 2
    assert_one_error_line(capsys.readouterr().err, command, bad)
    assert list(out.iterdir()) == []  # no output, no .partial, no temporary folder, no report folder
    assert checksums(folder) == before  # inputs unchanged, nothing written beside them


@pytest.mark.parametrize("case", list(NATIVE))
@pytest.mark.parametrize("which", list(NATIVE_COMMANDS))
def test_every_command_refuses_every_bad_native_file(inputs, tmp_path, capsys, which, case):
    _, files, _ = inputs
    command, argv = NATIVE_COMMANDS[which]
    bad = files["native"][case]
    run_bad(capsys, tmp_path, inputs, command, argv(bad.path, files["good"], tmp_path / "outputs"), bad)


@pytest.mark.parametrize("case", list(CALOCHALLENGE))
@pytest.mark.parametrize("to", ["calofm", "parquet"])
def test_convert_refuses_every_bad_calochallenge_file(inputs, tmp_path, capsys, case, to):
    bad = inputs[1]["calochallenge"][case]
    run_bad(capsys, tmp_path, inputs, "convert", ["convert", bad.path, tmp_path / "outputs" / "o", "--to", to], bad)


@pytest.mark.parametrize("case", list(PARQUET))
@pytest.mark.parametrize("to", ["calofm", "calochallenge"])
def test_convert_refuses_every_bad_parquet_source(inputs, tmp_path, capsys, case, to):
    bad = inputs[1]["parquet"][case]
    src = bad.path.parent if bad.path.name in ("data-00000-of-00001.parquet", "calofm.json") else bad.path
    run_bad(capsys, tmp_path, inputs, "convert", ["convert", src, tmp_path / "outputs" / "o", "--to", to,
                                                  "--geometry", "par04_siw", "--scale", "2"], bad)


@pytest.mark.parametrize("good", ["good", "good64"])
def test_the_same_commands_pass_on_valid_float32_and_float64_files(inputs, tmp_path, capsys, good):
    folder, files, before = inputs
    out = tmp_path / "outputs"
    out.mkdir()
    for which, (_, argv) in NATIVE_COMMANDS.items():
        assert main(["-q", *map(str, argv(files[good], files["good"], out))]) == 0, which
    assert sorted(p.name for p in out.iterdir()) == ["o.hdf5", "o_binning.xml", "o_pq", "plots", "report"]
    assert checksums(folder) == before
    capsys.readouterr()


def test_a_real_process_prints_one_line_and_no_traceback(inputs, tmp_path):
    _, files, _ = inputs
    bad = files["native"]["nan"]
    for argv, command in ((["validate", bad.path], "validate"),
                          (["convert", bad.path, tmp_path / "o.hdf5", "--to", "calochallenge"], "convert")):
        result = subprocess.run([sys.executable, "-m", "calofm.cli", *map(str, argv)], capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        assert result.returncode == 2 and result.stdout == ""
        # convert warns about visible energy? no: the file records deposited energy; nothing but the error
        assert_one_error_line(result.stderr, command, bad)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Bad numeric options: argparse names the option, nothing is written
# ----------------------------------------------------------------------------------------------

OPTIONS = [
    ("convert", ["--to", "calochallenge"], "--scale", ["nan", "-1", "0", "inf"]),
    ("simulate", ["--geometry", "odd", "--samples", "10"], "--seed", ["-1", str(2**70), "1.5"]),
    ("simulate", ["--geometry", "odd", "--seed", "1"], "--samples", ["0", "-3", "1e3"]),
    ("evaluate", ["-r", "{good}", "-g", "{good}"], "--fpd-samples", ["0:0", "1:10", "10:5", "2.5:10"]),
    ("evaluate", ["-r", "{good}", "-g", "{good}"], "--kpd-batch", ["0", "1"]),
    ("evaluate", ["-r", "{good}", "-g", "{good}"], "--threshold", ["nan", "-0.1"]),
    ("evaluate", ["-r", "{good}", "-g", "{good}"], "--max-showers", ["0", "9"]),
    ("evaluate", ["-r", "{good}", "-g", "{good}"], "--epochs", ["0"]),
    ("evaluate", ["-r", "{good}", "-g", "{good}"], "--n-runs", ["0"]),
    ("evaluate", ["-r", "{good}", "-g", "{good}"], "--seed", ["-1"]),
    ("compare-geometries", ["--files", "{good}"], "--threshold", ["inf", "-1"]),
    ("compare-geometries", ["--files", "{good}"], "--max-showers", ["0"]),
]


@pytest.mark.parametrize(("command", "base", "option", "values"), OPTIONS, ids=[f"{c}{o}" for c, _, o, _ in OPTIONS])
def test_bad_numeric_options_name_the_option(inputs, tmp_path, capsys, command, base, option, values):
    _, files, _ = inputs
    out = tmp_path / "outputs"
    out.mkdir()
    target = {"convert": [str(files["good"]), str(out / "o.hdf5")], "simulate": ["--out", str(out / "s.h5")],
              "evaluate": ["-o", str(out / "r")], "compare-geometries": ["--out", str(out / "p")]}[command]
    for value in values:
        argv = [command, *target, *(a.format(good=files["good"]) for a in base), f"{option}={value}"]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and f"argument {option}: " in err[-1] and "Traceback" not in "".join(err)
    assert list(out.iterdir()) == []


def test_library_calls_check_the_same_values_before_writing(tmp_path, inputs):
    from calofm.data.convert import native_to_calochallenge
    from calofm.evaluation.compare import compare_geometries
    from calofm.sim import simulate_to_file

    good = inputs[1]["good"]
    with pytest.raises(ValueError, match=r"seed must be a whole number in \[0, 2\^63\)"):
        simulate_to_file(tmp_path / "s.h5", "odd", 10, seed=2**70, progress=False)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        native_to_calochallenge(good, tmp_path / "c.hdf5", scale=float("nan"), progress=False)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        compare_geometries([good], tmp_path / "p", threshold=float("nan"))
    assert list(tmp_path.iterdir()) == [tmp_path / "hf_cache"] or list(tmp_path.iterdir()) == []
