"""Training data for a run: files or cached simulations per geometry, validation splits, preprocessing stats."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from calofm.data.dataset import ShowerDataset, Source
from calofm.data.io import ShowerFile
from calofm.geometry import Geometry, load_geometry, replace_card
from calofm.preprocess import ProfilePreprocessor, ShowerPreprocessor
from calofm.sim.cache import simulated_file
from calofm.training.config import DataConfig, SourceConfig

log = logging.getLogger(__name__)


@dataclass
class RunData:
    train: ShowerDataset  # every training source, each labelled with its geometry slot
    val: dict[str, ShowerDataset]  # geometry name -> its validation showers
    geometries: dict[str, Geometry]


def _split_files(src: SourceConfig, geometry: Geometry, check_values: bool,
                 cache=None) -> tuple[list[Source], list[Source]]:
    """User files: the last ``val_samples`` rows of the last file are held out for validation.

    The source's weight is shared out over its files in proportion to their training rows, so a geometry
    given as three files gets the same share of every batch as one given as a single file. With
    ``check_values`` every value of every file is checked first (NaN/Inf, negative energies, angles):
    bad data is a one-line error before the run creates anything, not a crash in a loader worker.
    """
    from calofm.data.io import validate_file
    from calofm.hub.datasets import data_files

    paths = [p for spec in src.files for p in data_files(spec, geometry.name, cache)]  # a Hub dataset id: its file
    sizes = []
    for p in paths:
        if check_values:
            validate_file(p, geometry)
        with ShowerFile(p, geometry=geometry, check=False) as f:
            if len(f) == 0:
                raise ValueError(f"{p}: holds no showers")
            sizes.append(len(f))
    val = src.val_samples if src.val_samples > 0 else 0
    if val and sizes[-1] <= val:
        raise ValueError(f"{paths[-1]}: {sizes[-1]} showers cannot spare val_samples={val} for validation")
    rows = sizes[:-1] + [sizes[-1] - val]
    train = [Source(p, geometry, src.weight * n / sum(rows), start=0, stop=n) for p, n in zip(paths, rows)]
    if not val:
        return train, []
    return train, [Source(paths[-1], geometry, src.weight, start=sizes[-1] - val)]


def source_geometry(src: SourceConfig, geometry_dirs=None) -> tuple[Geometry, Geometry]:
    """(the source's card, the same with the slot the model uses for it when that is not the card's own)."""
    card = load_geometry(src.geometry, geometry_dirs)
    if src.slot is not None and src.slot != card.slot:
        return card, replace_card(card, slot=src.slot)
    return card, card


def prepare_data(cfg: DataConfig, extra_geometry_dirs=None, progress: bool = True,
                 check_values: bool = True) -> RunData:
    """Resolve every source to files (simulating into the cache on first use) and build the datasets.

    Card names are looked up in ``extra_geometry_dirs``, then ``cfg.geometry_dirs``, then the built-in
    cards. User files are checked value by value unless ``check_values`` is False (e.g. on the other
    processes of a multi-process run, after the main process checked them). Call it on the main process
    first (``accelerator.main_process_first()``) so only one process simulates.
    """
    dirs = [*(extra_geometry_dirs or []), *cfg.geometry_dirs]
    train, val, geos = [], {}, {}
    for src in cfg.sources:
        card, geometry = source_geometry(src, dirs)  # simulate with the card, label rows with the model's slot
        if geometry.name in geos:
            raise ValueError(f"geometry '{geometry.name}' is listed twice in data.sources")
        geos[geometry.name] = geometry
        if src.files:
            tr, va = _split_files(src, geometry, check_values, cfg.cache_dir)
        else:
            sim = dict(cache=cfg.cache_dir, energy=src.energy, spectrum=src.spectrum, progress=progress)
            tr = [Source(simulated_file(card, src.samples, seed=cfg.seed, **sim), geometry, src.weight)]
            va = []
            if src.val_samples > 0:
                path = simulated_file(card, src.val_samples, seed=cfg.seed + 1000, **sim)
                va = [Source(path, geometry, src.weight)]
        train += tr
        if va:
            val[geometry.name] = ShowerDataset(va)
    slots = {}
    for g in geos.values():
        if g.slot in slots:
            raise ValueError(f"geometries '{slots[g.slot]}' and '{g.name}' both use slot {g.slot}")
        slots[g.slot] = g.name
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
            geometry = data.sources[k].geometry
            yield geometry.name, {"showers": b["showers"], "energy": b["energy"], "threshold": geometry.card.threshold}


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
