"""Detector geometries as data: ``geometries/*.yaml`` -> frozen ``Geometry``.

A geometry card holds the physical inputs only: the layer stack (materials and
thicknesses), the material constants, the stochastic resolution term, the readout
threshold, the ranges of its data and the scoring-mesh cell sizes. Everything
effective (X0_eff, R_M_eff, critical energy, sampling fraction, e/mip, ...) is
computed here with the PDG mixture rules and GFlash's sampling formulas, never
copied from the card (PDG Atomic & Nuclear Properties; Geant4 11.4.0
GFlashSamplingShowerParameterisation.cc).

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
from typing import Literal

import numpy as np

from calofm.config import ConfigError, from_dict, load_yaml, to_dict

log = logging.getLogger(__name__)

MESH_SHAPE = (9, 16, 45)  # (r, phi, z): the detector-agnostic scoring mesh of CaloDiT-2 / CaloChallenge DS2
N_SLOTS = 8  # geometry one-hot slots in the foundation model (at least 8; spare ones are for adaptation)
E_S = 21.2052  # MeV, scale energy of the Moliere radius (PDG review §33.5, as in Geant4 Par03EMShowerModel.cc)
GEOMETRY_ENV = "CALOFM_GEOMETRY_DIR"


class GeometryError(ConfigError):
    """A geometry card is invalid or a geometry name is unknown."""


# ----------------------------------------------------------------------------------------------
# Card schema (what the YAML holds)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """A pure material (all constants given) or a mixture by mass fraction of other materials."""

    density: float  # g/cm^3
    Z: float | None = None
    A: float | None = None  # g/mol
    X0: float | None = None  # radiation length in g/cm^2
    Ec: float | None = None  # critical energy (e-) in MeV
    R_M: float | None = None  # Moliere radius in mm (checked against E_s*X0/Ec)
    dedx: float | None = None  # minimum-ionising dE/dx in MeV cm^2/g
    components: dict[str, float] | None = None  # mass fractions, e.g. {W: 0.93, Ni: 0.061, Fe: 0.009}


@dataclass(frozen=True)
class Slice:
    material: str
    thickness: float  # mm along the detector normal
    active: bool = False


@dataclass(frozen=True)
class Section:
    """``repeat`` copies of a sampling cell, or a cell scaled to a total ``thickness`` (mm)."""

    slices: list[Slice]
    repeat: int | None = None
    thickness: float | None = None
    name: str = ""


@dataclass(frozen=True)
class Resolution:
    stochastic: float  # a in sigma/E = a/sqrt(E[GeV]) (+) c, GeV^1/2
    constant: float = 0.0


@dataclass(frozen=True)
class Mesh:
    n_r: int
    n_phi: int
    n_z: int
    dr: float  # mm
    dz: float  # mm, along the particle direction


@dataclass(frozen=True)
class GeometryCard:
    name: str
    title: str
    slot: int
    particle: Literal["gamma", "e-", "e+"]
    materials: dict[str, Material]
    stack: list[Section]
    resolution: Resolution
    threshold: float  # MeV of visible energy per mesh cell
    energy: tuple[float, float]  # GeV
    spectrum: Literal["flat", "log-uniform"]
    theta: tuple[float, float]  # rad
    phi: tuple[float, float]  # rad
    mesh: Mesh
    lemurs_name: str | None = None
    description: str = ""


# ----------------------------------------------------------------------------------------------
# Derived physics
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedMaterial:
    name: str
    density: float
    Z: float
    A: float
    X0: float  # g/cm^2
    Ec: float  # MeV
    dedx: float  # MeV cm^2/g

    @property
    def X0_mm(self) -> float:
        return 10.0 * self.X0 / self.density

    @property
    def R_M_mm(self) -> float:
        return 10.0 * E_S * self.X0 / self.Ec / self.density


@dataclass(frozen=True)
class SectionPhysics:
    """Effective values of one section (PDG mass rules; GFlash F_S and e/mip)."""

    name: str
    start: float  # mm from the front face
    thickness: float  # mm
    cell: float  # mm, one sampling cell
    density: float  # g/cm^3
    Z: float
    A: float
    X0: float  # mm
    R_M: float  # mm
    Ec: float  # MeV
    f_mip: float  # active share of minimum-ionising energy loss
    e_mip: float  # e/mip ratio, 1/(1 + 0.007 (Z_passive - Z_active))
    F_S: float  # X0 / sampling cell (GFlash)

    @property
    def f_em(self) -> float:
        """Sampling fraction for electromagnetic showers: visible / deposited energy."""
        return self.f_mip * self.e_mip


def _mass_rule(parts: list[tuple[float, ResolvedMaterial]]) -> dict[str, float]:
    """PDG mixture rule over (mass fraction, material) pairs: Z, A, X0 [g/cm^2], Ec, R_M [g/cm^2]."""
    total = sum(w for w, _ in parts)
    parts = [(w / total, m) for w, m in parts]
    inv_x0 = sum(w / m.X0 for w, m in parts)
    ec_over_x0 = sum(w * m.Ec / m.X0 for w, m in parts)
    return {
        "Z": sum(w * m.Z for w, m in parts),
        "A": sum(w * m.A for w, m in parts),
        "X0": 1.0 / inv_x0,
        "Ec": ec_over_x0 / inv_x0,
        "R_M": E_S / ec_over_x0,
        "dedx": sum(w * m.dedx for w, m in parts),
    }


def _resolve_materials(card: GeometryCard) -> dict[str, ResolvedMaterial]:
    resolved: dict[str, ResolvedMaterial] = {}

    def resolve(name: str, trail: tuple[str, ...]) -> ResolvedMaterial:
        if name in resolved:
            return resolved[name]
        if name not in card.materials:
            raise GeometryError(f"material '{name}' is used but not defined")
        if name in trail:
            raise GeometryError(f"material '{name}' is defined in terms of itself")
        m = card.materials[name]
        if m.density <= 0:
            raise GeometryError(f"material '{name}': density must be > 0")
        if m.components:
            fractions = sum(m.components.values())
            if abs(fractions - 1.0) > 1e-3 or min(m.components.values()) <= 0:
                raise GeometryError(f"material '{name}': mass fractions must be > 0 and sum to 1")
            parts = [(w, resolve(c, trail + (name,))) for c, w in m.components.items()]
            mix = _mass_rule(parts)
            out = ResolvedMaterial(name, m.density, mix["Z"], mix["A"], mix["X0"], mix["Ec"], mix["dedx"])
        else:
            missing = [k for k in ("Z", "A", "X0", "Ec", "dedx") if getattr(m, k) is None]
            if missing:
                raise GeometryError(f"material '{name}': missing {missing} (or give 'components')")
            for key in ("Z", "A", "X0", "Ec", "dedx"):
                if getattr(m, key) <= 0:
                    raise GeometryError(f"material '{name}': {key} must be > 0")
            out = ResolvedMaterial(name, m.density, m.Z, m.A, m.X0, m.Ec, m.dedx)
        if m.R_M is not None and m.R_M <= 0:
            raise GeometryError(f"material '{name}': R_M must be > 0 mm")
        if m.R_M is not None and abs(out.R_M_mm / m.R_M - 1) > 0.1:
            raise GeometryError(
                f"material '{name}': R_M {m.R_M} mm disagrees with E_s X0/Ec = {out.R_M_mm:.2f} mm (>10 %)"
            )
        resolved[name] = out
        return out

    for name in card.materials:
        resolve(name, ())
    return resolved


def _section_physics(sec: Section, start: float, mats: dict[str, ResolvedMaterial], idx: int) -> SectionPhysics:
    name = sec.name or f"section{idx}"
    if not sec.slices:
        raise GeometryError(f"stack {name}: no slices")
    for s in sec.slices:
        if s.thickness <= 0:
            raise GeometryError(f"stack {name}: slice '{s.material}' thickness must be > 0")
        if s.material not in mats:
            raise GeometryError(f"stack {name}: material '{s.material}' is not defined")
    cell = sum(s.thickness for s in sec.slices)
    if (sec.repeat is None) == (sec.thickness is None):
        raise GeometryError(f"stack {name}: give exactly one of 'repeat' or 'thickness'")
    if sec.repeat is not None and sec.repeat < 1:
        raise GeometryError(f"stack {name}: repeat must be >= 1")
    if sec.thickness is not None and sec.thickness <= 0:
        raise GeometryError(f"stack {name}: thickness must be > 0")
    thickness = sec.repeat * cell if sec.repeat is not None else sec.thickness
    areal = [(s.thickness * mats[s.material].density, s) for s in sec.slices]  # mass per area in a cell
    mix = _mass_rule([(w, mats[s.material]) for w, s in areal])
    density = sum(w for w, _ in areal) / cell
    loss = [(w * mats[s.material].dedx, s) for w, s in areal]  # MIP energy loss per slice
    active_loss = sum(e for e, s in loss if s.active)
    f_mip = active_loss / sum(e for e, _ in loss)
    active = [(w, mats[s.material]) for w, s in areal if s.active]
    passive = [(w, mats[s.material]) for w, s in areal if not s.active]
    z_act = _mass_rule(active)["Z"] if active else 0.0
    z_pas = _mass_rule(passive)["Z"] if passive else z_act
    e_mip = 1.0 / (1.0 + 0.007 * (z_pas - z_act)) if active else 0.0
    x0_mm = 10.0 * mix["X0"] / density
    return SectionPhysics(
        name=name,
        start=start,
        thickness=thickness,
        cell=cell,
        density=density,
        Z=mix["Z"],
        A=mix["A"],
        X0=x0_mm,
        R_M=10.0 * mix["R_M"] / density,
        Ec=mix["Ec"],
        f_mip=f_mip,
        e_mip=e_mip,
        F_S=x0_mm / cell,
    )


def _first_non_finite(value, where: str) -> str | None:
    """Path of the first NaN/inf number in plain card data, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((bad for w, v in items if (bad := _first_non_finite(v, w))), None)


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
        bad = _first_non_finite(to_dict(c), "geometry")
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
        return _resolve_materials(self.card)

    @cached_property
    def sections(self) -> tuple[SectionPhysics, ...]:
        out, start = [], 0.0
        for i, sec in enumerate(self.card.stack):
            phys = _section_physics(sec, start, self.materials, i)
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
