"""calofm.cli: help, argument helpers, one-line errors with exit code 2, and `calofm validate` output."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from calofm import cli
from calofm.cli import join_negative_ranges, main
from calofm.commands.args import parse_count, parse_range
from calofm.data import FileAttrs, ShowerFileError, write_showers
from calofm.geometry import load_geometry

READY = ["geometries", "validate", "convert"]  # the other subcommands are built elsewhere


def exits(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = exits(["--help"], capsys)
    assert code == 0
    for name in cli.COMMANDS:
        assert name in out
    assert "check a shower file and print a summary" in out
    assert main([]) == 0 and "usage: calofm" in capsys.readouterr().out  # no command: help, success


@pytest.mark.parametrize(("command", "options"), [
    ("geometries", ["--geometry-dir", "--json", "--sections"]),
    ("validate", ["FILE", "--geometry", "--geometry-dir"]),
    ("convert", ["IN", "OUT", "--to", "{calofm,calochallenge,parquet}", "--dataset", "--scale"]),
])
def test_subcommand_help(capsys, command, options):
    code, out, _ = exits([command, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: calofm {command}")
    for option in options:
        assert option in out


def test_help_does_not_import_heavy_libraries():
    # command modules import torch/h5py/datasets inside run(), so help and argument errors stay fast
    code = ("import sys; from calofm import cli; cli.build_parser(''); [cli.build_parser(n) for n in "
            f"{READY!r}]; print(sorted(m for m in ('torch', 'h5py', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_runs():
    script = Path(sys.executable).with_name("calofm")
    result = subprocess.run([str(script), "geometries", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: calofm geometries" in result.stdout


@pytest.mark.parametrize(("text", "value"), [("5000", 5000), ("200k", 200_000), ("1M", 1_000_000), ("1.5k", 1500),
                                             (" 3 ", 3), ("2m", 2_000_000)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "0", "1.5", "-5", "1e3", "10G", "0.0001k"])
def test_parse_count_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count(text)


@pytest.mark.parametrize(("text", "value"), [("1:1000", (1.0, 1000.0)), ("50", (50.0, 50.0)), ("50:50", (50.0, 50.0)),
                                             ("0.87:2.27", (0.87, 2.27)), ("-1:1", (-1.0, 1.0))])
def test_parse_range(text, value):
    assert parse_range(text) == value


@pytest.mark.parametrize(("argv", "expected"), [
    (["--phi", "-3.1416:3.1416"], ["--phi=-3.1416:3.1416"]),
    (["--theta", "1:2", "--phi", "-1:-0.5", "-v"], ["--theta", "1:2", "--phi=-1:-0.5", "-v"]),
    (["--phi=-1:1", "--energy", "-5"], ["--phi=-1:1", "--energy", "-5"]),  # already joined; plain numbers alone
    (["-v", "-1:2"], ["-v", "-1:2"]),  # only after a long option
])
def test_negative_ranges_are_joined_to_their_option(argv, expected):
    assert join_negative_ranges(argv) == expected


@pytest.mark.parametrize("text", ["5:1", "a:b", "1:2:3", "nan:1", "1:inf", ""])
def test_parse_range_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_range(text)


# ----------------------------------------------------------------------------------------------
# Errors: exit 2, one line naming the problem
# ----------------------------------------------------------------------------------------------


def one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_exits_2_with_one_line(tmp_path, tmp_showers, capsys):
    assert main(["validate", str(tmp_path / "nope.h5")]) == 2
    assert one_line(capsys) == f"calofm validate: error: {tmp_path / 'nope.h5'}: file not found"
    assert main(["validate", str(tmp_path)]) == 2
    assert one_line(capsys).endswith(f"{tmp_path}: is a directory, not an HDF5 file")
    good = tmp_showers(2)
    assert main(["validate", str(good), "--geometry", "no_such"]) == 2
    assert one_line(capsys).startswith("calofm validate: error: unknown geometry 'no_such'; available: allegro")
    assert main(["validate", str(good), "--geometry", "odd"]) == 2
    assert one_line(capsys).endswith("geometry mismatch: file holds 'par04_siw', asked for 'odd'")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    assert main(["validate", str(good), str(bad)]) == 2  # the first file passes, the second fails
    out = capsys.readouterr()
    assert f"{good}: OK" in out.out
    assert out.err.strip().endswith(f"{bad}: not an HDF5 file (or truncated before its header)")


def test_validate_checks_the_recorded_geometry_against_its_card(tmp_path, tmp_showers, capsys):
    wrong_dr = tmp_showers(2, geometry="odd", mesh_dr=9.9, name="odd_dr.h5")
    assert main(["validate", str(wrong_dr)]) == 2
    assert one_line(capsys).endswith(f"{wrong_dr}: mesh mismatch: file has dr = 9.9 mm, geometry 'odd' has "
                                     f"{load_geometry('odd').mesh.dr} mm")
    wrong_shape = tmp_showers(2, mesh_shape=(18, 50, 45), name="shape.h5")
    assert main(["validate", str(wrong_shape)]) == 2
    assert one_line(capsys).endswith("attribute mesh_shape = [18, 50, 45] but the showers are on the 9x16x45 mesh")
    custom = tmp_showers(2, geometry="my_detector", mesh_dr=3.0, name="custom.h5")
    assert main(["validate", str(custom)]) == 0  # a card we do not have is not an error, but it is said
    assert "no card for geometry 'my_detector' here: cell sizes not checked" in capsys.readouterr().out
    cards = tmp_path / "cards"
    cards.mkdir()
    card = yaml.safe_load(load_geometry("odd").source.read_text())
    card["name"] = "my_detector"
    (cards / "my_detector.yaml").write_text(yaml.safe_dump(card))
    assert main(["validate", str(custom), "--geometry-dir", str(cards)]) == 2
    assert "mesh mismatch: file has dr = 3.0 mm, geometry 'my_detector'" in one_line(capsys)


def test_argument_errors_exit_2(capsys):
    code, _, err = exits(["validate"], capsys)
    assert code == 2 and "the following arguments are required: FILE" in err
    code, _, err = exits(["convert", "a.h5", "b"], capsys)
    assert code == 2 and "the following arguments are required: --to" in err
    code, _, err = exits(["nosuchcommand"], capsys)
    assert code == 2 and "invalid choice: 'nosuchcommand'" in err


@pytest.mark.parametrize("command", [["simulate", "--geometry", "odd", "--samples", "2"],
                                     ["generate", "--model", "m", "--geometry", "odd", "--samples", "2"]])
@pytest.mark.parametrize("device, problem", [
    ("foo", "'foo' is not a torch device (cpu, cuda, cuda:1, mps, ...)"),
    ("cuda:63", "'cuda:63' is not usable on this machine ("),  # torch's AssertionError or "invalid device ordinal"
    ("meta", "'meta' is not usable on this machine (it holds no data)"),
])
def test_a_device_this_machine_lacks_is_an_argument_error(command, device, problem, tmp_path, capsys):
    code, _, err = exits([*command, "--out", str(tmp_path / "x.h5"), "--device", device], capsys)
    assert code == 2 and f"error: argument --device: {problem}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_very_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(ShowerFileError, match="file not found"):
        main(["-vv", "validate", str(tmp_path / "nope.h5")])


def test_ctrl_c_exits_130(monkeypatch, tmp_showers, capsys):
    from calofm.commands import files

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "run", interrupted)
    assert main(["validate", str(tmp_showers(1))]) == 130
    assert capsys.readouterr().err.strip() == "calofm validate: interrupted"


# ----------------------------------------------------------------------------------------------
# calofm validate
# ----------------------------------------------------------------------------------------------


def test_validate_prints_the_summary(tmp_path, capsys):
    showers = np.zeros((2, 9, 16, 45), np.float32)
    showers[0, 0, 0, :10] = 100.0  # 1 GeV in 10 cells
    showers[1, 1, 1, 0] = 250.0
    path = write_showers(tmp_path / "v.h5", showers, [10_000.0, 5_000.0], [0.1, -0.1], [1.2, 1.9],
                         attrs=FileAttrs(geometry="cld", particle="gamma", energy_scale="visible"))
    assert main(["validate", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{path}: OK",
        "  showers          2",
        "  geometry         cld   particle gamma   energy scale visible",
        "  E_inc            5 - 10 GeV",
        "  theta            1.200 - 1.900 rad",
        "  sum E / E_inc    0.0833",  # 1250 MeV / 15000 MeV
        "  hits per shower  5.5   max cell 250 MeV",
    ]
    # a file without calofm attributes: the geometry comes from --geometry
    plain = write_showers(tmp_path / "plain.h5", showers, [10_000.0, 5_000.0], [0.1, -0.1], [1.2, 1.9])
    assert main(["validate", str(plain), "--geometry", "odd"]) == 0
    assert "  geometry         odd   particle (not recorded)" in capsys.readouterr().out
