"""Independent float64 reference implementation of every statistic of SPEC section 4.

This module is the oracle the JAX kernels are tested against. It is written directly from
the definitions of docs/store.md ("The statistics") with numpy/scipy in float64, as plainly as
possible (clarity over speed; it is meant for small matrices). It imports nothing from the
kernels except the two histogram grids (``zbin_edges``, ``bin_edges``); in particular the
log-space normal bin mass is re-derived here (:func:`log_normal_mass`) rather than taken
from ``kernels.bins.log_normal_bin_mass``, so that the kernel's version can be checked
against it.

Decisions where the SPEC is silent (also listed in the module-level docs of each function):

* "sigma = 0" is decided exactly: it holds when all finite entries are equal (min == max),
  and then mu is that common value and sigma is exactly 0. (Computing sigma from float
  moments of a constant array can give a tiny non-zero value from rounding of the mean.)
* With n = 0 finite entries every scalar is NaN and every count is 0.
* With sigma = 0: skew = kurt = 0, zhist all zeros, and every z-histogram-based value
  (entropy, entropy_residual, entropy_mm, kl_gauss, kl_gauss_mm, mu_fit, sigma_fit, kl_fit,
  tail_mass) is NaN. ``hist`` (raw values) is still filled.
* Spectra: non-finite entries of W_Q / W_K are replaced by 0 before any decomposition
  (element statistics still see them and count them in ``n_nonfinite``). An all-zero
  spectrum (s_1 = 0) gives spectral_norm = frobenius_norm = 0 and NaN for every ratio
  (stable_rank, spectral_entropy, effective_rank, participation_ratio, condition_number);
  otherwise condition_number = inf when s_k = 0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_ndtr

try:
    from spinjax.kernels.bins import bin_edges, zbin_edges
except ImportError:  # repo checkout without an installed package: kernels/ is top-level
    from kernels.bins import bin_edges, zbin_edges

__all__ = [
    "ELEMENT_KEYS",
    "SPECTRAL_KEYS",
    "MATRICES",
    "log_normal_mass",
    "element_stats",
    "spectral_stats",
    "head_reference",
    "near_edge_count",
]

ELEMENT_KEYS = (
    "mean", "std", "skew", "kurt", "min", "max",
    "entropy", "entropy_residual", "entropy_mm",
    "kl_gauss", "kl_gauss_mm", "mu_fit", "sigma_fit", "kl_fit",
    "tail_mass", "zhist", "hist", "n_nonfinite",
)  # fmt: skip
SPECTRAL_KEYS = (
    "spectral_norm", "frobenius_norm", "stable_rank", "spectral_entropy",
    "effective_rank", "participation_ratio", "condition_number",
)  # fmt: skip
MATRICES = ("W_Q", "W_K", "W_QK")

NAN = float("nan")


# --------------------------------------------------------------------------------------
# ln of the standard-normal mass of a bin
# --------------------------------------------------------------------------------------


def _log1mexp(x: float) -> float:
    """ln(1 - exp(x)) for x <= 0, accurate for x near 0 and for x very negative."""
    if x == -math.inf:
        return 0.0
    if x > -math.log(2.0):
        return math.log(-math.expm1(x))
    return math.log1p(-math.exp(x))


def log_normal_mass(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """ln(Phi(hi) - Phi(lo)) element-wise for lo < hi (either may be infinite), in float64.

    SPEC 4 (``kl_gauss``): "Compute ln q_i in log space (log-ndtr, upper half mirrored),
    never as a difference of CDFs". A bin whose centre lies above zero is mirrored to
    [-hi, -lo) (same mass by symmetry), so the bin handled always has centre <= 0. Then

        ln q = ln Phi(b) + ln(1 - exp(ln Phi(a) - ln Phi(b)))

    with ``scipy.special.log_ndtr``. In the lower half ln Phi is accurate down to the far
    tail (no underflow: ln Phi(-40) is about -804), and the difference of CDFs is never
    formed: the ratio Phi(a)/Phi(b) = exp(ln Phi(a) - ln Phi(b)) <= 1 enters through
    ln(1 - exp(x)) evaluated with expm1/log1p, so neither cancellation nor underflow occurs.
    The tail bin [-inf, b) gives ln Phi(b) exactly. Plain loop, one bin at a time.
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    lo, hi = np.broadcast_arrays(lo, hi)
    out = np.empty(lo.shape, dtype=np.float64)
    for idx in np.ndindex(lo.shape):
        a, b = float(lo[idx]), float(hi[idx])
        if not a < b:
            raise ValueError(f"empty or reversed bin [{a}, {b})")
        # centre of the bin; -inf/+inf for the unbounded tails
        centre = a + b if math.isfinite(a) and math.isfinite(b) else (a if math.isinf(a) else b)
        if centre > 0:
            a, b = -b, -a
        log_phi_b = float(log_ndtr(b))
        log_phi_a = float(log_ndtr(a))  # -inf for a = -inf
        out[idx] = log_phi_b + _log1mexp(log_phi_a - log_phi_b)
    return out


# --------------------------------------------------------------------------------------
# element statistics
# --------------------------------------------------------------------------------------


def _bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value, bins [e_i, e_{i+1}) (edges[0] = -inf, edges[-1] = +inf)."""
    return np.searchsorted(edges, values, side="right") - 1


def _kl_binned(counts: np.ndarray, n: int, log_q: np.ndarray) -> float:
    """sum_i p_i ln(p_i / q_i), p_i = counts_i / n, terms with p_i = 0 contribute 0."""
    occupied = counts > 0
    p = counts[occupied] / n
    return float(np.sum(p * (np.log(p) - log_q[occupied])))


def element_stats(M: np.ndarray, zmax: float = 10.0, nz: int = 402) -> dict:
    """Element statistics of one matrix, SPEC section 4, over its finite entries.

    * mean = mu, std = sigma (population, ddof 0), skew = m3 / m2^1.5,
      kurt = m4 / m2^2 - 3, with m_k the central moments of the n finite entries;
      min / max of the finite entries.
    * zhist: counts of z = (w - mu) / sigma on zbin_edges(zmax, nz), bins [e_i, e_{i+1}).
      tail_mass = (zhist[0] + zhist[-1]) / n.
    * entropy S = ln(sigma) - sum_{inner i} p_i ln(p_i / dz), p_i = zhist_i / n,
      dz = 2 zmax / (nz - 2); entropy_residual = S - 0.5 ln(2 pi e sigma^2);
      entropy_mm = S + (m - 1) / (2n), m = occupied inner bins.
    * kl_gauss = sum_{all i} p_i ln(p_i / q_i), q_i the standard-normal mass of z-bin i
      (log space); kl_gauss_mm = kl_gauss - (m - 1) / (2n), m = occupied bins (all).
    * Gaussian core fit: weighted least squares of ln(p_i / dz) = a + b z + c z^2 over inner
      bins with |centre| <= 2 and count > 0, weights = counts; s = sqrt(-1 / (2c)),
      m = b s^2, mu_fit = mu + sigma m, sigma_fit = sigma s, kl_fit = sum p_i ln(p_i / q'_i)
      with q'_i the mass of N(m, s^2) on the same z bins. All three NaN if c >= 0 or fewer
      than 3 bins qualify.
    * hist: counts of the finite raw values on bin_edges(); n_nonfinite = size - n.

    sigma = 0 is decided exactly (all finite entries equal): skew = kurt = 0, zhist zeros,
    z-histogram values NaN. n = 0: every scalar NaN, every count 0.
    """
    x_all = np.asarray(M, dtype=np.float64).ravel()
    finite = np.isfinite(x_all)
    x = x_all[finite]
    n = int(x.size)
    z_edges = np.asarray(zbin_edges(zmax, nz), dtype=np.float64)
    r_edges = np.asarray(bin_edges(), dtype=np.float64)

    out: dict = {k: NAN for k in ELEMENT_KEYS}
    out["zhist"] = np.zeros(nz, dtype=np.int64)
    out["hist"] = np.zeros(r_edges.size - 1, dtype=np.int64)
    out["n_nonfinite"] = int(x_all.size - n)
    if n == 0:
        return out

    out["hist"] = np.bincount(_bin_index(x, r_edges), minlength=r_edges.size - 1).astype(np.int64)
    out["min"] = float(x.min())
    out["max"] = float(x.max())

    if x.min() == x.max():  # sigma = 0 exactly
        out.update(mean=float(x[0]), std=0.0, skew=0.0, kurt=0.0)
        return out

    mu = float(np.mean(x))
    d = x - mu
    m2 = float(np.mean(d**2))
    m3 = float(np.mean(d**3))
    m4 = float(np.mean(d**4))
    sigma = math.sqrt(m2)
    out.update(mean=mu, std=sigma, skew=m3 / m2**1.5, kurt=m4 / m2**2 - 3.0)

    # standardized histogram
    z = d / sigma
    zhist = np.bincount(_bin_index(z, z_edges), minlength=nz).astype(np.int64)
    out["zhist"] = zhist
    out["tail_mass"] = float(zhist[0] + zhist[-1]) / n
    dz = 2.0 * zmax / (nz - 2)
    p = zhist / n

    # entropy over the inner bins 1 .. nz-2
    inner = np.zeros(nz, dtype=bool)
    inner[1:-1] = True
    occ_inner = inner & (zhist > 0)
    S = math.log(sigma) - float(np.sum(p[occ_inner] * np.log(p[occ_inner] / dz)))
    out["entropy"] = S
    out["entropy_residual"] = S - 0.5 * math.log(2.0 * math.pi * math.e * sigma**2)
    out["entropy_mm"] = S + (int(occ_inner.sum()) - 1) / (2.0 * n)

    # KL against the standard normal on all bins
    log_q = log_normal_mass(z_edges[:-1], z_edges[1:])
    kl = _kl_binned(zhist, n, log_q)
    out["kl_gauss"] = kl
    out["kl_gauss_mm"] = kl - (int((zhist > 0).sum()) - 1) / (2.0 * n)

    # Gaussian core fit
    centres = 0.5 * (z_edges[:-1] + z_edges[1:])  # inf/nan at the tails, excluded by `inner`
    sel = np.zeros(nz, dtype=bool)
    sel[1:-1] = (np.abs(centres[1:-1]) <= 2.0) & (zhist[1:-1] > 0)
    if int(sel.sum()) >= 3:
        zc = centres[sel]
        y = np.log(p[sel] / dz)
        w = zhist[sel].astype(np.float64)
        # minimise sum w (y - a - b z - c z^2)^2  <=>  ordinary LS on rows scaled by sqrt(w)
        A = np.stack([np.ones_like(zc), zc, zc**2], axis=1)
        sw = np.sqrt(w)
        (a, b, c), *_ = np.linalg.lstsq(A * sw[:, None], y * sw, rcond=None)
        if c < 0:
            s = math.sqrt(-1.0 / (2.0 * c))
            m = b * s**2
            out["mu_fit"] = float(mu + sigma * m)
            out["sigma_fit"] = float(sigma * s)
            log_qf = log_normal_mass((z_edges[:-1] - m) / s, (z_edges[1:] - m) / s)
            out["kl_fit"] = _kl_binned(zhist, n, log_qf)
    return out


# --------------------------------------------------------------------------------------
# spectral statistics
# --------------------------------------------------------------------------------------


def spectral_stats(s: np.ndarray) -> dict:
    """Spectral statistics of SPEC section 4 from singular values s_1 >= ... >= s_k.

    lambda_i = s_i^2, p_i = lambda_i / sum(lambda):
    spectral_norm = s_1; frobenius_norm = sqrt(sum lambda); stable_rank = sum lambda / lambda_1;
    spectral_entropy = -sum p_i ln p_i (0 ln 0 = 0); effective_rank = exp(spectral_entropy);
    participation_ratio = (sum lambda)^2 / sum lambda^2; condition_number = s_1 / s_k
    (inf when s_k = 0). The input is sorted descending first. If s_1 = 0 (all zero) every
    ratio is NaN.
    """
    s = np.sort(np.asarray(s, dtype=np.float64).ravel())[::-1]
    lam = s**2
    total = float(np.sum(lam))
    s1, sk = float(s[0]), float(s[-1])
    out = {
        "spectral_norm": s1,
        "frobenius_norm": math.sqrt(total),
    }
    if s1 == 0.0:
        out.update({k: NAN for k in SPECTRAL_KEYS if k not in out})
        return out
    p = lam / total
    nz_p = p[p > 0]
    H = float(-np.sum(nz_p * np.log(nz_p)))
    out.update(
        stable_rank=total / float(lam[0]),
        spectral_entropy=H,
        effective_rank=math.exp(H),
        participation_ratio=total**2 / float(np.sum(lam**2)),
        condition_number=math.inf if sk == 0.0 else s1 / sk,
    )
    return out


# --------------------------------------------------------------------------------------
# one head
# --------------------------------------------------------------------------------------


def head_singular_values(WQ: np.ndarray, WK: np.ndarray) -> dict[str, np.ndarray]:
    """Descending singular values (d_head each) of W_Q, W_K and the explicit W_QK, float64;
    non-finite entries of WQ / WK replaced by 0 first."""
    WQ0, WK0 = (np.where(np.isfinite(w), w, 0.0).astype(np.float64) for w in (WQ, WK))
    d_head = WQ0.shape[0]
    return {
        "W_Q": np.linalg.svd(WQ0, compute_uv=False)[:d_head],
        "W_K": np.linalg.svd(WK0, compute_uv=False)[:d_head],
        "W_QK": np.linalg.svd(WQ0.T @ WK0, compute_uv=False)[:d_head],
    }


def head_reference(WQ: np.ndarray, WK: np.ndarray, zmax: float = 10.0, nz: int = 402) -> dict[str, dict]:
    """All statistics of one head: {"W_Q": {...}, "W_K": {...}, "W_QK": {...}}.

    WQ, WK have shape (d_head, d_model). W_QK = WQ^T WK (SPEC section 1) is formed explicitly
    in float64 (its element stats see non-finite entries produced by non-finite factors).
    Each entry is element_stats(M) merged with spectral_stats(singular values) plus
    ``singular_values`` (length d_head, descending): for W_Q / W_K np.linalg.svd of the
    matrix, for W_QK the top d_head singular values of the explicit d_model x d_model matrix
    (the reference decomposes it on purpose; the kernel must use the factors).
    For the spectra, non-finite entries of WQ / WK are replaced by 0 first.
    """
    WQ = np.asarray(WQ, dtype=np.float64)
    WK = np.asarray(WK, dtype=np.float64)
    if WQ.ndim != 2 or WQ.shape != WK.shape:
        raise ValueError(f"WQ {WQ.shape} and WK {WK.shape} must both be (d_head, d_model)")
    WQK = WQ.T @ WK
    spectra = head_singular_values(WQ, WK)
    elements = {"W_Q": WQ, "W_K": WK, "W_QK": WQK}
    result: dict[str, dict] = {}
    for name in MATRICES:
        sv = np.asarray(spectra[name], dtype=np.float64)
        stats = element_stats(elements[name], zmax=zmax, nz=nz)
        stats.update(spectral_stats(sv))
        stats["singular_values"] = sv
        result[name] = stats
    return result


# --------------------------------------------------------------------------------------
# histogram tolerance helper
# --------------------------------------------------------------------------------------


def near_edge_count(values: np.ndarray, edges: np.ndarray, rtol: float = 1e-5, atol: float = 1e-6) -> int:
    """Number of finite values within rtol * |e| + atol of some finite edge e.

    Used to allow histogram count differences (kernel vs reference) only for entries that lie
    within float32 rounding of a bin edge: |count_kernel - count_ref| summed over bins must be
    <= 2 * near_edge_count(...) (each such entry can move one count between two bins).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    e = np.sort(np.asarray(edges, dtype=np.float64).ravel())
    e = e[np.isfinite(e)]
    if v.size == 0 or e.size == 0:
        return 0
    j = np.searchsorted(e, v)  # e[j-1] < v <= e[j]
    near = np.zeros(v.size, dtype=bool)
    for k in (j - 1, j):
        ok = (k >= 0) & (k < e.size)
        ek = e[np.clip(k, 0, e.size - 1)]
        near |= ok & (np.abs(v - ek) <= rtol * np.abs(ek) + atol)
    return int(near.sum())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (natural log) of two histograms of counts, in float64."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    half = [np.sum(x[x > 0] * np.log(x[x > 0] / m[x > 0])) for x in (p, q)]
    return float(0.5 * (half[0] + half[1]))
