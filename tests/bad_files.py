"""A factory of corrupt shower files for the bad-input battery of every command that reads shower files.

``make_bad_files(folder)`` writes the native set (for validate, convert, evaluate, compare-geometries, and for
``generate --like`` and ``adapt --data``), ``make_bad_calochallenge(folder)`` and ``make_bad_parquet(folder)``
the foreign sets (for ``convert --to calofm``). Each returns ``{name: BadFile}``; ``BadFile.problem`` is a
regular expression for what follows ``<path>: `` in the one-line error. ``good_file`` writes valid files
(positive controls). ``checksums`` and ``assert_one_error_line`` are the battery's assertions.

Usage (module-scoped, so the files are built once)::

    @pytest.fixture(scope="module")
    def bad(tmp_path_factory):
        return make_bad_files(tmp_path_factory.mktemp("bad"))
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

MESH = (9, 16, 45)
N = 12  # showers per file: above calofm evaluate's minimum of 10
SIW = {"geometry": "par04_siw", "mesh_dr": 4.65, "mesh_dz": 3.4, "energy_scale": "deposited"}


@dataclass(frozen=True)
class BadFile:
    name: str
    path: Path
    problem: str  # regex for the error message after "<path>: "


def columns(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid float32 columns: sparse showers (MeV), energies 1-100 GeV (MeV), angles in range."""
    rng = np.random.default_rng(seed)
    showers = rng.exponential(0.5, (n, *MESH)) * (rng.random((n, *MESH)) < 0.2)
    return {"showers": showers.astype(np.float32),
            "incident_energy": rng.uniform(1e3, 1e5, n).astype(np.float32),
            "incident_phi": rng.uniform(-math.pi, math.pi, n).astype(np.float32),
            "incident_theta": rng.uniform(0.9, 2.2, n).astype(np.float32)}


def write_raw(path: Path, data: dict, attrs: dict | None = None) -> Path:
    """Write datasets and attributes with plain h5py (no calofm checks); a dict value makes a group."""
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            if isinstance(value, dict):
                f.create_group(key)
            else:
                f.create_dataset(key, data=value)
        f.attrs.update(attrs if attrs is not None else SIW)
    return path


def good_file(path: Path, n: int = N, seed: int = 0, dtype=np.float32, attrs: dict | None = None) -> Path:
    """A valid native file (``dtype=np.float64`` gives a valid float64 file, which loads as float32)."""
    return write_raw(path, {k: v.astype(dtype) for k, v in columns(n, seed).items()}, attrs)


def _changed(**changes: Callable[[np.ndarray], np.ndarray] | None | dict):
    """A builder: valid columns with some replaced (callable), removed (None) or made a group ({})."""

    def build(path: Path) -> Path:
        data = columns()
        for key, change in changes.items():
            if change is None:
                del data[key]
            elif isinstance(change, dict):
                data[key] = change
            else:
                data[key] = change(data[key].copy())
        return write_raw(path, data)

    return build


def _poke(index, value):
    def change(a):
        a[index] = value
        return a

    return change


def _text(path: Path) -> Path:
    path.write_text("incident_energy,showers\n1000,0.5\n")
    return path


def _truncated(path: Path) -> Path:
    good = good_file(path.with_name(path.name + ".whole"))
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    return path


def _fill_values(path: Path) -> Path:
    """200k rows declared, one 64-row chunk written; conditions 'valid' fill values: reads as empty showers."""
    with h5py.File(path, "w") as f:
        s = f.create_dataset("showers", (200_000, *MESH), "f4", chunks=(64, *MESH), compression="gzip")
        s[:64] = columns(64)["showers"]
        for key, fill in (("incident_energy", 1e4), ("incident_phi", 0.0), ("incident_theta", 1.5)):
            f.create_dataset(key, data=np.full(200_000, fill, "f4"))
        f.attrs.update(SIW)
    return path


# name -> (file name, builder or None for a path that does not exist, problem regex)
NATIVE: dict[str, tuple[str, Callable[[Path], Path] | None, str]] = {
    "missing": ("missing.h5", None, r"file not found"),
    "empty": ("empty.h5", lambda p: (p.write_bytes(b""), p)[1], r"not an HDF5 file"),
    "text": ("text.h5", _text, r"not an HDF5 file"),
    "truncated": ("truncated.h5", _truncated, r"(?:cannot open HDF5 file, |read failed, file )truncated or corrupt\?"),
    "directory": ("folder.h5", lambda p: (p.mkdir(), p)[1], r"is a directory|no Parquet shards found"),
    "missing-key": ("no_theta.h5", _changed(incident_theta=None), r"missing key\(s\) \['incident_theta'\]"),
    "group": ("group.h5", _changed(showers={}), r"'showers' is a group, expected a dataset"),
    "wrong-shape": ("flat.h5", _changed(showers=lambda a: a.reshape(N, -1)),
                    r"'showers' has shape \(12, 6480\), expected \(N, 9, 16, 45\)"),
    "ds3-shape": ("ds3.h5", _changed(showers=lambda a: np.zeros((N, 18, 50, 45), "f4")), r"'showers' has shape"),
    "mismatched-n": ("short_theta.h5", _changed(incident_theta=lambda a: a[:-1]),
                     r"'incident_theta' has 11 entries but 'showers' has 12"),
    "nan": ("nan.h5", _changed(showers=_poke((11, 3, 4, 5), np.nan)),
            r"'showers' holds NaN/Inf \(first in shower 11\)"),
    "inf": ("inf.h5", _changed(showers=_poke((6, 0, 0, 0), np.inf)), r"'showers' holds NaN/Inf \(first in shower 6\)"),
    "negative-cell": ("negative_cell.h5", _changed(showers=_poke((4, 8, 15, 44), -0.5)),
                      r"'showers' holds negative energies \(first in shower 4\)"),
    "nan-energy": ("nan_energy.h5", _changed(incident_energy=_poke(3, np.nan)),
                   r"'incident_energy' holds NaN/Inf \(first at row 3\)"),
    "zero-energy": ("zero_energy.h5", _changed(incident_energy=_poke(2, 0.0)),
                    r"'incident_energy' must be > 0 MeV \(row 2\)"),
    "negative-energy": ("negative_energy.h5", _changed(incident_energy=_poke(9, -1e3)),
                        r"'incident_energy' must be > 0 MeV \(row 9\)"),
    "theta-degrees": ("theta_deg.h5", _changed(incident_theta=_poke(1, 90.0)), r"'incident_theta' outside .*degrees\?"),
    "int-dtype": ("int.h5", _changed(showers=lambda a: a.astype(np.int32)), r"'showers' has dtype int32"),
    "int-energy": ("int_energy.h5", _changed(incident_energy=lambda a: a.astype(np.int64)),
                   r"'incident_energy' has dtype int64"),
    "float64-overflow": ("f64_huge.h5", _changed(showers=lambda a: _poke((5, 1, 1, 1), 1e300)(a.astype(np.float64))),
                         r"'showers' holds NaN/Inf or values beyond float32 \(first in shower 5\)"),
    "n0": ("n0.h5", _changed(**{k: (lambda a: a[:0]) for k in ("showers", "incident_energy", "incident_phi",
                                                               "incident_theta")}), r"holds no showers \(N = 0\)"),
    "fill-values": ("claims_200k.h5", _fill_values,
                    r"'showers' claims 200000 rows but only 1 of its 3125 HDF5 chunks were ever written"),
    "other-mesh": ("siw_7mm.h5", lambda p: good_file(p, attrs={**SIW, "mesh_dr": 7.0}),
                   r"mesh mismatch: file has dr = 7.0 mm, geometry 'par04_siw' has 4.65 mm"),
    # calofm's attributes with the wrong type (these were TypeErrors with a traceback)
    "attr-mesh-dr": ("attr_dr.h5", lambda p: good_file(p, attrs={**SIW, "mesh_dr": np.array([4.65, 4.65])}),
                     r"attribute mesh_dr = array\(\[4\.65, 4\.65\]\) is not a cell size > 0 mm"),
    "attr-mesh-shape": ("attr_shape.h5", lambda p: good_file(p, attrs={**SIW, "mesh_shape": 6480}),
                        r"attribute mesh_shape = \[6480\] but the showers are on the 9x16x45 mesh"),
    "attr-geometry": ("attr_geometry.h5", lambda p: good_file(p, attrs={**SIW, "geometry": 4}),
                      r"attribute geometry = 4 is not a name"),
}


def _make(folder: Path, table: dict) -> dict[str, BadFile]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (file_name, build, problem) in table.items():
        path = folder / file_name
        if build is not None:
            build(path)
        out[name] = BadFile(name, path, problem)
    return out


def make_bad_files(folder: Path) -> dict[str, BadFile]:
    """The native corrupt-file set (see ``NATIVE``)."""
    return _make(Path(folder), NATIVE)


# ----------------------------------------------------------------------------------------------
# CaloChallenge and Parquet sources (convert --to calofm)
# ----------------------------------------------------------------------------------------------


def _cc(showers=None, energies=None, drop: str | None = None):
    def build(path: Path) -> Path:
        flat = np.zeros((N, 6480)) if showers is None else showers
        e = np.full((N, 1), 1e4) if energies is None else energies
        with h5py.File(path, "w") as f:
            for key, value in (("showers", flat), ("incident_energies", e)):
                if key != drop:
                    f.create_dataset(key, data=value)
        return path

    return build


def _cc_poke(row, value, key="showers"):
    a = np.zeros((N, 6480)) if key == "showers" else np.full((N, 1), 1e4)
    a[row, 0 if key != "showers" else 77] = value
    return a


CALOCHALLENGE = {
    "text": ("cc_text.hdf5", _text, r"not an HDF5 file"),
    "missing-energies": ("cc_no_energies.hdf5", _cc(drop="incident_energies"), r"missing key 'incident_energies'"),
    "wrong-voxels": ("cc_368.hdf5", _cc(showers=np.zeros((N, 368))),
                     r"'showers' has shape \(12, 368\), expected \(N, 6480\) DS2 or \(N, 40500\) DS3"),
    "mismatched-n": ("cc_short.hdf5", _cc(energies=np.full((N - 1, 1), 1e4)),
                     r"'incident_energies' has shape \(11, 1\), expected \(12, 1\)"),
    "nan": ("cc_nan.hdf5", _cc(showers=_cc_poke(10, np.nan)), r"'showers' holds NaN/Inf \(first in shower 10\)"),
    "zero-energy": ("cc_zero.hdf5", _cc(energies=_cc_poke(4, 0.0, "e")),
                    r"'incident_energies' must be > 0 MeV \(row 4\)"),
    "int-dtype": ("cc_int.hdf5", _cc(showers=np.zeros((N, 6480), np.int32)), r"'showers' has dtype int32"),
    "n0": ("cc_n0.hdf5", _cc(showers=np.zeros((0, 6480)), energies=np.zeros((0, 1))), r"holds no showers"),
}


def make_bad_calochallenge(folder: Path) -> dict[str, BadFile]:
    return _make(Path(folder), CALOCHALLENGE)


def _parquet(rows: int = N, drop: str | None = None, cells: int = 6480, change: dict | None = None,
             meta: dict | str | None = None):
    def build(path: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = columns(rows)
        for key, fn in (change or {}).items():
            data[key] = fn(data[key].copy())
        path.mkdir()
        flat = data["showers"].reshape(rows, 6480)[:, :cells]
        table = pa.table({"showers": pa.array([r.tolist() for r in flat], pa.list_(pa.float32())),
                          **{k: pa.array(data[k]) for k in ("incident_energy", "incident_phi", "incident_theta")}})
        if drop:
            table = table.drop_columns([drop])
        pq.write_table(table, path / "data-00000-of-00001.parquet")
        if meta is not None:
            (path / "calofm.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        return path

    return build


PARQUET = {
    "text": ("pq_text.parquet", _text, r"not a readable Parquet file \("),
    "no-shards": ("pq_empty_folder", lambda p: (p.mkdir(), p)[1], r"no Parquet shards found"),
    "missing-column": ("pq_no_phi", _parquet(drop="incident_phi"), r"missing column\(s\) \['incident_phi'\]"),
    "short-rows": ("pq_short", _parquet(cells=100), r"'showers' rows must hold 6480 values"),
    "nan": ("pq_nan", _parquet(change={"showers": _poke((7, 0, 0, 0), np.nan)}),
            r"'showers' holds NaN/Inf \(first in shower 7\)"),
    "negative-energy": ("pq_neg", _parquet(change={"incident_energy": _poke(5, -1.0)}),
                        r"'incident_energy' must be > 0 MeV \(row 5\)"),
    "n0": ("pq_n0", _parquet(rows=0), r"holds no showers"),
    "broken-json": ("pq_json", _parquet(meta="{not json"), r"not readable JSON"),
    "other-mesh": ("pq_7mm", _parquet(meta={"geometry": "par04_siw", "mesh_dr": 7.0}), r"mesh mismatch: file has dr"),
    "attr-mesh-dr": ("pq_dr_text", _parquet(meta={"geometry": "par04_siw", "mesh_dr": "4.65"}),
                     r"attribute mesh_dr = '4\.65' is not a cell size > 0 mm"),
}


def make_bad_parquet(folder: Path) -> dict[str, BadFile]:
    bad = _make(Path(folder), PARQUET)
    # errors about a shard name the shard, errors about the folder name the folder
    shard = {"missing-column", "short-rows", "nan", "negative-energy"}
    return {k: BadFile(b.name, b.path / "data-00000-of-00001.parquet" if k in shard else
                       (b.path / "calofm.json" if k in ("broken-json", "attr-mesh-dr") else b.path), b.problem)
            for k, b in bad.items()}


# ----------------------------------------------------------------------------------------------
# Assertions
# ----------------------------------------------------------------------------------------------


def checksums(path: Path) -> dict[str, str]:
    """Every entry under the folder ``path`` (or the file ``path`` itself) -> sha256 of its bytes ("dir" for
    folders): inputs must not change."""
    path = Path(path)
    entries = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in entries}


def assert_one_error_line(stderr: str, command: str, bad: BadFile) -> str:
    """stderr is exactly one line, ``calofm <command>: error: <file>: <problem>``, and no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in stderr
    expected = rf"^calofm {re.escape(command)}: error: {re.escape(str(bad.path))}: (?:{bad.problem})"
    assert re.match(expected, lines[0]), f"{lines[0]!r} does not match {expected!r}"
    return lines[0]
