"""Geometry cards: the schema of what a ``geometries/*.yaml`` card holds, and the physics derived from it.

The card gives physical inputs only (materials, layer stack, resolution, threshold, ranges, mesh). Effective
values (X0, R_M, critical energy, dE/dx of mixtures; per stack section the sampling fraction and e/mip) are
computed here with the PDG mixture rules and GFlash's sampling formulas (PDG Atomic & Nuclear Properties;
Geant4 11.4.0 GFlashSamplingShowerParameterisation.cc). ``calofm.geometry.Geometry`` puts them together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from calofm.config import ConfigError

E_S = 21.2052  # MeV, scale energy of the Moliere radius (PDG review §33.5, as in Geant4 Par03EMShowerModel.cc)


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


def mass_rule(parts: list[tuple[float, ResolvedMaterial]]) -> dict[str, float]:
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


def resolve_materials(card: GeometryCard) -> dict[str, ResolvedMaterial]:
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
            mix = mass_rule(parts)
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


def section_physics(sec: Section, start: float, mats: dict[str, ResolvedMaterial], idx: int) -> SectionPhysics:
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
    mix = mass_rule([(w, mats[s.material]) for w, s in areal])
    density = sum(w for w, _ in areal) / cell
    loss = [(w * mats[s.material].dedx, s) for w, s in areal]  # MIP energy loss per slice
    active_loss = sum(e for e, s in loss if s.active)
    f_mip = active_loss / sum(e for e, _ in loss)
    active = [(w, mats[s.material]) for w, s in areal if s.active]
    passive = [(w, mats[s.material]) for w, s in areal if not s.active]
    z_act = mass_rule(active)["Z"] if active else 0.0
    z_pas = mass_rule(passive)["Z"] if passive else z_act
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


def first_non_finite(value, where: str) -> str | None:
    """Path of the first NaN/inf number in plain card data, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((bad for w, v in items if (bad := first_non_finite(v, w))), None)
