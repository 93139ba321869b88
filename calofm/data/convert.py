"""Conversion between the native format, CaloChallenge 2022 files and Parquet (Hugging Face datasets).

CaloChallenge (CaloChallenge/homepage README.md): ``incident_energies`` (N, 1) MeV and ``showers`` (N, V) MeV,
flattened layer-major with the radial bin fastest: ``flat = (z * n_alpha + alpha) * n_r + r``.
The native order is (r, phi, z), so DS2 <-> native is an exact axis transpose. DS3 (18 x 50 x 45)
is rebinned onto the 9 x 16 x 45 mesh: radial pairs merge exactly; phi bins are shared by
overlap (50 bins do not nest in 16), which conserves energy per layer and ring but is an
approximation within a ring. Export to DS3 applies the transposed overlap split.
CaloChallenge showers have no angles: import sets theta = pi/2, phi = 0 (normal incidence).

Parquet: shards of a ``datasets`` table with columns ``showers`` (fixed-size list of 6480
float32 in native C order), ``incident_energy``, ``incident_phi``, ``incident_theta``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from calofm.data.format import ENERGY, PHI, SHOWERS, THETA, FileAttrs, ShowerFileError, open_h5
from calofm.data.io import ShowerFile, ShowerWriter, partial_path
from calofm.geometry import MESH_SHAPE, load_geometry

log = logging.getLogger(__name__)

CC_MESHES = {6480: (9, 16, 45), 40500: (18, 50, 45)}  # voxels -> (n_r, n_alpha, n_z)
# DS2 (dr, dz) = the Par04 Si-W mesh; DS3 halves dr and is rebinned to it
# (Geant4 11.4.0 Par04 common_settings_{low,high}gran.mac)
CC_CELL_MM = (4.65, 3.4)
N_CELLS = int(np.prod(MESH_SHAPE))


# ----------------------------------------------------------------------------------------------
# Voxel order
# ----------------------------------------------------------------------------------------------


def to_calochallenge_order(showers: np.ndarray) -> np.ndarray:
    """(N, r, phi, z) -> (N, z*n_phi*n_r) in CaloChallenge order (r fastest, then alpha, then layer)."""
    return np.ascontiguousarray(np.transpose(showers, (0, 3, 2, 1))).reshape(len(showers), -1)


def from_calochallenge_order(flat: np.ndarray, n_r: int, n_alpha: int, n_z: int) -> np.ndarray:
    """(N, V) CaloChallenge -> (N, r, alpha, z)."""
    return np.ascontiguousarray(np.transpose(flat.reshape(len(flat), n_z, n_alpha, n_r), (0, 3, 2, 1)))


def phi_overlap(n_from: int, n_to: int) -> np.ndarray:
    """(n_to, n_from) matrix: share of source bin j falling into target bin i (bins uniform on [-pi, pi])."""
    e_from = np.linspace(-math.pi, math.pi, n_from + 1)
    e_to = np.linspace(-math.pi, math.pi, n_to + 1)
    lo = np.maximum(e_to[:-1, None], e_from[None, :-1])
    hi = np.minimum(e_to[1:, None], e_from[None, 1:])
    return np.clip(hi - lo, 0, None) / (2 * math.pi / n_from)


def rebin_ds3_to_native(showers: np.ndarray) -> np.ndarray:
    """(N, 18, 50, 45) -> (N, 9, 16, 45): merge radial pairs, share phi by overlap."""
    merged = showers[:, 0::2] + showers[:, 1::2]
    return np.einsum("ij,nrjz->nriz", phi_overlap(50, 16), merged, optimize=True).astype(np.float32)


def native_to_ds3(showers: np.ndarray) -> np.ndarray:
    """(N, 9, 16, 45) -> (N, 18, 50, 45): split radial cells in halves, phi by overlap."""
    split = np.einsum("ji,nriz->nrjz", phi_overlap(16, 50), showers, optimize=True)
    return (np.repeat(split, 2, axis=1) / 2).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# CaloChallenge
# ----------------------------------------------------------------------------------------------


def read_calochallenge_meta(path: str | Path) -> tuple[int, tuple[int, int, int]]:
    with open_h5(path) as f:
        for key in ("incident_energies", "showers"):
            if key not in f:
                raise ShowerFileError(path, f"missing key '{key}' (not a CaloChallenge file?)")
        n, voxels = f["showers"].shape if f["showers"].ndim == 2 else (None, None)
        if voxels not in CC_MESHES:
            raise ShowerFileError(
                path, f"'showers' has shape {f['showers'].shape}, expected (N, 6480) DS2 or (N, 40500) DS3"
            )
        e = f["incident_energies"]
        if e.shape not in ((n, 1), (n,)):
            raise ShowerFileError(path, f"'incident_energies' has shape {e.shape}, expected ({n}, 1)")
        return n, CC_MESHES[voxels]


def calochallenge_to_native(
    src: str | Path, dst: str | Path, geometry: str = "par04_siw", chunk: int = 2048, progress: bool = True,
    geometry_dirs: list[str | Path] | None = None,
) -> Path:
    """Import a CaloChallenge DS2/DS3 file (values kept: CaloChallenge energies are sampling-corrected)."""
    geo = load_geometry(geometry, geometry_dirs)  # an unknown name fails here, before anything is written
    n, (n_r, n_alpha, n_z) = read_calochallenge_meta(src)
    if (geo.mesh.dr, geo.mesh.dz) != CC_CELL_MM:
        log.warning("%s: CaloChallenge DS2/DS3 showers are on the Par04 Si-W mesh (dr %.2f mm, dz %.1f mm); "
                    "recording them as '%s' (dr %.3g mm, dz %.3g mm) as asked", src, *CC_CELL_MM, geo.name,
                    geo.mesh.dr, geo.mesh.dz)
    attrs = FileAttrs(geometry=geo.name, particle="e-", energy_scale="deposited", mesh_dr=geo.mesh.dr,
                      mesh_dz=geo.mesh.dz, generator=f"calochallenge-import:{Path(src).name}")
    with open_h5(src) as f, ShowerWriter(dst, attrs=attrs) as w:
        for start in tqdm(range(0, n, chunk), disable=not progress, desc=f"import {Path(src).name}", unit="chunk"):
            flat = f["showers"][start : start + chunk].astype(np.float32)
            energy = f["incident_energies"][start : start + chunk].astype(np.float32).reshape(-1)
            showers = from_calochallenge_order(flat, n_r, n_alpha, n_z)
            if showers.shape[1:] != MESH_SHAPE:
                showers = rebin_ds3_to_native(showers)
            showers = np.clip(showers, 0, None)  # CaloChallenge files clip negatives the same way
            w.append(showers, energy, np.zeros_like(energy), np.full_like(energy, math.pi / 2))
    return Path(dst)


def native_to_calochallenge(
    src: str | Path, dst: str | Path, dataset: int = 2, scale: float = 1.0, chunk: int = 2048, progress: bool = True
) -> Path:
    """Export to a CaloChallenge DS2 (exact) or DS3 (overlap split) file; voxels multiplied by ``scale``."""
    if dataset not in (2, 3):
        raise ValueError("dataset must be 2 or 3")
    dst = Path(dst)
    tmp = partial_path(dst)
    voxels = 6480 if dataset == 2 else 40500
    with ShowerFile(src) as r, open_h5(tmp, "w") as f:
        if r.attrs.energy_scale == "visible" and scale == 1.0:
            log.warning("%s holds visible energy; CaloChallenge files are sampling-corrected (use --scale)", src)
        # maxshape: an empty file (n = 0) still gets valid chunk shapes
        ds = f.create_dataset("showers", (r.n, voxels), dtype="f4", chunks=(min(max(r.n, 1), 100), voxels),
                              maxshape=(None, voxels), compression="gzip")
        de = f.create_dataset("incident_energies", (r.n, 1), dtype="f4", chunks=(min(max(r.n, 1), 4096), 1),
                              maxshape=(None, 1), compression="gzip")
        for start, batch in r.iter_chunks(rows=chunk, progress=progress, desc=f"export {Path(src).name}"):
            showers = batch[SHOWERS] * np.float32(scale)
            if dataset == 3:
                showers = native_to_ds3(showers)
            ds[start : start + len(showers)] = to_calochallenge_order(showers)
            de[start : start + len(showers), 0] = batch[ENERGY]
    tmp.replace(dst)
    return dst


# ----------------------------------------------------------------------------------------------
# Parquet / Hugging Face datasets
# ----------------------------------------------------------------------------------------------


def _features():
    from datasets import Features, List, Value

    return Features({
        SHOWERS: List(Value("float32"), length=N_CELLS),
        ENERGY: Value("float32"),
        PHI: Value("float32"),
        THETA: Value("float32"),
    })


def native_to_parquet(src: str | Path, dst: str | Path, shard_rows: int = 10_000, progress: bool = True) -> Path:
    """Write Parquet shards ``dst/data-0000k-of-0000n.parquet`` plus ``calofm.json`` (file attributes)."""
    import pyarrow as pa
    from datasets import Dataset

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    features = _features()
    with ShowerFile(src) as r:
        n_shards = max(1, -(-r.n // shard_rows))
        for k, (_, batch) in enumerate(r.iter_chunks(rows=shard_rows, progress=progress, desc="parquet")):
            flat = batch[SHOWERS].reshape(len(batch[SHOWERS]), -1)
            table = pa.table({
                SHOWERS: pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), N_CELLS),
                ENERGY: pa.array(batch[ENERGY]), PHI: pa.array(batch[PHI]), THETA: pa.array(batch[THETA]),
            })
            Dataset(table).cast(features).to_parquet(str(tmp / f"data-{k:05d}-of-{n_shards:05d}.parquet"))
        if r.n == 0:  # one empty shard keeps the schema, so the folder reads back as 0 rows
            Dataset.from_dict({k: [] for k in features}, features=features).to_parquet(
                str(tmp / "data-00000-of-00001.parquet"))
        meta = {k: v for k, v in vars(r.attrs).items() if k != "extra"}
        meta["extra"] = {k: _json_value(v) for k, v in r.attrs.extra.items()}
        meta["rows"] = r.n
        (tmp / "calofm.json").write_text(json.dumps(meta, indent=1, default=str))
    if dst.exists():
        import shutil

        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def _json_value(value):
    """numpy attribute values as plain JSON data (they come back as the same h5 attributes)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, str | int | float | bool | list) or value is None else str(value)


def parquet_files(src: str | Path) -> list[Path]:
    src = Path(src)
    files = sorted(src.glob("*.parquet")) if src.is_dir() else [src]
    if not files or not all(f.exists() for f in files):
        raise ShowerFileError(src, "no Parquet shards found")
    return files


def parquet_to_native(src: str | Path, dst: str | Path, geometry: str | None = None, progress: bool = True,
                      geometry_dirs: list[str | Path] | None = None) -> Path:
    """Read Parquet shards (written by ``native_to_parquet`` or any table with the same columns)."""
    import pyarrow.parquet as pq

    src = Path(src)
    if geometry is not None:
        geometry = load_geometry(geometry, geometry_dirs).name  # fail early on an unknown name
    meta = {}
    if src.is_dir() and (src / "calofm.json").exists():
        meta = json.loads((src / "calofm.json").read_text())
    attrs = FileAttrs(
        geometry=geometry or meta.get("geometry"), particle=meta.get("particle"),
        energy_scale=meta.get("energy_scale") or "visible", mesh_dr=meta.get("mesh_dr"),
        mesh_dz=meta.get("mesh_dz"), generator=meta.get("generator"), seed=meta.get("seed"),
        extra=meta.get("extra") or {},
    )
    with ShowerWriter(dst, attrs=attrs) as w:
        for path in tqdm(parquet_files(src), disable=not progress, desc="parquet shards"):
            pf = pq.ParquetFile(path)
            missing = {SHOWERS, ENERGY, PHI, THETA} - set(pf.schema_arrow.names)
            if missing:
                raise ShowerFileError(path, f"missing column(s) {sorted(missing)}")
            for rb in pf.iter_batches(batch_size=4096):
                col = rb.column(SHOWERS)
                values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                if values.size != len(rb) * N_CELLS:
                    raise ShowerFileError(path, f"'showers' rows must hold {N_CELLS} values")
                w.append(values.reshape(len(rb), *MESH_SHAPE),
                         *(rb.column(k).to_numpy().astype(np.float32) for k in (ENERGY, PHI, THETA)))
    return Path(dst)


def load_parquet_dataset(src: str | Path, streaming: bool = False):
    """The shards as a Hugging Face ``datasets`` object (``streaming=True`` for an IterableDataset)."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files=[str(p) for p in parquet_files(src)], split="train",
                        features=_features(), streaming=streaming)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def detect_kind(path: str | Path) -> str:
    """'parquet', 'calochallenge' or 'calofm' (the native format)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        return "parquet"
    with open_h5(path) as f:
        if "incident_energies" in f:
            return "calochallenge"
    return "calofm"


def convert(src: str | Path, dst: str | Path, to: str, geometry: str | None = None, dataset: int = 2,
            scale: float = 1.0, progress: bool = True, geometry_dirs: list[str | Path] | None = None) -> Path:
    """Convert between formats; the source kind is detected."""
    kind = detect_kind(src)
    if to not in ("calofm", "calochallenge", "parquet"):
        raise ValueError(f"--to must be calofm, calochallenge or parquet, not {to!r}")
    if kind == "calochallenge":
        native = calochallenge_to_native(src, dst if to == "calofm" else Path(dst).with_suffix(".tmp.h5"),
                                         geometry=geometry or "par04_siw", progress=progress,
                                         geometry_dirs=geometry_dirs)
    elif kind == "parquet":
        native = parquet_to_native(src, dst if to == "calofm" else Path(dst).with_suffix(".tmp.h5"),
                                   geometry=geometry, progress=progress, geometry_dirs=geometry_dirs)
    else:
        native = Path(src)
    try:
        if to == "calofm":
            if kind == "calofm":
                raise ValueError(f"{src} is already in the calofm format")
            return native
        if to == "calochallenge":
            return native_to_calochallenge(native, dst, dataset=dataset, scale=scale, progress=progress)
        return native_to_parquet(native, dst, progress=progress)
    finally:
        if native != Path(src) and native != Path(dst) and native.exists():
            native.unlink()
