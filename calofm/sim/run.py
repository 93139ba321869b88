"""Simulation runs: incident conditions, deterministic chunking, output files.

A run is split into chunks of ``CHUNK`` showers; chunk ``k`` draws its conditions and showers
from generators seeded with ``(seed, k)``, so the output depends only on the seed and the
settings -- not on batch sizes, devices of the same kind, or on where a resumed run restarted.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from calofm.cards import card_attrs
from calofm.data.format import FileAttrs
from calofm.data.io import ShowerWriter, progress_disabled
from calofm.data.output import catch_interrupts
from calofm.geometry import Geometry, load_geometry
from calofm.sim.shower import ShowerSimulator, SimOptions

log = logging.getLogger(__name__)

CHUNK = 1000  # showers per deterministic chunk
GENERATOR = "calofm-sim-gflash-v2"
PHI_SLACK = 1e-3  # rad: ranges typed with rounded pi (-3.1416) are accepted


def _seed(seed: int, chunk: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, chunk, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_conditions(
    n: int, energy: tuple[float, float], theta: tuple[float, float], phi: tuple[float, float],
    spectrum: str, rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Incident energies (GeV) flat or log-uniform in ``energy``; theta, phi uniform in their ranges."""
    lo, hi = energy
    if not 0 < lo <= hi:
        raise ValueError(f"energy range {energy} GeV: need 0 < lo <= hi")
    if not 0 < theta[0] <= theta[1] < math.pi:
        raise ValueError(f"theta range {theta}: need 0 < lo <= hi < pi (rad)")
    if not -math.pi - PHI_SLACK <= phi[0] <= phi[1] <= 2 * math.pi + PHI_SLACK:  # slack: "-3.1416" is fine
        raise ValueError(f"phi range {phi}: need -pi <= lo <= hi <= 2 pi (rad)")
    u = rng.random(n)
    if spectrum == "flat":
        e = lo + (hi - lo) * u
    elif spectrum == "log-uniform":
        e = lo * (hi / lo) ** u
    else:
        raise ValueError(f"spectrum must be 'flat' or 'log-uniform', not {spectrum!r}")
    return {
        "energy_gev": e,
        "theta": theta[0] + (theta[1] - theta[0]) * rng.random(n),
        "phi": phi[0] + (phi[1] - phi[0]) * rng.random(n),
    }


class Run:
    """Settings of one simulation run; ``chunk(k)`` returns chunk k's conditions and showers."""

    def __init__(
        self,
        geometry: Geometry | str,
        n: int,
        energy: tuple[float, float] | None = None,
        theta: tuple[float, float] | None = None,
        phi: tuple[float, float] | None = None,
        spectrum: str | None = None,
        seed: int = 0,
        options: SimOptions | None = None,
        device: str = "cpu",
    ):
        self.geometry = load_geometry(geometry)
        card = self.geometry.card
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"number of showers must be a whole number >= 1, not {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be a whole number in [0, 2^63), not {seed!r}")
        self.n, self.seed = n, seed
        self.energy = tuple(energy or card.energy)
        self.theta = tuple(theta or card.theta)
        self.phi = tuple(phi or card.phi)
        self.spectrum = spectrum or card.spectrum
        self.options = options or SimOptions(particle=card.particle)
        self.simulator = ShowerSimulator(self.geometry, self.options, device=device)
        sample_conditions(1, self.energy, self.theta, self.phi, self.spectrum, np.random.default_rng(0))

    @property
    def n_chunks(self) -> int:
        return -(-self.n // CHUNK)

    def settings(self) -> dict[str, str | float | int]:
        """Everything that determines the output (stored as file attributes, checked on resume)."""
        return {
            "sim_n": self.n, "sim_energy_gev": str(list(self.energy)), "sim_theta": str(list(self.theta)),
            "sim_phi": str(list(self.phi)), "sim_spectrum": self.spectrum,
            "sim_spot_factor": self.options.spot_factor, "sim_threshold": int(self.options.threshold),
        }

    def attrs(self) -> FileAttrs:
        g = self.geometry
        return FileAttrs(
            geometry=g.name, particle=self.options.particle, energy_scale=self.options.energy_scale,
            mesh_dr=g.mesh.dr, mesh_dz=g.mesh.dz, generator=GENERATOR, seed=self.seed,
            extra={**self.settings(), **card_attrs(g)},  # a card that is not built in travels with the file
        )

    def chunk(self, k: int) -> dict[str, np.ndarray]:
        size = min(CHUNK, self.n - k * CHUNK)
        cond = sample_conditions(size, self.energy, self.theta, self.phi, self.spectrum,
                                 np.random.default_rng(_seed(self.seed, k, 0)))
        gen = torch.Generator(device=self.simulator.device).manual_seed(_seed(self.seed, k, 1))
        showers = self.simulator(torch.from_numpy(cond["energy_gev"]), torch.from_numpy(cond["theta"]),
                                 torch.from_numpy(cond["phi"]), gen)
        return {
            "showers": showers.cpu().numpy(),
            "incident_energy": (cond["energy_gev"] * 1e3).astype(np.float32),
            "incident_phi": cond["phi"].astype(np.float32),
            "incident_theta": cond["theta"].astype(np.float32),
        }


def simulate(
    geometry: Geometry | str, n: int, energy=None, theta=None, phi=None, spectrum=None, seed: int = 0,
    options: SimOptions | None = None, device: str = "cpu", progress: bool = False,
) -> dict[str, np.ndarray]:
    """Simulate ``n`` showers in memory; same keys and units as ``calofm.data.read_showers``."""
    run = Run(geometry, n, energy, theta, phi, spectrum, seed, options, device)
    parts = [run.chunk(k) for k in tqdm(range(run.n_chunks), disable=not progress, desc="simulate", unit="chunk")]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def simulate_to_file(
    out: str | Path, geometry: Geometry | str, n: int, energy=None, theta=None, phi=None, spectrum=None,
    seed: int = 0, options: SimOptions | None = None, device: str = "cpu", progress: bool = True,
    resume: bool = True, compression: str | None = "gzip",
) -> Path:
    """Simulate into a native shower file; an interrupted run resumes from its ``.partial`` file."""
    run = Run(geometry, n, energy, theta, phi, spectrum, seed, options, device)  # checks before any file exists
    with catch_interrupts(), ShowerWriter(out, attrs=run.attrs(), compression=compression, resume=resume,
                                          expected_rows=n) as w:
        done = w.n_written
        if done % CHUNK and done != n:  # a chunk is written in one append, so this means a foreign file
            raise ValueError(f"{w.tmp}: holds {done} showers, not a whole number of chunks; delete it")
        bar = tqdm(total=n, initial=done, disable=progress_disabled(progress), unit="shower",
                   desc=f"simulate {run.geometry.name}")
        for k in range(done // CHUNK, run.n_chunks):
            c = run.chunk(k)
            w.append(c["showers"], c["incident_energy"], c["incident_phi"], c["incident_theta"])
            bar.update(len(c["showers"]))
        bar.close()
    return Path(out)
