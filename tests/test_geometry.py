"""calofm.geometry: built-in cards, derived physics against hand calculations, card validation, user cards."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calofm.cli import main
from calofm.config import ConfigError
from calofm.geometry import (
    GEOMETRY_ENV,
    MESH_SHAPE,
    N_SLOTS,
    GeometryError,
    available_geometries,
    builtin_dir,
    load_all,
    load_geometry,
    load_geometry_file,
    replace_card,
)
from calofm.materials import E_S

BUILTIN = ["allegro", "cld", "ild", "odd", "par04_scipb", "par04_siw"]


@functools.cache
def _card_text(name: str) -> dict:
    return yaml.safe_load((builtin_dir() / f"{name}.yaml").read_text())


def card(name: str = "par04_siw") -> dict:
    """A built-in card as plain data, to be mutated."""
    return copy.deepcopy(_card_text(name))


def write_card(folder: Path, data: dict, file_name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_name or data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def new_detector(name: str = "mydet", slot: int = 6, title: str = "My Si-W prototype") -> dict:
    data = card("par04_siw")
    data.update(name=name, slot=slot, title=title, lemurs_name=None)
    data["stack"][0]["repeat"] = 30
    return data


# ----------------------------------------------------------------------------------------------
# Built-in cards
# ----------------------------------------------------------------------------------------------


def test_every_builtin_card_loads_with_its_file_name_and_a_unique_slot():
    geos = load_all()
    assert sorted(geos) == BUILTIN
    slots = [g.slot for g in geos.values()]
    assert len(set(slots)) == len(slots) and all(0 <= s < N_SLOTS for s in slots)
    for name, g in geos.items():
        assert g.name == name and g.source == builtin_dir() / f"{name}.yaml"
        assert (g.mesh.n_r, g.mesh.n_phi, g.mesh.n_z) == MESH_SHAPE
        assert g.depth > 0 and g.depth_x0 > 0 and 0 < g.sampling_fraction < 1
    assert load_geometry("par04_siw") == geos["par04_siw"]
    assert load_geometry(geos["odd"]) is geos["odd"]  # a Geometry passes through


# Values computed independently by hand (Par04 W 1.4 mm / Si 0.3 mm; detector depths and sampling fractions)
# and the LEMURS ALLEGRO E_sum/E_inc; tolerances cover the rounding of the quoted numbers and the slightly
# different material tables behind them.
@pytest.mark.parametrize(("name", "attr", "expected", "rel"), [
    ("par04_siw", "Z_eff", 72.5, 0.002),
    ("par04_siw", "X0_eff", 4.22, 0.002),
    ("par04_siw", "F_S", 2.48, 0.002),
    ("par04_siw", "e_mip", 0.704, 0.001),
    ("par04_siw", "depth_x0", 36.2, 0.005),
    ("par04_siw", "depth", 153.0, 1e-9),
    ("par04_siw", "R_M_eff", 10.8, 0.01),  # "1.07-1.09 cm from the PDG mass rule"
    ("par04_siw", "sampling_fraction", 0.025, 0.03),  # f_EM ~ 0.025
    ("odd", "depth_x0", 26.1, 0.01),  # ODD and CLD: two PCB mixtures of the card are estimates (~0.5 %)
    ("odd", "depth", 242.0, 0.002),
    ("odd", "sampling_fraction", 0.025, 0.08),  # "f_EM ~ 0.025" (quoted to one digit)
    ("cld", "depth_x0", 21.7, 0.01),
    ("cld", "depth", 202.0, 1e-9),
    ("ild", "depth_x0", 24.1, 0.005),
    ("allegro", "depth_x0", 20.5, 0.03),  # "~20.5 X0 at eta = 0" (inclined plates approximated)
    ("allegro", "depth", 405.5, 0.001),  # r = 2172.8-2578.3 mm
    ("allegro", "sampling_fraction", 0.144, 0.1),  # LEMURS ALLEGRO mean E_sum/E_inc ~ 0.144
])
def test_derived_values_match_physics_reference(name, attr, expected, rel):
    assert getattr(load_geometry(name), attr) == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize(("name", "section", "f_mip"), [
    ("par04_siw", 0, 0.036), ("odd", 0, 0.036), ("cld", 0, 0.036), ("ild", 0, 0.042), ("ild", 1, 0.022),
    ("par04_scipb", 0, 0.042),
])
def test_mip_sampling_fractions(name, section, f_mip):
    assert load_geometry(name).sections[section].f_mip == pytest.approx(f_mip, abs=0.001)


def test_par04_cell_by_hand():
    # one cell: 1.4 mm W (19.30 g/cm3) + 0.3 mm Si (2.329): areal densities 2.702 and 0.06987 g/cm2
    w_w, w_si = 2.702 / 2.77187, 0.06987 / 2.77187
    s = load_geometry("par04_siw").sections[0]
    assert s.cell == pytest.approx(1.7) and s.thickness == pytest.approx(153.0)
    assert s.density == pytest.approx(2.77187 / 0.17)
    assert s.Z == pytest.approx(74 * w_w + 14 * w_si)
    x0 = 1 / (w_w / 6.76 + w_si / 21.82)  # g/cm2, PDG rule 1/X0 = sum w/X0
    assert s.X0 == pytest.approx(10 * x0 / s.density) and s.X0 == pytest.approx(4.2193, abs=1e-4)
    assert s.F_S == pytest.approx(s.X0 / 1.7)
    assert s.f_mip == pytest.approx(0.06987 * 1.664 / (0.06987 * 1.664 + 2.702 * 1.145))
    assert s.e_mip == pytest.approx(1 / (1 + 0.007 * (74 - 14)))
    assert s.f_em == pytest.approx(s.f_mip * s.e_mip)
    ec_over_x0 = w_w * 7.97 / 6.76 + w_si * 40.19 / 21.82
    assert s.Ec == pytest.approx(x0 * ec_over_x0)
    assert s.R_M == pytest.approx(10 * E_S / ec_over_x0 / s.density)  # 1/R_M = sum w Ec/(X0 E_s)


def test_mixture_rule_on_tungsten_dens24():
    # W 93 %, Ni 6.1 %, Fe 0.9 % by mass (OpenDataMaterials.xml); hand-computed PDG mixture rule:
    # 1/X0 = 0.93/6.76 + 0.061/12.68 + 0.009/13.84 = 0.137574 + 0.004811 + 0.000650 = 0.143035 cm2/g
    m = load_geometry("odd").materials["TungstenDens24"]
    assert m.X0 == pytest.approx(1 / 0.143035, rel=1e-5)  # 6.9913 g/cm2
    assert m.X0_mm == pytest.approx(3.9277, rel=1e-4)  # at 17.8 g/cm3
    assert m.Z == pytest.approx(0.93 * 74 + 0.061 * 28 + 0.009 * 26)  # 70.762
    assert m.A == pytest.approx(175.0539, rel=1e-6)
    # Ec = X0 sum w Ec/X0 = 8.4659 MeV; R_M = E_s / sum(w Ec/X0) / rho = 9.838 mm
    assert m.Ec == pytest.approx(8.4659, rel=1e-4)
    assert m.R_M_mm == pytest.approx(9.838, rel=1e-3)
    assert m.dedx == pytest.approx(0.93 * 1.145 + 0.061 * 1.468 + 0.009 * 1.451)


@pytest.mark.parametrize(("material", "x0_mm", "r_m_mm"), [
    ("W", 3.504, 9.327), ("Si", 93.70, 49.44),  # W: CaloChallenge README, Par04 macro comment; Si: PDG
])
def test_element_radiation_lengths(material, x0_mm, r_m_mm):
    m = load_geometry("par04_siw").materials[material]
    assert m.X0_mm == pytest.approx(x0_mm, rel=1e-3)
    assert m.R_M_mm == pytest.approx(r_m_mm, rel=0.005)


def test_stack_averages_are_weighted_by_radiation_lengths():
    g = load_geometry("ild")
    front, back = g.sections
    assert back.start == pytest.approx(front.thickness) and g.depth == pytest.approx(20 * 2.625 + 10 * 4.725)
    t = np.array([front.thickness / front.X0, back.thickness / back.X0])
    assert g.depth_x0 == pytest.approx(t.sum())
    assert g.X0_eff == pytest.approx(g.depth / t.sum())
    for attr, stack_attr in (("R_M", "R_M_eff"), ("Z", "Z_eff"), ("f_em", "sampling_fraction"), ("F_S", "F_S")):
        expected = (t[0] * getattr(front, attr) + t[1] * getattr(back, attr)) / t.sum()
        assert getattr(g, stack_attr) == pytest.approx(expected)
    prof = g.depth_profile()
    np.testing.assert_allclose(prof["edges"], [0, front.thickness, g.depth])
    np.testing.assert_allclose(prof["f_em"], [front.f_em, back.f_em])


def test_allegro_sampling_fraction_grows_with_the_lar_gap():
    # FCC-config Geant4 values rise from 0.136 (L1) to 0.183 (L10); the card's LAr gap grows with radius
    f_em = [s.f_em for s in load_geometry("allegro").sections[1:]]
    assert np.all(np.diff(f_em) > 0)
    assert f_em[-1] == pytest.approx(0.183, rel=0.05)


def test_mesh_coordinates():
    g = load_geometry("par04_siw")
    np.testing.assert_allclose(g.r_edges, np.arange(10) * 4.65)  # CaloChallenge DS2 r edges, up to 41.85 mm
    np.testing.assert_allclose(g.z_edges[-1], 153.0)
    np.testing.assert_allclose(g.phi_edges[[0, -1]], [-math.pi, math.pi])
    c = g.cell_centres()
    assert all(v.shape == MESH_SHAPE for v in c.values())
    # Par04InferenceSetup: ((iR+0.5) dr cos phi_c, ..., (iZ+0.5) dz), phi_c = (iPhi+0.5) 2pi/16 - pi
    i_r, i_phi, i_z = 3, 5, 7
    phi_c = (i_phi + 0.5) * 2 * math.pi / 16 - math.pi
    assert c["x"][i_r, i_phi, i_z] == pytest.approx(3.5 * 4.65 * math.cos(phi_c))
    assert c["y"][i_r, i_phi, i_z] == pytest.approx(3.5 * 4.65 * math.sin(phi_c))
    assert c["z"][i_r, i_phi, i_z] == pytest.approx(7.5 * 3.4)


def test_summary_ratios_and_universal_grid_cards():
    geos = load_all()
    s = geos["par04_siw"].summary()
    assert s["dr_RM"] == pytest.approx(4.65 / s["R_M_eff_mm"]) and s["dz_X0"] == pytest.approx(3.4 / s["X0_eff_mm"])
    # cards without a primary-source mesh scale Par04's cells by R_M_eff and X0_eff (docs/geometries.md)
    for name in ("ild", "par04_scipb"):
        t = geos[name].summary()
        assert t["dr_RM"] == pytest.approx(s["dr_RM"], rel=0.02)
        assert t["dz_X0"] == pytest.approx(s["dz_X0"], rel=0.02)


def test_replace_card_validates_again():
    g = load_geometry("par04_siw")
    assert replace_card(g, slot=7).slot == 7 and g.slot == 0
    with pytest.raises(GeometryError, match="slot 9 outside"):
        replace_card(g, slot=9)


# ----------------------------------------------------------------------------------------------
# Invalid cards
# ----------------------------------------------------------------------------------------------


def _set(data: dict, path: str, value) -> None:
    *head, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for p in head:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


class _Delete:
    def __repr__(self) -> str:  # a stable test id (pytest-xdist workers must collect the same ids)
        return "<deleted>"


_DELETE = _Delete()

INVALID = [
    ("colour", "red", r"geometry: unknown key\(s\) \['colour'\]"),
    ("materials.W.colour", "grey", r"geometry\.materials\.W: unknown key\(s\) \['colour'\]"),
    ("stack.0.slices.0.absorber", True, r"geometry\.stack\[0\]\.slices\[0\]: unknown key\(s\) \['absorber'\]"),
    ("mesh", _DELETE, "missing required key 'mesh'"),
    ("slot", _DELETE, "missing required key 'slot'"),
    ("materials.W.Z", _DELETE, r"material 'W': missing \['Z'\]"),
    ("stack.0.slices.0.thickness", -1.4, "slice 'W' thickness must be > 0"),
    ("stack.0.slices.1.thickness", 0.0, "slice 'Si' thickness must be > 0"),
    ("stack.0.slices.0.thickness", "1.4 mm", r"slices\[0\]\.thickness: expected a number"),
    ("stack.0.slices.0.thickness", float("nan"), r"geometry\.stack\[0\]\.slices\[0\]\.thickness: must be a finite"),
    ("stack.0.slices.0.material", "Unobtainium", "material 'Unobtainium' is not defined"),
    ("stack.0.repeat", 0, "repeat must be >= 1"),
    ("stack.0.thickness", 100.0, "give exactly one of 'repeat' or 'thickness'"),
    ("stack.0.repeat", _DELETE, "give exactly one of 'repeat' or 'thickness'"),
    ("stack", card()["stack"] + [{"name": "gap", "repeat": 1, "slices": []}], "stack gap: no slices"),
    ("stack", [], "stack is empty"),
    ("stack.0.slices.1.active", False, "stack has no active slice"),
    ("materials.W.density", 0.0, "material 'W': density must be > 0"),
    ("materials.W.density", float("inf"), "materials.W.density: must be a finite number"),
    ("materials.Si.X0", -21.82, "material 'Si': X0 must be > 0"),
    ("materials.W.R_M", 12.0, r"material 'W': R_M 12.0 mm disagrees with E_s X0/Ec = 9.32 mm"),
    ("materials.W.R_M", 0.0, "material 'W': R_M must be > 0 mm"),
    ("materials.Mix", {"density": 10.0, "components": {"W": 0.5, "Si": 0.4}}, "mass fractions must be > 0 and sum"),
    ("materials.Mix", {"density": 10.0, "components": {"W": 1.1, "Si": -0.1}}, "mass fractions must be > 0 and sum"),
    ("materials.Mix", {"density": 10.0, "components": {"W": 0.5, "Os": 0.5}}, "material 'Os' is used but not"),
    ("materials.Mix", {"density": 1.0, "components": {"Mix": 1.0}}, "'Mix' is defined in terms of itself"),
    ("mesh.n_r", 18, r"mesh 18x16x45: calofm uses \(9, 16, 45\) for every detector"),
    ("mesh.n_phi", 50, "mesh 9x50x45"),
    ("mesh.dr", 0.0, "mesh cell sizes dr, dz must be > 0 mm"),
    ("mesh.dz", -3.4, "mesh cell sizes dr, dz must be > 0 mm"),
    ("energy", [1000.0, 1.0], r"energy range \(1000\.0, 1\.0\): need 0 < min <= max"),
    ("energy", [0.0, 10.0], "energy range"),
    ("energy", [1.0], "geometry.energy: expected 2 values, got 1"),
    ("energy", [1.0, float("inf")], r"geometry\.energy\[1\]: must be a finite number"),
    ("theta", [0.0, 1.0], "theta range"),
    ("theta", [1.0, 4.0], "theta range"),
    ("theta", [2.0, 1.0], "theta range"),
    ("phi", [-4.0, 0.0], "phi range"),
    ("phi", [0.0, 7.0], "phi range"),
    ("slot", 8, r"slot 8 outside \[0, 8\)"),
    ("slot", -1, r"slot -1 outside"),
    ("slot", 1.0, "geometry.slot: expected an integer"),
    ("particle", "pi+", r"geometry\.particle: 'pi\+' is not one of"),
    ("spectrum", "power", "geometry.spectrum: 'power' is not one of"),
    ("resolution.stochastic", 0.0, "stochastic term must be in"),
    ("resolution.stochastic", 2.5, "stochastic term must be in"),
    ("threshold", -0.1, "threshold must be >= 0 MeV"),
]


@pytest.mark.parametrize(("path", "value", "problem"), INVALID, ids=[f"{p}={v!r}" for p, v, _ in INVALID])
def test_invalid_cards_are_rejected_naming_the_file(tmp_path, path, value, problem):
    data = card()
    _set(data, path, value)
    file = write_card(tmp_path, data, "par04_siw")
    with pytest.raises(GeometryError) as err:
        load_geometry_file(file)
    msg = str(err.value)
    assert msg.startswith(f"{file}: ") and "\n" not in msg
    assert re.search(problem, msg), msg


def test_card_name_must_match_the_file_and_be_lower_case(tmp_path):
    file = write_card(tmp_path, card(), "other")
    with pytest.raises(GeometryError, match=rf"^{file}: file name must match name 'par04_siw'$"):
        load_geometry_file(file)
    data = card()
    data["name"] = "Par04"
    file = write_card(tmp_path, data)
    with pytest.raises(GeometryError, match=rf"^{file}: name 'Par04': use lower-case letters"):
        load_geometry_file(file)


def test_broken_yaml_names_the_file(tmp_path):
    file = tmp_path / "broken.yaml"
    file.write_text("name: broken\nstack: [\n")
    with pytest.raises(ConfigError, match=rf"^{file}: invalid YAML"):
        load_geometry_file(file)


_NUMBERS = st.sampled_from([0, -1, 0.0, -0.5, 1e-9, 1e9, float("nan"), float("inf"), 1.5, 100, 7])
_JUNK = _NUMBERS | st.sampled_from([None, "x", True, [], {}, [1.0], [2.0, 1.0], {"a": 1}])


def _leaves(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _leaves(v, prefix + (k,))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(BUILTIN), data=st.data())
def test_any_mutated_card_loads_or_fails_with_one_line_naming_the_file(tmp_path, name, data):
    mutated = card(name)
    paths = list(_leaves(mutated))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = mutated
        try:
            for p in path[:-1]:
                node = node[p]
            if data.draw(st.booleans()) and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = data.draw(_JUNK)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    file = write_card(tmp_path / "fuzz", mutated, name)
    try:
        g = load_geometry_file(file)
    except GeometryError as err:
        assert str(err).startswith(f"{file}: ") and "\n" not in str(err)
    else:
        assert all(math.isfinite(v) for v in (g.depth, g.depth_x0, g.X0_eff, g.R_M_eff, g.sampling_fraction))


# ----------------------------------------------------------------------------------------------
# User cards: --geometry-dir and $CALOFM_GEOMETRY_DIR
# ----------------------------------------------------------------------------------------------


def test_a_card_dropped_in_an_extra_folder_is_a_new_detector(tmp_path):
    write_card(tmp_path / "cards", new_detector())
    found = available_geometries([tmp_path / "cards"])
    assert set(found) == set(BUILTIN) | {"mydet"}
    g = load_geometry("mydet", [str(tmp_path / "cards")])
    assert g.slot == 6 and g.depth == pytest.approx(30 * 1.7) and g.source == tmp_path / "cards" / "mydet.yaml"
    with pytest.raises(GeometryError, match=r"unknown geometry 'mydet'; available: allegro, cld"):
        load_geometry("mydet")  # not on the search path without the folder


def test_geometry_env_var_adds_folders_and_user_cards_shadow_builtins(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    write_card(first, new_detector("odd", slot=1, title="my ODD variant"))
    write_card(second, new_detector("odd", slot=1, title="shadowed by the first folder"))
    write_card(second, new_detector("other", slot=7))
    monkeypatch.setenv(GEOMETRY_ENV, os.pathsep.join([str(first), str(second)]))
    found = available_geometries()
    assert found["odd"] == first / "odd.yaml" and found["other"] == second / "other.yaml"
    assert load_geometry("odd").card.title == "my ODD variant"
    # --geometry-dir comes before the environment variable
    write_card(tmp_path / "cli", new_detector("odd", slot=1, title="from --geometry-dir"))
    assert load_geometry("odd", [tmp_path / "cli"]).card.title == "from --geometry-dir"
    assert load_all()["par04_siw"].source == builtin_dir() / "par04_siw.yaml"


def test_missing_geometry_folder_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(GeometryError, match="nope: geometry directory does not exist"):
        available_geometries([tmp_path / "nope"])
    monkeypatch.setenv(GEOMETRY_ENV, str(tmp_path / "gone"))
    with pytest.raises(GeometryError, match="gone: geometry directory does not exist"):
        load_geometry("par04_siw")


def test_load_by_path_and_shared_slot_warning(tmp_path, caplog):
    path = write_card(tmp_path, new_detector("twin", slot=0))
    assert load_geometry(str(path)).name == "twin"
    with caplog.at_level(logging.WARNING, logger="calofm.geometry"):
        load_all([tmp_path])
    assert "geometries twin and par04_siw share slot 0" in caplog.text  # user folders are searched first


# ----------------------------------------------------------------------------------------------
# calofm geometries
# ----------------------------------------------------------------------------------------------


def test_cli_geometries_lists_every_card(tmp_path, capsys):
    assert main(["geometries"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["name", "slot", "depth_mm", "depth_X0", "X0_eff_mm"]
    assert [line.split()[0] for line in lines[1:]] == BUILTIN
    par04 = next(line.split() for line in lines if line.split()[0] == "par04_siw")
    assert par04[1:5] == ["0", "153", "36.3", "4.22"]

    write_card(tmp_path, new_detector())
    assert main(["geometries", "--geometry-dir", str(tmp_path), "--sections"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+mydet\s+6\s+51\s", out, re.M)
    assert f"mydet ({tmp_path / 'mydet.yaml'})" in out and "presampler" in out  # ALLEGRO's first section


def test_cli_geometries_json(capsys):
    assert main(["geometries", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert sorted(table) == BUILTIN
    assert table["odd"]["depth_X0"] == pytest.approx(load_geometry("odd").depth_x0)
    assert table["par04_siw"]["e_mip"] == pytest.approx(0.704, abs=0.001)


def test_cli_geometries_bad_card_is_one_line_exit_2(tmp_path, capsys):
    data = new_detector()
    data["slot"] = 99
    path = write_card(tmp_path, data)
    assert main(["geometries", "--geometry-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"calofm geometries: error: {path}: slot 99 outside [0, 8)"
