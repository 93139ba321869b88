"""calofm.data.convert: CaloChallenge DS2/DS3 voxel order and rebinning, Parquet / HF datasets, `calofm convert`."""

from __future__ import annotations

import json
import logging
import math

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_showers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calofm.cli import main
from calofm.data import FileAttrs, ShowerFile, ShowerFileError, read_showers, write_showers
from calofm.data.convert import (
    calochallenge_to_native,
    convert,
    detect_kind,
    from_calochallenge_order,
    load_parquet_dataset,
    native_to_calochallenge,
    native_to_ds3,
    native_to_parquet,
    parquet_to_native,
    phi_overlap,
    rebin_ds3_to_native,
    to_calochallenge_order,
)
from calofm.geometry import MESH_SHAPE, load_geometry

KEYS = ("showers", "incident_energy", "incident_phi", "incident_theta")


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path, monkeypatch):
    """load_dataset caches Arrow files: keep them out of the developer's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def native_file(path, n=6, data_seed=0, **attrs):
    data = random_showers(n, data_seed)
    write_showers(path, *(data[k] for k in KEYS), attrs=FileAttrs(**({"geometry": "par04_siw"} | attrs)))
    return path, data


def cc_file(path, showers_flat, energies):
    """A CaloChallenge file as the challenge's Dataset_creation.ipynb writes it (float64 energies, gzip)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=np.asarray(energies, np.float64).reshape(-1, 1), compression="gzip")
        f.create_dataset("showers", data=showers_flat, compression="gzip")
    return path


def single_cell(r, phi, z, shape=MESH_SHAPE, value=7.0):
    s = np.zeros((1, *shape), np.float32)
    s[0, r, phi, z] = value
    return s


# ----------------------------------------------------------------------------------------------
# Voxel order (CaloChallenge README: DS2 flat = layer*144 + alpha*9 + r, DS3 flat = layer*900 + alpha*18 + r)
# ----------------------------------------------------------------------------------------------

cells = st.tuples(st.integers(0, 8), st.integers(0, 15), st.integers(0, 44))


@settings(max_examples=60, deadline=None)
@given(cells)
def test_ds2_flat_index_of_a_single_cell(cell):
    r, phi, z = cell
    flat = to_calochallenge_order(single_cell(r, phi, z))
    assert flat.shape == (1, 6480)
    assert np.flatnonzero(flat[0]).tolist() == [z * 144 + phi * 9 + r]
    back = from_calochallenge_order(flat, 9, 16, 45)
    np.testing.assert_array_equal(back, single_cell(r, phi, z))


@pytest.mark.parametrize("cell", [(0, 0, 0), (8, 0, 0), (0, 15, 0), (0, 0, 44), (8, 15, 44), (3, 5, 7)])
def test_ds2_export_writes_the_cell_at_the_calochallenge_index(tmp_path, cell):
    r, phi, z = cell
    src = tmp_path / "one.h5"
    write_showers(src, single_cell(r, phi, z), [5000.0], [0.0], [1.5],
                  attrs=FileAttrs(geometry="par04_siw", energy_scale="deposited"))
    out = native_to_calochallenge(src, tmp_path / "one_cc.hdf5", progress=False)
    with h5py.File(out, "r") as f:
        assert np.flatnonzero(f["showers"][0]).tolist() == [z * 144 + phi * 9 + r]
        assert f["showers"][0, z * 144 + phi * 9 + r] == 7.0 and f["incident_energies"][:].tolist() == [[5000.0]]
        assert f["incident_energies"].dtype == np.float64  # as the official files; evaluate.py needs it


@settings(max_examples=30, deadline=None)
@given(st.tuples(st.integers(0, 17), st.integers(0, 49), st.integers(0, 44)))
def test_ds3_import_puts_a_voxel_in_its_native_ring_layer_and_phi_overlap(cell):
    r3, a3, z = cell
    flat = np.zeros((1, 40500), np.float32)
    flat[0, z * 900 + a3 * 18 + r3] = 1.0  # CaloChallenge DS3 order (README)
    fine = from_calochallenge_order(flat, 18, 50, 45)
    assert fine[0, r3, a3, z] == 1.0
    native = rebin_ds3_to_native(fine)[0]
    assert native.sum() == pytest.approx(1.0)
    nz = np.argwhere(native > 0)
    assert set(nz[:, 0]) == {r3 // 2} and set(nz[:, 2]) == {z}  # radial pairs merge; layers are kept
    # the DS3 phi bin [a3/50, (a3+1)/50] (in turns) shares itself among the 16 native bins by overlap
    for i in range(16):
        lo, hi = max(i / 16, a3 / 50), min((i + 1) / 16, (a3 + 1) / 50)
        assert native[r3 // 2, i, z] == pytest.approx(max(hi - lo, 0) * 50, abs=1e-6)


def test_phi_overlap_matrix_by_hand():
    m = phi_overlap(50, 16)  # (16, 50): share of DS3 bin j in native bin i
    assert m.shape == (16, 50) and m.min() >= 0 and m.max() <= 1 + 1e-12
    np.testing.assert_allclose(m.sum(axis=0), 1.0)  # every source bin is shared out completely
    np.testing.assert_allclose(m.sum(axis=1), 50 / 16)  # each target bin receives 3.125 source bins
    # bin j=3 spans [0.06, 0.08] turns, native bin 0 ends at 1/16 = 0.0625: 1/8 in bin 0, 7/8 in bin 1
    assert m[0, 3] == pytest.approx(0.125) and m[1, 3] == pytest.approx(0.875) and m[0, 0] == pytest.approx(1.0)
    t = phi_overlap(16, 50)  # (50, 16)
    np.testing.assert_allclose(t.sum(axis=0), 1.0)
    np.testing.assert_allclose(t.sum(axis=1), 16 / 50)
    np.testing.assert_allclose(t[3, 0], (0.0625 - 0.06) * 16)  # 1/8 of DS3 bin 3's width is in native bin 0
    np.testing.assert_allclose(phi_overlap(16, 16), np.eye(16), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# CaloChallenge files
# ----------------------------------------------------------------------------------------------


def test_native_to_ds2_to_native_is_exact(tmp_path):
    src, data = native_file(tmp_path / "n.h5", n=7, data_seed=1, energy_scale="deposited")
    cc = native_to_calochallenge(src, tmp_path / "cc.hdf5", dataset=2, progress=False)
    with h5py.File(cc, "r") as f:
        assert set(f) == {"incident_energies", "showers"}
        assert f["showers"].shape == (7, 6480) and f["showers"].dtype == np.float32
        assert f["incident_energies"].shape == (7, 1) and f["showers"].compression == "gzip"
    back = calochallenge_to_native(cc, tmp_path / "back.h5", progress=False)
    got = read_showers(back)
    np.testing.assert_array_equal(got["showers"], data["showers"])
    np.testing.assert_array_equal(got["incident_energy"], data["incident_energy"])
    # CaloChallenge showers carry no angles: normal incidence
    assert np.all(got["incident_phi"] == 0) and np.allclose(got["incident_theta"], math.pi / 2)
    with ShowerFile(back) as f:
        assert (f.attrs.geometry, f.attrs.particle, f.attrs.energy_scale) == ("par04_siw", "e-", "deposited")
        assert f.attrs.generator == "calochallenge-import:cc.hdf5"


def test_export_scale_and_visible_energy_warning(tmp_path, caplog):
    src, data = native_file(tmp_path / "vis.h5", n=3, energy_scale="visible")
    with caplog.at_level(logging.WARNING, logger="calofm.data.convert"):
        native_to_calochallenge(src, tmp_path / "plain.hdf5", progress=False)
    assert "holds visible energy" in caplog.text
    cc = native_to_calochallenge(src, tmp_path / "scaled.hdf5", scale=1 / 0.033, progress=False)
    with h5py.File(cc, "r") as f:
        np.testing.assert_array_equal(f["showers"][:], to_calochallenge_order(data["showers"] * np.float32(1 / 0.033)))


def test_import_reads_challenge_style_files(tmp_path, caplog):
    flat = to_calochallenge_order(random_showers(4, seed=2)["showers"]).astype(np.float64)
    flat[1, 100] = -0.5  # the challenge clips negatives to 0; so does the import
    cc = cc_file(tmp_path / "dataset_2_1.hdf5", flat, [1000.0, 2e3, 5e4, 1e6])
    assert detect_kind(cc) == "calochallenge"
    native = calochallenge_to_native(cc, tmp_path / "n.h5", geometry="par04_siw", progress=False)
    got = read_showers(native)
    expected = from_calochallenge_order(np.clip(flat, 0, None).astype(np.float32), 9, 16, 45)
    np.testing.assert_array_equal(got["showers"], expected)
    np.testing.assert_array_equal(got["incident_energy"], [1000.0, 2e3, 5e4, 1e6])
    assert not caplog.records  # par04_siw: the DS2 mesh itself
    calochallenge_to_native(cc, tmp_path / "n_odd.h5", geometry="odd", progress=False)
    assert "recording them as 'odd'" in caplog.text  # another mesh: allowed, but said
    native = tmp_path / "n_odd.h5"
    attrs = ShowerFile(native).attrs
    assert (attrs.geometry, attrs.mesh_dr, attrs.mesh_dz) == ("odd", load_geometry("odd").mesh.dr,
                                                              load_geometry("odd").mesh.dz)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 5), seed=st.integers(0, 100))
def test_ds3_export_and_import_conserve_energy_per_layer_and_ring(tmp_path, n, seed):
    src, data = native_file(tmp_path / f"d3_{n}_{seed}.h5", n=n, data_seed=seed, energy_scale="deposited")
    cc = native_to_calochallenge(src, tmp_path / f"d3_{n}_{seed}.hdf5", dataset=3, progress=False, overwrite=True)
    with h5py.File(cc, "r") as f:
        assert f["showers"].shape == (n, 40500)
        fine = from_calochallenge_order(f["showers"][:], 18, 50, 45)
    native_ring_layer = data["showers"].sum(axis=2)  # (n, 9, 45)
    fine_ring_layer = fine.sum(axis=2)  # (n, 18, 45)
    np.testing.assert_allclose(fine_ring_layer[:, 0::2] + fine_ring_layer[:, 1::2], native_ring_layer, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(fine_ring_layer[:, 0::2], fine_ring_layer[:, 1::2], rtol=1e-6)  # rings split evenly
    back = read_showers(calochallenge_to_native(cc, tmp_path / f"d3_{n}_{seed}_back.h5", progress=False,
                                                overwrite=True))
    np.testing.assert_allclose(back["showers"].sum(axis=2), native_ring_layer, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back["showers"].sum(axis=(1, 2)), data["showers"].sum(axis=(1, 2)), rtol=1e-5,
                               atol=1e-5)


def test_ds3_split_then_merge_conserves_each_native_cell_row():
    x = random_showers(2, seed=3)["showers"]
    fine = native_to_ds3(x)
    assert fine.shape == (2, 18, 50, 45)
    again = rebin_ds3_to_native(fine)
    np.testing.assert_allclose(again.sum(axis=2), x.sum(axis=2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("make", "problem"), [
    (lambda f: f.create_dataset("showers", data=np.zeros((2, 6480), "f4")), "missing key 'incident_energies'"),
    (lambda f: (f.create_dataset("incident_energies", data=np.ones((2, 1))),
                f.create_dataset("showers", data=np.zeros((2, 368), "f4"))),
     r"'showers' has shape \(2, 368\), expected \(N, 6480\) DS2 or \(N, 40500\) DS3"),
    (lambda f: (f.create_dataset("incident_energies", data=np.ones((3, 1))),
                f.create_dataset("showers", data=np.zeros((2, 6480), "f4"))),
     r"'incident_energies' has shape \(3, 1\), expected \(2, 1\)"),
])
def test_bad_calochallenge_files_are_named(tmp_path, make, problem):
    path = tmp_path / "bad_cc.hdf5"
    with h5py.File(path, "w") as f:
        make(f)
    with pytest.raises(ShowerFileError, match=rf"^{path}: {problem}"):
        calochallenge_to_native(path, tmp_path / "x.h5", progress=False)


# ----------------------------------------------------------------------------------------------
# Parquet / Hugging Face datasets
# ----------------------------------------------------------------------------------------------


def test_parquet_round_trip_is_exact_with_attributes(tmp_path):
    attrs = dict(geometry="odd", particle="gamma", energy_scale="visible", mesh_dr=4.65, mesh_dz=5.05,
                 generator="calofm-sim 0.1", seed=42, extra={"sim_settings": "gflash", "stochastic": 0.16, "runs": 3})
    src, data = native_file(tmp_path / "n.h5", n=7, data_seed=4, **attrs)
    out = native_to_parquet(src, tmp_path / "pq", shard_rows=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "calofm.json", "data-00000-of-00003.parquet", "data-00001-of-00003.parquet", "data-00002-of-00003.parquet"]
    meta = json.loads((out / "calofm.json").read_text())
    assert meta["rows"] == 7 and meta["geometry"] == "odd" and meta["extra"]["stochastic"] == 0.16
    assert detect_kind(out) == "parquet"
    back = parquet_to_native(out, tmp_path / "back.h5", progress=False)
    got = read_showers(back)
    for key in KEYS:
        np.testing.assert_array_equal(got[key], data[key])
    with ShowerFile(back) as f:
        restored = f.attrs
    restored.format_version = None
    assert restored == FileAttrs(**attrs)


def test_load_parquet_dataset_gives_fixed_length_rows_in_native_order(tmp_path):
    import datasets

    src, data = native_file(tmp_path / "n.h5", n=5, data_seed=5)
    out = native_to_parquet(src, tmp_path / "pq", shard_rows=2, progress=False)
    ds = load_parquet_dataset(out)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 5
    assert ds.features["showers"] == datasets.List(datasets.Value("float32"), length=6480)
    assert ds.features["incident_energy"] == datasets.Value("float32")
    rows = ds.with_format("numpy")[:]
    np.testing.assert_array_equal(rows["showers"], data["showers"].reshape(5, 6480))  # C order of (r, phi, z)
    np.testing.assert_array_equal(rows["incident_theta"], data["incident_theta"])
    first = next(iter(load_parquet_dataset(out, streaming=True)))
    np.testing.assert_array_equal(np.asarray(first["showers"], np.float32), data["showers"][0].reshape(-1))


def test_files_without_showers_are_refused(tmp_path):
    src, _ = native_file(tmp_path / "empty.h5", n=0)
    for export in (native_to_calochallenge, native_to_parquet):
        with pytest.raises(ShowerFileError, match="holds no showers"):
            export(src, tmp_path / "out", progress=False)


def test_plain_parquet_tables_from_other_tools_load(tmp_path):
    data = random_showers(3, seed=6)
    table = pa.table({  # variable-length lists, no calofm.json
        "showers": pa.array([row.tolist() for row in data["showers"].reshape(3, -1)], pa.list_(pa.float32())),
        **{k: pa.array(data[k]) for k in KEYS[1:]},
    })
    pq.write_table(table, tmp_path / "other.parquet")
    native = parquet_to_native(tmp_path / "other.parquet", tmp_path / "o.h5", geometry="cld", progress=False)
    got = read_showers(native)
    np.testing.assert_array_equal(got["showers"], data["showers"])
    assert ShowerFile(native).attrs.geometry == "cld"
    pq.write_table(table.drop_columns(["incident_phi"]), tmp_path / "nophi.parquet")
    with pytest.raises(ShowerFileError, match=r"nophi\.parquet: missing column\(s\) \['incident_phi'\]"):
        parquet_to_native(tmp_path / "nophi.parquet", tmp_path / "x.h5", progress=False)
    short = table.set_column(0, "showers", pa.array([[1.0, 2.0]] * 3, pa.list_(pa.float32())))
    pq.write_table(short, tmp_path / "short.parquet")
    with pytest.raises(ShowerFileError, match=r"short\.parquet: 'showers' rows must hold 6480 values"):
        parquet_to_native(tmp_path / "short.parquet", tmp_path / "y.h5", progress=False)
    (tmp_path / "none").mkdir()
    with pytest.raises(ShowerFileError, match="none: no Parquet shards found"):
        parquet_to_native(tmp_path / "none", tmp_path / "z.h5", progress=False)


# ----------------------------------------------------------------------------------------------
# convert() and `calofm convert`
# ----------------------------------------------------------------------------------------------


def test_convert_dispatch_leaves_no_intermediate_files(tmp_path):
    src, data = native_file(tmp_path / "n.h5", n=4, data_seed=7, energy_scale="deposited")
    cc = convert(src, tmp_path / "cc.hdf5", "calochallenge", progress=False)
    out = convert(cc, tmp_path / "from_cc_pq", "parquet", progress=False)  # via a temporary native file
    cc2 = convert(out, tmp_path / "cc2.hdf5", "calochallenge", progress=False)
    with h5py.File(cc, "r") as a, h5py.File(cc2, "r") as b:
        np.testing.assert_array_equal(a["showers"][:], b["showers"][:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cc.hdf5", "cc2.hdf5", "cc2_binning.xml", "cc_binning.xml",
                                                          "from_cc_pq", "n.h5"]
    with pytest.raises(ValueError, match="is already in the calofm format"):
        convert(src, tmp_path / "same.h5", "calofm", progress=False)
    with pytest.raises(ValueError, match="--to must be calofm, calochallenge or parquet"):
        convert(src, tmp_path / "x", "root", progress=False)


def test_cli_convert_end_to_end(tmp_path, capsys):
    src, data = native_file(tmp_path / "sim.h5", n=5, data_seed=8, energy_scale="visible", particle="gamma")
    cc, back, pq_dir, again = (tmp_path / n for n in ("sim_cc.hdf5", "back.h5", "sim_pq", "again.h5"))
    assert main(["convert", str(src), str(cc), "--to", "calochallenge", "--scale", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {cc} and {tmp_path / 'sim_cc_binning.xml'}"
    assert main(["convert", str(cc), str(back), "--to", "calofm", "--geometry", "par04_siw"]) == 0
    np.testing.assert_array_equal(read_showers(back)["showers"], data["showers"] * np.float32(2))
    assert main(["convert", str(src), str(pq_dir), "--to", "parquet"]) == 0
    assert main(["convert", str(pq_dir), str(again), "--to", "calofm"]) == 0
    capsys.readouterr()
    assert main(["validate", str(again)]) == 0
    out = capsys.readouterr().out
    assert f"{again}: OK" in out and "showers          5" in out and "particle gamma" in out
    assert main(["convert", str(src), str(tmp_path / "ds3.hdf5"), "--to", "calochallenge", "--dataset", "3"]) == 0
    with h5py.File(tmp_path / "ds3.hdf5", "r") as f:
        assert f["showers"].shape == (5, 40500)


def test_cli_convert_errors_are_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.h5"
    assert main(["convert", str(missing), str(tmp_path / "o.hdf5"), "--to", "calochallenge"]) == 2
    assert capsys.readouterr().err.strip() == f"calofm convert: error: {missing}: file not found"
    src, _ = native_file(tmp_path / "n.h5", n=1)
    assert main(["convert", str(src), str(tmp_path / "o.h5"), "--to", "calofm"]) == 2
    assert capsys.readouterr().err.strip() == f"calofm convert: error: {src} is already in the calofm format"
    cc = cc_file(tmp_path / "cc.hdf5", np.zeros((2, 6480)), [1e3, 1e3])
    assert main(["convert", str(cc), str(tmp_path / "i.h5"), "--to", "calofm", "--geometry", "atlas"]) == 2
    assert capsys.readouterr().err.strip().startswith("calofm convert: error: unknown geometry 'atlas'; available:")
    assert not (tmp_path / "i.h5").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(src), str(tmp_path / "o"), "--to", "root"])
    assert exit_info.value.code == 2
    assert "argument --to: invalid choice: 'root'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# What CaloChallenge's evaluate.py needs: float64 energies and the binning XML of the file's geometry
# ----------------------------------------------------------------------------------------------

# a <Layer> of the official code/binning_dataset_2.xml (CaloChallenge/homepage), the DS2 = Par04 Si-W mesh
DS2_LAYER = '<Layer id="17" r_edges="0,4.65,9.3,13.95,18.6,23.25,27.9,32.55,37.2,41.85" n_bin_alpha="16" />'


def read_binning(path) -> tuple[list[list[float]], list[int]]:
    """r_edges and n_bin_alpha per layer, read as CaloChallenge's XMLHandler reads them."""
    import xml.etree.ElementTree as ET

    (particle,) = [p for p in ET.parse(path).getroot() if p.attrib["name"] == "electron"]
    return ([[float(v) for v in layer.attrib["r_edges"].split(",")] for layer in particle],
            [int(layer.attrib["n_bin_alpha"]) for layer in particle])


@pytest.mark.parametrize(("geometry", "dataset"), [("par04_siw", 2), ("odd", 2), ("allegro", 3)])
def test_every_export_writes_the_binning_xml_of_its_geometry(tmp_path, geometry, dataset):
    src, _ = native_file(tmp_path / "n.h5", n=2, geometry=geometry, energy_scale="deposited")
    out = native_to_calochallenge(src, tmp_path / "n_cc.hdf5", dataset=dataset, progress=False)
    xml = tmp_path / "n_cc_binning.xml"
    edges, alphas = read_binning(xml)
    dr = load_geometry(geometry).mesh.dr
    n_r = 9 if dataset == 2 else 18
    assert len(edges) == 45 and set(alphas) == {16 if dataset == 2 else 50}
    assert sum((len(e) - 1) * a for e, a in zip(edges, alphas)) == (6480 if dataset == 2 else 40500)  # = voxels
    np.testing.assert_allclose(edges[0], np.arange(n_r + 1) * dr * 9 / n_r, rtol=1e-6)
    if geometry == "par04_siw":
        assert DS2_LAYER in xml.read_text()  # the official file, line for line
    with h5py.File(out, "r") as f:
        assert f["incident_energies"].dtype == np.float64 and f["showers"].dtype == np.float32


def test_export_of_a_file_without_geometry_or_cell_size_asks_for_one(tmp_path):
    src, _ = native_file(tmp_path / "plain.h5", n=2, geometry=None)
    with pytest.raises(ShowerFileError, match="records neither a geometry nor a cell size.*pass --geometry"):
        native_to_calochallenge(src, tmp_path / "x.hdf5", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.h5"]
    native_to_calochallenge(src, tmp_path / "x.hdf5", geometry="cld", progress=False)
    assert read_binning(tmp_path / "x_binning.xml")[0][0][1] == pytest.approx(load_geometry("cld").mesh.dr)
