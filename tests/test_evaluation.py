"""Evaluation building blocks: features on hand-made showers, separation power, binning, FPD/KPD maths."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from calofm.evaluation import fpd as fpd_mod
from calofm.evaluation.features import apply_threshold, energy_masks, high_level_vector, shower_features
from calofm.evaluation.histograms import SPECS, bin_edges, chi2_ndf, separation_power
from calofm.geometry import MESH_SHAPE, load_geometry


@pytest.fixture(scope="module")
def siw():
    return load_geometry("par04_siw")


def _cell_xy(geo, ir, iphi):
    r = 0.5 * (geo.r_edges[ir] + geo.r_edges[ir + 1])
    phi = 0.5 * (geo.phi_edges[iphi] + geo.phi_edges[iphi + 1])
    return r, r * np.cos(phi), r * np.sin(phi)


def test_single_hit_gives_exact_centre_zero_width_and_sparsity(siw):
    s = np.zeros((1, *MESH_SHAPE), np.float32)
    s[0, 2, 5, 7] = 10.0
    s[0, 0, 0, 3] = 1e-4  # below the 0.5 keV threshold: removed before any feature
    f = shower_features(apply_threshold(s, siw.card.threshold), np.array([1000.0]), siw)
    r, x, y = _cell_xy(siw, 2, 5)
    assert f["ec_x"][0, 7] == pytest.approx(x, abs=1e-9)
    assert f["ec_y"][0, 7] == pytest.approx(y, abs=1e-9)
    assert f["ec_r"][0, 7] == pytest.approx(r)
    for key in ("width_x", "width_y", "width_r"):
        assert f[key][0, 7] == 0.0  # exactly: FPD/KPD divide by the reference max, round-off would blow up
    assert f["e_layer"][0, 7] == pytest.approx(10.0)
    assert f["e_layer"][0].sum() == pytest.approx(10.0)  # the sub-threshold cell is gone
    assert f["sparsity"][0, 7] == pytest.approx(1 - 1 / 144)
    assert f["sparsity"][0, 3] == 1.0
    assert f["n_hits"][0] == 1
    assert f["e_ratio"][0] == pytest.approx(0.01)
    assert f["radial"][0, 2] == pytest.approx(10.0)


def test_two_opposite_hits_centre_zero_known_width(siw):
    s = np.zeros((1, *MESH_SHAPE), np.float32)
    s[0, 4, 2, 10] = 5.0
    s[0, 4, 10, 10] = 5.0  # phi + pi
    f = shower_features(s, np.array([2000.0]), siw)
    r, x, y = _cell_xy(siw, 4, 2)
    assert f["ec_x"][0, 10] == pytest.approx(0.0, abs=1e-6)
    assert f["ec_y"][0, 10] == pytest.approx(0.0, abs=1e-6)
    assert f["width_x"][0, 10] == pytest.approx(abs(x), rel=1e-6)
    assert f["width_y"][0, 10] == pytest.approx(abs(y), rel=1e-6)
    assert f["ec_r"][0, 10] == pytest.approx(r)
    assert f["width_r"][0, 10] == pytest.approx(0.0, abs=1e-5)
    assert f["sparsity"][0, 10] == pytest.approx(1 - 2 / 144)


def test_high_level_vector_layout(siw):
    s = np.zeros((2, *MESH_SHAPE), np.float32)
    s[:, 1, 1, 7] = 10.0
    v = high_level_vector(shower_features(s, np.array([1000.0, 5000.0]), siw))
    assert v.shape == (2, 1 + 45 * 8 + 1) == (2, 362)
    assert v[1, 0] == pytest.approx(np.log10(5000.0))
    assert v[0, 1 + 7] == pytest.approx(np.log10(10.0 + 1e-8))
    assert v[0, 1 + 45 * 5] == pytest.approx(np.log10(10.0 + 1e-8))  # log10 E_tot after 5 blocks of 45
    assert v[0, 1] == pytest.approx(-8.0)  # empty layer: log10(1e-8)


def test_energy_masks_use_calochallenge_ranges():
    e = np.array([2e3, 20e3, 200e3, 1e6, 5e3])
    masks = energy_masks(e)
    assert list(masks) == ["1-10 GeV", "10-100 GeV", "100-1000 GeV"]
    assert masks["1-10 GeV"].tolist() == [True, False, False, False, True]
    assert masks["100-1000 GeV"].tolist() == [False, False, True, True, False]  # 1 TeV is in the last range


def test_separation_power_limits():
    h = np.array([1, 5, 10, 3])
    assert separation_power(h, 2 * h) == pytest.approx(0.0)
    assert separation_power(np.array([3, 4, 0, 0]), np.array([0, 0, 7, 1])) == pytest.approx(1.0)
    assert separation_power(np.zeros(4), h) == 1.0
    assert 0 < separation_power(h, h[::-1]) < 1
    assert chi2_ndf(h * 100, h * 100) == pytest.approx(0.0)


def test_binning_reproduces_calochallenge_ds2_for_ds2_cells(siw):
    ref = np.random.default_rng(0).uniform(0, 10, 100)
    spec = {s.key: s for s in SPECS}
    assert siw.r_edges[-1] == pytest.approx(41.85)
    np.testing.assert_allclose(bin_edges(spec["ec_x"], ref, siw, 0.0), np.linspace(-30, 30, 101))
    np.testing.assert_allclose(bin_edges(spec["width_r"], ref, siw, 0.0), np.linspace(0, 20, 101))
    allegro = load_geometry("allegro")  # 5 mm cells: same bins in units of the mesh radius
    np.testing.assert_allclose(bin_edges(spec["ec_x"], ref, allegro, 0.0)[-1], 30 * allegro.r_edges[-1] / 41.85)
    ratio = bin_edges(spec["e_ratio"], np.full(10, 0.025), siw, 0.0)
    np.testing.assert_allclose(ratio, 0.025 * np.linspace(0.5, 1.5, 101))
    layer = bin_edges(spec["e_layer"], np.array([0.0, 2.0, 50.0]), siw, 5e-4)
    assert layer[0] == pytest.approx(5e-4) and layer[-1] == pytest.approx(50.0) and len(layer) == 40


# ---------------------------------------------------------------------------------------------
# FPD / KPD
# ---------------------------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert fpd_mod.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) \
        == pytest.approx(4.0 + 1.0)
    # commuting (diagonal) covariances: sum over dims of (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    assert fpd_mod.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) \
        == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    # general case against the sqrtm formula, including a feature constant in sample 1
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8)) * 0.5
    x[:, 2] = 0.7
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    m1, m2 = x.mean(0), y.mean(0)
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2) - 2 * np.trace(linalg.sqrtm(c1 @ c2).real)
    assert fpd_mod.frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)


def test_resampled_moments_match_gathered_sample():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 4))
    idx = rng.choice(50, size=130)  # more draws than data: weighted route
    mu, cov = fpd_mod.resampled_mean_cov(x, idx)
    np.testing.assert_allclose(mu, x[idx].mean(0), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x[idx], rowvar=False), atol=1e-12)


def test_fpd_recovers_gaussian_closed_form():
    rng = np.random.default_rng(3)
    d, n = 4, 6000
    mu2 = np.array([0.3, 0.0, 0.0, -0.2])
    cov2 = np.diag([1.5, 1.0, 0.6, 1.0])
    real = rng.standard_normal((n, d))
    gen = rng.multivariate_normal(mu2, cov2, n)
    scale = np.abs(real).max(axis=0)  # FPD divides by the reference max|x|
    expected = fpd_mod.frechet_distance(np.zeros(d), np.diag(1 / scale**2), mu2 / scale, cov2 / np.outer(scale, scale))
    value, err = fpd_mod.fpd(real, gen, min_samples=1000, max_samples=6000, num_batches=10)
    assert abs(value - expected) < max(5 * err, 0.1 * expected)
    same, same_err = fpd_mod.fpd(real, rng.standard_normal((n, d)), min_samples=1000, max_samples=6000, num_batches=10)
    assert same < 0.1 * expected and same >= 0.0


def test_fpd_fit_is_scale_covariant():
    # a generated feature 1e6 reference-maxima away: FPD ~ (1e6)^2; curve_fit from (1, 1) used to stall at 1.0
    rng = np.random.default_rng(5)
    real, gen = rng.standard_normal((2000, 3)), rng.standard_normal((2000, 3)) + 0.5
    gen[:, 0] += 1e6 * np.abs(real[:, 0]).max()
    value, err = fpd_mod.fpd(real, gen, min_samples=500, max_samples=2000, num_batches=5)
    assert value > 1e11 and err < 0.01 * value
    assert value == pytest.approx(1e12, rel=0.01)


def test_poly_kernel_sums_blocked_equal_direct(monkeypatch):
    monkeypatch.setattr(fpd_mod, "KERNEL_BLOCK", 7)  # several blocks, ragged last one
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((23, 5)), rng.standard_normal((17, 5))
    kxx = (x @ x.T / 5 + 1) ** 4
    kxy = (x @ y.T / 5 + 1) ** 4
    total, trace = fpd_mod.poly_kernel_sums(x)
    assert total == pytest.approx(kxx.sum()) and trace == pytest.approx(np.trace(kxx))
    assert fpd_mod.poly_kernel_sums(x, y)[0] == pytest.approx(kxy.sum())


def test_mmd_matches_direct_computation_and_kpd_behaviour():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((60, 3)), rng.standard_normal((40, 3)) + 0.5
    k = lambda a, b: (a @ b.T / 3 + 1) ** 4  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    direct = ((kxx.sum() - np.trace(kxx)) / (60 * 59) + (kyy.sum() - np.trace(kyy)) / (40 * 39)
              - 2 * k(x, y).mean())
    assert fpd_mod.mmd_poly_unbiased(x, y) == pytest.approx(direct, rel=1e-10)

    real = rng.standard_normal((4000, 6))
    same, same_err = fpd_mod.kpd(real, rng.standard_normal((4000, 6)), num_batches=10, batch_size=1000)
    shifted, shifted_err = fpd_mod.kpd(real, rng.standard_normal((4000, 6)) * 1.2 + 0.2, num_batches=10,
                                       batch_size=1000)
    assert abs(same) < 3 * same_err + 1e-4
    assert shifted > 3 * shifted_err and shifted > 10 * abs(same)
