"""Shared pytest fixtures: keep them small and generic (module-specific helpers live in their test file)."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from calofm.geometry import GEOMETRY_ENV, MESH_SHAPE

# `make test` runs two pytest-xdist workers on two cores: one intra-op thread each. Tiny models gain
# nothing from more, and oversubscribed OpenMP barriers stall (a tiny training test took 70 s with
# 2 threads per worker vs 2 s with 1 on a busy machine). Subprocesses inherit OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _no_user_geometry_dir(monkeypatch):
    """Tests see only the built-in geometry cards, whatever $CALOFM_GEOMETRY_DIR the developer has set."""
    monkeypatch.delenv(GEOMETRY_ENV, raising=False)


@pytest.fixture(autouse=True)
def _ctrl_c_enabled():
    """Ctrl-C behaves as in a terminal, also when the suite runs as a background job (SIGINT inherited as
    ignored, where calofm rightly leaves it alone): the interrupt tests raise a real SIGINT."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        yield
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        yield


def random_showers(n: int, seed: int = 0, occupancy: float = 0.2) -> dict[str, np.ndarray]:
    """``n`` sparse random showers (MeV) with conditions in the LEMURS ranges; keys as in the native file."""
    rng = np.random.default_rng(seed)
    showers = rng.exponential(0.5, (n, *MESH_SHAPE)) * (rng.random((n, *MESH_SHAPE)) < occupancy)
    return {
        "showers": showers.astype(np.float32),
        "incident_energy": rng.uniform(1e3, 1e5, n).astype(np.float32),  # 1-100 GeV in MeV
        "incident_phi": rng.uniform(-math.pi, math.pi, n).astype(np.float32),
        "incident_theta": rng.uniform(0.87, 2.27, n).astype(np.float32),
    }


@pytest.fixture
def tmp_showers(tmp_path):
    """Factory: ``tmp_showers(n=8, seed=0, geometry="par04_siw", name=None, **attrs) -> Path`` of a native file.

    The file holds ``random_showers(n, seed)``; extra keyword arguments are ``FileAttrs`` fields
    (``particle``, ``energy_scale``, ``mesh_dr``, ...). ``geometry=None`` records no geometry.
    """
    from calofm.data import FileAttrs, write_showers

    def make(n: int = 8, seed: int = 0, geometry: str | None = "par04_siw", name: str | None = None,
             **attrs) -> Path:
        data = random_showers(n, seed)
        path = tmp_path / (name or f"showers_{geometry}_{n}_{seed}.h5")
        attrs.setdefault("generator", "pytest")
        write_showers(path, data["showers"], data["incident_energy"], data["incident_phi"],
                      data["incident_theta"], attrs=FileAttrs(geometry=geometry, **attrs), compression=None)
        return path

    return make
