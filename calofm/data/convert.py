"""Conversion between the native format, CaloChallenge 2022 files and Parquet (Hugging Face datasets).

The formats live in ``calofm.data.calochallenge`` and ``calofm.data.parquet``; this module checks and
dispatches. Every conversion:
- checks its input before any output exists (everything that needs no shower values: keys, shapes, N > 0,
  the geometry and mesh against the card), and every value while converting, naming the input and its row;
- refuses an output that is an input, lies inside an input folder or holds the input (symlinks and
  relative paths resolved), and an existing output unless ``overwrite``;
- writes through a hidden temporary folder beside the output and moves the result into place only when it
  is complete, so an error or Ctrl-C leaves nothing behind and an existing output untouched.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

from calofm.data.calochallenge import (  # noqa: F401  (the public names of the formats, re-exported)
    CC_CELL_MM,
    CC_MESHES,
    binning_path,
    binning_xml,
    export_calochallenge,
    export_cell_size,
    from_calochallenge_order,
    import_calochallenge,
    native_to_ds3,
    phi_overlap,
    read_calochallenge_meta,
    rebin_ds3_to_native,
    to_calochallenge_order,
)
from calofm.data.format import ShowerFileError, file_geometry, h5_errors, open_h5
from calofm.data.io import ShowerFile
from calofm.data.output import Staging, catch_interrupts, check_output
from calofm.data.parquet import export_parquet, import_parquet, load_parquet_dataset, open_parquet  # noqa: F401
from calofm.geometry import load_geometry

TARGETS = ("calofm", "calochallenge", "parquet")


def detect_kind(path: str | Path) -> str:
    """'parquet', 'calochallenge' or 'calofm' (the native format)."""
    path = Path(path)
    if not path.exists():
        raise ShowerFileError(path, "file not found")
    if path.is_dir() or path.suffix == ".parquet":
        return "parquet"
    with open_h5(path) as f, h5_errors(path):
        native_keys = any(k in f for k in ("incident_energy", "incident_phi", "incident_theta"))
        flat = "showers" in f and getattr(f["showers"], "ndim", 0) == 2
        if "incident_energies" in f or (flat and not native_keys):
            return "calochallenge"
    return "calofm"


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, not {scale!r}")
    return float(scale)


def convert(src: str | Path, dst: str | Path, to: str, geometry: str | None = None, dataset: int = 2,
            scale: float = 1.0, progress: bool = True, geometry_dirs: list[str | Path] | None = None,
            overwrite: bool = False) -> Path:
    """Convert between formats; the source kind is detected (see the module docstring for the guarantees)."""
    if to not in TARGETS:
        raise ValueError(f"--to must be calofm, calochallenge or parquet, not {to!r}")
    return _convert(Path(src), detect_kind(src), Path(dst), to, geometry=geometry, dataset=dataset, scale=scale,
                    progress=progress, geometry_dirs=geometry_dirs, overwrite=overwrite)


def _convert(src: Path, kind: str, dst: Path, to: str, geometry=None, dataset: int = 2, scale: float = 1.0,
             progress: bool = True, geometry_dirs=None, overwrite: bool = False, chunk: int = 2048,
             shard_rows: int = 10_000) -> Path:
    if dataset not in (2, 3):
        raise ValueError(f"dataset must be 2 or 3, not {dataset!r}")
    scale = check_scale(scale)
    if kind == to == "calofm":
        raise ValueError(f"{src} is already in the calofm format")
    check_output(dst, [src], overwrite, "parquet" if to == "parquet" else "file")
    if to == "calochallenge":
        check_output(binning_path(dst), [src], overwrite)
    with ExitStack() as stack:
        stack.enter_context(catch_interrupts())
        # the input first: everything that needs no shower values, before any output exists
        if kind == "calofm":
            reader = stack.enter_context(ShowerFile(src, geometry=geometry, geometry_dirs=geometry_dirs))
            source_geometry, source_attrs = reader.geometry, reader.attrs
        elif kind == "calochallenge":
            source_geometry = load_geometry(geometry or "par04_siw", geometry_dirs)
            meta, source_attrs = read_calochallenge_meta(src), None
        else:
            source = open_parquet(src)
            source_geometry, _ = file_geometry(src, source.attrs, geometry, geometry_dirs)
            if source_geometry is not None:
                source.attrs.geometry = source_geometry.name
            source_attrs = source.attrs
        dr = export_cell_size(src, source_geometry, source_attrs) if to == "calochallenge" else None
        staging = stack.enter_context(Staging(dst.parent, dst.name, inputs=[src]))
        if kind != "calofm":
            native = staging.tmp / "native.h5"
            if kind == "calochallenge":
                import_calochallenge(src, native, meta, source_geometry, chunk=chunk, progress=progress)
            else:
                import_parquet(source, native, progress=progress)
            if to == "calofm":
                staging.place(native, dst)
                return dst
            reader = stack.enter_context(ShowerFile(native, geometry_dirs=geometry_dirs))
        if to == "calochallenge":
            out, xml = staging.tmp / "cc.hdf5", staging.tmp / "binning.xml"
            export_calochallenge(reader, out, xml, dr, dataset=dataset, scale=scale, chunk=chunk, progress=progress)
            staging.place(out, dst)
            staging.place(xml, binning_path(dst))
        else:
            export_parquet(reader, staging.tmp / "parquet", shard_rows=shard_rows, progress=progress)
            staging.place(staging.tmp / "parquet", dst, "folder")
    return dst


# ----------------------------------------------------------------------------------------------
# One direction each (the source kind is given, not detected)
# ----------------------------------------------------------------------------------------------


def calochallenge_to_native(src: str | Path, dst: str | Path, geometry: str = "par04_siw", chunk: int = 2048,
                            progress: bool = True, geometry_dirs=None, overwrite: bool = False) -> Path:
    """Import a CaloChallenge DS2/DS3 file (values kept: CaloChallenge energies are sampling-corrected)."""
    return _convert(Path(src), "calochallenge", Path(dst), "calofm", geometry=geometry, chunk=chunk,
                    progress=progress, geometry_dirs=geometry_dirs, overwrite=overwrite)


def native_to_calochallenge(src: str | Path, dst: str | Path, dataset: int = 2, scale: float = 1.0,
                            chunk: int = 2048, progress: bool = True, geometry: str | None = None,
                            geometry_dirs=None, overwrite: bool = False) -> Path:
    """Export to a CaloChallenge DS2 (exact) or DS3 (overlap split) file and its binning XML
    (``binning_path(dst)``); voxels multiplied by ``scale``."""
    return _convert(Path(src), "calofm", Path(dst), "calochallenge", geometry=geometry, dataset=dataset,
                    scale=scale, chunk=chunk, progress=progress, geometry_dirs=geometry_dirs, overwrite=overwrite)


def native_to_parquet(src: str | Path, dst: str | Path, shard_rows: int = 10_000, progress: bool = True,
                      overwrite: bool = False, geometry_dirs=None) -> Path:
    """Write Parquet shards ``dst/data-0000k-of-0000n.parquet`` plus ``calofm.json`` (file attributes)."""
    return _convert(Path(src), "calofm", Path(dst), "parquet", shard_rows=shard_rows, progress=progress,
                    overwrite=overwrite, geometry_dirs=geometry_dirs)


def parquet_to_native(src: str | Path, dst: str | Path, geometry: str | None = None, progress: bool = True,
                      geometry_dirs=None, overwrite: bool = False) -> Path:
    """Read Parquet shards (written by ``native_to_parquet`` or any table with the same columns)."""
    return _convert(Path(src), "parquet", Path(dst), "calofm", geometry=geometry, progress=progress,
                    geometry_dirs=geometry_dirs, overwrite=overwrite)
