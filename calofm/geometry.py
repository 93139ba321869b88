"""Detector geometries as data: ``geometries/*.yaml`` -> frozen ``Geometry``.

A geometry card holds the physical inputs only: the layer stack (materials and
thicknesses), the material constants, the stochastic resolution term, the readout
threshold, the ranges of its data and the scoring-mesh cell sizes. Everything
effective (X0_eff, R_M_eff, critical energy, sampling fraction, e/mip, ...) is
computed here with the PDG mixture rules and GFlash's sampling formulas, never
copied from the card (``calofm.materials``: the card schema and the PDG mixture rules and
GFlash sampling formulas).

Search path for cards: ``--geometry-dir`` / ``CALOFM_GEOMETRY_DIR`` (``os.pathsep``
separated) first, then the built-in cards. A user card with a built-in name wins.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from calofm.config import ConfigError, from_dict, load_yaml, to_dict
from calofm.materials import (
    GeometryCard,
    GeometryError,
    Mesh,
    ResolvedMaterial,
    SectionPhysics,
    first_non_finite,
    resolve_materials,
    section_physics,
)

log = logging.getLogger(__name__)

MESH_SHAPE = (9, 16, 45)  # (r, phi, z): the detector-agnostic scoring mesh of CaloDiT-2 / CaloChallenge DS2
N_SLOTS = 8  # geometry one-hot slots in the foundation model (at least 8; spare ones are for adaptation)
GEOMETRY_ENV = "CALOFM_GEOMETRY_DIR"


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """A validated detector geometry with derived effective values."""

    card: GeometryCard
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self):
        c = self.card
        # NaN passes every "<= 0" check below, so reject non-finite numbers first, wherever they are
        bad = first_non_finite(to_dict(c), "geometry")
        if bad:
            raise GeometryError(f"{bad}: must be a finite number")
        if not c.name.replace("_", "").isalnum() or c.name != c.name.lower():
            raise GeometryError(f"name '{c.name}': use lower-case letters, digits and '_'")
        if not 0 <= c.slot < N_SLOTS:
            raise GeometryError(f"slot {c.slot} outside [0, {N_SLOTS})")
        if not c.stack:
            raise GeometryError("stack is empty")
        if not 0 < c.resolution.stochastic < 2 or not 0 <= c.resolution.constant < 0.5:
            raise GeometryError("resolution: stochastic term must be in (0, 2) GeV^1/2, constant in [0, 0.5)")
        if c.threshold < 0:
            raise GeometryError("threshold must be >= 0 MeV")
        lo, hi = c.energy
        if not 0 < lo <= hi:
            raise GeometryError(f"energy range {c.energy}: need 0 < min <= max (GeV)")
        if not 0 < c.theta[0] <= c.theta[1] < math.pi:
            raise GeometryError(f"theta range {c.theta}: need 0 < min <= max < pi")
        if not -math.pi - 1e-6 <= c.phi[0] <= c.phi[1] <= math.pi + 1e-6:
            raise GeometryError(f"phi range {c.phi}: need -pi <= min <= max <= pi")
        m = c.mesh
        if (m.n_r, m.n_phi, m.n_z) != MESH_SHAPE:
            raise GeometryError(f"mesh {m.n_r}x{m.n_phi}x{m.n_z}: calofm uses {MESH_SHAPE} for every detector")
        if m.dr <= 0 or m.dz <= 0:
            raise GeometryError("mesh cell sizes dr, dz must be > 0 mm")
        # Resolve eagerly so a bad card fails at load time, not in the middle of a run.
        if not any(s.active for sec in c.stack for s in sec.slices):
            raise GeometryError("stack has no active slice")
        _ = self.sections

    # -- identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.card.name

    @property
    def slot(self) -> int:
        return self.card.slot

    @property
    def mesh(self) -> Mesh:
        return self.card.mesh

    # -- derived physics ------------------------------------------------------------------------
    @cached_property
    def materials(self) -> dict[str, ResolvedMaterial]:
        return resolve_materials(self.card)

    @cached_property
    def sections(self) -> tuple[SectionPhysics, ...]:
        out, start = [], 0.0
        for i, sec in enumerate(self.card.stack):
            phys = section_physics(sec, start, self.materials, i)
            out.append(phys)
            start += phys.thickness
        return tuple(out)

    @property
    def depth(self) -> float:
        """Total thickness along the detector normal, mm."""
        return sum(s.thickness for s in self.sections)

    @property
    def depth_x0(self) -> float:
        return sum(s.thickness / s.X0 for s in self.sections)

    def _x0_weighted(self, attr: str) -> float:
        # Averages over the stack weighted by radiation lengths: the shower samples material per X0.
        w = np.array([s.thickness / s.X0 for s in self.sections])
        return float(np.dot(w, [getattr(s, attr) for s in self.sections]) / w.sum())

    @property
    def X0_eff(self) -> float:
        """Effective radiation length of the whole stack, mm."""
        return self.depth / self.depth_x0

    @property
    def R_M_eff(self) -> float:
        return self._x0_weighted("R_M")

    @property
    def Ec_eff(self) -> float:
        return self._x0_weighted("Ec")

    @property
    def Z_eff(self) -> float:
        return self._x0_weighted("Z")

    @property
    def F_S(self) -> float:
        return self._x0_weighted("F_S")

    @property
    def e_mip(self) -> float:
        return self._x0_weighted("e_mip")

    @property
    def sampling_fraction(self) -> float:
        """EM sampling fraction averaged over the stack (per X0); per-depth values in ``depth_profile``."""
        return self._x0_weighted("f_em")

    def depth_profile(self) -> dict[str, np.ndarray]:
        """Piecewise-constant profile along the detector normal: section edges (mm) and per-section values."""
        secs = self.sections
        return {
            "edges": np.array([s.start for s in secs] + [self.depth]),
            "X0": np.array([s.X0 for s in secs]),
            "R_M": np.array([s.R_M for s in secs]),
            "f_em": np.array([s.f_em for s in secs]),
        }

    # -- mesh -----------------------------------------------------------------------------------
    @property
    def r_edges(self) -> np.ndarray:
        return np.arange(self.mesh.n_r + 1) * self.mesh.dr

    @property
    def z_edges(self) -> np.ndarray:
        return np.arange(self.mesh.n_z + 1) * self.mesh.dz

    @property
    def phi_edges(self) -> np.ndarray:
        return np.linspace(-math.pi, math.pi, self.mesh.n_phi + 1)

    def cell_centres(self) -> dict[str, np.ndarray]:
        """Cell-centre coordinates in the particle frame, each (9, 16, 45): r, phi, z, x, y (mm, rad)."""
        r = 0.5 * (self.r_edges[1:] + self.r_edges[:-1])
        phi = 0.5 * (self.phi_edges[1:] + self.phi_edges[:-1])
        z = 0.5 * (self.z_edges[1:] + self.z_edges[:-1])
        rr, pp, zz = np.meshgrid(r, phi, z, indexing="ij")
        return {"r": rr, "phi": pp, "z": zz, "x": rr * np.cos(pp), "y": rr * np.sin(pp)}

    def summary(self) -> dict[str, float | str | int]:
        """Key numbers for tables and docs."""
        return {
            "name": self.name,
            "slot": self.slot,
            "depth_mm": self.depth,
            "depth_X0": self.depth_x0,
            "X0_eff_mm": self.X0_eff,
            "R_M_eff_mm": self.R_M_eff,
            "Ec_eff_MeV": self.Ec_eff,
            "Z_eff": self.Z_eff,
            "f_samp": self.sampling_fraction,
            "e_mip": self.e_mip,
            "a_GeV^1/2": self.card.resolution.stochastic,
            "dr_mm": self.mesh.dr,
            "dz_mm": self.mesh.dz,
            "dr_RM": self.mesh.dr / self.R_M_eff,
            "dz_X0": self.mesh.dz / self.X0_eff,
            "energy_GeV": f"{self.card.energy[0]:g}-{self.card.energy[1]:g}",
        }


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def builtin_dir() -> Path:
    """The built-in cards: package data ``calofm/geometries`` (read with importlib.resources, so wheel, ``--user``
    and editable installs all find them). In the repository it is a link to the top-level ``geometries/``."""
    cards = importlib.resources.files("calofm") / "geometries"
    if not isinstance(cards, Path):  # a zipped install: calofm reads its cards as files, it cannot run from a zip
        raise GeometryError(f"the built-in geometry cards are not a folder on disk ({cards})")
    return cards.resolve()


def search_path(extra: list[str | Path] | None = None) -> list[Path]:
    dirs = [Path(p) for p in (extra or [])]
    env = os.environ.get(GEOMETRY_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(builtin_dir())
    return dirs


def geometry_from_data(data: dict, where: str | Path, source: Path | None = None) -> Geometry:
    """A validated ``Geometry`` from a parsed card; errors start with ``where``."""
    try:
        return Geometry(from_dict(GeometryCard, data, where="geometry"), source=source)
    except ConfigError as err:
        raise GeometryError(f"{where}: {err}") from None


def load_geometry_file(path: str | Path) -> Geometry:
    path = Path(path)
    geo = geometry_from_data(load_yaml(path), path, source=path)
    if path.stem != geo.name:
        raise GeometryError(f"{path}: file name must match name '{geo.name}'")
    return geo


def available_geometries(extra_dirs: list[str | Path] | None = None) -> dict[str, Path]:
    """name -> card path over the search path (earlier directories shadow later ones)."""
    found: dict[str, Path] = {}
    for d in search_path(extra_dirs):
        if not d.is_dir():
            if d != builtin_dir():
                raise GeometryError(f"{d}: geometry directory does not exist")
            continue
        for p in sorted(d.glob("*.yaml")):
            if p.stem in found:
                log.info("geometry %s from %s shadows %s", p.stem, found[p.stem], p)
                continue
            found[p.stem] = p
    return found


def load_geometry(name: str | Geometry, extra_dirs: list[str | Path] | None = None) -> Geometry:
    """Load a geometry by name (``par04_siw``) or from a ``.yaml`` path."""
    if isinstance(name, Geometry):
        return name
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return load_geometry_file(name)
    cards = available_geometries(extra_dirs)
    if name not in cards:
        raise GeometryError(f"unknown geometry '{name}'; available: {', '.join(sorted(cards))}")
    return load_geometry_file(cards[name])


def load_all(extra_dirs: list[str | Path] | None = None) -> dict[str, Geometry]:
    geos = {n: load_geometry_file(p) for n, p in available_geometries(extra_dirs).items()}
    slots: dict[int, str] = {}
    for g in geos.values():
        if g.slot in slots:
            log.warning("geometries %s and %s share slot %d", slots[g.slot], g.name, g.slot)
        slots.setdefault(g.slot, g.name)
    return geos


def geometry_table(geos: dict[str, Geometry]) -> str:
    """Fixed-width table of the key numbers of each geometry."""
    cols = [
        ("name", "{}", 12),
        ("slot", "{}", 4),
        ("depth_mm", "{:.0f}", 8),
        ("depth_X0", "{:.1f}", 8),
        ("X0_eff_mm", "{:.2f}", 9),
        ("R_M_eff_mm", "{:.1f}", 10),
        ("Ec_eff_MeV", "{:.1f}", 10),
        ("f_samp", "{:.4f}", 7),
        ("e_mip", "{:.2f}", 5),
        ("a_GeV^1/2", "{:.3f}", 9),
        ("dr_mm", "{:.2f}", 6),
        ("dz_mm", "{:.2f}", 6),
        ("dr_RM", "{:.2f}", 5),
        ("dz_X0", "{:.2f}", 5),
        ("energy_GeV", "{}", 10),
    ]
    lines = ["  ".join(f"{c:>{w}}" for c, _, w in cols)]
    for g in geos.values():
        s = g.summary()
        lines.append("  ".join(f"{fmt.format(s[c]):>{w}}" for c, fmt, w in cols))
    return "\n".join(lines)


def replace_card(geo: Geometry, **changes) -> Geometry:
    """A copy of ``geo`` with card fields changed (validated again)."""
    return Geometry(dataclasses.replace(geo.card, **changes), source=geo.source)
