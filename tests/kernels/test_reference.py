"""Validates the float64 oracle in tests/reference.py itself (SPEC section 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from reference import (
    ELEMENT_KEYS,
    SPECTRAL_KEYS,
    bin_edges,
    element_stats,
    head_reference,
    log_normal_mass,
    near_edge_count,
    spectral_stats,
    zbin_edges,
)

GAUSS_H = 0.5 * math.log(2 * math.pi * math.e)
HIST_KEYS = (
    "entropy", "entropy_residual", "entropy_mm", "kl_gauss", "kl_gauss_mm",
    "mu_fit", "sigma_fit", "kl_fit", "tail_mass",
)  # fmt: skip


@pytest.fixture(scope="module")
def normal_1e6():
    x = np.random.default_rng(0).standard_normal((1000, 1000))
    return x, element_stats(x)


# ---------------------------------------------------------------- ln q_i


def test_log_normal_mass_standard_bins_sum_to_one_and_finite():
    e = zbin_edges()
    lq = log_normal_mass(e[:-1], e[1:])
    assert lq.shape == (e.size - 1,) == (402,)
    assert np.all(np.isfinite(lq))
    assert math.isclose(float(np.exp(lq).sum()), 1.0, rel_tol=0, abs_tol=1e-13)
    # symmetric grid -> symmetric masses
    np.testing.assert_allclose(lq, lq[::-1], rtol=1e-13)
    # far tails: ln Phi(-10) = -53.23128515051247
    assert math.isclose(lq[0], -53.23128515051247, rel_tol=1e-12)
    assert math.isclose(lq[-1], -53.23128515051247, rel_tol=1e-12)


def test_log_normal_mass_far_tail_bins_finite():
    # bins far out where Phi differences underflow in linear space
    lo = np.array([-60.0, 40.0, 1000.0, -np.inf, 50.0, -0.01])
    hi = np.array([-59.95, 40.05, 1000.05, -45.0, np.inf, 0.02])
    lq = log_normal_mass(lo, hi)
    assert np.all(np.isfinite(lq))
    # naive linear-space difference would be 0 -> -inf
    with np.errstate(divide="ignore"):
        naive = np.log(scipy.stats.norm.cdf(hi) - scipy.stats.norm.cdf(lo))
    assert np.isneginf(naive[:5]).all()
    # compare with Mills-ratio asymptotics for the upper tail [50, inf)
    x = 50.0
    approx = -x * x / 2 - math.log(x * math.sqrt(2 * math.pi)) + math.log1p(-1 / x**2 + 3 / x**4)
    assert math.isclose(lq[4], approx, rel_tol=1e-9)
    # mirrored bins agree
    assert math.isclose(
        log_normal_mass(np.array([40.0]), np.array([40.05]))[0],
        log_normal_mass(np.array([-40.05]), np.array([-40.0]))[0],
        rel_tol=1e-14,
    )


def test_log_normal_mass_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40

    def exact(a, b):
        return float(mpmath.log(mpmath.ncdf(b) - mpmath.ncdf(a)))

    e = zbin_edges()
    idx = [1, 2, 50, 150, 199, 200, 201, 250, 399, 400]
    lq = log_normal_mass(e[:-1][idx], e[1:][idx])
    for i, v in zip(idx, lq, strict=True):
        assert math.isclose(v, exact(e[i], e[i + 1]), rel_tol=1e-12), i
    # shifted / scaled bins as used by kl_fit, including ones straddling zero
    m, s = 0.3, 1.7
    lo, hi = (e[1:-2] - m) / s, (e[2:-1] - m) / s
    lq = log_normal_mass(lo, hi)
    for j in range(0, lo.size, 37):
        assert math.isclose(lq[j], exact(lo[j], hi[j]), rel_tol=1e-11, abs_tol=1e-12), j
    # infinite tails
    assert math.isclose(
        log_normal_mass(np.array([-np.inf]), np.array([-30.0]))[0],
        float(mpmath.log(mpmath.ncdf(-30))),
        rel_tol=1e-13,
    )


def test_log_normal_mass_whole_line_pieces():
    # arbitrary partition of the line: masses sum to 1
    cuts = np.concatenate([[-np.inf], np.sort(np.random.default_rng(1).normal(0, 3, 50)), [np.inf]])
    lq = log_normal_mass(cuts[:-1], cuts[1:])
    assert math.isclose(float(np.exp(lq).sum()), 1.0, abs_tol=1e-13)


# ---------------------------------------------------------------- moments


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moments_against_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 1.5, size=(37, 53)) - 1.0
    st = element_stats(x)
    assert set(st) == set(ELEMENT_KEYS)
    assert math.isclose(st["mean"], x.mean(), rel_tol=1e-12)
    assert math.isclose(st["std"], np.std(x), rel_tol=1e-12)
    assert math.isclose(st["skew"], scipy.stats.skew(x, axis=None), rel_tol=1e-10)
    assert math.isclose(st["kurt"], scipy.stats.kurtosis(x, axis=None, fisher=True), rel_tol=1e-10)
    assert st["min"] == x.min() and st["max"] == x.max()
    assert st["n_nonfinite"] == 0
    assert st["zhist"].dtype == np.int64 and st["zhist"].shape == (402,)
    assert st["zhist"].sum() == x.size
    assert st["hist"].dtype == np.int64 and st["hist"].shape == (bin_edges().size - 1,)
    assert st["hist"].sum() == x.size


def test_upcast_from_float32():
    x = np.random.default_rng(3).standard_normal((20, 30)).astype(np.float32)
    a, b = element_stats(x), element_stats(x.astype(np.float64))
    for k in ("mean", "std", "skew", "kurt", "entropy", "kl_gauss"):
        assert a[k] == b[k]


# ---------------------------------------------------------------- histogram-based values


def test_standard_normal_large_sample(normal_1e6):
    x, st = normal_1e6
    assert abs(st["entropy"] - GAUSS_H) < 2e-3
    assert abs(st["entropy_mm"] - GAUSS_H) < 2e-3
    assert abs(st["entropy_residual"]) < 2e-3
    assert math.isclose(
        st["entropy_residual"],
        st["entropy"] - 0.5 * math.log(2 * math.pi * math.e * st["std"] ** 2),
        abs_tol=1e-14,
    )
    assert abs(st["kl_gauss_mm"]) < 1e-3
    assert 0 < st["kl_gauss"] < 1e-3
    assert abs(st["mu_fit"] - 0.0) < 1e-2
    assert abs(st["sigma_fit"] - 1.0) < 1e-2
    assert 0 < st["kl_fit"] < 1e-3
    assert st["tail_mass"] == 0.0
    assert st["zhist"][0] == 0 and st["zhist"][-1] == 0


def test_miller_madow_corrections(normal_1e6):
    x, st = normal_1e6
    n = x.size
    zh = st["zhist"]
    m_inner = int((zh[1:-1] > 0).sum())
    m_all = int((zh > 0).sum())
    assert math.isclose(st["entropy_mm"], st["entropy"] + (m_inner - 1) / (2 * n), abs_tol=1e-15)
    assert math.isclose(st["kl_gauss_mm"], st["kl_gauss"] - (m_all - 1) / (2 * n), abs_tol=1e-15)


def test_entropy_by_hand_small():
    # direct recomputation of the plug-in formula with np.histogram on the inner grid
    x = np.random.default_rng(4).standard_normal(5000) * 2.5 + 1.0
    st = element_stats(x)
    z = (x - x.mean()) / x.std()
    e = zbin_edges()
    counts, _ = np.histogram(z, bins=e[1:-1])  # inner bins; only the last bin differs (closed)
    p = counts[counts > 0] / x.size
    S = math.log(x.std()) - float(np.sum(p * np.log(p / 0.05)))
    assert math.isclose(st["entropy"], S, abs_tol=1e-12)
    np.testing.assert_array_equal(st["zhist"][1:-1], counts)


def test_shifted_scaled_normal():
    x = np.random.default_rng(5).normal(3.0, 0.5, size=(1000, 1000))
    st = element_stats(x)
    assert abs(st["entropy"] - 0.5 * math.log(2 * math.pi * math.e * 0.25)) < 2e-3
    assert abs(st["entropy_residual"]) < 2e-3
    assert abs(st["kl_gauss_mm"]) < 1e-3
    assert abs(st["mu_fit"] - 3.0) < 1e-2
    assert abs(st["sigma_fit"] - 0.5) < 1e-2
    assert st["tail_mass"] == 0.0


def test_uniform_entropy():
    width, lo = 0.37, -1.0
    x = np.random.default_rng(6).uniform(lo, lo + width, size=(1000, 1000))
    st = element_stats(x)
    # The two partially covered bins at the support's ends bias the plug-in estimate up by
    # at most dz * density / e per end (density 1/(2 sqrt 3) in z): <= 0.0106 in total.
    assert abs(st["entropy"] - math.log(width)) < 1.1e-2
    # uniform entropy is below the Gaussian of the same variance by 0.5 ln(pi e / 6)
    assert abs(st["entropy_residual"] + 0.5 * math.log(math.pi * math.e / 6)) < 1.1e-2
    # exact: the binned uniform distribution on the same z grid (sample mu, sigma)
    mu, sigma = x.mean(), x.std()
    za, zb = (lo - mu) / sigma, (lo + width - mu) / sigma
    e = zbin_edges()
    P = np.clip(np.minimum(e[1:], zb) - np.maximum(e[:-1], za), 0, None) / (zb - za)
    occ = P > 0
    S = math.log(sigma) - float(np.sum(P[occ] * np.log(P[occ] / 0.05)))
    assert abs(st["entropy"] - S) < 5e-4
    lq = log_normal_mass(e[:-1], e[1:])
    kl = float(np.sum(P[occ] * (np.log(P[occ]) - lq[occ])))
    assert abs(st["kl_gauss"] - kl) < 5e-4
    assert abs(kl - 0.5 * math.log(math.pi * math.e / 6)) < 1.1e-2


def test_laplace_kl():
    b = 0.02
    x = np.random.default_rng(7).laplace(0.0, b, size=(1000, 1000))
    st = element_stats(x)
    h_laplace = 1 + math.log(2 * b)
    kl = 0.5 * math.log(2 * math.pi * math.e * 2 * b * b) - h_laplace  # = 0.5 ln(pi e) - 1
    assert math.isclose(kl, 0.5 * math.log(math.pi * math.e) - 1, abs_tol=1e-12)
    assert abs(st["kl_gauss"] - kl) < 5e-3
    assert abs(st["kl_gauss_mm"] - kl) < 5e-3
    assert abs(st["entropy"] - h_laplace) < 5e-3
    assert abs(st["kurt"] - 3.0) < 0.1
    # the core fit tracks the sharper Laplace core: sigma_fit != std, KL to the fit exists
    assert np.isfinite(st["kl_fit"]) and np.isfinite(st["sigma_fit"])


def test_fit_against_polyfit():
    x = np.random.default_rng(8).standard_t(5, size=200_000)
    st = element_stats(x)
    z = (x - x.mean()) / x.std()
    e = zbin_edges()
    zh = st["zhist"]
    c = 0.5 * (e[1:-2] + e[2:-1])
    cnt = zh[1:-1]
    sel = (np.abs(c) <= 2) & (cnt > 0)
    y = np.log(cnt[sel] / z.size / 0.05)
    # np.polyfit minimises sum (w (y - P))^2, so w = sqrt(counts)
    cc, bb, _aa = np.polyfit(c[sel], y, 2, w=np.sqrt(cnt[sel]))
    s = math.sqrt(-1 / (2 * cc))
    m = bb * s * s
    assert math.isclose(st["mu_fit"], x.mean() + x.std() * m, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(st["sigma_fit"], x.std() * s, rel_tol=1e-9)
    # kl_fit by a linear-space computation, upper half via the survival function (fine
    # here: the occupied t_5 bins are not far enough out to underflow)
    lo_, hi_ = (e[:-1] - m) / s, (e[1:] - m) / s
    up = lo_ + hi_ > 0
    norm = scipy.stats.norm
    q = np.where(up, norm.sf(lo_) - norm.sf(hi_), norm.cdf(hi_) - norm.cdf(lo_))
    p = zh / z.size
    occ = p > 0
    kl = float(np.sum(p[occ] * np.log(p[occ] / q[occ])))
    assert math.isclose(st["kl_fit"], kl, rel_tol=1e-6)


def test_fit_nan_when_curvature_nonnegative_or_too_few_bins():
    # two-point distribution: only 2 occupied bins (z = +-1) -> fewer than 3 -> NaN
    x = np.array([0.0, 1.0] * 50)
    st = element_stats(x)
    assert math.isnan(st["mu_fit"]) and math.isnan(st["sigma_fit"]) and math.isnan(st["kl_fit"])
    assert np.isfinite(st["entropy"]) and np.isfinite(st["kl_gauss"])
    # U-shaped (arcsine) distribution: convex log-density in the core -> c > 0 -> NaN
    u = np.random.default_rng(9).uniform(0, 1, 200_000)
    x = np.sin(np.pi * (u - 0.5))
    st = element_stats(x)
    assert math.isnan(st["mu_fit"]) and math.isnan(st["sigma_fit"]) and math.isnan(st["kl_fit"])


def test_tail_mass_and_bin_convention():
    # 1 outlier among many zeros: z of the outlier = sqrt(n-1) > 10 for n = 200
    x = np.zeros(200)
    x[0] = 1.0
    st = element_stats(x)
    assert st["zhist"][-1] == 1 and st["zhist"][0] == 0
    assert st["tail_mass"] == 1 / 200
    assert np.isfinite(st["kl_gauss"])  # tail bin has finite ln q
    # values exactly on a raw edge go to the bin that starts there: [e_i, e_{i+1})
    e = bin_edges()
    st = element_stats(np.array([e[10], e[10], e[500]]))
    assert st["hist"][10] == 2 and st["hist"][500] == 1 and st["hist"].sum() == 3
    # first/last raw bins are unbounded: nothing dropped
    st = element_stats(np.array([-1e30, 1e30, 0.0, 1e-300]))
    assert st["hist"][0] == 1 and st["hist"][-1] == 1 and st["hist"].sum() == 4


def test_constant_matrix():
    for c in (0.0, 0.1, -3.7e-5):
        st = element_stats(np.full((13, 17), c))
        assert st["mean"] == c and st["std"] == 0.0
        assert st["skew"] == 0.0 and st["kurt"] == 0.0
        assert st["min"] == c and st["max"] == c
        for k in HIST_KEYS:
            assert math.isnan(st[k]), k
        assert st["zhist"].sum() == 0
        assert st["hist"].sum() == 13 * 17


def test_nonfinite_entries_excluded_and_counted():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((30, 40))
    y = x.copy()
    y[0, 0], y[3, 7], y[29, 39] = np.nan, np.inf, -np.inf
    clean = np.delete(x.ravel(), [0, 3 * 40 + 7, 29 * 40 + 39])
    a, b = element_stats(y), element_stats(clean)
    assert a["n_nonfinite"] == 3 and b["n_nonfinite"] == 0
    for k in ELEMENT_KEYS:
        if k == "n_nonfinite":
            continue
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), k


def test_all_nonfinite():
    st = element_stats(np.array([[np.nan, np.inf], [-np.inf, np.nan]]))
    assert st["n_nonfinite"] == 4
    for k in ELEMENT_KEYS:
        if k in ("zhist", "hist"):
            assert st[k].sum() == 0
        elif k != "n_nonfinite":
            assert math.isnan(st[k]), k


# ---------------------------------------------------------------- spectra


def test_spectral_hand_examples():
    st = spectral_stats(np.array([2.0, 1.0, 0.0]))
    assert set(st) == set(SPECTRAL_KEYS)
    assert st["spectral_norm"] == 2.0
    assert math.isclose(st["frobenius_norm"], math.sqrt(5))
    assert math.isclose(st["stable_rank"], 1.25)
    assert st["condition_number"] == math.inf
    assert math.isclose(st["participation_ratio"], 25 / 17)
    H = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert math.isclose(st["spectral_entropy"], H)
    assert math.isclose(st["effective_rank"], math.exp(H))

    st = spectral_stats(np.ones(4) * 3.0)
    assert math.isclose(st["stable_rank"], 4)
    assert math.isclose(st["effective_rank"], 4)
    assert math.isclose(st["participation_ratio"], 4)
    assert st["condition_number"] == 1.0

    st = spectral_stats(np.array([3.0, 4.0]))  # sorted internally
    assert st["spectral_norm"] == 4.0 and math.isclose(st["condition_number"], 4 / 3)
    assert math.isclose(st["frobenius_norm"], 5.0)

    st = spectral_stats(np.zeros(3))
    assert st["spectral_norm"] == 0.0 and st["frobenius_norm"] == 0.0
    assert math.isnan(st["stable_rank"]) and math.isnan(st["condition_number"])


def test_spectral_bounds_random():
    s = np.sort(np.random.default_rng(11).exponential(size=16))[::-1]
    st = spectral_stats(s)
    assert 1 <= st["participation_ratio"] <= 16
    assert 1 <= st["effective_rank"] <= 16
    assert 1 <= st["stable_rank"] <= 16


def _qr_spectrum(WQ, WK):
    _, RQ = np.linalg.qr(WQ.T)
    _, RK = np.linalg.qr(WK.T)
    return np.linalg.svd(RQ @ RK.T, compute_uv=False)


@pytest.mark.parametrize("d_head,d_model", [(4, 32), (8, 64)])
def test_head_reference(d_head, d_model):
    rng = np.random.default_rng(d_head)
    WQ = rng.standard_normal((d_head, d_model)) * 0.05
    WK = rng.standard_normal((d_head, d_model)) * 0.07 + 0.01
    ref = head_reference(WQ, WK)
    assert set(ref) == {"W_Q", "W_K", "W_QK"}
    for name, M in (("W_Q", WQ), ("W_K", WK), ("W_QK", WQ.T @ WK)):
        r = ref[name]
        assert set(r) == set(ELEMENT_KEYS) | set(SPECTRAL_KEYS) | {"singular_values"}
        assert r["singular_values"].shape == (d_head,)
        e = element_stats(M)
        for k in ("mean", "std", "skew", "kurt", "entropy", "kl_gauss"):
            assert r[k] == e[k]
    sv = ref["W_QK"]["singular_values"]
    np.testing.assert_allclose(sv, _qr_spectrum(WQ, WK), rtol=0, atol=1e-12 * sv[0])
    s2 = spectral_stats(_qr_spectrum(WQ, WK))
    for k in SPECTRAL_KEYS:
        assert math.isclose(ref["W_QK"][k], s2[k], rel_tol=1e-9), k
    np.testing.assert_allclose(ref["W_Q"]["singular_values"], np.linalg.svd(WQ, compute_uv=False), rtol=1e-12)
    assert math.isclose(ref["W_QK"]["frobenius_norm"], np.linalg.norm(WQ.T @ WK), rel_tol=1e-12)


def test_head_reference_rank_deficient_and_nonfinite():
    rng = np.random.default_rng(12)
    WQ = rng.standard_normal((4, 16))
    WK = rng.standard_normal((4, 16))
    WQ[3] = WQ[0]  # rank 3 -> W_QK has a zero singular value
    ref = head_reference(WQ, WK)
    assert ref["W_QK"]["singular_values"][-1] < 1e-12 * ref["W_QK"]["singular_values"][0]
    assert ref["W_Q"]["condition_number"] > 1e12
    WQn = WQ.copy()
    WQn[1, 2] = np.nan
    ref_n = head_reference(WQn, WK)
    assert ref_n["W_Q"]["n_nonfinite"] == 1
    assert ref_n["W_QK"]["n_nonfinite"] == 16  # row 2 of W_QK = WQ[:, 2] . WK
    WQ0 = WQn.copy()
    WQ0[1, 2] = 0.0
    np.testing.assert_allclose(ref_n["W_QK"]["singular_values"], _qr_spectrum(WQ0, WK), atol=1e-12)


# ---------------------------------------------------------------- near-edge helper


def test_near_edge_count():
    e = zbin_edges()
    vals = np.array([0.05 + 1e-9, 0.075, -10.0, 3.0 - 1e-7, np.nan, np.inf, 20.0, 0.0])
    # near: 0.05+1e-9, -10.0, 3-1e-7, 0.0 ; not: 0.075, 20.0 (beyond last finite edge), nan, inf
    assert near_edge_count(vals, e, rtol=1e-6, atol=1e-6) == 4
    assert near_edge_count(vals, e, rtol=0.0, atol=0.0) == 2  # exact hits -10 and 0
    assert near_edge_count(np.array([]), e, 1e-6, 1e-6) == 0
