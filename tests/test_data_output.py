"""No data is ever lost by `calofm convert`: never onto or into an input, --overwrite, staged writes, nothing left
behind on errors or Ctrl-C, and errors that blame the right file (calofm.data.output, calofm.data.convert)."""

from __future__ import annotations

import hashlib
import os
import signal

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_showers

from calofm.cli import main
from calofm.data import FileAttrs, ShowerFileError, read_showers, write_showers
from calofm.data.convert import calochallenge_to_native, convert, native_to_calochallenge
from calofm.data.output import Staging, atomic_folder, catch_interrupts, check_interrupted, write_text_atomic

KEYS = ("showers", "incident_energy", "incident_phi", "incident_theta")


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def native(path, n=4, seed=0, nan_row=None):
    data = random_showers(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_showers(path, *(data[k] for k in KEYS), attrs=FileAttrs(geometry="par04_siw", energy_scale="deposited"),
                  compression=None)
    if nan_row is not None:  # the writer refuses NaN: damage the file afterwards
        with h5py.File(path, "r+") as f:
            f["showers"][nan_row, 1, 2, 3] = np.nan
    return path


def tree(folder) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> sha256: what must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if p.name != "hf_cache" and "hf_cache" not in p.parts}


def error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("to", ["calofm", "calochallenge", "parquet"])
def test_convert_never_writes_onto_or_into_an_input(tmp_path, capsys, to):
    data = tmp_path / "data"
    src = native(data / "a.h5")
    (data / "notes.txt").write_text("keep me")
    pq_dir = tmp_path / "pq"
    convert(src, pq_dir, "parquet", progress=False)
    (tmp_path / "link.h5").symlink_to(src)
    before = tree(tmp_path)
    capsys.readouterr()
    source = src if to != "calofm" else pq_dir  # --to calofm needs a foreign source
    cases = [
        (source, source, "is the input"),
        (source, tmp_path / "link.h5", "is the input") if to != "calofm" else (pq_dir, pq_dir / "x.h5", "inside"),
        (source, data / "sub" / ".." / "a.h5", "is the input") if to != "calofm" else (pq_dir, pq_dir, "is the input"),
        (src, data, "holds the input") if to != "calofm" else (pq_dir, tmp_path, "holds the input"),
    ]
    for s, d, problem in cases:
        for extra in ([], ["--overwrite"]):
            line = error(capsys, ["convert", str(s), str(d), "--to", to, *extra])
            assert line.startswith(f"calofm convert: error: {d}: ") and problem in line, line
    assert tree(tmp_path) == before  # every input and its neighbours untouched, nothing left behind


def test_an_existing_output_needs_overwrite_and_a_foreign_folder_is_never_replaced(tmp_path, capsys):
    src = native(tmp_path / "a.h5")
    cc, xml = tmp_path / "a_cc.hdf5", tmp_path / "a_cc_binning.xml"
    xml.write_text("mine")
    assert error(capsys, ["convert", str(src), str(cc), "--to", "calochallenge"]).endswith(
        f"{xml}: exists already (use --overwrite to replace it)")
    assert main(["convert", str(src), str(cc), "--to", "calochallenge", "--overwrite"]) == 0
    assert xml.read_text().startswith("<Bins>")
    old = cc.read_bytes()
    assert error(capsys, ["convert", str(src), str(cc), "--to", "calochallenge"]).endswith(
        "exists already (use --overwrite to replace it)")
    assert cc.read_bytes() == old
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        error(capsys, ["convert", str(src), str(victim), "--to", "parquet", *extra])
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert "not replacing it, even with --overwrite" in error(
        capsys, ["convert", str(src), str(victim), "--to", "parquet", "--overwrite"])
    big = native(tmp_path / "big.h5", n=5, seed=1)
    shards = tmp_path / "shards"
    convert(big, shards, "parquet", progress=False)
    assert main(["convert", str(src), str(shards), "--to", "parquet", "--overwrite"]) == 0  # calofm's own: replaced
    assert sorted(p.name for p in shards.iterdir()) == ["calofm.json", "data-00000-of-00001.parquet"]
    capsys.readouterr()


@pytest.mark.parametrize("to", ["calochallenge", "parquet"])
def test_a_failed_conversion_leaves_nothing_and_keeps_the_old_output(tmp_path, capsys, to):
    bad = native(tmp_path / "in" / "nan.h5", n=6, nan_row=5)  # found only when the last row is read
    out = tmp_path / "out" / ("o.hdf5" if to == "calochallenge" else "o_pq")
    native(tmp_path / "good.h5")
    assert main(["-q", "convert", str(tmp_path / "good.h5"), str(out), "--to", to]) == 0
    capsys.readouterr()
    before = tree(tmp_path)
    for dst, extra in ((out, ["--overwrite"]), (tmp_path / "new" / "deep" / "o.hdf5", [])):
        line = error(capsys, ["-q", "convert", str(bad), str(dst), "--to", to, "--scale", "2", *extra])
        assert line == f"calofm convert: error: {bad}: 'showers' holds NaN/Inf (first in shower 5)"
        assert tree(tmp_path) == before  # no .partial, no XML, no folder 'new', the old output intact


def test_imports_blame_the_source_and_its_row(tmp_path, capsys):
    flat = np.zeros((10, 6480))
    flat[6, 100] = np.nan
    cc = tmp_path / "cc_nan.hdf5"
    with h5py.File(cc, "w") as f:
        f["incident_energies"] = np.full((10, 1), 1e4)
        f["showers"] = flat
    with pytest.raises(ShowerFileError, match=rf"^{cc}: 'showers' holds NaN/Inf \(first in shower 6\)$"):
        calochallenge_to_native(cc, tmp_path / "out.h5", chunk=4, progress=False)  # row 6 is in the second chunk
    with h5py.File(cc, "r+") as f:
        f["showers"][6, 100] = 0.0
        f["incident_energies"][3, 0] = -1.0
    assert error(capsys, ["convert", str(cc), str(tmp_path / "out.h5"), "--to", "calofm"]) == (
        f"calofm convert: error: {cc}: 'incident_energies' must be > 0 MeV (row 3)")
    text = tmp_path / "table.parquet"
    text.write_text("incident_energy,showers\n1,2\n")
    line = error(capsys, ["convert", str(text), str(tmp_path / "t.h5"), "--to", "calofm"])
    assert line.startswith(f"calofm convert: error: {text}: not a readable Parquet file (")
    data = random_showers(3)
    data["incident_theta"][2] = np.inf
    table = pa.table({"showers": pa.array([r.tolist() for r in data["showers"].reshape(3, -1)], pa.list_(pa.float32())),
                      **{k: pa.array(data[k]) for k in KEYS[1:]}})
    pq.write_table(table, tmp_path / "inf.parquet")
    assert error(capsys, ["convert", str(tmp_path / "inf.parquet"), str(tmp_path / "i.h5"), "--to", "calofm",
                          "--geometry", "odd"]).endswith("inf.parquet: 'incident_theta' holds NaN/Inf (first at row 2)")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf_cache") == ["cc_nan.hdf5", "inf.parquet",
                                                                                 "table.parquet"]


def test_ctrl_c_swallowed_by_h5py_still_stops_convert_with_130(tmp_path, capsys, monkeypatch):
    import calofm.data.calochallenge as cc_module

    src = native(tmp_path / "a.h5")
    original, calls = cc_module.to_calochallenge_order, []

    def swallowing(showers):  # as h5py does: the KeyboardInterrupt surfaces in a callback and is dropped
        calls.append(1)
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return original(showers)

    monkeypatch.setattr(cc_module, "to_calochallenge_order", swallowing)
    assert main(["convert", str(src), str(tmp_path / "a_cc.hdf5"), "--to", "calochallenge", "--scale", "2"]) == 130
    assert calls and capsys.readouterr().err.strip().splitlines()[-1] == "calofm convert: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_a_ctrl_c_is_never_lost_inside_catch_interrupts():
    with pytest.raises(KeyboardInterrupt), catch_interrupts():
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # swallowed; the block still ends with KeyboardInterrupt
    check_interrupted()  # and it is raised once only


def test_staging_merges_reports_and_cleans_up(tmp_path, monkeypatch):
    report = tmp_path / "report"
    report.mkdir()
    (report / "old.png").write_text("old")
    (report / "metrics.json").write_text("old")
    with Staging(report.parent, "report") as st:
        (st.tmp / "r" / "odd").mkdir(parents=True)
        (st.tmp / "r" / "metrics.json").write_text("new")
        (st.tmp / "r" / "odd" / "e.png").write_text("png")
        st.place(st.tmp / "r", report, "merge")
    assert {p.name: p.read_text() for p in report.rglob("*") if p.is_file()} == {
        "old.png": "old", "metrics.json": "new", "e.png": "png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    with pytest.raises(RuntimeError), Staging(tmp_path / "a" / "b", "x") as st:
        (st.tmp / "x").write_text("half")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # the folders it created are gone too
    src = native(tmp_path / "in.h5")
    with pytest.raises(ShowerFileError, match="is an input; not replacing it"), Staging(tmp_path, "y",
                                                                                       inputs=[src]) as st:
        (st.tmp / "y").write_text("x")
        st.place(st.tmp / "y", src)
    assert len(read_showers(src)["showers"]) == 4

    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    with pytest.raises(ShowerFileError, match=r"locked: cannot write here \(Permission denied\)"):
        native_to_calochallenge(src, tmp_path / "locked" / "o.hdf5", progress=False)
    assert not (tmp_path / "locked").exists()


def test_atomic_folder_replaces_an_old_folder_only_when_complete(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(final) as tmp:
        (tmp / "new.txt").write_text("half")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in final.iterdir()] == ["old.txt"]
    with atomic_folder(final) as tmp:
        assert tmp == tmp_path / "model.partial"
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in final.iterdir()] == ["new.txt"]
    write_text_atomic(final / "new.txt", "newer")
    assert (final / "new.txt").read_text() == "newer" and [p.name for p in final.iterdir()] == ["new.txt"]


def test_scale_must_be_finite_and_positive(tmp_path, capsys):
    src = native(tmp_path / "a.h5")
    for bad in ("nan", "-1", "0", "inf"):
        with pytest.raises(SystemExit):
            main(["convert", str(src), str(tmp_path / "o.hdf5"), "--to", "calochallenge", "--scale", bad])
        assert "argument --scale:" in capsys.readouterr().err
    for bad in (float("nan"), -1.0, 0, True):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            native_to_calochallenge(src, tmp_path / "o.hdf5", scale=bad, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a.h5"]
