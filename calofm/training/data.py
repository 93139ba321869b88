"""Training data for a run: files or cached simulations per geometry, validation splits, preprocessing stats."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calofm.data.dataset import ShowerDataset, Source
from calofm.data.io import ShowerFile
from calofm.geometry import Geometry, load_geometry
from calofm.preprocess import ProfilePreprocessor, ShowerPreprocessor
from calofm.sim.cache import simulated_file
from calofm.training.config import DataConfig, SourceConfig

log = logging.getLogger(__name__)


@dataclass
class RunData:
    train: ShowerDataset  # every training source, each labelled with its geometry slot
    val: dict[str, ShowerDataset]  # geometry name -> its validation showers
    geometries: dict[str, Geometry]


def _split_files(src: SourceConfig, geometry: Geometry) -> tuple[list[Source], list[Source]]:
    """User files: the last ``val_samples`` rows of the last file are held out for validation."""
    paths = [Path(p).expanduser() for p in src.files]
    sizes = []
    for p in paths:
        with ShowerFile(p, geometry=geometry, check=False) as f:
            sizes.append(len(f))
    train = [Source(p, geometry, src.weight) for p in paths]
    if src.val_samples <= 0:
        return train, []
    last, n_last = paths[-1], sizes[-1]
    if n_last <= src.val_samples:
        raise ValueError(f"{last}: {n_last} showers cannot spare val_samples={src.val_samples} for validation")
    train[-1] = Source(last, geometry, src.weight, start=0, stop=n_last - src.val_samples)
    return train, [Source(last, geometry, src.weight, start=n_last - src.val_samples)]


def prepare_data(cfg: DataConfig, extra_geometry_dirs=None, progress: bool = True) -> RunData:
    """Resolve every source to files (simulating into the cache on first use) and build the datasets.

    Call it on the main process first (``accelerator.main_process_first()``) so only one process simulates.
    """
    train, val, geos = [], {}, {}
    for src in cfg.sources:
        geometry = load_geometry(src.geometry, extra_geometry_dirs)
        if geometry.name in geos:
            raise ValueError(f"geometry '{geometry.name}' is listed twice in data.sources")
        geos[geometry.name] = geometry
        if src.weight <= 0:
            raise ValueError(f"data source {geometry.name}: weight must be > 0")
        if src.files:
            tr, va = _split_files(src, geometry)
        else:
            sim = dict(cache=cfg.cache_dir, energy=src.energy, spectrum=src.spectrum, progress=progress)
            tr = [Source(simulated_file(geometry, src.samples, seed=cfg.seed, **sim), geometry, src.weight)]
            va = []
            if src.val_samples > 0:
                path = simulated_file(geometry, src.val_samples, seed=cfg.seed + 1000, **sim)
                va = [Source(path, geometry, src.weight)]
        train += tr
        if va:
            val[geometry.name] = ShowerDataset(va)
    return RunData(train=ShowerDataset(train), val=val, geometries=geos)


def _stat_batches(data: ShowerDataset, samples_per_file: int, batch: int = 500):
    """(geometry name, {"showers", "energy"}) over the first ``samples_per_file`` showers of every source.

    Fixed rows, so every process of a multi-process run computes the same statistics.
    """
    for k, size in enumerate(data.sizes):
        offset = int(data.offsets[k])
        n = min(int(size), samples_per_file)
        for start in range(0, n, batch):
            rows = np.arange(offset + start, offset + min(start + batch, n))
            b = data.__getitems__(rows)
            yield data.sources[k].geometry.name, {"showers": b["showers"], "energy": b["energy"]}


def fit_preprocessor(
    data: ShowerDataset, samples_per_file: int, pre: ShowerPreprocessor | None = None
) -> ShowerPreprocessor:
    """Fit ``pre``'s model-space statistics on the first ``samples_per_file`` showers of every source."""
    pre = (pre or ShowerPreprocessor()).fit(b for _, b in _stat_batches(data, samples_per_file))
    log.info("preprocessing fitted: %s", pre)
    return pre


def fit_profile(
    data: ShowerDataset, samples_per_file: int, slots: dict[str, int], profile: ProfilePreprocessor
) -> ProfilePreprocessor:
    """Fit the per-geometry profile statistics (factorised variant) on the same showers as ``fit_preprocessor``
    for the geometries in ``slots`` (name -> one-hot slot); other geometries keep their statistics."""
    batches = ((name, slots[name], torch.as_tensor(b["showers"]).double().sum(dim=(1, 2)), b["energy"])
               for name, b in _stat_batches(data, samples_per_file) if name in slots)
    profile = profile.fit(batches)
    log.info("profile preprocessing fitted: %s", profile)
    return profile


def cell_maxima(data: ShowerDataset, samples_per_file: int, pre: ShowerPreprocessor) -> dict[str, float]:
    """Per geometry, the largest cell energy of the same showers in ``pre``'s units (fraction of E_inc, or MeV).

    Generation caps cells there: an undertrained model otherwise makes rare core cells far hotter than
    any the detector produced (docs/generation.md).
    """
    top: dict[str, float] = {}
    for name, b in _stat_batches(data, samples_per_file):
        showers = torch.as_tensor(b["showers"]).double()
        unit = pre.unit(showers, torch.as_tensor(b["energy"]).double())
        top[name] = max(top.get(name, 0.0), float((showers / unit).max()))
    if not all(v > 0 for v in top.values()):
        raise ValueError(f"training data with only empty showers: cell maxima {top}")
    return top
