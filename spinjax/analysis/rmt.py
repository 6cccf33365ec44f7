"""Analytic laws of the random-matrix null, for reference curves on figures (numpy/scipy, no JAX).

The null head is W_QK = W_Q^T W_K with W_Q, W_K (d_head, d) of i.i.d. Gaussian entries.
"Study scaling" is the source study's: N(0, 1) factors and W_QK divided by sqrt(d), so an
entry of W_QK has variance d_head / d. ``spinjax baseline --sigma s`` draws N(0, s^2) factors
and divides by nothing: its W_QK is the study's times ``s^2 sqrt(d)`` (``s = d**-0.25`` gives
the study's W_QK exactly), its factors the study's times ``s``.

Laws (r = d_head / d <= 1):

- an entry of W_QK (study scaling) is ``sum_a q_a k_a / sqrt(d)``, q, k ~ N(0, I_{d_head}): a
  symmetric variance-gamma law, variance d_head / d, excess kurtosis exactly 6 / d_head;
  :func:`negentropy` is its KL divergence from the Gaussian of the same variance;
- eigenvalues of ``W_Q W_Q^T / (d sigma^2)`` follow Marchenko-Pastur with ratio r (mean 1);
- eigenvalues of ``(W_Q W_Q^T)(W_K W_K^T) / (d sigma^2)^2``, the squared non-zero singular
  values of W_QK so normalised, follow the free product MP(r) x MP(r) (S-transform
  1 / (1 + r w)^2); the other d - d_head singular values of W_QK are exactly 0;
- a full-rank d x d Gaussian matrix has squared singular values (over d times the entry
  variance) distributed as Marchenko-Pastur with ratio 1.

References: Marchenko & Pastur (1967); Voiculescu's S-transform, e.g. Mingo & Speicher,
*Free Probability and Random Matrices* (2017), ch. 3; the variance-gamma law of a product of
Gaussian vectors, e.g. Gaunt (2014), *Variance-Gamma approximation via Stein's method*.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special


def study_scale(d: int, sigma: float) -> dict[str, float]:
    """Factor bringing a ``spinjax baseline --sigma`` null to the study's scaling, per matrix.

    >>> study_scale(64, 1.0)["W_QK"]
    0.125
    """
    return {"W_Q": 1.0 / sigma, "W_K": 1.0 / sigma, "W_QK": 1.0 / (sigma * sigma * math.sqrt(d))}


def marchenko_pastur_pdf(x: np.ndarray, ratio: float) -> np.ndarray:
    """Marchenko-Pastur density (mean 1) of the eigenvalues of ``X X^T / n``, X (p, n) with
    unit-variance entries and ``ratio = p / n`` in (0, 1]: support ``[(1 - sqrt r)^2, (1 + sqrt r)^2]``.

    >>> float(marchenko_pastur_pdf(np.array([1.0]), 1.0)[0]) == 1 / (2 * np.pi) * np.sqrt(3)
    True
    """
    x = np.asarray(x, np.float64)
    a, b = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    inside = (x > a) & (x < b)
    with np.errstate(invalid="ignore", divide="ignore"):
        pdf = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * np.pi * ratio * x)
    return np.where(inside, pdf, 0.0)


def free_mp_product_pdf(x: np.ndarray, ratio: float, factors: int = 2) -> np.ndarray:
    """Density of the free product of ``factors`` Marchenko-Pastur laws of ``ratio`` (each mean 1).

    With psi the moment transform, ``z (1 + psi) (1 + r psi)^factors = psi`` at ``z = 1 / x``;
    the density is ``|Im psi| / (pi x)`` on the complex root (0 off the support). ``factors=1``
    gives back :func:`marchenko_pastur_pdf`; ``factors=2`` is the law of W_QK's normalised
    squared singular values (module docstring).
    """
    x = np.atleast_1d(np.asarray(x, np.float64))
    out = np.zeros_like(x)
    r = float(ratio)
    base = np.polynomial.polynomial.polypow([1.0, r], factors)  # (1 + r psi)^k, ascending
    poly = np.polynomial.polynomial.polymul([1.0, 1.0], base)  # (1 + psi)(1 + r psi)^k
    for i, xi in enumerate(x):
        if xi <= 0:
            continue
        coeffs = poly / xi
        coeffs[1] -= 1.0  # ... - psi
        roots = np.polynomial.polynomial.polyroots(coeffs)
        out[i] = np.abs(roots.imag).max() / (np.pi * xi)
    return out


def free_mp_product_support(ratio: float, factors: int = 2) -> tuple[float, float]:
    """The support's edges, found on a grid (for plotting ranges), of :func:`free_mp_product_pdf`."""
    hi = (1 + math.sqrt(ratio)) ** (2 * factors) * 1.05
    grid = np.linspace(1e-6, hi, 4001)
    pdf = free_mp_product_pdf(grid, ratio, factors)
    on = np.flatnonzero(pdf > 1e-9 * pdf.max())
    return float(grid[max(on[0] - 1, 0)]), float(grid[min(on[-1] + 1, len(grid) - 1)])


def singular_value_quantiles(n: int, ratio: float = 1.0) -> np.ndarray:
    """Descending singular values of ``X / sqrt(n_cols)``, X with unit-variance entries, at the
    Marchenko-Pastur quantiles ``(k - 1/2) / n`` (k = 1..n): the large-size rank plot of ``n``
    singular values. For a square Gaussian matrix (ratio 1) they lie in [0, 2] (quarter circle).
    """
    a, b = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    s = np.linspace(math.sqrt(a), math.sqrt(b), 20001)
    pdf_s = 2 * s * marchenko_pastur_pdf(s * s, ratio)  # density of s = sqrt(lambda)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf_s[1:] + pdf_s[:-1]) * np.diff(s))])
    cdf /= cdf[-1]
    p = 1 - (np.arange(1, n + 1) - 0.5) / n
    return np.interp(p, cdf, s)


def variance_gamma_pdf(x: np.ndarray, d_head: int, scale: float = 1.0) -> np.ndarray:
    """Density of ``scale * sum_{a <= d_head} q_a k_a`` with q, k ~ N(0, I): variance
    ``scale^2 d_head``, ``|y|^nu K_nu(|y|) / (scale sqrt(pi) Gamma(d_head/2) 2^nu)``, y = x/scale,
    nu = (d_head - 1)/2, in log space (infinite at 0 only for d_head = 1). For nu >= 30, where
    K_nu overflows near 0, ``y^nu K_nu(y)`` comes from Debye's uniform expansion (4 terms,
    relative error ~ 1e-7).
    """
    y = np.abs(np.asarray(x, np.float64)) / scale
    nu = (d_head - 1) / 2
    norm = math.log(scale) + 0.5 * math.log(math.pi) + special.gammaln(d_head / 2) + nu * math.log(2)
    if nu >= _DEBYE_NU:
        return np.exp(_log_ynu_knu(y, nu) - norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pdf = nu * np.log(y) + np.log(special.kve(nu, y)) - y - norm
    if nu > 0:  # y^nu K_nu(y) -> 2^(nu - 1) Gamma(nu) at y = 0
        at0 = (nu - 1) * math.log(2) + special.gammaln(nu) - norm
        log_pdf = np.where(y == 0, at0, log_pdf)
    return np.exp(log_pdf)


_DEBYE_NU = 30.0


def _log_ynu_knu(y: np.ndarray, nu: float) -> np.ndarray:
    """ln(y^nu K_nu(y)) by Debye's expansion of K_nu(nu z), z = y / nu (finite at y = 0)."""
    z = y / nu
    w = np.sqrt(1 + z * z)
    t = 1 / w
    u = (1.0, (3 * t - 5 * t**3) / 24, (81 * t**2 - 462 * t**4 + 385 * t**6) / 1152,
         (30375 * t**3 - 369603 * t**5 + 765765 * t**7 - 425425 * t**9) / 414720)  # fmt: skip
    series = sum((-1) ** k * uk / nu**k for k, uk in enumerate(u))
    return (nu * (math.log(nu) - w + np.log1p(w)) + 0.5 * math.log(math.pi / (2 * nu))
            - 0.5 * np.log(w) + np.log(series))  # fmt: skip


def negentropy(d_head: int) -> float:
    """KL divergence of an entry of W_QK from the Gaussian of its variance (scale-free), by
    float64 quadrature of the variance-gamma density: 7.55e-3 at d_head 8, ~ (6/d_head)^2 / 48
    for large d_head. It is the true value that ``kl_gauss`` estimates for a random head, and
    the Gaussian entropy minus the true entropy.
    """
    s = math.sqrt(d_head)
    z = np.linspace(-16.0, 16.0, 160_000)  # even count: z = 0 (a log singularity at d_head 1) is skipped
    pdf = variance_gamma_pdf(z, d_head, 1.0 / s)  # unit variance
    ok = pdf > 0
    integrand = np.zeros_like(z)
    integrand[ok] = pdf[ok] * (np.log(pdf[ok]) + 0.5 * z[ok] ** 2 + 0.5 * math.log(2 * math.pi))
    return float(max(np.trapezoid(integrand, z), 0.0))


def null_curves(d: int, d_head: np.ndarray) -> dict[str, np.ndarray]:
    """Analytic element statistics of W_QK in the study's scaling, along ``d_head``:

    ``std`` = sqrt(d_head / d); ``entropy_gauss`` = 0.5 ln(2 pi e d_head / d) (the Gaussian of
    that std); ``entropy`` = entropy_gauss - negentropy (the exact law); ``kl_gauss`` =
    negentropy; ``kurt`` = 6 / d_head (exact excess kurtosis of an entry).
    """
    dh = np.asarray(d_head, np.float64)
    j = np.array([negentropy(int(round(v))) for v in dh.ravel()]).reshape(dh.shape)
    gauss = 0.5 * np.log(2 * np.pi * np.e * dh / d)
    return {"std": np.sqrt(dh / d), "entropy_gauss": gauss, "entropy": gauss - j, "kl_gauss": j,
            "kurt": 6.0 / dh}  # fmt: skip
