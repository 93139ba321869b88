"""The built-in simulator against the GFlash formulas and the geometry cards."""

import math

import h5py
import numpy as np
import pytest
import torch

from calofm.cli import main as cli_main
from calofm.data.io import ShowerFile, read_showers
from calofm.geometry import load_geometry
from calofm.sim import Run, SimOptions, simulate, simulate_to_file
from calofm.sim.gflash import n_spots
from calofm.sim.run import CHUNK
from calofm.sim.shower import standard_gamma

NORMAL = (math.pi / 2, math.pi / 2)


def _electrons(name, energy, n, scale="deposited", threshold=False, theta=NORMAL, **kw):
    opts = SimOptions(particle=kw.pop("particle", "e-"), energy_scale=scale, threshold=threshold, **kw)
    return simulate(name, n, energy=(energy, energy), theta=theta, phi=(0.0, 0.0), options=opts, seed=kw.get("seed", 0))


def _peak_x0(showers, geometry):
    """Depth of the maximum of the mean longitudinal profile (parabola through the top cell), in X0."""
    lz = showers.sum((1, 2)).mean(0)
    k = int(np.argmax(lz))
    y0, y1, y2 = lz[k - 1], lz[k], lz[k + 1]
    return (k + 0.5 + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2)) * geometry.mesh.dz / geometry.X0_eff


def _gflash_t(geometry, energy_gev):
    """exp<ln T> for a sampling calorimeter (Grindhammer-Peters), computed here independently."""
    ln_y = math.log(energy_gev * 1e3 / geometry.Ec_eff)
    return (ln_y - 0.812) - 0.55 / geometry.F_S - 0.69 * (1 - geometry.e_mip)


@pytest.fixture(scope="module")
def siw():
    return load_geometry("par04_siw")


def test_depth_of_maximum_follows_gflash(siw):
    peaks = {e: _peak_x0(_electrons("par04_siw", e, 600)["showers"], siw) for e in (10, 100)}
    for e, peak in peaks.items():
        assert abs(peak - _gflash_t(siw, e)) < 0.5, (e, peak, _gflash_t(siw, e))
    # the maximum moves by ln(10) X0 per decade of energy
    assert abs((peaks[100] - peaks[10]) - math.log(10)) < 0.5


def test_photons_start_later_than_electrons(siw):
    depth = {}
    for particle in ("e-", "gamma"):
        s = _electrons("par04_siw", 20, 800, particle=particle)["showers"]
        lz = s.sum((1, 2)).mean(0)
        depth[particle] = float((lz * np.arange(45)).sum() / lz.sum()) * siw.mesh.dz / siw.X0_eff
    # mean photon conversion depth is 9/7 X0
    assert abs(depth["gamma"] - depth["e-"] - 9 / 7) < 0.35


@pytest.mark.parametrize("name", ["par04_siw", "odd"])
def test_resolution_matches_stochastic_term(name):
    g = load_geometry(name)
    a, c = g.card.resolution.stochastic, g.card.resolution.constant
    for energy in (10, 30):
        vis = _electrons(name, energy, 1500, scale="visible", threshold=True)["showers"].sum((1, 2, 3))
        measured = vis.std() / vis.mean()
        expected = math.sqrt(a**2 / energy + c**2)
        assert abs(measured / expected - 1) < 0.10, (name, energy, measured, expected)


def test_lateral_containment_in_one_moliere_radius(siw):
    s = _electrons("par04_siw", 50, 400)["showers"]
    radial = s.sum((2, 3)).mean(0)
    cumulative = np.concatenate([[0.0], np.cumsum(radial)]) / radial.sum()
    contained = np.interp(siw.R_M_eff, siw.r_edges, cumulative)
    assert 0.85 < contained < 0.95
    # almost all deposited energy stays in the 36 X0 deep, 4 R_M wide mesh
    assert 0.97 < s.sum((1, 2, 3)).mean() / 50e3 < 1.0


def test_hits_grow_and_sparsity_falls_with_energy():
    sparsity = [float((_electrons("par04_siw", e, 300, scale="visible", threshold=True)["showers"] == 0).mean())
                for e in (1, 10, 100)]
    assert sparsity[0] > sparsity[1] > sparsity[2]
    assert sparsity[2] < 0.95 and sparsity[0] > 0.9


def test_geometries_differ_as_their_cards_say():
    out = {}
    for name in ("par04_siw", "allegro"):
        g = load_geometry(name)
        s = _electrons(name, 20, 400, scale="visible", threshold=True)["showers"]
        response = s.sum((1, 2, 3)).mean() / 20e3
        # visible energy follows the computed sampling fraction (ALLEGRO's presampler adds a little spread)
        assert abs(response / g.sampling_fraction - 1) < 0.2, (name, response, g.sampling_fraction)
        radial = s.sum((2, 3)).mean(0)
        out[name] = (response, radial[0] / radial.sum())
    assert out["allegro"][0] > 4 * out["par04_siw"][0]  # LAr/Pb samples ~6x more than Si/W
    # ALLEGRO's 5 mm cells are 0.13 R_M, Par04's 4.65 mm cells 0.43 R_M: far less energy in the first ring
    assert out["par04_siw"][1] - out["allegro"][1] > 0.2


def test_inclined_particles_see_tilted_layers():
    ild = load_geometry("ild")  # front layers sample twice as much as the back ones
    asym, contained = {}, {}
    for theta in (0.87, math.pi / 2):
        s = _electrons("ild", 50, 500, scale="visible", threshold=False, theta=(theta, theta))["showers"]
        x = ild.cell_centres()["x"]
        left, right = s[:, x < 0].sum(), s[:, x > 0].sum()
        asym[theta] = (left - right) / (left + right)
        dep = _electrons("ild", 50, 500, theta=(theta, theta))["showers"].sum((1, 2, 3)).mean() / 50e3
        contained[theta] = dep
    # at theta < pi/2 the x > 0 half lies deeper, in the less sampled back section
    assert asym[0.87] > 0.01
    assert abs(asym[math.pi / 2]) < 0.005
    # the inclined path crosses 1/sin(theta) more material: less leakage out of the back
    assert contained[0.87] > contained[math.pi / 2]


def test_visible_is_sampling_fraction_times_deposited(siw):
    kw = dict(energy=(30, 30), seed=5)
    vis = simulate("par04_siw", 50, options=SimOptions(energy_scale="visible", threshold=False), **kw)["showers"]
    dep = simulate("par04_siw", 50, options=SimOptions(energy_scale="deposited", threshold=False), **kw)["showers"]
    hit = dep > 0
    np.testing.assert_array_equal(hit, vis > 0)
    np.testing.assert_allclose(vis[hit] / dep[hit], siw.sections[0].f_em, rtol=1e-5)


def test_threshold_applies_to_visible_cells(siw):
    on = simulate("par04_siw", 100, energy=(5, 5), seed=2)["showers"]
    off = simulate("par04_siw", 100, energy=(5, 5), seed=2, options=SimOptions(threshold=False))["showers"]
    assert on[on > 0].min() >= siw.card.threshold
    assert (off[(off > 0)] < siw.card.threshold).any()
    np.testing.assert_array_equal(on, np.where(off >= siw.card.threshold, off, 0))


def test_spot_and_binned_methods_agree():
    stats = {}
    for method in ("spots", "binned"):
        s = _electrons("par04_siw", 30, 800, scale="visible", threshold=True, method=method)["showers"]
        lz, lr, tot = s.sum((1, 2)).mean(0), s.sum((2, 3)).mean(0), s.sum((1, 2, 3))
        stats[method] = np.array([(lz * np.arange(45)).sum() / lz.sum(), (s > 0).sum((1, 2, 3)).mean(),
                                  lr[0] / lr.sum(), tot.mean(), tot.std() / tot.mean()])
    rel = np.abs(stats["binned"] / stats["spots"] - 1)
    assert (rel[:4] < 0.03).all(), rel
    assert rel[4] < 0.12, rel


def test_deterministic_and_chunk_independent():
    low = (1.0, 8.0)
    a = simulate("cld", 1200, seed=3, energy=low)
    b = simulate("cld", 1200, seed=3, energy=low)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["showers"], simulate("cld", 1200, seed=4, energy=low)["showers"])
    # chunk 1 depends only on (seed, 1): a resumed run reproduces it exactly
    tail = Run("cld", 1200, seed=3, energy=low).chunk(1)
    np.testing.assert_array_equal(tail["showers"], a["showers"][CHUNK:])
    # and on nothing else: a longer run shares its first chunk
    np.testing.assert_array_equal(simulate("cld", 1000, seed=3, energy=low)["showers"], a["showers"][:CHUNK])


def test_interrupted_run_resumes_to_the_same_file(tmp_path, monkeypatch):
    low = dict(energy=(1.0, 4.0), seed=9, progress=False)
    reference = simulate_to_file(tmp_path / "ref.h5", "par04_scipb", 2100, **low)
    out = tmp_path / "run.h5"
    original = Run.chunk

    def failing(self, k):
        if k == 2:
            raise KeyboardInterrupt
        return original(self, k)

    monkeypatch.setattr(Run, "chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        simulate_to_file(out, "par04_scipb", 2100, **low)
    assert not out.exists()
    with h5py.File(out.with_name(out.name + ".partial"), "r") as f:  # readers refuse an unfinished file
        assert f["showers"].shape[0] == f.attrs["calofm_rows_committed"] == 2 * CHUNK
    monkeypatch.setattr(Run, "chunk", original)
    simulate_to_file(out, "par04_scipb", 2100, **low)
    a, b = read_showers(reference), read_showers(out)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_conditions_and_cli(tmp_path, capsys):
    out = tmp_path / "ild.h5"
    rc = cli_main(["simulate", "--geometry", "ild", "--samples", "0.3k", "--energy", "50:50", "--theta",
                   "1.5708:1.5708", "--phi", "0:0", "--out", str(out), "--seed", "1", "--particle", "e-"])
    assert rc == 0 and out.exists()
    with ShowerFile(out) as f:
        cond = f.conditions()
        assert len(f) == 300 and f.attrs.geometry == "ild" and f.attrs.particle == "e-" and f.attrs.seed == 1
        np.testing.assert_allclose(cond["incident_energy"], 50e3)
        np.testing.assert_allclose(cond["incident_theta"], 1.5708, rtol=1e-6)
        assert f.attrs.mesh_dz == load_geometry("ild").mesh.dz
    assert cli_main(["simulate", "--geometry", "ild", "--samples", "10", "--out", str(out)]) == 2  # exists
    assert "exists already" in capsys.readouterr().err
    # log-uniform spectrum spans its range with a flat log distribution
    e = simulate("par04_siw", 2000, energy=(1, 1000), spectrum="log-uniform", seed=1)["incident_energy"] / 1e3
    assert e.min() >= 1 and e.max() <= 1000
    assert abs(np.mean(np.log10(e)) - 1.5) < 0.05


def test_the_issue_example_with_a_negative_phi_range(tmp_path):
    """``--phi -3.1416:3.1416`` as typed in the docs: argparse alone would take it for an option."""
    out = tmp_path / "odd.h5"
    argv = ["simulate", "--geometry", "odd", "--samples", "200", "--energy", "1:1000", "--theta", "0.87:2.27",
            "--phi", "-3.1416:3.1416", "--out", str(out), "--seed", "1"]
    assert cli_main(argv) == 0
    with ShowerFile(out) as f:
        cond = f.conditions()
    assert -3.1416 <= cond["incident_phi"].min() < -2.5 and 2.5 < cond["incident_phi"].max() <= 3.1416
    assert 0.87 <= cond["incident_theta"].min() and cond["incident_theta"].max() <= 2.27


def test_bad_options():
    with pytest.raises(ValueError):
        SimOptions(particle="pi+")
    with pytest.raises(ValueError):
        simulate("odd", 10, energy=(0, 10))
    with pytest.raises(ValueError):
        simulate("odd", 10, theta=(0.0, 4.0))


def test_runs_on_any_device_dtype():
    # the simulator keeps every tensor on its device; CPU here, CUDA when present
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = simulate("par04_siw", 20, energy=(10, 10), device=device)["showers"]
    assert s.shape == (20, 9, 16, 45) and s.dtype == np.float32 and (s >= 0).all()


@pytest.mark.parametrize("shape", [0.05, 0.4, 1.0, 2.5, 40.0])
def test_gamma_sampler_follows_the_gamma_distribution(shape):
    # Kolmogorov-Smirnov distance to the exact CDF; 1.63/sqrt(n) is the 1 % critical value
    n = 100_000
    x = standard_gamma(torch.full((n,), shape, dtype=torch.float64), torch.Generator().manual_seed(5))
    assert (x > 0).all() and torch.isfinite(x).all()
    cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), x.sort().values)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(grid - cdf, cdf - (grid - 1 / n)).max().item()
    assert ks < 1.63 / math.sqrt(n), ks
    # mixed shapes keep their order (each sample belongs to its own shape)
    shapes = torch.tensor([0.3, 300.0] * 5000)
    y = standard_gamma(shapes, torch.Generator().manual_seed(6))
    assert abs(y[1::2].mean().item() / 300 - 1) < 0.01 and abs(y[::2].mean().item() / 0.3 - 1) < 0.05


def test_batches_mixing_binned_and_spot_showers():
    # 1-300 GeV at default options: some showers are binned, the rest spot by spot in sub-batches
    opts = SimOptions(max_spots=20_000)
    s = simulate("odd", 60, energy=(1, 300), seed=8, options=opts)
    e_gev = s["incident_energy"] / 1e3
    spots = n_spots(torch.from_numpy(e_gev).double(), load_geometry("odd").card.resolution.stochastic)
    assert (spots > 3000).any() and (spots <= 3000).any()
    # each shower's visible energy tracks its own incident energy, whichever path made it
    ratio = s["showers"].sum((1, 2, 3)) / s["incident_energy"]
    assert ratio.std() / ratio.mean() < 0.25 and (ratio > 0).all()
