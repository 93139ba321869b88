"""Evaluation building blocks: features on hand-made showers, separation power, binning, FPD/KPD maths,
the classifier's best-epoch selection and isotonic calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg
from sklearn.metrics import roc_auc_score

from calofm.evaluation import classifier as cls_mod
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


# Exact population MMD^2 for two discrete distributions in d = 2 (kernel (a.b/2 + 1)^4, a.b/2 in {1/2, 0, -1/2},
# so k in {81/16, 1, 1/16}): X uniform on {e1, e2}, Y uniform on {e1, -e1}.
# E k(x, x') = (81/16 + 1)/2 = 97/32; E k(y, y') = (81/16 + 1/16)/2 = 82/32; E k(x, y) = (81/16 + 1/16 + 1 + 1)/4
# = 57/32; MMD^2 = 97/32 + 82/32 - 2 * 57/32 = 65/32. (Degree 3 would give 19/16; the V-statistic that keeps
# the diagonal is biased up by (k(x,x) - E k(x,x'))/m + (k(y,y) - E k(y,y'))/n = 65/32/m + 80/32/n.)
X_SUPPORT = np.array([[1.0, 0.0], [0.0, 1.0]])
Y_SUPPORT = np.array([[1.0, 0.0], [-1.0, 0.0]])
MMD2_EXACT = 65 / 32


def test_mmd_estimator_is_unbiased_for_a_discrete_closed_form():
    k = lambda a, b: (a @ b.T / 2 + 1) ** 4  # noqa: E731
    enumerated = k(X_SUPPORT, X_SUPPORT).mean() + k(Y_SUPPORT, Y_SUPPORT).mean() - 2 * k(X_SUPPORT, Y_SUPPORT).mean()
    assert enumerated == pytest.approx(MMD2_EXACT, rel=1e-12)  # the hand derivation above
    # batches of 10 straight from the population: the mean is 65/32 (the biased V-statistic would give ~2.49)
    rng = np.random.default_rng(6)
    values = [fpd_mod.mmd_poly_unbiased(X_SUPPORT[rng.integers(0, 2, 10)], Y_SUPPORT[rng.integers(0, 2, 10)])
              for _ in range(4000)]
    sem = np.std(values) / np.sqrt(len(values))  # ~0.017
    assert abs(np.mean(values) - MMD2_EXACT) < 4 * sem < 0.1


def test_kpd_median_converges_to_the_discrete_closed_form():
    rng = np.random.default_rng(7)
    real = X_SUPPORT[rng.integers(0, 2, 20_000)]  # max|x| = 1 per feature: the normalisation is the identity
    gen = Y_SUPPORT[rng.integers(0, 2, 20_000)]
    value, err = fpd_mod.kpd(real, gen, batch_size=500)
    assert abs(value - MMD2_EXACT) < max(3 * err, 0.05 * MMD2_EXACT)
    assert abs(value - MMD2_EXACT) < 0.1 * MMD2_EXACT  # a degree-3 kernel (19/16) is far outside
    assert 0 < err < 0.1 * MMD2_EXACT
    # the same data in another unit: normalised by the reference max|x| first, so KPD does not change
    assert fpd_mod.kpd(50 * real, 50 * gen, batch_size=500) == pytest.approx((value, err), rel=1e-9)


def test_kpd_reports_the_median_and_half_the_central_68_percent_range(monkeypatch):
    batches = iter([10.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    monkeypatch.setattr(fpd_mod, "mmd_poly_unbiased", lambda x, y, degree: next(batches))
    value, err = fpd_mod.kpd(np.ones((20, 2)), np.ones((20, 2)), batch_size=5)
    # sorted 1..10: percentile p sits at rank p/100 * 9 -> 16.275 % = 2.46475, 83.725 % = 8.53525 (linear)
    assert value == 5.5 and err == pytest.approx((8.53525 - 2.46475) / 2)


# ---------------------------------------------------------------------------------------------
# Classifier: best-epoch selection, isotonic calibration
# ---------------------------------------------------------------------------------------------

TINY_CLS = cls_mod.ClassifierConfig(hidden=8, n_hidden_layers=0, epochs=6, batch_size=10, lr=0.05, device="cpu")


def _scripted_predict(monkeypatch, accuracies, y_test):
    """Replace the classifier's test-split prediction: epoch i scores ``accuracies[i]``; record the weights seen."""
    seen = []

    def predict(model, x, device, batch=4096):
        acc = accuracies[len(seen)]
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        wrong = int(round((1 - acc) * len(y_test)))
        p = np.where(y_test > 0.5, 0.9, 0.1)
        p[:wrong] = 1 - p[:wrong]
        return p

    monkeypatch.setattr(cls_mod, "_predict", predict)
    return seen


def _same_weights(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_best_epoch_is_the_one_with_the_highest_test_accuracy(monkeypatch):
    rng = np.random.default_rng(8)
    train = (rng.standard_normal((40, 3)).astype(np.float32), (rng.random(40) < 0.5).astype(np.float32))
    test = (rng.standard_normal((10, 3)).astype(np.float32), np.repeat([1.0, 0.0], 5).astype(np.float32))
    seen = _scripted_predict(monkeypatch, [0.6, 0.9, 0.7, 0.8, 0.5, 0.9], test[1])
    model, acc = cls_mod.train_classifier(train, test, TINY_CLS, seed=0)
    assert len(seen) == 6 and acc == pytest.approx(0.9)
    assert not _same_weights(seen[1], seen[-1])  # training moved on, so the restore below means something
    # the first epoch at 0.9: the later tie does not replace it (strict >, as in CaloChallenge evaluate.py)
    assert _same_weights(model.state_dict(), seen[1])

    seen = _scripted_predict(monkeypatch, [0.5, 1.0, 0.6, 0.6, 0.6, 0.6], test[1])
    model, acc = cls_mod.train_classifier(train, test, TINY_CLS, seed=0)
    assert len(seen) == 2 and acc == 1.0  # stops as soon as the test split is separated perfectly
    assert _same_weights(model.state_dict(), seen[1])


def test_returned_model_reproduces_the_best_recorded_accuracy(monkeypatch):
    """Real training (no stub): the returned accuracy is the best epoch's, and the returned model scores it."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    y = (x[:, 0] + 0.8 * rng.standard_normal(300) > 0).astype(np.float32)  # learnable but noisy
    train, test = (x[:200], y[:200]), (x[200:], y[200:])
    history, real_predict = [], cls_mod._predict

    def spy(model, xs, device, batch=4096):
        p = real_predict(model, xs, device, batch)
        history.append(float(np.mean((p > 0.5) == (test[1] > 0.5))))
        return p

    monkeypatch.setattr(cls_mod, "_predict", spy)
    model, acc = cls_mod.train_classifier(train, test, TINY_CLS, seed=1)
    assert acc == max(history) and len(history) == TINY_CLS.epochs
    assert float(np.mean((real_predict(model, test[0], "cpu") > 0.5) == (test[1] > 0.5))) == acc


def _spy_calibrated(monkeypatch) -> dict:
    """Record the calibrated validation probabilities that ``calibrated_scores`` passes to sklearn's log_loss."""
    import sklearn.metrics

    seen, log_loss = {}, sklearn.metrics.log_loss

    def spy(y_true, y_pred, **kwargs):
        seen["p"] = np.asarray(y_pred)
        return log_loss(y_true, y_pred, **kwargs)

    monkeypatch.setattr(sklearn.metrics, "log_loss", spy)
    return seen


def test_isotonic_calibration_recovers_the_true_frequencies(monkeypatch):
    # raw score s ~ U(0, 1) but P(reference | s) = s^3: badly miscalibrated, rank order right
    rng = np.random.default_rng(10)

    def draw(n):
        s = rng.random(n)
        return s, (rng.random(n) < s**3).astype(np.float64)

    (p_test, y_test), (p_val, y_val) = draw(20_000), draw(20_000)
    seen = _spy_calibrated(monkeypatch)
    res = cls_mod.calibrated_scores(p_test, y_test, p_val, y_val)
    cal = seen["p"]
    assert np.all(np.diff(cal[np.argsort(p_val)]) >= 0)  # monotone in the raw score
    assert cal.min() >= 1e-6 and cal.max() <= 1 - 1e-6
    assert np.mean(np.abs(cal - p_val**3)) < 0.02  # maps the raw score to the true probability
    for lo in np.linspace(0, 0.8, 5):  # reliability: observed frequency = predicted probability per bin
        m = (cal >= lo) & (cal < lo + 0.2)
        assert abs(y_val[m].mean() - cal[m].mean()) < 0.03
    # BCE of the calibrated scores -> the conditional entropy E[H(s^3)] (0.3339 by quadrature); raw BCE ~0.53
    s = (np.arange(100_000) + 0.5) / 100_000
    q = s**3
    entropy = float(np.mean(-(q * np.log(q) + (1 - q) * np.log1p(-q))))
    assert res["bce"] == pytest.approx(entropy, abs=0.01)
    assert res["jsd"] == pytest.approx((math.log(2) - res["bce"]) / math.log(2), rel=1e-12)
    # a monotone map keeps the ranking: only the isotonic steps' ties move the AUC, and little
    assert abs(res["auc"] - roc_auc_score(y_val, p_val)) < 0.01 and res["auc"] > 0.85


def test_calibration_bounds_keep_a_wrong_certain_prediction_finite(monkeypatch):
    # test split perfectly separated; one validation reference shower scores below every generated one
    p_test = np.r_[np.linspace(0.6, 1.0, 50), np.linspace(0.0, 0.4, 50)]
    y_test = np.r_[np.ones(50), np.zeros(50)]
    p_val = np.r_[0.01, np.linspace(0.6, 1.0, 49), np.linspace(0.0, 0.4, 50)]
    y_val = y_test.copy()
    seen = _spy_calibrated(monkeypatch)
    res = cls_mod.calibrated_scores(p_test, y_test, p_val, y_val)
    np.testing.assert_array_equal(seen["p"], np.r_[1e-6, np.full(49, 1 - 1e-6), np.full(50, 1e-6)])
    # -log(1e-6) for the wrong one, -log(1 - 1e-6) for the 99 right ones (no infinity, no eps-sized loss)
    assert res["bce"] == pytest.approx((-math.log(1e-6) - 99 * math.log1p(-1e-6)) / 100, rel=1e-9)
    assert res["auc"] == pytest.approx(1 - 0.5 / 50)  # the wrong one ties with all 50 generated showers
