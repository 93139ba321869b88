"""PyTorch access to shower files: one dataset over many files, each labelled with its geometry.

Batches come from ``StepBatchSampler``: the rows of global batch ``k`` are a pure function of
``(seed, k)`` (short runs of consecutive rows from files picked by mixing weight), so
resuming at step ``k`` is exact and ``W`` processes each taking a slice of the same global
batch see exactly what one process sees. Runs of consecutive rows keep HDF5 reads chunked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from calofm.data.format import ENERGY, PHI, SHOWERS, THETA
from calofm.data.io import ShowerFile
from calofm.geometry import Geometry, load_geometry


@dataclass(frozen=True)
class Source:
    """A file (or its rows ``[start, stop)``, e.g. a train/validation split) and its geometry."""

    path: Path
    geometry: Geometry
    weight: float = 1.0
    start: int = 0
    stop: int | None = None


class ShowerDataset(Dataset):
    """Concatenation of shower files; items carry the geometry slot and name of their file."""

    def __init__(self, sources: Sequence[Source | tuple[str | Path, str | Geometry]], check: bool = True):
        self.sources: list[Source] = []
        for s in sources:
            if not isinstance(s, Source):
                s = Source(Path(s[0]), load_geometry(s[1]))
            self.sources.append(s)
        if not self.sources:
            raise ValueError("ShowerDataset needs at least one file")
        self.files = [ShowerFile(s.path, geometry=s.geometry, check=check) for s in self.sources]
        self.starts = np.array([s.start for s in self.sources], dtype=np.int64)
        sizes = []
        for src, f in zip(self.sources, self.files):
            stop = len(f) if src.stop is None else src.stop
            if not 0 <= src.start < stop <= len(f):
                raise ValueError(f"{src.path}: rows [{src.start}, {stop}) are empty or outside its {len(f)} showers")
            sizes.append(stop - src.start)
        sizes = np.array(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.slots = np.array([s.geometry.slot for s in self.sources], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    @property
    def geometries(self) -> list[Geometry]:
        return [s.geometry for s in self.sources]

    def file_of(self, index: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, index, side="right") - 1

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole batch at once: showers (B, 9, 16, 45) MeV, energy/phi/theta (B,), geometry slot (B,)."""
        index = np.asarray(indices, dtype=np.int64)
        which = self.file_of(index)
        showers = np.empty((len(index), 9, 16, 45), dtype=np.float32)
        cond = {k: np.empty(len(index), dtype=np.float32) for k in (ENERGY, PHI, THETA)}
        for fi in np.unique(which):
            sel = np.flatnonzero(which == fi)
            part = self.files[fi].read(index[sel] - self.offsets[fi] + self.starts[fi])
            showers[sel] = part[SHOWERS]
            for k in cond:
                cond[k][sel] = part[k]
        return {
            "showers": torch.from_numpy(showers),
            "energy": torch.from_numpy(cond[ENERGY]),
            "phi": torch.from_numpy(cond[PHI]),
            "theta": torch.from_numpy(cond[THETA]),
            "geometry": torch.from_numpy(self.slots[which]),
        }

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


class StepBatchSampler(Sampler[list[int]]):
    """Index batches keyed by step: batch ``k`` depends only on ``(seed, k)``.

    Each global batch is made of runs of ``run`` consecutive rows; the file of each run is
    drawn with probability proportional to ``weights`` (default: file sizes). This process
    yields rows ``[rank * B/W, (rank+1) * B/W)`` of every global batch of size ``B``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        steps: int,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        start_step: int = 0,
        rank: int = 0,
        world: int = 1,
        run: int = 16,
    ):
        if min(batch_size, run, world) < 1:
            raise ValueError(f"batch_size, run and world must be >= 1, got {batch_size}, {run}, {world}")
        if not 0 <= rank < world:  # otherwise this process would silently get empty batches
            raise ValueError(f"rank {rank} outside [0, {world})")
        if batch_size % world:
            raise ValueError(f"global batch size {batch_size} is not divisible by {world} processes")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        w = np.asarray(weights if weights is not None else self.sizes, dtype=np.float64)
        if len(w) != len(self.sizes) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixing weights {w.tolist()} must be finite, >= 0, one per file, not all zero")
        self.p = w / w.sum()
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.start_step, self.rank, self.world, self.run = start_step, rank, world, run

    def global_batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        n_runs = -(-self.batch_size // self.run)
        files = rng.choice(len(self.sizes), size=n_runs, p=self.p)
        rows = []
        for f in files:
            size = int(self.sizes[f])
            length = min(self.run, size)
            start = int(rng.integers(0, size - length + 1))
            rows.append(self.offsets[f] + start + np.arange(length))
        idx = np.concatenate(rows)
        while len(idx) < self.batch_size:  # files shorter than a run: top up with single rows
            f = rng.choice(len(self.sizes), p=self.p)
            idx = np.append(idx, self.offsets[f] + rng.integers(0, self.sizes[f]))
        idx = idx[: self.batch_size]
        return idx[rng.permutation(len(idx))]

    def __iter__(self) -> Iterator[list[int]]:
        per = self.batch_size // self.world
        for step in range(self.start_step, self.steps):
            idx = self.global_batch(step)
            yield idx[self.rank * per : (self.rank + 1) * per].tolist()

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)


def _identity(batch):
    return batch


def make_loader(dataset: ShowerDataset, sampler: Sampler, num_workers: int = 0, prefetch: int = 4) -> DataLoader:
    """DataLoader over a batch sampler, using the dataset's whole-batch ``__getitems__``."""
    kwargs = {"num_workers": num_workers}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_identity, **kwargs)


def sequential_batches(dataset: ShowerDataset, batch_size: int, limit: int | None = None):
    """In-order batches (validation): yields dicts like ``__getitems__``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        yield dataset.__getitems__(range(start, min(start + batch_size, n)))
