"""CaloChallenge 2022 files (datasets 2 and 3): voxel order, rebinning, reading, writing, the binning XML.

CaloChallenge (CaloChallenge/homepage README.md): ``incident_energies`` (N, 1) MeV and ``showers`` (N, V) MeV,
flattened layer-major with the radial bin fastest: ``flat = (z * n_alpha + alpha) * n_r + r``.
The native order is (r, phi, z), so DS2 <-> native is an exact axis transpose. DS3 (18 x 50 x 45)
is rebinned onto the 9 x 16 x 45 mesh: radial pairs merge exactly; phi bins are shared by
overlap (50 bins do not nest in 16), which conserves energy per layer and ring but is an
approximation within a ring. Export to DS3 applies the transposed overlap split.
CaloChallenge showers have no angles: import sets theta = pi/2, phi = 0 (normal incidence).

The challenge's ``evaluate.py`` takes the radial bin edges of its features from a binning XML
(``binning_dataset_2.xml``: 45 layers of ``r_edges`` in mm and ``n_bin_alpha``), so every export
writes the XML of its own geometry beside the file. The writers here fill paths inside a
``Staging`` folder; ``calofm.data.convert`` does the output checks and the moves.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from calofm.cards import card_attrs
from calofm.data.format import ENERGY, SHOWERS, FileAttrs, ShowerFileError, check_values, h5_errors, open_h5
from calofm.data.io import ShowerFile, ShowerWriter, progress_disabled
from calofm.data.output import check_interrupted
from calofm.geometry import MESH_SHAPE, Geometry

log = logging.getLogger(__name__)

CC_MESHES = {6480: (9, 16, 45), 40500: (18, 50, 45)}  # voxels -> (n_r, n_alpha, n_z)
# DS2 (dr, dz) = the Par04 Si-W mesh; DS3 halves dr and is rebinned to it
# (Geant4 11.4.0 Par04 common_settings_{low,high}gran.mac)
CC_CELL_MM = (4.65, 3.4)
CC_PARTICLE = "electron"  # evaluate.py reads the <Bin name="electron"> of its XML for datasets 2 and 3


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
# The binning XML of evaluate.py
# ----------------------------------------------------------------------------------------------


def binning_xml(dr: float, dataset: int = 2, n_layers: int = MESH_SHAPE[2]) -> str:
    """The binning XML for cells of ``dr`` mm, in the layout of CaloChallenge's ``binning_dataset_{2,3}.xml``."""
    n_r, n_alpha, _ = CC_MESHES[6480 if dataset == 2 else 40500]
    step = dr * MESH_SHAPE[0] / n_r  # DS3 halves each native ring
    edges = ",".join(f"{i * step:.6g}" for i in range(n_r + 1))
    lines = ["<Bins>", f'   <Bin pid="11" name="{CC_PARTICLE}">']
    lines += [f'      <Layer id="{k}" r_edges="{edges}" n_bin_alpha="{n_alpha}" />' for k in range(n_layers)]
    return "\n".join([*lines, "   </Bin>", "</Bins>", ""])


def binning_path(dst: str | Path) -> Path:
    """Where an export's binning XML goes: ``out.hdf5`` -> ``out_binning.xml``."""
    dst = Path(dst)
    return dst.with_name(f"{dst.stem}_binning.xml")


def export_cell_size(path: Path, geometry: Geometry | None, attrs: FileAttrs) -> float:
    """dr (mm) for the binning XML: the file's geometry card, else its recorded mesh_dr."""
    if geometry is not None:
        return float(geometry.mesh.dr)
    if attrs.mesh_dr is not None:
        return float(attrs.mesh_dr)
    raise ShowerFileError(path, "records neither a geometry nor a cell size, which the binning XML needs: "
                                "pass --geometry NAME")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaloChallengeMeta:
    n: int
    mesh: tuple[int, int, int]  # (n_r, n_alpha, n_z)


def read_calochallenge_meta(path: str | Path) -> CaloChallengeMeta:
    """Keys, shapes, dtypes and N > 0 of a CaloChallenge file (no values read)."""
    with open_h5(path) as f, h5_errors(path):
        for key in ("incident_energies", "showers"):
            if key not in f:
                raise ShowerFileError(path, f"missing key '{key}' (not a CaloChallenge file?)")
            if not isinstance(f[key], h5py.Dataset):
                raise ShowerFileError(path, f"'{key}' is a group, expected a dataset")
            if not np.issubdtype(f[key].dtype, np.floating):
                raise ShowerFileError(path, f"'{key}' has dtype {f[key].dtype}, expected float32 or float64")
        n, voxels = f["showers"].shape if f["showers"].ndim == 2 else (None, None)
        if voxels not in CC_MESHES:
            raise ShowerFileError(
                path, f"'showers' has shape {f['showers'].shape}, expected (N, 6480) DS2 or (N, 40500) DS3"
            )
        e = f["incident_energies"]
        if e.shape not in ((n, 1), (n,)):
            raise ShowerFileError(path, f"'incident_energies' has shape {e.shape}, expected ({n}, 1)")
        if n == 0:
            raise ShowerFileError(path, "holds no showers (N = 0)")
        return CaloChallengeMeta(n, CC_MESHES[voxels])


def import_calochallenge(src: Path, out: Path, meta: CaloChallengeMeta, geometry: Geometry, chunk: int = 2048,
                         progress: bool = True) -> None:
    """Write the native file ``out`` from a CaloChallenge file (values kept: they are sampling-corrected)."""
    if (geometry.mesh.dr, geometry.mesh.dz) != CC_CELL_MM:
        log.warning("%s: CaloChallenge DS2/DS3 showers are on the Par04 Si-W mesh (dr %.2f mm, dz %.1f mm); "
                    "recording them as '%s' (dr %.3g mm, dz %.3g mm) as asked", src, *CC_CELL_MM, geometry.name,
                    geometry.mesh.dr, geometry.mesh.dz)
    attrs = FileAttrs(geometry=geometry.name, particle="e-", energy_scale="deposited", mesh_dr=geometry.mesh.dr,
                      mesh_dz=geometry.mesh.dz, generator=f"calochallenge-import:{src.name}",
                      extra=card_attrs(geometry))  # a card that is not built in travels with the file
    with open_h5(src) as f, ShowerWriter(out, attrs=attrs) as w:
        for start in tqdm(range(0, meta.n, chunk), disable=progress_disabled(progress), desc=f"import {src.name}",
                          unit="chunk"):
            check_interrupted()
            with h5_errors(src):
                flat = f["showers"][start : start + chunk].astype(np.float32)
                energy = f["incident_energies"][start : start + chunk].astype(np.float32).reshape(-1)
            showers = from_calochallenge_order(flat, *meta.mesh)
            if showers.shape[1:] != MESH_SHAPE:
                showers = rebin_ds3_to_native(showers)
            showers = np.clip(showers, 0, None)  # CaloChallenge files clip negatives the same way; NaN stays NaN
            try:  # the source and its row are to blame, not the file being written
                check_values(src, showers=showers, energy=energy, offset=start)
            except ShowerFileError as err:
                raise ShowerFileError(src, err.problem.replace(f"'{ENERGY}'", "'incident_energies'")) from None
            w.append(showers, energy, np.zeros_like(energy), np.full_like(energy, math.pi / 2))


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def export_calochallenge(reader: ShowerFile, out: Path, xml: Path, dr: float, dataset: int = 2, scale: float = 1.0,
                         chunk: int = 2048, progress: bool = True) -> None:
    """Write a CaloChallenge DS2 (exact) or DS3 (overlap split) file, voxels times ``scale``, and its binning XML.

    ``incident_energies`` is float64 as in the official files (evaluate.py's classifier needs it)."""
    n, voxels = reader.n, 6480 if dataset == 2 else 40500
    if reader.attrs.energy_scale == "visible" and scale == 1.0:
        log.warning("%s holds visible energy; CaloChallenge files are sampling-corrected (use --scale, "
                    "see docs/format.md)", reader.path)
    with open_h5(out, "w") as f:
        with h5_errors(out, "write"):
            ds = f.create_dataset("showers", (n, voxels), dtype="f4", chunks=(min(n, 100), voxels), compression="gzip")
            de = f.create_dataset("incident_energies", (n, 1), dtype="f8", chunks=(min(n, 4096), 1),
                                  compression="gzip")
        for start, batch in reader.iter_chunks(rows=chunk, progress=progress, desc=f"export {reader.path.name}"):
            showers = batch[SHOWERS] * np.float32(scale)
            if dataset == 3:
                showers = native_to_ds3(showers)
            check_interrupted()
            with h5_errors(out, "write"):
                ds[start : start + len(showers)] = to_calochallenge_order(showers)
                de[start : start + len(showers), 0] = batch[ENERGY].astype(np.float64)
    xml.write_text(binning_xml(dr, dataset))
