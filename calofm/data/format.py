"""The native shower file: the LEMURS / Geant4 Par04 HDF5 layout, plus calofm attributes.

Datasets (as written by key4hep/DDML scripts/edm4hep2h5.py):
    showers           float32 (N, 9, 16, 45)  MeV, axes (r, phi, z)
    incident_energy   float32 (N,)            MeV
    incident_phi      float32 (N,)            rad
    incident_theta    float32 (N,)            rad

calofm adds file attributes (geometry, particle, mesh, energy scale, generator, seed, format
version). Files written by others have none of them and still load; the geometry then comes
from the user. Every check here raises ``ShowerFileError`` with one line naming file and problem.
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from calofm.config import first_line
from calofm.geometry import MESH_SHAPE

FORMAT_VERSION = "1"
SHOWERS = "showers"
ENERGY = "incident_energy"
PHI = "incident_phi"
THETA = "incident_theta"
CONDITION_KEYS = (ENERGY, PHI, THETA)
REQUIRED_KEYS = (SHOWERS, *CONDITION_KEYS)
ENERGY_SCALES = ("visible", "deposited")


class ShowerFileError(ValueError):
    """A shower file is missing, malformed or holds invalid values."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


@dataclass
class FileAttrs:
    """calofm's file attributes; all optional for files written by other tools."""

    geometry: str | None = None
    particle: str | None = None
    energy_scale: str = "visible"  # "visible" (active-layer energy, LEMURS) or "deposited" (CaloChallenge-like)
    mesh_shape: tuple[int, int, int] = MESH_SHAPE
    mesh_dr: float | None = None  # mm
    mesh_dz: float | None = None  # mm
    generator: str | None = None
    seed: int | None = None
    format_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _names = ("geometry", "particle", "energy_scale", "mesh_dr", "mesh_dz", "generator", "seed")

    def to_h5(self) -> dict[str, Any]:
        out: dict[str, Any] = {"calofm_format_version": FORMAT_VERSION, "mesh_shape": np.array(self.mesh_shape)}
        for name in self._names:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for key, value in self.extra.items():
            out[key] = value
        return out

    @classmethod
    def from_h5(cls, attrs: h5py.AttributeManager) -> FileAttrs:
        def get(key):
            value = attrs.get(key)
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, np.generic):
                value = value.item()
            return value

        shape = attrs.get("mesh_shape")
        known = set(cls._names) | {"mesh_shape", "calofm_format_version"}
        return cls(
            geometry=get("geometry"),
            particle=get("particle"),
            energy_scale=get("energy_scale") or "visible",
            mesh_shape=tuple(np.ravel(shape).tolist()) if shape is not None else MESH_SHAPE,  # checked by check_attrs
            mesh_dr=get("mesh_dr"),
            mesh_dz=get("mesh_dz"),
            generator=get("generator"),
            seed=get("seed"),
            format_version=get("calofm_format_version"),
            extra={k: get(k) for k in attrs if k not in known},
        )


@contextmanager
def h5_errors(path: str | Path, what: str = "read"):
    """Turn h5py's low-level errors on damaged files into a one-line ``ShowerFileError`` naming the file.

    Corrupt metadata surfaces as OSError, KeyError, RuntimeError or ValueError from deep inside
    h5py, none of which names the file (and the CLI does not catch RuntimeError). A failed write
    (disk full, permissions) is said as such, not blamed on a corrupt file.
    """
    try:
        yield
    except ShowerFileError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        msg = first_line(err)
        if what == "write":
            raise ShowerFileError(path, f"write failed ({msg})") from None
        raise ShowerFileError(path, f"{what} failed, file truncated or corrupt? ({msg})") from None


def open_h5(path: str | Path, mode: str = "r", **kwargs) -> h5py.File:
    """Open an HDF5 file, turning OS/HDF5 errors into one-line ``ShowerFileError``s."""
    path = Path(path)
    reading = mode in ("r", "r+")
    if reading:
        if not path.exists():
            raise ShowerFileError(path, "file not found")
        if path.is_dir():
            raise ShowerFileError(path, "is a directory, not an HDF5 file")
        if not h5py.is_hdf5(path):
            raise ShowerFileError(path, "not an HDF5 file (or truncated before its header)")
    elif not path.parent.is_dir():
        raise ShowerFileError(path, f"cannot create the file: folder {path.parent} does not exist")
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as err:
        msg = first_line(err)
        if not reading:
            reason = "permission denied" if not os.access(path.parent, os.W_OK) else msg
            raise ShowerFileError(path, f"cannot create the file ({reason})") from None
        raise ShowerFileError(path, f"cannot open HDF5 file, truncated or corrupt? ({msg})") from None


def check_structure(f: h5py.File, path: str | Path) -> int:
    """Keys, ranks, shapes, dtypes and lengths; returns the number of showers."""
    missing = [k for k in REQUIRED_KEYS if k not in f]
    if missing:
        hint = ""
        if "incident_energies" in f:
            hint = " (looks like a CaloChallenge file: use `calofm convert ... --to calofm`)"
        raise ShowerFileError(path, f"missing key(s) {missing}{hint}")
    for key in REQUIRED_KEYS:
        if not isinstance(f[key], h5py.Dataset):
            raise ShowerFileError(path, f"'{key}' is a group, expected a dataset")
        if not np.issubdtype(f[key].dtype, np.floating):
            raise ShowerFileError(path, f"'{key}' has dtype {f[key].dtype}, expected float32")
    showers = f[SHOWERS]
    if showers.ndim != 4 or tuple(showers.shape[1:]) != MESH_SHAPE:
        raise ShowerFileError(
            path, f"'showers' has shape {tuple(showers.shape)}, expected (N, {', '.join(map(str, MESH_SHAPE))})"
        )
    n = showers.shape[0]
    for key in CONDITION_KEYS:
        ds = f[key]
        if ds.ndim != 1:
            raise ShowerFileError(path, f"'{key}' has shape {tuple(ds.shape)}, expected ({n},)")
        if ds.shape[0] != n:
            raise ShowerFileError(path, f"'{key}' has {ds.shape[0]} entries but 'showers' has {n}")
    return n


def check_complete(f: h5py.File, path: str | Path, n: int) -> None:
    """A file must hold showers, and every row it claims must have been written.

    Rows that were never written read as HDF5 fill values (zeros) and would pass every value check:
    a dataset resized or created with a length but not filled, or a ``.partial`` file of an
    interrupted write renamed by hand.
    """
    if n == 0:
        raise ShowerFileError(path, "holds no showers (N = 0)")
    if "calofm_rows_committed" in f.attrs:
        raise ShowerFileError(path, f"is an unfinished file from an interrupted write "
                                    f"({int(f.attrs['calofm_rows_committed'])} of {n} rows committed)")
    expected = f.attrs.get("calofm_expected_rows")
    if expected is not None and int(expected) != n:
        raise ShowerFileError(path, f"records {int(expected)} expected rows but holds {n}")
    for key in REQUIRED_KEYS:
        ds = f[key]
        layout = ds.id.get_create_plist().get_layout()
        if layout == h5py.h5d.CHUNKED:
            need = int(np.prod([-(-size // c) for size, c in zip(ds.shape, ds.chunks)]))
            have = ds.id.get_num_chunks()
            if have < need:
                raise ShowerFileError(path, f"'{key}' claims {n} rows but only {have} of its {need} HDF5 chunks "
                                            "were ever written (the rest read as fill values)")
        elif layout == h5py.h5d.CONTIGUOUS and ds.id.get_storage_size() == 0:
            raise ShowerFileError(path, f"'{key}' claims {n} rows but was never written (it reads as fill values)")


def check_values(
    path: str | Path,
    showers: np.ndarray | None = None,
    energy: np.ndarray | None = None,
    phi: np.ndarray | None = None,
    theta: np.ndarray | None = None,
    offset: int = 0,
    rows: np.ndarray | None = None,
) -> None:
    """NaN/Inf, negative energies and angle ranges. Errors name the file row: ``rows[i]`` for array
    position ``i`` when given (rows read in any order), else ``offset + i``."""

    def first_bad(mask: np.ndarray) -> int:
        pos = int(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0])
        return int(rows[pos]) if rows is not None else offset + pos

    if showers is not None:
        finite = np.isfinite(showers)
        if not finite.all():
            raise ShowerFileError(path, f"'showers' holds NaN/Inf (first in shower {first_bad(~finite)})")
        if (showers < 0).any():
            raise ShowerFileError(path, f"'showers' holds negative energies (first in shower {first_bad(showers < 0)})")
    if energy is not None:
        if not np.isfinite(energy).all():
            row = first_bad(~np.isfinite(energy))
            raise ShowerFileError(path, f"'incident_energy' holds NaN/Inf (first at row {row})")
        if (energy <= 0).any():
            raise ShowerFileError(path, f"'incident_energy' must be > 0 MeV (row {first_bad(energy <= 0)})")
    for key, values, lo, hi in ((PHI, phi, -math.pi, 2 * math.pi), (THETA, theta, 0.0, math.pi)):
        if values is None:
            continue
        if not np.isfinite(values).all():
            raise ShowerFileError(path, f"'{key}' holds NaN/Inf (first at row {first_bad(~np.isfinite(values))})")
        bad = (values < lo - 1e-5) | (values > hi + 1e-5)
        if bad.any():
            raise ShowerFileError(path, f"'{key}' outside [{lo:.4g}, {hi:.4g}] rad (row {first_bad(bad)}); degrees?")


def check_geometry(path: str | Path, attrs: FileAttrs, geometry) -> None:
    """The file's recorded geometry and mesh must match the one the user asked for."""
    if geometry is None:
        return
    if attrs.geometry is not None and attrs.geometry != geometry.name:
        raise ShowerFileError(path, f"geometry mismatch: file holds '{attrs.geometry}', asked for '{geometry.name}'")
    for name, value, expected in (("dr", attrs.mesh_dr, geometry.mesh.dr), ("dz", attrs.mesh_dz, geometry.mesh.dz)):
        if value is not None and abs(float(value) - expected) > 1e-4 * expected:
            raise ShowerFileError(
                path, f"mesh mismatch: file has {name} = {value} mm, geometry '{geometry.name}' has {expected} mm"
            )


def check_attrs(path: str | Path, attrs: FileAttrs) -> None:
    """calofm's attributes, where present, have the types and values calofm writes (files from other tools
    have none of them)."""
    for name in ("geometry", "particle"):
        value = getattr(attrs, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ShowerFileError(path, f"attribute {name} = {_short(value)} is not a name")
    if attrs.energy_scale not in ENERGY_SCALES:
        raise ShowerFileError(path, f"attribute energy_scale = {_short(attrs.energy_scale)} is not one of "
                                    f"{', '.join(ENERGY_SCALES)}")
    for name in ("mesh_dr", "mesh_dz"):
        value = getattr(attrs, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or value <= 0):
            raise ShowerFileError(path, f"attribute {name} = {_short(value)} is not a cell size > 0 mm")
    if attrs.mesh_shape != MESH_SHAPE:
        raise ShowerFileError(path, f"attribute mesh_shape = {_short(list(attrs.mesh_shape))} but the showers "
                                    f"are on the {'x'.join(map(str, MESH_SHAPE))} mesh")
    if not isinstance(attrs.extra, dict):
        raise ShowerFileError(path, f"the extra attributes must be a mapping, not {_short(attrs.extra)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def stored_card(path: str | Path, attrs: FileAttrs):
    """The geometry card a file carries (``calofm.cards``), checked against its recorded sha256; None if none."""
    from calofm.cards import CARD_ATTR, CARD_SHA_ATTR, card_from_text
    from calofm.geometry import GeometryError

    text, digest = attrs.extra.get(CARD_ATTR), attrs.extra.get(CARD_SHA_ATTR)
    if text is None and digest is None:
        return None
    if not isinstance(text, str) or not isinstance(digest, str):
        raise ShowerFileError(path, f"attributes {CARD_ATTR} and {CARD_SHA_ATTR} must both be text")
    if hashlib.sha256(text.encode()).hexdigest() != digest:
        raise ShowerFileError(path, "its stored geometry card does not match the sha256 recorded with it "
                                    "(damaged or modified)")
    try:
        card = card_from_text(text, "stored geometry card")
    except GeometryError as err:
        raise ShowerFileError(path, f"its {err}") from None
    if card.name != attrs.geometry:
        raise ShowerFileError(path, f"its stored geometry card is for '{card.name}', but the file records "
                                    f"geometry {attrs.geometry!r}")
    return card


def file_geometry(path: str | Path, attrs: FileAttrs, geometry=None, geometry_dirs=None):
    """The geometry of a file, checked against its recorded name and cell sizes: ``(Geometry or None, note)``.

    The one geometry check every command runs on a shower file. ``geometry`` (a name, a card path or a
    ``Geometry``) is what the user asked for; without it the recorded geometry's card is found by name (built in,
    ``geometry_dirs`` or $CALOFM_GEOMETRY_DIR), else the card stored in the file is used. A card found either way
    must agree with the file's stored card (``calofm.cards.same_card``); a recorded geometry without any card is
    said in ``note``.
    """
    from calofm.cards import same_card
    from calofm.geometry import available_geometries, load_geometry

    stored = stored_card(path, attrs)
    if geometry is not None:
        geo = load_geometry(geometry, geometry_dirs)
    elif attrs.geometry is None:
        return None, ""
    elif attrs.geometry in available_geometries(geometry_dirs):
        geo = load_geometry(attrs.geometry, geometry_dirs)
    elif stored is not None:
        geo = stored
    else:
        return None, f"no card for geometry '{attrs.geometry}' here: cell sizes not checked (see --geometry-dir)"
    check_geometry(path, attrs, geo)
    if stored is not None and not same_card(geo, stored):
        other = geo.source or "the card given"
        raise ShowerFileError(path, f"its stored card of geometry '{geo.name}' differs from {other}; give the card "
                                    "the file was made with (--geometry CARD.yaml)")
    return geo, "geometry card: stored in the file" if geo is stored else ""


def check_file(f: h5py.File, path: Path, geometry=None, geometry_dirs=None):
    """Every check of an open native file that needs no shower values, shared by every command:
    keys, shapes, dtypes, lengths, N > 0, rows actually written, the attributes, and the geometry (asked for or
    recorded) against its card and the card the file carries. Returns ``(n, attrs, Geometry or None, note)``."""
    with h5_errors(path):
        n = check_structure(f, path)
        check_complete(f, path, n)
        attrs = FileAttrs.from_h5(f.attrs)
    check_attrs(path, attrs)
    geo, note = file_geometry(path, attrs, geometry, geometry_dirs)
    return n, attrs, geo, note


@contextmanager
def wide_float_hint(f: h5py.File, keys):
    """A NaN/Inf error on a float64 dataset may be a value beyond float32 (read as inf): say so."""
    try:
        yield
    except ShowerFileError as err:
        key = err.problem.split("'")[1] if err.problem.startswith("'") else None
        if key in keys and "NaN/Inf" in err.problem and f[key].dtype.itemsize > 4:
            raise ShowerFileError(err.path, err.problem.replace("NaN/Inf", "NaN/Inf or values beyond float32",
                                                                1)) from None
        raise
