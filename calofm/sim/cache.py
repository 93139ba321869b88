"""Simulated training data created on first use and reused: one file per (geometry, settings)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from calofm.data.io import ShowerFile
from calofm.geometry import Geometry, load_geometry
from calofm.sim.run import GENERATOR, simulate_to_file
from calofm.sim.shower import SimOptions

log = logging.getLogger(__name__)
CACHE_ENV = "CALOFM_CACHE"


def cache_dir(path: str | Path | None = None) -> Path:
    """``path``, else $CALOFM_CACHE, else ~/.cache/calofm."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "calofm")).expanduser()


def simulated_file(
    geometry: Geometry | str, n: int, seed: int = 0, cache: str | Path | None = None,
    energy: tuple[float, float] | None = None, theta: tuple[float, float] | None = None,
    spectrum: str | None = None, particle: str | None = None, progress: bool = True,
) -> Path:
    """Path of a cached simulated file with these settings, simulating it (or finishing it) if needed."""
    geometry = load_geometry(geometry)
    card = geometry.card
    settings = {
        "generator": GENERATOR, "geometry": geometry.name, "n": n, "seed": seed,
        "energy": list(energy or card.energy), "theta": list(theta or card.theta),
        "spectrum": spectrum or card.spectrum, "particle": particle or card.particle,
        # a changed card (stack, resolution, mesh) must not reuse old showers
        "card": hashlib.sha1(json.dumps(repr(card), sort_keys=True).encode()).hexdigest()[:10],
    }
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir(cache) / "sim" / f"{geometry.name}_{n}_s{seed}_{key}.h5"
    if path.exists():
        try:
            with ShowerFile(path, geometry=geometry, check=False) as f:
                if len(f) == n:
                    log.info("reusing cached %s", path)
                    return path
        except ValueError as err:
            log.warning("cached file unusable (%s); simulating again", err)
        path.unlink()
    log.info("simulating %d %s showers for %s into %s", n, settings["particle"], geometry.name, path)
    options = SimOptions(particle=settings["particle"])
    # uncompressed: training reads random batches, which compressed chunks would slow down
    return simulate_to_file(path, geometry, n, energy=tuple(settings["energy"]), theta=tuple(settings["theta"]),
                            spectrum=settings["spectrum"], seed=seed, options=options, progress=progress,
                            compression=None)
