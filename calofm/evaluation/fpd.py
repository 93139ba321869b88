"""Frechet and kernel physics distances (FPD, KPD; arXiv:2211.10295) with JetNet's definitions.

The CaloChallenge calls ``jetnet.evaluation.fpd(ref, gen, min_samples=10000)`` and
``kpd(ref, gen, batch_size=10000)`` on the 362 high-level features. jetnet itself needs coffea,
energyflow, numba and awkward, so the same definitions are written out here (docs/evaluation.md).
"""

from __future__ import annotations

import logging
from functools import cache

import numpy as np
from scipy.optimize import curve_fit

log = logging.getLogger(__name__)

KERNEL_BLOCK = 2048  # rows per block of the Gram matrix (keeps memory at ~160 MB for 10k x 10k)


def normalise(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide every feature by max|x| of the *real* (reference) sample; all-zero features are left alone."""
    scale = np.max(np.abs(real), axis=0)
    scale = np.where(scale == 0, 1.0, scale)
    return real / scale, gen / scale


@cache
def _blas():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^1/2) of two Gaussians."""
    # Tr (C1 C2)^1/2 = sum of sqrt(eigenvalues of L^T C2 L), C1 = L L^T (similar to C1 C2, symmetric PSD):
    # the same number as pytorch-fid's sqrtm route, without its complex round-off.
    # A feature constant in sample 1 (zero row and column of C1) only adds zero eigenvalues to C1 C2,
    # so the trace of the root is taken on the other features: exact, and keeps C1 positive definite.
    keep = np.flatnonzero(np.diag(cov1) > 0)
    c1, c2 = cov1[np.ix_(keep, keep)], cov2[np.ix_(keep, keep)]
    try:
        root1 = np.linalg.cholesky(c1)
    except np.linalg.LinAlgError:  # still singular (collinear features): symmetric square root instead
        w, v = np.linalg.eigh(c1)
        root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1.T @ c2 @ root1)  # symmetric up to round-off; LAPACK reads one triangle
    tr_sqrt = float(np.sum(np.sqrt(np.clip(inner, 0.0, None))))
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def resampled_mean_cov(x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof=1, as np.cov) of ``x[idx]``.

    Draws larger than the data use count-weighted sums over the data: same numbers, cost set by len(x).
    """
    size = len(idx)
    if size > len(x):
        counts = np.bincount(idx, minlength=len(x)).astype(np.float64)
        mu = counts @ x / size
        xc = x - mu
        return mu, (xc.T * counts) @ xc / (size - 1)
    sample = x[idx]
    mu = sample.mean(axis=0)
    xc = sample - mu
    return mu, (xc.T @ xc) / (size - 1)


def fpd(
    real: np.ndarray,
    gen: np.ndarray,
    min_samples: int = 10_000,
    max_samples: int = 50_000,
    num_batches: int = 20,
    num_points: int = 10,
    seed: int = 42,
    progress: bool = False,
) -> tuple[float, float]:
    """FPD and its error: the N -> infinity intercept of the mean Frechet distance vs 1/N (CaloChallenge defaults).

    N = 1/linspace(1/min, 1/max, num_points); ``num_batches`` pairs per N with replacement; fit bounded >= 0.
    """
    from tqdm.auto import tqdm

    if not 2 <= min_samples <= max_samples or num_batches < 1 or num_points < 2:
        raise ValueError(f"FPD needs batch sizes 2 <= min <= max (got {min_samples}:{max_samples}), num_batches "
                         f">= 1 and num_points >= 2 (got {num_batches}, {num_points})")
    x, y = normalise(np.asarray(real, dtype=np.float64), np.asarray(gen, dtype=np.float64))
    sizes = (1.0 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype(np.int32)
    rng = np.random.default_rng(seed)
    means = []
    # One BLAS thread: 400 mid-sized products and 200 362x362 LAPACK calls ran 10-40x slower with threaded
    # OpenBLAS on a busy 2-core machine (e.g. two pytest workers); on an idle one this costs ~30 %.
    with _blas().limit(limits=1, user_api="blas"):
        for size in tqdm(sizes, desc="FPD batch sizes", disable=not progress, leave=False):
            values = []
            for _ in range(num_batches):
                i1 = rng.choice(len(x), size=size)
                i2 = rng.choice(len(y), size=size)
                values.append(frechet_distance(*resampled_mean_cov(x, i1), *resampled_mean_cov(y, i2)))
            means.append(np.mean(values))
    # fit in units of the largest mean: curve_fit starts at (1, 1) and stalls there for means of 1e10 or more
    unit = max(float(np.max(means)), np.finfo(float).tiny)
    params, cov = curve_fit(lambda t, a, b: a + b * t, 1.0 / sizes, np.asarray(means) / unit,
                            bounds=([0, 0], [np.inf, np.inf]))
    return float(params[0] * unit), float(np.sqrt(cov[0, 0]) * unit)


def _poly(block: np.ndarray, d: int, degree: int) -> np.ndarray:
    k = block / d + 1.0
    return k * k * k * k if degree == 4 else k**degree  # explicit products: np.power is ~10x slower


def poly_kernel_sums(x: np.ndarray, y: np.ndarray | None = None, degree: int = 4) -> tuple[float, float]:
    """(sum of all entries, trace) of the kernel matrix (x_i . y_j / d + 1)^degree, in row blocks.

    ``y=None`` means y = x: only the upper block triangle is computed (off-diagonal blocks count twice).
    """
    d = x.shape[1]
    total, trace = 0.0, 0.0
    for start in range(0, len(x), KERNEL_BLOCK):
        rows = x[start : start + KERNEL_BLOCK]
        if y is not None:
            total += float(_poly(rows @ y.T, d, degree).sum())
            continue
        block = _poly(rows @ x[start:].T, d, degree)
        width = len(rows)
        diag = block[:, :width]
        total += float(diag.sum()) + 2.0 * float(block[:, width:].sum())
        trace += float(np.trace(diag))
    return total, trace


def mmd_poly_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 4) -> float:
    """Unbiased quadratic MMD^2 with the polynomial kernel (x . y / d + 1)^degree (diagonals excluded)."""
    m, n = len(x), len(y)
    sxx, txx = poly_kernel_sums(x, degree=degree)
    syy, tyy = poly_kernel_sums(y, degree=degree)
    sxy, _ = poly_kernel_sums(x, y, degree)
    return (sxx - txx) / (m * (m - 1)) + (syy - tyy) / (n * (n - 1)) - 2.0 * sxy / (m * n)


def kpd(
    real: np.ndarray,
    gen: np.ndarray,
    num_batches: int = 10,
    batch_size: int = 10_000,
    seed: int = 42,
    degree: int = 4,
    progress: bool = False,
) -> tuple[float, float]:
    """KPD: median over batches (drawn with replacement, seed + 1000 i) of the unbiased MMD^2, and half
    the 16.275-83.725 percentile range as error. Defaults are the CaloChallenge call (JetNet degree 4)."""
    from tqdm.auto import tqdm

    if batch_size < 2 or num_batches < 1:
        raise ValueError(f"KPD needs batch_size >= 2 and num_batches >= 1, got {batch_size} and {num_batches}")
    x, y = normalise(np.asarray(real, dtype=np.float64), np.asarray(gen, dtype=np.float64))
    values = []
    for i in tqdm(range(num_batches), desc="KPD batches", disable=not progress, leave=False):
        rng = np.random.default_rng(seed + 1000 * i)
        values.append(mmd_poly_unbiased(x[rng.choice(len(x), size=batch_size)],
                                        y[rng.choice(len(y), size=batch_size)], degree))
    lo, hi = np.percentile(values, [16.275, 83.725])
    return float(np.median(values)), float((hi - lo) / 2.0)
