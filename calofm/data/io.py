"""Reading and writing native shower files.

``ShowerWriter`` streams chunks into resizable datasets of ``<out>.partial`` and renames it to
``<out>`` only when closed cleanly, so an interrupted run never leaves a file that looks
complete; with ``resume=True`` a later run continues the partial file where it stopped.
``ShowerFile`` is a lazy, memory-bounded reader whose batch reads touch whole HDF5 chunks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

from calofm.data.format import (
    CONDITION_KEYS,
    ENERGY,
    PHI,
    SHOWERS,
    THETA,
    FileAttrs,
    ShowerFileError,
    check_file,
    check_structure,
    check_values,
    h5_errors,
    open_h5,
    wide_float_hint,
)
from calofm.data.output import catch_interrupts, check_interrupted, partial_path
from calofm.geometry import MESH_SHAPE

log = logging.getLogger(__name__)

CHUNK_ROWS = 64  # showers per HDF5 chunk: 1.6 MB uncompressed, the unit of every batch read
COMMITTED = "calofm_rows_committed"  # rows known to be fully written (resume point)


class ShowerWriter:
    """Append showers in chunks; the output appears under its final name only on ``close()``.

    ``compression`` is ``None`` (fastest random access), ``"gzip"`` (level 4 with shuffle,
    as small as the LEMURS files) or ``"lzf"``. ``resume=True`` reopens a matching
    ``.partial`` file and ``n_written`` tells the producer where to continue.
    """

    def __init__(
        self,
        path: str | Path,
        attrs: FileAttrs | None = None,
        compression: str | None = "gzip",
        resume: bool = False,
        expected_rows: int | None = None,
        overwrite: bool = True,
    ):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.attrs = attrs or FileAttrs()
        if self.path.exists() and not overwrite:
            raise ShowerFileError(self.path, "exists already (pass overwrite=True or choose another name)")
        if not self.path.parent.exists():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ShowerFileError(self.path, f"cannot create its folder ({err.strerror or err})") from None
        self.n_written = 0
        self._file: h5py.File | None = None
        if resume and self.tmp.exists() and self._reopen():
            return
        if self.tmp.exists():
            self.tmp.unlink()
        self._create(compression, expected_rows)

    # -- setup ----------------------------------------------------------------------------------
    def _create(self, compression: str | None, expected_rows: int | None) -> None:
        opts: dict[str, Any] = {}
        if compression == "gzip":
            opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        elif compression == "lzf":
            opts = {"compression": "lzf", "shuffle": True}
        elif compression is not None:
            raise ValueError(f"compression must be None, 'gzip' or 'lzf', not {compression!r}")
        f = open_h5(self.tmp, "w")
        f.create_dataset(
            SHOWERS, shape=(0, *MESH_SHAPE), maxshape=(None, *MESH_SHAPE), dtype="f4",
            chunks=(CHUNK_ROWS, *MESH_SHAPE), **opts,
        )
        for key in CONDITION_KEYS:
            f.create_dataset(key, shape=(0,), maxshape=(None,), dtype="f4", chunks=(4096,))
        for key, value in self.attrs.to_h5().items():
            f.attrs[key] = value
        if expected_rows is not None:
            f.attrs["calofm_expected_rows"] = expected_rows
        f.attrs[COMMITTED] = 0
        self._file = f

    def _reopen(self) -> bool:
        """Continue a partial file whose attributes match this run; False if it cannot be used."""
        try:
            f = open_h5(self.tmp, "r+")
        except ShowerFileError as err:
            log.warning("cannot resume %s (%s); starting again", self.tmp, err.problem)
            return False
        try:
            with h5_errors(self.tmp):
                check_structure(f, self.tmp)
                old = FileAttrs.from_h5(f.attrs)
        except ShowerFileError as err:
            f.close()
            log.warning("cannot resume %s (%s); starting again", self.tmp, err.problem)
            return False
        for name in ("geometry", "particle", "energy_scale", "mesh_dr", "mesh_dz", "generator", "seed"):
            if getattr(old, name) != getattr(self.attrs, name):
                log.warning("cannot resume %s: %s differs (%r vs %r); starting again",
                            self.tmp, name, getattr(old, name), getattr(self.attrs, name))
                f.close()
                return False
        if any(old.extra.get(k) != v for k, v in self.attrs.extra.items()):
            log.warning("cannot resume %s: run settings differ; starting again", self.tmp)
            f.close()
            return False
        n = int(f.attrs.get(COMMITTED, 0))
        for key in (SHOWERS, *CONDITION_KEYS):  # drop rows of an append that was cut short
            f[key].resize(n, axis=0)
        self._file, self.n_written = f, n
        log.info("resuming %s after %d showers", self.tmp, n)
        return True

    # -- writing --------------------------------------------------------------------------------
    def append(self, showers: np.ndarray, energy: np.ndarray, phi: np.ndarray, theta: np.ndarray) -> None:
        """Append a chunk: showers (n, 9, 16, 45) MeV, energy (n,) MeV, phi/theta (n,) rad."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: writer is closed")
        showers = np.asarray(showers, dtype=np.float32)
        n = showers.shape[0]
        cols = {ENERGY: energy, PHI: phi, THETA: theta}
        cols = {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in cols.items()}
        if showers.shape[1:] != MESH_SHAPE or any(len(v) != n for v in cols.values()):
            raise ShowerFileError(self.path, f"append: inconsistent chunk shapes {showers.shape}, "
                                             f"{[len(v) for v in cols.values()]}")
        check_values(self.path, showers, cols[ENERGY], cols[PHI], cols[THETA], offset=self.n_written)
        check_interrupted()
        f, start = self._file, self.n_written
        with h5_errors(self.tmp, "write"):
            for key in (SHOWERS, *CONDITION_KEYS):
                f[key].resize(start + n, axis=0)
            f[SHOWERS][start:] = showers
            for key, values in cols.items():
                f[key][start:] = values
            self.n_written = start + n
            f.attrs[COMMITTED] = self.n_written
            f.flush()

    def close(self) -> Path:
        """Finish the file and move it to its final name (atomic on one filesystem)."""
        if self._file is None:
            return self.path
        if COMMITTED in self._file.attrs:
            del self._file.attrs[COMMITTED]
        self._file.close()
        self._file = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop writing but keep ``.partial`` so a later ``resume=True`` run can continue it."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ShowerWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShowerFile:
    """Lazy reader of one native shower file.

    Opening runs every check that needs no shower values (``check_file``); ``read(idx)`` returns the rows
    of an index batch, sorted and grouped into contiguous runs so each HDF5 chunk is decompressed once per
    batch, and checks the values it reads (NaN/Inf, negative energies), naming the file row.

    The HDF5 handle belongs to the process that opened it: a forked DataLoader worker (or an unpickled
    copy) opens its own on first use and never uses the parent's.
    """

    def __init__(self, path: str | Path, geometry=None, check: bool = True, cache_mb: int = 64,
                 geometry_dirs: list[str | Path] | None = None):
        self.path = Path(path)
        self.cache_mb = cache_mb
        self._h5: h5py.File | None = None
        self._showers: h5py.Dataset | None = None
        self._pid: int | None = None
        try:
            self.n, self.attrs, self.geometry, self.note = check_file(self._file(), self.path, geometry,
                                                                      geometry_dirs)
        except BaseException:
            self.close()
            raise
        self.geometry_name = self.geometry.name if self.geometry is not None else self.attrs.geometry
        self.check = check
        self._conditions: dict[str, np.ndarray] | None = None

    def _file(self) -> h5py.File:
        """This process's handle, opened on first use in each process."""
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = open_h5(self.path, "r", rdcc_nbytes=self.cache_mb * 2**20, rdcc_nslots=10007)
            self._pid, self._showers = os.getpid(), None
        return self._h5

    def __len__(self) -> int:
        return self.n

    def conditions(self) -> dict[str, np.ndarray]:
        """All incident energies (MeV) and angles (rad): small, read once and kept."""
        if self._conditions is None:
            f = self._file()
            with h5_errors(self.path), np.errstate(over="ignore"):  # float64 beyond float32: inf, refused below
                cond = {k: f[k][:].astype(np.float32) for k in CONDITION_KEYS}
            if self.check:
                with wide_float_hint(f, CONDITION_KEYS):
                    check_values(self.path, energy=cond[ENERGY], phi=cond[PHI], theta=cond[THETA])
            self._conditions = cond
        return self._conditions

    def read(self, index: np.ndarray | slice | list[int]) -> dict[str, np.ndarray]:
        """Rows ``index`` (any order, repeats and negative rows allowed, or a boolean mask):
        showers (n, 9, 16, 45) and conditions (n,)."""
        check_interrupted()
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n)
            index = np.arange(start, stop, step)
        index = np.asarray(index)
        if index.dtype == bool:  # a mask over all rows, as numpy and h5py accept
            if index.shape != (self.n,):
                raise IndexError(f"{self.path}: boolean index has shape {index.shape}, expected ({self.n},)")
            index = np.flatnonzero(index)
        if index.size and not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"{self.path}: index must be integers or a boolean mask, not {index.dtype}")
        index = index.astype(np.int64).reshape(-1)
        if index.size and (index.min() < -self.n or index.max() >= self.n):
            raise IndexError(f"{self.path}: index out of range for {self.n} showers")
        index = np.where(index < 0, index + self.n, index)  # negative rows count from the end, as in numpy
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        uniq, inverse = np.unique(sorted_idx, return_inverse=True)
        showers = np.empty((len(uniq), *MESH_SHAPE), dtype=np.float32)
        # contiguous runs -> one slice read each (h5py fancy indexing is row by row)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        pos = 0
        f = self._file()
        with h5_errors(self.path), np.errstate(over="ignore"):  # float64 beyond float32: inf, refused below
            if self._showers is None:  # one dataset handle: its chunk cache lives as long as the handle
                self._showers = f[SHOWERS]
            for run in np.split(uniq, breaks):
                if run.size:
                    showers[pos : pos + run.size] = self._showers[run[0] : run[-1] + 1]
                    pos += run.size
        if self.check:
            with wide_float_hint(f, (SHOWERS,)):
                check_values(self.path, showers=showers, rows=uniq)  # errors name the file row
        out = np.empty((len(index), *MESH_SHAPE), dtype=np.float32)
        out[order] = showers[inverse]
        cond = self.conditions()
        result = {SHOWERS: out}
        result.update({k: cond[k][index] for k in CONDITION_KEYS})
        return result

    def iter_chunks(self, rows: int = 4096, progress: bool = False, desc: str | None = None, limit: int | None = None):
        """Yield (start, batch dict) over the whole file (or its first ``limit`` rows) in order."""
        n = self.n if limit is None else max(min(limit, self.n), 0)
        bar = tqdm(total=n, unit="shower", disable=progress_disabled(progress), desc=desc or self.path.name)
        try:
            for start in range(0, n, rows):
                batch = self.read(slice(start, min(start + rows, n)))
                bar.update(len(batch[SHOWERS]))
                yield start, batch
        except BaseException:
            bar.leave = False  # the error line should stand alone, without a half-finished bar above it
            raise
        finally:
            bar.close()

    def load(self, limit: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
        """Everything in memory (26 kB per shower), or the first ``limit`` showers."""
        parts = [batch for _, batch in self.iter_chunks(limit=limit, progress=progress)] or [self.read(slice(0, 0))]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._showers = None

    def __enter__(self) -> ShowerFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):  # picklable for DataLoader workers (spawn): the copy opens its own handle
        state = self.__dict__.copy()
        state["_h5"] = state["_showers"] = state["_pid"] = None
        return state


def progress_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable``: a bar only when asked for and stderr is a terminal (no bar noise in logs or pipes)."""
    return None if progress else True


def write_showers(
    path: str | Path,
    showers: np.ndarray,
    energy: np.ndarray,
    phi: np.ndarray,
    theta: np.ndarray,
    attrs: FileAttrs | None = None,
    compression: str | None = "gzip",
) -> Path:
    """Write a complete file in one call (temporary file, then rename)."""
    with ShowerWriter(path, attrs=attrs, compression=compression) as w:
        for start in range(0, len(showers), 4096):
            sl = slice(start, start + 4096)
            w.append(showers[sl], energy[sl], phi[sl], theta[sl])
    return Path(path)


def read_showers(path: str | Path, geometry=None, geometry_dirs: list[str | Path] | None = None
                 ) -> dict[str, np.ndarray]:
    """Load a whole file into memory."""
    with ShowerFile(path, geometry=geometry, geometry_dirs=geometry_dirs) as f:
        return f.load()


def validate_file(path: str | Path, geometry=None, progress: bool = False,
                  geometry_dirs: list[str | Path] | None = None) -> dict[str, Any]:
    """Full check of a file (``check_file``, then every value); returns a small summary.

    Without ``geometry``, a recorded geometry that has a card (built in, ``geometry_dirs`` or
    $CALOFM_GEOMETRY_DIR) is checked against it; one without a card is reported in ``note``."""
    with catch_interrupts(), ShowerFile(path, geometry=geometry, geometry_dirs=geometry_dirs) as f:
        cond = f.conditions()
        e_sum, n_hits, vmax = 0.0, 0, 0.0
        for _, batch in f.iter_chunks(rows=2048, progress=progress, desc=f"validate {Path(path).name}"):
            s = batch[SHOWERS]
            e_sum += float(s.sum(dtype=np.float64))
            n_hits += int((s > 0).sum())
            vmax = max(vmax, float(s.max(initial=0.0)))
        energy = cond[ENERGY]
        return {
            "file": str(path),
            "showers": f.n,
            "geometry": f.geometry_name or "(not recorded)",
            "particle": f.attrs.particle or "(not recorded)",
            "energy_scale": f.attrs.energy_scale,
            "E_inc_GeV": (float(energy.min()) / 1e3, float(energy.max()) / 1e3),
            "theta": (float(cond[THETA].min()), float(cond[THETA].max())),
            "E_sum/E_inc": e_sum / float(energy.sum(dtype=np.float64)),
            "hits_per_shower": n_hits / f.n,
            "max_cell_MeV": vmax,
            "note": f.note,
        }
