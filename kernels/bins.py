"""The two histogram grids of SPEC section 4: standardized (z) and shared raw-value."""

from __future__ import annotations

import numpy as np
from scipy.special import log_ndtr as scipy_log_ndtr

ZMAX = 10.0
NZ = 402  # 400 inner bins of width 0.05 plus two unbounded tail bins

# Raw grid: log-spaced magnitudes, RAW_PER_DECADE bins per decade from 10**RAW_LO_DECADE to
# 10**RAW_HI_DECADE on each side of zero, one central bin (-10**lo, 10**lo) and two unbounded
# tails. 48 per decade gives a relative width of 10**(1/48) - 1 = 4.9% (SPEC: <= 5% for
# abs(w) >= 1e-5); the range 1e-7..1e4 leaves margin around the required 1e-6..1e3.
RAW_PER_DECADE = 48
RAW_LO_DECADE = -7
RAW_HI_DECADE = 4
RAW_PER_SIDE = RAW_PER_DECADE * (RAW_HI_DECADE - RAW_LO_DECADE)
NB = 2 * RAW_PER_SIDE + 3


def zbin_edges(zmax: float = ZMAX, nz: int = NZ) -> np.ndarray:
    """Edges of the standardized histogram: [-inf, linspace(-zmax, zmax, nz - 1), +inf].

    Bin i is [e_i, e_{i+1}): ``nz - 2`` inner bins of width dz = 2 zmax / (nz - 2) (0.05 by
    default) and two unbounded tail bins, |z| beyond zmax.

    Examples:
      >>> from spinjax.kernels import zbin_edges
      >>> e = zbin_edges()
      >>> print(len(e), e[0], e[1], round(e[2] - e[1], 4), e[-2], e[-1])
      403 -inf -10.0 0.05 10.0 inf
      >>> print(zbin_edges(zmax=1.0, nz=6))
      [-inf -1.  -0.5  0.   0.5  1.   inf]
    """
    inner = np.linspace(-zmax, zmax, nz - 1)
    return np.concatenate([[-np.inf], inner, [np.inf]])


def bin_edges() -> np.ndarray:
    """Edges of the shared raw-value grid, len NB + 1, first -inf and last +inf.

    Bin i is [edges[i], edges[i+1]). The positive magnitudes are exactly
    10**(k / RAW_PER_DECADE), k = -336..192 (1e-7..1e4); the negative side mirrors them, and
    the central bin [-1e-7, 1e-7) holds the values too small to resolve. Every bin but the
    central and the tail ones spans a relative width of 10**(1/48) - 1 = 4.9%.

    Examples:
      >>> from spinjax.kernels import NB, bin_edges
      >>> e = bin_edges()
      >>> print(len(e), NB, e[0], e[1], e[-2], e[-1])
      1060 1059 -inf -10000.0 10000.0 inf
      >>> print(e[529], e[530], e[866])  # the central bin, and 1.0 is an edge
      -1e-07 1e-07 1.0
      >>> print(round(e[867] / e[866] - 1, 4))
      0.0491
    """
    k = np.arange(RAW_LO_DECADE * RAW_PER_DECADE, RAW_HI_DECADE * RAW_PER_DECADE + 1)
    pos = 10.0 ** (k / RAW_PER_DECADE)
    return np.concatenate([[-np.inf], -pos[::-1], pos, [np.inf]])


def log_normal_bin_mass(lo: np.ndarray, hi: np.ndarray, *, xp=np, log_ndtr=scipy_log_ndtr):
    """ln(Phi(hi) - Phi(lo)) for lo < hi, in log space so that it never underflows or cancels.

    Bins on the upper half are mirrored to the lower half, where log_ndtr is accurate;
    a bin that straddles zero has mass >= its larger half and is computed as 1 - both tails.
    ``xp`` and ``log_ndtr`` are numpy's and scipy's, or jax.numpy's and jax.scipy's, so that
    the kernels and the float64 references share this one definition.

    For a bin [a, b) at or below zero, ln(Phi(b) - Phi(a)) = ln Phi(b) + ln(1 - exp(ln Phi(a)
    - ln Phi(b))), the second term by ``expm1``; Phi(-x) = 1 - Phi(x) maps the upper half
    onto it. The difference of two CDFs would be 0 (ln = -inf) for the bin [30, 31) below.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels.bins import log_normal_bin_mass
      >>> lo = np.array([-np.inf, -1.0, -0.5, 30.0])
      >>> hi = np.array([0.0, 1.0, 0.5, 31.0])
      >>> for v in log_normal_bin_mass(lo, hi):
      ...     print(f"{v:.4f}")
      -0.6931
      -0.3817
      -0.9599
      -454.3212

    References:
      ``scipy.special.log_ndtr`` (ln Phi, accurate in the lower tail); M. Maechler,
      "Accurately computing log(1 - exp(-|a|))", CRAN Rmpfr vignette, 2012.
    """
    upper = lo >= 0
    a = xp.where(upper, -hi, lo)  # mirrored bin [a, b) lies at or below zero
    b = xp.where(upper, -lo, hi)
    below = b <= 0
    log_b = log_ndtr(xp.where(below, b, 0.0))
    log_a = log_ndtr(xp.where(below, a, 0.0))
    # ln(Phi(b) - Phi(a)) = ln Phi(b) + ln(1 - exp(ln Phi(a) - ln Phi(b)))
    diff = xp.minimum(log_a - log_b, 0.0)
    one_side = log_b + xp.log(-xp.expm1(xp.where(below, diff, -1.0)))
    lo_s = xp.where(below | upper, -1.0, lo)  # keep the unused branch finite
    hi_s = xp.where(below | upper, 1.0, hi)
    straddle = xp.log1p(-xp.exp(log_ndtr(lo_s)) - xp.exp(log_ndtr(-hi_s)))
    return xp.where(below, one_side, straddle)
