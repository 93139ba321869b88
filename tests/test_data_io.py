"""calofm.data.io: write/read round trips, lazy batch reads, interrupted writes and exact resume."""

from __future__ import annotations

import logging
import pickle

import h5py
import numpy as np
import pytest
from conftest import random_showers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calofm.data import FileAttrs, ShowerFile, ShowerFileError, ShowerWriter, read_showers, validate_file, write_showers
from calofm.data.io import CHUNK_ROWS, COMMITTED, partial_path
from calofm.geometry import MESH_SHAPE, load_geometry

KEYS = ("showers", "incident_energy", "incident_phi", "incident_theta")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def columns(data: dict, rows=slice(None)) -> list[np.ndarray]:
    return [data[k][rows] for k in KEYS]


def assert_same(got: dict, expected: dict) -> None:
    for key in KEYS:
        assert got[key].dtype == np.float32 and got[key].shape == expected[key].shape
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def h5_contents(path) -> dict:
    """Ground truth read with plain h5py (independent of ShowerFile)."""
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in KEYS} | {"attrs": {k: f.attrs[k] for k in f.attrs if k != "mesh_shape"}}


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


@FAST
@given(
    n=st.integers(1, 2 * CHUNK_ROWS + 3) | st.sampled_from([1, CHUNK_ROWS]),
    seed=st.integers(0, 2**32 - 1),
    special=st.lists(st.floats(0, np.finfo(np.float32).max, width=32), max_size=5),
    compression=st.sampled_from([None, "gzip", "lzf"]),
)
def test_write_read_round_trip_is_exact(tmp_path, n, seed, special, compression):
    data = random_showers(n, seed)
    if special:  # extreme but valid values: 0, subnormals, float32 max
        flat = data["showers"].reshape(-1)
        flat[np.random.default_rng(seed).integers(0, flat.size, len(special))] = special
    path = write_showers(tmp_path / "rt.h5", *columns(data), attrs=FileAttrs(geometry="odd"), compression=compression)
    assert not partial_path(path).exists()
    assert_same(read_showers(path), data)
    assert_same(h5_contents(path), data)  # what other tools see is the same


@FAST
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(any), seed=st.integers(0, 1000))
def test_appending_chunks_equals_one_write(tmp_path, sizes, seed):
    data = random_showers(sum(sizes), seed)
    with ShowerWriter(tmp_path / "chunks.h5", compression=None) as w:
        start = 0
        for size in sizes:
            w.append(*columns(data, slice(start, start + size)))
            start += size
            assert w.n_written == start
    assert_same(read_showers(tmp_path / "chunks.h5"), data)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A 150-shower file (3 HDF5 chunks) and its arrays; uncompressed to keep the many reads fast."""
    data = random_showers(150, seed=11)
    path = write_showers(tmp_path_factory.mktemp("stored") / "s.h5", *columns(data), compression=None)
    return path, data


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 149), max_size=80))
def test_read_any_index_list_equals_numpy_fancy_indexing(stored, index):
    path, data = stored
    with ShowerFile(path) as f:
        got = f.read(index)
        got_array = f.read(np.array(index, dtype=np.int32))
    expected = {k: data[k][np.array(index, dtype=np.int64)] for k in KEYS}
    assert_same(got, expected)
    assert_same(got_array, expected)


@pytest.mark.parametrize("sl", [slice(None), slice(10, 20), slice(5, 140, 7), slice(149, 0, -3), slice(200, 300)])
def test_read_slices(stored, sl):
    path, data = stored
    with ShowerFile(path) as f:
        assert_same(f.read(sl), {k: data[k][sl] for k in KEYS})


@settings(max_examples=20, deadline=None)
@given(st.lists(st.booleans(), min_size=150, max_size=150), st.lists(st.integers(-150, 149), max_size=20))
def test_read_masks_and_negative_rows_like_numpy(stored, mask, rows):
    path, data = stored
    mask, rows = np.array(mask, dtype=bool), np.array(rows, dtype=np.int64)
    with ShowerFile(path) as f:
        assert_same(f.read(mask), {k: data[k][mask] for k in KEYS})
        assert_same(f.read(rows), {k: data[k][rows] for k in KEYS})


def test_read_out_of_range_is_an_error(stored):
    path, _ = stored
    with ShowerFile(path) as f:
        for bad in ([150], [-151], [0, 3, 1000]):
            with pytest.raises(IndexError, match="index out of range for 150 showers"):
                f.read(bad)
        with pytest.raises(IndexError, match=r"boolean index has shape \(3,\), expected \(150,\)"):
            f.read(np.ones(3, dtype=bool))
        with pytest.raises(IndexError, match="index must be integers or a boolean mask, not float64"):
            f.read(np.array([1.0, 2.5]))


def test_iter_chunks_and_conditions(stored):
    path, data = stored
    with ShowerFile(path) as f:
        starts = []
        for start, batch in f.iter_chunks(rows=64):
            starts.append(start)
            assert_same(batch, {k: data[k][start : start + 64] for k in KEYS})
        assert starts == [0, 64, 128]
        cond = f.conditions()
        assert cond is f.conditions()  # read once, then kept
        for key in KEYS[1:]:
            np.testing.assert_array_equal(cond[key], data[key])


def test_reader_pickles_for_dataloader_workers(stored):
    path, data = stored
    with ShowerFile(path) as f:
        clone = pickle.loads(pickle.dumps(f))
    assert_same(clone.read([7, 3, 7]), {k: data[k][[7, 3, 7]] for k in KEYS})
    clone.close()


# ----------------------------------------------------------------------------------------------
# Interrupted writes and resume
# ----------------------------------------------------------------------------------------------

ATTRS = dict(geometry="par04_siw", particle="gamma", mesh_dr=4.65, mesh_dz=3.4, generator="sim", seed=7)


class Stop(Exception):
    """Stands for a crash or Ctrl-C in the producer."""


def write_until(path, data, stop_after: int, chunk: int = 10, compression=None, **attrs):
    """Write ``data`` in chunks and crash after ``stop_after`` rows; returns the writer."""
    with pytest.raises(Stop):
        with ShowerWriter(path, attrs=FileAttrs(**attrs), compression=compression) as w:
            for start in range(0, stop_after, chunk):
                w.append(*columns(data, slice(start, min(start + chunk, stop_after))))
            raise Stop
    return w


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path):
    data = random_showers(30, seed=1)
    out = tmp_path / "out.h5"
    w = write_until(out, data, 20, **ATTRS)
    assert not out.exists() and partial_path(out).exists()
    assert w.n_written == 20
    with h5py.File(partial_path(out), "r") as f:
        assert f.attrs[COMMITTED] == 20 and f["showers"].shape[0] == 20
    with pytest.raises(RuntimeError, match="writer is closed"):
        w.append(*columns(data, slice(0, 1)))


def test_an_existing_file_is_untouched_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out.h5"
    old = random_showers(5, seed=1)
    write_showers(out, *columns(old))
    write_until(out, random_showers(30, seed=2), 20, **ATTRS)
    assert_same(read_showers(out), old)


@FAST
@given(n=st.integers(1, 2 * CHUNK_ROWS + 3), data=st.data())
def test_resume_continues_exactly_where_it_stopped(tmp_path, n, data):
    stop = data.draw(st.integers(0, n), label="rows before the crash")
    chunk = data.draw(st.integers(5, 40), label="chunk")
    showers = random_showers(n, seed=n)
    out, ref = tmp_path / "resumed.h5", tmp_path / "reference.h5"
    for p in (out, partial_path(out), ref):
        p.unlink(missing_ok=True)
    write_until(out, showers, stop, chunk=chunk, **ATTRS)
    with ShowerWriter(out, attrs=FileAttrs(**ATTRS), resume=True) as w:
        assert w.n_written == stop
        for start in range(w.n_written, n, chunk):
            w.append(*columns(showers, slice(start, start + chunk)))
    with ShowerWriter(ref, attrs=FileAttrs(**ATTRS), compression=None) as w:
        w.append(*columns(showers))
    resumed, reference = h5_contents(out), h5_contents(ref)
    assert_same(resumed, reference)
    assert resumed["attrs"] == reference["attrs"] and COMMITTED not in resumed["attrs"]
    assert not partial_path(out).exists()


def test_resume_drops_rows_of_an_append_that_was_cut_short(tmp_path):
    data = random_showers(30, seed=3)
    out = tmp_path / "cut.h5"
    write_until(out, data, 10, compression="gzip", **ATTRS)
    with h5py.File(partial_path(out), "r+") as f:  # a crash between resize and commit
        for key in KEYS:
            f[key].resize(17, axis=0)
        f["showers"][10:] = -1.0  # garbage rows
    with ShowerWriter(out, attrs=FileAttrs(**ATTRS), resume=True) as w:
        assert w.n_written == 10
        w.append(*columns(data, slice(10, 30)))
    assert_same(read_showers(out), data)


@pytest.mark.parametrize("change", [
    {"geometry": "odd"}, {"seed": 8}, {"particle": "e-"}, {"generator": "other"}, {"energy_scale": "deposited"},
    {"mesh_dr": 5.0}, {"mesh_dz": 3.3}, {"extra": {"run": "b"}},
])
def test_resume_with_different_settings_starts_over(tmp_path, caplog, change):
    data = random_showers(20, seed=4)
    out = tmp_path / "x.h5"
    write_until(out, data, 10, **ATTRS, extra={"run": "a"})
    new = FileAttrs(**(ATTRS | {"extra": {"run": "a"}} | change))
    with caplog.at_level(logging.WARNING, logger="calofm.data.io"):
        w = ShowerWriter(out, attrs=new, resume=True)
    assert w.n_written == 0 and "starting again" in caplog.text
    w.append(*columns(data, slice(10, 20)))
    w.close()
    with h5py.File(out, "r") as f:  # plain h5py: {"geometry": "odd"} contradicts the mesh, which ShowerFile refuses
        assert f["showers"].shape[0] == 10
        got = FileAttrs.from_h5(f.attrs)
    got.format_version = None
    assert got == new


def test_resume_without_or_with_a_damaged_partial_file_starts_fresh(tmp_path):
    data = random_showers(4, seed=5)
    fresh = ShowerWriter(tmp_path / "a.h5", resume=True)
    assert fresh.n_written == 0
    fresh.close()
    partial_path(tmp_path / "b.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))  # an HDF5 signature, then junk
    with ShowerWriter(tmp_path / "b.h5", resume=True) as w:
        assert w.n_written == 0
        w.append(*columns(data))
    assert_same(read_showers(tmp_path / "b.h5"), data)


def test_writer_rejects_bad_chunks_without_losing_its_place(tmp_path):
    data = random_showers(6, seed=6)
    with ShowerWriter(tmp_path / "w.h5") as w:
        w.append(*columns(data, slice(0, 3)))
        bad = data["showers"][3:6].copy()
        bad[1, 0, 0, 0] = -1.0
        with pytest.raises(ShowerFileError, match=r"w\.h5: 'showers' holds negative energies \(first in shower 4\)"):
            w.append(bad, *columns(data, slice(3, 6))[1:])  # row numbers are file-global
        with pytest.raises(ShowerFileError, match="inconsistent chunk shapes"):
            w.append(data["showers"][3:6], data["incident_energy"][3:5], *columns(data, slice(3, 6))[2:])
        with pytest.raises(ShowerFileError, match="inconsistent chunk shapes"):
            w.append(np.zeros((1, 18, 50, 45)), *columns(data, slice(0, 1))[1:])
        assert w.n_written == 3
        w.append(*columns(data, slice(3, 6)))
    assert_same(read_showers(tmp_path / "w.h5"), data)


def test_writer_options(tmp_path):
    nested = tmp_path / "a" / "b" / "c.h5"
    write_showers(nested, *columns(random_showers(2)))
    assert nested.exists()  # parent folders are created
    with pytest.raises(ShowerFileError, match="exists already"):
        ShowerWriter(nested, overwrite=False)
    with pytest.raises(ValueError, match="compression must be None, 'gzip' or 'lzf'"):
        ShowerWriter(tmp_path / "z.h5", compression="zstd")
    w = ShowerWriter(tmp_path / "twice.h5")
    assert w.close() == w.close() == tmp_path / "twice.h5"  # closing twice is harmless


# ----------------------------------------------------------------------------------------------
# validate_file
# ----------------------------------------------------------------------------------------------


def test_validate_file_summary_numbers(tmp_path):
    showers = np.zeros((3, *MESH_SHAPE), np.float32)
    showers[0, 0, 0, 0] = 10.0
    showers[0, 1, 2, 3] = 5.0
    showers[1, 8, 15, 44] = 25.0
    showers[2, 4, 4, 4] = 0.5
    energy = np.array([1000.0, 2000.0, 50000.0], np.float32)  # MeV
    theta = np.array([1.0, 1.5, 2.0], np.float32)
    path = write_showers(tmp_path / "v.h5", showers, energy, np.zeros(3, np.float32), theta,
                         attrs=FileAttrs(geometry="par04_siw", particle="gamma", energy_scale="visible"))
    s = validate_file(path, geometry=load_geometry("par04_siw"))
    assert s["file"] == str(path) and s["showers"] == 3
    assert (s["geometry"], s["particle"], s["energy_scale"]) == ("par04_siw", "gamma", "visible")
    assert s["E_inc_GeV"] == pytest.approx((1.0, 50.0))
    assert s["theta"] == pytest.approx((1.0, 2.0))
    assert s["E_sum/E_inc"] == pytest.approx(40.5 / 53000.0)
    assert s["hits_per_shower"] == pytest.approx(4 / 3)
    assert s["max_cell_MeV"] == 25.0


def test_a_file_without_showers_is_refused(tmp_path, tmp_showers):
    empty = tmp_showers(0, geometry=None)  # the writer makes it; no reader takes it
    for read in (validate_file, read_showers, ShowerFile):
        with pytest.raises(ShowerFileError, match=rf"^{empty}: holds no showers \(N = 0\)$"):
            read(empty)
