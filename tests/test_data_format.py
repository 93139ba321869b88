"""calofm.data.format: file attributes, files written by other tools, and one-line rejection of bad files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import random_showers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calofm.data import FileAttrs, ShowerFile, ShowerFileError, ShowerWriter, read_showers, validate_file
from calofm.data.format import ENERGY_SCALES, FORMAT_VERSION
from calofm.geometry import load_geometry

KEYS = ("showers", "incident_energy", "incident_phi", "incident_theta")


def raw_file(path: Path, data: dict, attrs: dict | None = None, compression: str | None = "gzip") -> Path:
    """A shower file written with plain h5py, as LEMURS / DDML edm4hep2h5.py do (no calofm attributes)."""
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            if isinstance(value, dict):  # a group
                f.create_group(key)
            else:
                opts = {"compression": compression, "compression_opts": 9} if compression == "gzip" else {}
                f.create_dataset(key, data=value, **(opts if np.ndim(value) else {}))
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


def one_line_error(call, path) -> str:
    with pytest.raises(ShowerFileError) as err:
        call()
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    assert err.value.path == str(path)
    return msg


# ----------------------------------------------------------------------------------------------
# Files from other tools
# ----------------------------------------------------------------------------------------------


def test_lemurs_like_file_loads_and_takes_the_geometry_from_the_user(tmp_path):
    data = random_showers(5, seed=1)
    path = raw_file(tmp_path / "LEMURS_ODD_gamma_5events.h5", data)
    with ShowerFile(path) as f:
        assert len(f) == 5 and f.geometry_name is None
        assert f.attrs == FileAttrs()  # nothing recorded: every attribute at its default
        got = f.load()
    for key in KEYS:
        np.testing.assert_array_equal(got[key], data[key])
    odd = load_geometry("odd")
    with ShowerFile(path, geometry=odd) as f:
        assert f.geometry_name == "odd"
    assert validate_file(path, geometry=odd)["geometry"] == "odd"
    assert validate_file(path)["geometry"] == "(not recorded)"


def test_float64_and_uncompressed_files_load_as_float32(tmp_path):
    data = {k: v.astype(np.float64) for k, v in random_showers(3, seed=2).items()}
    path = raw_file(tmp_path / "f64.h5", data, compression=None)
    got = read_showers(path)
    for key in KEYS:
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], data[key].astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Attributes
# ----------------------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
_extra_keys = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda k: k not in FileAttrs._names and k not in ("mesh_shape", "calofm_format_version", "calofm_expected_rows"))
_extra_values = st.integers(-2**62, 2**62) | st.floats(allow_nan=False) | _text | st.booleans()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    geometry=st.none() | st.sampled_from(["my_detector", "lab_prototype"]),  # no card: any mesh is accepted
    particle=st.none() | st.sampled_from(["gamma", "e-", "pi+"]),
    energy_scale=st.sampled_from(ENERGY_SCALES),
    mesh=st.none() | st.tuples(st.floats(0.1, 100), st.floats(0.1, 100)),
    generator=st.none() | _text,
    seed=st.none() | st.integers(0, 2**63 - 1),
    extra=st.dictionaries(_extra_keys, _extra_values, max_size=4),
)
def test_attributes_round_trip(tmp_path, geometry, particle, energy_scale, mesh, generator, seed, extra):
    attrs = FileAttrs(geometry=geometry, particle=particle, energy_scale=energy_scale,
                      mesh_dr=mesh and mesh[0], mesh_dz=mesh and mesh[1], generator=generator, seed=seed, extra=extra)
    path = tmp_path / "attrs.h5"
    data = random_showers(1)
    with ShowerWriter(path, attrs=attrs, compression=None) as w:
        w.append(*(data[k] for k in KEYS))
    with ShowerFile(path) as f:
        got = f.attrs
    assert got.format_version == FORMAT_VERSION
    got.format_version = None
    assert got == attrs
    assert all(type(got.extra[k]) is type(v) for k, v in extra.items())


def test_expected_rows_is_kept_as_an_extra_attribute_and_checked(tmp_path):
    data = random_showers(3)
    for name, expected in (("x.h5", 3), ("short.h5", 10)):
        with ShowerWriter(tmp_path / name, attrs=FileAttrs(geometry="odd"), expected_rows=expected) as w:
            w.append(*(data[k] for k in KEYS))
    with ShowerFile(tmp_path / "x.h5") as f:
        assert f.attrs.extra == {"calofm_expected_rows": 3} and len(f) == 3
    msg = one_line_error(lambda: ShowerFile(tmp_path / "short.h5"), tmp_path / "short.h5")
    assert msg.endswith("records 10 expected rows but holds 3")


# ----------------------------------------------------------------------------------------------
# Bad files: each rejected with one line naming the file
# ----------------------------------------------------------------------------------------------


def _bad(**changes):
    def make():
        data = random_showers(5, seed=3)
        for key, change in changes.items():
            if change is None:
                del data[key]
            elif callable(change):
                data[key] = change(data[key])
            else:
                data[key] = change
        return data

    return make


def _poke(index, value):
    def change(a):
        a = a.copy()
        a[index] = value
        return a

    return change


BAD_FILES = [
    ("missing-showers", _bad(showers=None), r"missing key\(s\) \['showers'\]"),
    ("missing-theta", _bad(incident_theta=None), r"missing key\(s\) \['incident_theta'\]"),
    ("calochallenge", lambda: {"incident_energies": np.ones((2, 1), "f4"), "showers": np.ones((2, 6480), "f4")},
     r"missing key\(s\) .*looks like a CaloChallenge file: use `calofm convert"),
    ("group", _bad(showers={}), "'showers' is a group, expected a dataset"),
    ("int-showers", _bad(showers=lambda a: a.astype(np.int32)), "'showers' has dtype int32, expected float32"),
    ("int-energy", _bad(incident_energy=lambda a: a.astype(np.int64)), "'incident_energy' has dtype int64"),
    ("ds3-shape", _bad(showers=np.zeros((5, 18, 50, 45), "f4")), r"'showers' has shape \(5, 18, 50, 45\), expected"),
    ("flat-showers", _bad(showers=np.zeros((5, 6480), "f4")), r"'showers' has shape \(5, 6480\), expected \(N, 9, 16"),
    ("energy-2d", _bad(incident_energy=lambda a: a[:, None]), r"'incident_energy' has shape \(5, 1\), expected \(5,\)"),
    ("scalar-phi", _bad(incident_phi=np.float32(0.0)), r"'incident_phi' has shape \(\), expected \(5,\)"),
    ("short-theta", _bad(incident_theta=lambda a: a[:4]), "'incident_theta' has 4 entries but 'showers' has 5"),
    ("nan-shower", _bad(showers=_poke((3, 1, 2, 3), np.nan)), r"'showers' holds NaN/Inf \(first in shower 3\)"),
    ("inf-shower", _bad(showers=_poke((1, 0, 0, 0), np.inf)), r"'showers' holds NaN/Inf \(first in shower 1\)"),
    ("negative-cell", _bad(showers=_poke((2, 8, 15, 44), -1e-3)), r"negative energies \(first in shower 2\)"),
    ("zero-energy", _bad(incident_energy=_poke(1, 0.0)), r"'incident_energy' must be > 0 MeV \(row 1\)"),
    ("negative-energy", _bad(incident_energy=_poke(4, -5.0)), r"'incident_energy' must be > 0 MeV \(row 4\)"),
    ("nan-energy", _bad(incident_energy=_poke(0, np.nan)), r"'incident_energy' holds NaN/Inf \(first at row 0\)"),
    ("nan-theta", _bad(incident_theta=_poke(2, np.nan)), r"'incident_theta' holds NaN/Inf \(first at row 2\)"),
    ("theta-degrees", _bad(incident_theta=_poke(3, 90.0)), r"'incident_theta' outside \[0, 3\.142\] rad \(row 3\)"),
    ("phi-degrees", _bad(incident_phi=_poke(0, -180.0)), r"'incident_phi' outside .* rad \(row 0\); degrees\?"),
]


@pytest.mark.parametrize(("make", "problem"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_rejected_with_one_line(tmp_path, make, problem):
    path = raw_file(tmp_path / "bad.h5", make())
    msg = one_line_error(lambda: validate_file(path), path)
    assert re.search(problem, msg), msg


def test_structure_is_checked_at_open_values_when_read(tmp_path):
    data = random_showers(6, seed=4)
    data["showers"][4, 0, 0, 0] = np.nan
    path = raw_file(tmp_path / "lazy.h5", data)
    with ShowerFile(path) as f:  # opening reads no values
        np.testing.assert_array_equal(f.read([0, 5])["showers"], data["showers"][[0, 5]])
        one_line_error(lambda: f.read([5, 4]), path)
    with ShowerFile(path, check=False) as f:  # checks can be switched off
        assert np.isnan(f.read([4])["showers"]).any()


def test_geometry_mismatch(tmp_path, tmp_showers):
    odd = load_geometry("odd")
    par04 = tmp_showers(3, geometry="par04_siw")
    msg = one_line_error(lambda: ShowerFile(par04, geometry=odd), par04)
    assert msg.endswith("geometry mismatch: file holds 'par04_siw', asked for 'odd'")
    # no geometry recorded, but a mesh that does not match the requested detector
    other = tmp_showers(3, geometry=None, mesh_dr=4.65, mesh_dz=3.4)
    assert ShowerFile(other, geometry=load_geometry("par04_siw")).geometry_name == "par04_siw"
    msg = one_line_error(lambda: validate_file(other, geometry=odd), other)
    assert msg.endswith("mesh mismatch: file has dz = 3.4 mm, geometry 'odd' has 5.05 mm")
    bad_dr = tmp_showers(3, geometry="odd", mesh_dr=5.0, mesh_dz=5.05)
    msg = one_line_error(lambda: read_showers(bad_dr, geometry=odd), bad_dr)
    assert msg.endswith("mesh mismatch: file has dr = 5.0 mm, geometry 'odd' has 4.65 mm")


def test_not_a_shower_file(tmp_path):
    cases = {
        tmp_path / "text.h5": "not an HDF5 file",
        tmp_path / "empty.h5": "not an HDF5 file",
        tmp_path / "missing.h5": "file not found",
        tmp_path / "folder.h5": "is a directory, not an HDF5 file",
    }
    (tmp_path / "text.h5").write_text("incident_energy,showers\n1,2\n")
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "folder.h5").mkdir()
    for path, problem in cases.items():
        assert problem in one_line_error(lambda p=path: validate_file(p), path)


@pytest.fixture(scope="module")
def good_file_bytes(tmp_path_factory) -> bytes:
    data = random_showers(80, seed=5)  # two HDF5 chunks of showers
    path = tmp_path_factory.mktemp("good") / "good.h5"
    with ShowerWriter(path, attrs=FileAttrs(geometry="par04_siw"), compression="gzip") as w:
        w.append(*(data[k] for k in KEYS))
    return path.read_bytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 0.9999))
def test_truncated_files_are_rejected(tmp_path, good_file_bytes, fraction):
    path = tmp_path / "cut.h5"
    path.write_bytes(good_file_bytes[: int(len(good_file_bytes) * fraction)])
    assert re.search("truncated", one_line_error(lambda: validate_file(path), path))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_bytes_never_escape_as_anything_but_a_named_error(tmp_path, good_file_bytes, data):
    # HDF5 metadata sits at the start of the file: aim a third of the damage there
    size = len(good_file_bytes)
    start = data.draw(st.integers(0, 4096) | st.integers(0, size - 1))
    junk = data.draw(st.binary(min_size=1, max_size=64))
    damaged = bytearray(good_file_bytes)
    damaged[start : start + len(junk)] = junk
    path = tmp_path / "damaged.h5"
    path.write_bytes(bytes(damaged[:size]))
    try:
        summary = validate_file(path)
    except ShowerFileError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
    else:  # damage in unused bytes, or in values that stay valid
        assert summary["showers"] == 80 and math.isfinite(summary["E_sum/E_inc"])



# ----------------------------------------------------------------------------------------------
# Rows named as in the file; rows never written; the recorded geometry against its card
# ----------------------------------------------------------------------------------------------


def test_bad_values_are_named_by_their_file_row_whatever_the_read(tmp_path):
    data = {"showers": np.zeros((2100, 9, 16, 45), np.float32), **{k: v for k, v in random_showers(2100).items()
                                                                     if k != "showers"}}
    data["showers"][2090, 4, 4, 4] = np.nan  # in the second 2048-row chunk that validate reads
    data["showers"][7, 0, 0, 0] = -1.0
    path = raw_file(tmp_path / "late_nan.h5", data, compression="lzf")
    with ShowerFile(path) as f:
        assert one_line_error(lambda: f.read([2099, 2090, 3]), path).endswith("NaN/Inf (first in shower 2090)")
        assert one_line_error(lambda: f.read(slice(5, 9)), path).endswith("negative energies (first in shower 7)")
    data["showers"][7, 0, 0, 0] = 0.0
    path = raw_file(tmp_path / "late_nan.h5", data, compression="lzf")
    assert one_line_error(lambda: validate_file(path), path).endswith("(first in shower 2090)")


def test_rows_that_were_never_written_are_refused(tmp_path):
    claim = tmp_path / "claim.h5"  # 200k rows declared, 64 written: the rest read as fill values
    with h5py.File(claim, "w") as f:
        s = f.create_dataset("showers", (200_000, 9, 16, 45), "f4", chunks=(64, 9, 16, 45), compression="gzip")
        s[:64] = random_showers(64)["showers"]
        for key, fill in (("incident_energy", 1e4), ("incident_phi", 0.0), ("incident_theta", 1.5)):
            f.create_dataset(key, (200_000,), "f4", fillvalue=fill, chunks=(4096,))
            f[key][:] = fill
    msg = one_line_error(lambda: validate_file(claim), claim)
    assert msg.endswith("'showers' claims 200000 rows but only 1 of its 3125 HDF5 chunks were ever written "
                        "(the rest read as fill values)")
    unwritten = tmp_path / "contiguous.h5"
    with h5py.File(unwritten, "w") as f:
        f.create_dataset("showers", data=random_showers(3)["showers"])
        f.create_dataset("incident_energy", (3,), "f4")  # created, never written
        f.create_dataset("incident_phi", data=np.zeros(3, "f4"))
        f.create_dataset("incident_theta", data=np.ones(3, "f4"))
    assert one_line_error(lambda: ShowerFile(unwritten), unwritten).endswith(
        "'incident_energy' claims 3 rows but was never written (it reads as fill values)")
    partial = tmp_path / "renamed.h5"  # the .partial file of an interrupted write, renamed by hand
    writer = ShowerWriter(partial, attrs=FileAttrs(geometry="odd"))
    writer.append(*(random_showers(2)[k] for k in KEYS))
    writer.abort()
    (tmp_path / "renamed.h5.partial").rename(partial)
    assert one_line_error(lambda: ShowerFile(partial), partial).endswith(
        "is an unfinished file from an interrupted write (2 of 2 rows committed)")


def test_a_recorded_geometry_is_checked_against_its_card_on_every_open(tmp_path, tmp_showers):
    odd_mesh = tmp_showers(2, geometry="par04_siw", mesh_dr=7.0, name="siw_7mm.h5")
    for read in (ShowerFile, read_showers, validate_file):  # no geometry asked for: the recorded one's card
        assert one_line_error(lambda r=read: r(odd_mesh), odd_mesh).endswith(
            "mesh mismatch: file has dr = 7.0 mm, geometry 'par04_siw' has 4.65 mm")
    with ShowerFile(tmp_showers(2, geometry="par04_siw", mesh_dr=4.65, name="ok.h5")) as f:
        assert f.geometry.name == "par04_siw" and f.note == ""
    with ShowerFile(tmp_showers(2, geometry="my_detector", mesh_dr=3.0, name="custom.h5")) as f:
        assert f.geometry is None and "no card for geometry 'my_detector'" in f.note


def test_output_errors_name_the_output_not_a_corrupt_file(tmp_path, monkeypatch):
    from calofm.data.format import open_h5

    missing = tmp_path / "no_such_folder" / "out.h5"
    assert one_line_error(lambda: open_h5(missing, "w"), missing).endswith(
        f"cannot create the file: folder {missing.parent} does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()

    def refuse(path, mode, **kwargs):  # what h5py raises in a folder without write permission
        raise OSError(13, "Unable to synchronously create file (unable to open file: name = '...', errno = 13)")

    monkeypatch.setattr(h5py, "File", refuse)
    monkeypatch.setattr("os.access", lambda path, mode: False)
    msg = one_line_error(lambda: open_h5(locked / "out.h5", "w"), locked / "out.h5")
    assert msg.endswith("cannot create the file (permission denied)") and "corrupt" not in msg
