"""Element statistics of SPEC section 4: one fused pass of sums and histograms, then summaries.

A pass over a batch of blocks ``x`` of shape (H, rows, cols) accumulates, per head, the finite
count, the power sums of ``x - shift`` (orders 1..4), min, max, the non-finite count and both
histograms. ``shift`` and ``scale`` are the mean and std the caller expects; the z-histogram
bins ``(x - shift) / scale``. The summaries then recover the exact central moments from the
shifted sums, so a slightly-off shift costs no accuracy; a caller checks with
:func:`needs_refinement` that the scale used for binning was the final std.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np

from . import bins

_LOG_2PI_E = float(np.log(2.0 * np.pi * np.e))


class Sums(NamedTuple):
    """Per-head running sums of one element pass; every field has leading dim H."""

    n: jax.Array  # int32, finite entries
    s1: jax.Array  # sum (x - shift)
    s2: jax.Array
    s3: jax.Array
    s4: jax.Array
    min: jax.Array
    max: jax.Array
    n_nonfinite: jax.Array  # int32
    counts: jax.Array  # int32 (H, N_MERGED): both histograms at once, see :func:`histograms`


def empty_sums(n_heads: int) -> Sums:
    """The identity of :func:`add_block`: zero counts and sums, min +inf, max -inf."""
    zf = jnp.zeros((n_heads,), jnp.float32)
    zi = jnp.zeros((n_heads,), jnp.int32)
    return Sums(
        n=zi, s1=zf, s2=zf, s3=zf, s4=zf,
        min=jnp.full((n_heads,), jnp.inf, jnp.float32),
        max=jnp.full((n_heads,), -jnp.inf, jnp.float32),
        n_nonfinite=zi,
        counts=jnp.zeros((n_heads, N_MERGED), jnp.int32),
    )  # fmt: skip


def zbin_index(z: jax.Array) -> jax.Array:
    """Index into ``bins.zbin_edges()`` of each z (bin i is [e_i, e_{i+1})).

    i = clip(floor((z + zmax) / dz), -1, nz - 2) + 1 with dz = 2 zmax / (nz - 2): 0 is the
    lower tail (z < -zmax), nz - 1 the upper one (z >= zmax, +inf included).

    Examples:
      >>> import jax.numpy as jnp
      >>> from spinjax.kernels.elements import zbin_index
      >>> print(zbin_index(jnp.array([-11.0, -10.0, -0.01, 0.0, 9.99, 10.0, jnp.inf])))
      [  0   1 200 201 400 401 401]
    """
    dz = 2.0 * bins.ZMAX / (bins.NZ - 2)
    inner = jnp.floor((z + bins.ZMAX) / dz)
    return (jnp.clip(inner, -1, bins.NZ - 2) + 1).astype(jnp.int32)


def raw_bin_index(w: jax.Array) -> jax.Array:
    """Index into ``bins.bin_edges()`` of each raw value (log-spaced magnitudes, mirrored).

    For |w| >= 1e-7, j = clip(floor(48 (log10 |w| + 7)), 0, 528) is the magnitude's bin; the
    index is 530 + j for w > 0 and 528 - j for w < 0, and 529 (the central bin) for |w| < 1e-7.
    A negative value lies in the mirror image of its magnitude's bin, so one exactly on an edge
    -e counts in the bin below it, and an entry within float32 rounding of an edge (log10 in
    float32) may land in the neighbouring bin.

    Examples:
      >>> import jax.numpy as jnp
      >>> from spinjax.kernels.elements import raw_bin_index
      >>> print(raw_bin_index(jnp.array([-1.01, -1e-9, 0.0, 1e-9, 1.01, 1e5])))
      [ 192  529  529  529  866 1058]
      >>> from spinjax.kernels import bin_edges
      >>> e = bin_edges()
      >>> print(e[866] <= 1.01 < e[867], e[192] < -1.01 < e[193])
      True True
    """
    lo = 10.0**bins.RAW_LO_DECADE
    mag = jnp.maximum(jnp.abs(w), lo)
    j = jnp.floor(bins.RAW_PER_DECADE * (jnp.log10(mag) - bins.RAW_LO_DECADE))
    j = jnp.clip(j, 0, bins.RAW_PER_SIDE).astype(jnp.int32)
    centre = bins.RAW_PER_SIDE + 1
    return jnp.where(w >= lo, centre + 1 + j, jnp.where(w <= -lo, centre - 1 - j, centre))


# Both histograms from one scatter: raw bin r and z bin j each count the (finite) edges of their
# grid at or below an entry, so r + j counts the edges of both grids together: the bin of the
# entry on the merged, sorted edges. Each merged bin lies inside one raw and one z bin, which
# :func:`histograms` recovers from the edges' order. One scatter instead of two halves the
# costliest step of the pass on CPUs, where XLA's scatter-add runs one entry at a time.
N_MERGED = bins.NB + bins.NZ - 1


def histograms(acc: Sums, shift: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(zhist (H, NZ), hist (H, NB)) from a pass's merged counts; same ``shift``, ``scale``.

    Merged bin m holds the entries with exactly m edges (of both grids) at or below them. An
    edge's place among all edges is its index in its own grid plus the number of the other
    grid's edges before it, so each raw or z bin is a run of consecutive merged bins: a
    difference of the counts' running sum. Entries within float32 rounding of an edge may land
    one bin over, as binning allows.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from spinjax.kernels.elements import add_block, empty_sums, histograms
      >>> x = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])  # one head, z = x about shift 0, scale 1
      >>> acc = jax.jit(add_block)(empty_sums(1), x, jnp.zeros(1), jnp.ones(1))
      >>> zhist, hist = jax.jit(histograms)(acc, jnp.zeros(1), jnp.ones(1))
      >>> print(np.flatnonzero(zhist[0]), np.flatnonzero(hist[0]))  # z = 1: bin 201 + 1 / 0.05
      [221 241 261 281] [866 880 888 894]
    """
    scale = jnp.where(scale > 0, scale, 1.0)
    raw = jnp.asarray(bins.bin_edges()[1:-1], jnp.float32)
    z = shift[:, None] + scale[:, None] * jnp.asarray(bins.zbin_edges()[1:-1], jnp.float32)
    # ties between the grids: the raw edge counts as first, on both sides
    raw_place = jnp.arange(raw.size) + jax.vmap(lambda zh: jnp.searchsorted(zh, raw, side="left"))(z)
    z_place = jnp.arange(z.shape[1]) + jnp.searchsorted(raw, z, side="right")
    total = jnp.pad(jnp.cumsum(acc.counts, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))

    def runs(place):  # counts of the bins between consecutive edges at these places
        bounds = jnp.pad(place + 1, ((0, 0), (1, 1)), constant_values=(0, N_MERGED))
        return jnp.diff(jnp.take_along_axis(total, bounds, axis=1), axis=1)

    return runs(z_place), runs(raw_place)


def _scatter_parts(n: int) -> int:
    """Independent scatters that count ``n`` indices: XLA:CPU runs each scatter on one core, and
    independent ones side by side, so four quarters of a block count faster than one scatter
    (or two; benchmarks/RESULTS.md). GPUs take one."""
    parts = 4 if jax.default_backend() == "cpu" else 1
    return parts if n % parts == 0 else 1


def _per_head_counts(idx: jax.Array, keep: jax.Array | None, n_bins: int) -> jax.Array:
    """Histogram of ``idx`` (H, ...) per head; entries with ``keep`` false are dropped."""
    h = idx.shape[0]
    flat = idx.reshape(h, -1) + (n_bins * jnp.arange(h, dtype=jnp.int32))[:, None]
    if keep is not None:
        flat = jnp.where(keep.reshape(h, -1), flat, h * n_bins)  # out-of-range slot, dropped
    parts = flat.reshape(_scatter_parts(flat.size), -1)
    counts = sum(jnp.bincount(part, length=h * n_bins + 1) for part in parts)
    return counts[:-1].reshape(h, n_bins)


def add_block(
    acc: Sums,
    x: jax.Array,
    shift: jax.Array,
    scale: jax.Array,
    row_valid: jax.Array | None = None,
    *,
    masked: bool = True,
) -> Sums:
    """Adds a block ``x`` (H, rows, cols) to the running sums.

    ``row_valid`` (rows,) marks padding rows that are not part of the matrix. With
    ``masked=False`` every entry is taken as finite and real, which skips the masks (a large
    share of the pass's work); a non-finite entry then still shows as a non-finite min or max
    (see :func:`saw_nonfinite`), and the caller redoes the pass masked.

    Per head, over the kept (finite, real) entries x: n += count, s_k += sum (x - shift)^k for
    k = 1..4, min and max, n_nonfinite += non-finite real entries, and one count per entry in
    the merged bin ``raw_bin_index(x) + zbin_index((x - shift) / scale)`` (see
    :func:`histograms`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from spinjax.kernels.elements import add_block, empty_sums
      >>> x = jnp.array([[[1.0, 2.0], [jnp.nan, 4.0]]])  # one head, a 2 x 2 block
      >>> acc = jax.jit(add_block)(empty_sums(1), x, jnp.zeros(1), jnp.ones(1))
      >>> print(acc.n, acc.s1, acc.s2, acc.min, acc.max, acc.n_nonfinite)
      [3] [7.] [21.] [1.] [4.] [1]
    """
    scale = jnp.where(scale > 0, scale, 1.0)  # std 0: z-statistics are NaN, bins must exist
    if masked:
        finite = jnp.isfinite(x)
        inside = jnp.ones(x.shape, bool) if row_valid is None else row_valid[None, :, None]
        keep = finite & inside
        xs = jnp.where(keep, x - shift[:, None, None], 0.0)
        n = keep.sum((1, 2), dtype=jnp.int32)
        lo, hi = jnp.where(keep, x, jnp.inf), jnp.where(keep, x, -jnp.inf)
        n_nonfinite = (~finite & inside).sum((1, 2), dtype=jnp.int32)
    else:
        keep = None
        xs = x - shift[:, None, None]
        n = jnp.full(x.shape[:1], x.shape[1] * x.shape[2], jnp.int32)
        lo = hi = x
        n_nonfinite = jnp.zeros(x.shape[:1], jnp.int32)
    s1, s2, s3, s4, lo, hi = _row_sums(xs, lo, hi)
    z = xs * (1.0 / scale)[:, None, None]
    return Sums(
        n=acc.n + n,
        s1=acc.s1 + s1,
        s2=acc.s2 + s2,
        s3=acc.s3 + s3,
        s4=acc.s4 + s4,
        min=jnp.minimum(acc.min, lo),
        max=jnp.maximum(acc.max, hi),
        n_nonfinite=acc.n_nonfinite + n_nonfinite,
        counts=acc.counts + _per_head_counts(raw_bin_index(x) + zbin_index(z), keep, N_MERGED),
    )


def _row_sums(xs: jax.Array, lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, ...]:
    """Per head (first axis): sums of xs^1..4, min of ``lo``, max of ``hi``, over (H, rows, cols).

    One reduction with six results reads the block once, where six reductions read it six
    times. It runs along stretches of at most 256 entries of a row in ``lanes`` interleaved
    accumulators (entry i goes to lane i mod 16): a reduction over a major axis that keeps the
    lanes as the minor one is one vector add per step, where one accumulator per stretch waits
    on each add in turn. The partial sums are then added pairwise; each lane sums at most 16
    entries in order, since long sums in order lose accuracy in the fourth powers of
    heavy-tailed entries at large d_model (benchmarks/RESULTS.md has the measurements).
    """
    h, rows, cols = xs.shape
    run = max(r for r in range(1, min(cols, 256) + 1) if cols % r == 0)
    lanes = max(r for r in range(1, min(run, 16) + 1) if run % r == 0)
    runs = (h, rows, cols // run, run // lanes, lanes)
    xs = xs.reshape(runs)
    xs2 = xs * xs
    zero, inf = jnp.float32(0), jnp.float32(jnp.inf)

    def add(a, b):
        sums = tuple(u + v for u, v in zip(a[:4], b[:4], strict=True))
        return (*sums, jnp.minimum(a[4], b[4]), jnp.maximum(a[5], b[5]))

    operands = (xs, xs2, xs2 * xs, xs2 * xs2, lo.reshape(runs), hi.reshape(runs))
    part = jax.lax.reduce(operands, (zero, zero, zero, zero, inf, -inf), add, (3,))
    rest = (1, 2, 3)
    return (*(p.sum(rest) for p in part[:4]), part[4].min(rest), part[5].max(rest))


def saw_nonfinite(acc: Sums) -> jax.Array:
    """Whether an unmasked pass met a NaN or Inf (min and max propagate them)."""
    return ~(jnp.isfinite(acc.min) & jnp.isfinite(acc.max))


def central_moments(acc: Sums, shift: jax.Array):
    """(mean, m2, m3, m4) from sums taken about ``shift``; NaN where no entry is finite.

    With d = s1 / n and a_k = s_k / n (sums of (x - shift)^k): mean = shift + d,
    m2 = a2 - d^2, m3 = a3 - 3 d a2 + 2 d^3, m4 = a4 - 4 d a3 + 6 d^2 a2 - 3 d^4, exact for
    any shift (a shift near the mean keeps the cancellation small). All finite entries equal
    (min == max) gives m2 = m3 = m4 = 0 exactly and mean = that value.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from spinjax.kernels.elements import add_block, central_moments, empty_sums
      >>> x = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
      >>> shift = jnp.array([2.0])  # a guess of the mean, not the mean
      >>> acc = jax.jit(add_block)(empty_sums(1), x, shift, jnp.ones(1))
      >>> print(np.round(np.concatenate(central_moments(acc, shift)), 4))  # mean m2 m3 m4
      [2.5    1.25   0.     2.5625]

    References:
      T. F. Chan, G. H. Golub, R. J. LeVeque, "Algorithms for computing the sample variance:
      analysis and recommendations", The American Statistician 37(3), 1983 (shifted data).
    """
    n = acc.n.astype(jnp.float32)
    n = jnp.where(n > 0, n, jnp.nan)
    d = acc.s1 / n  # offset of the true mean from the shift
    a2, a3, a4 = acc.s2 / n, acc.s3 / n, acc.s4 / n
    m2 = jnp.maximum(a2 - d * d, 0.0)
    m3 = a3 - 3.0 * d * a2 + 2.0 * d**3
    m4 = a4 - 4.0 * d * a3 + 6.0 * d * d * a2 - 3.0 * d**4
    # All finite entries equal: exactly zero spread, whatever rounding the sums carry.
    flat = acc.min == acc.max
    zero = jnp.zeros_like(m2)
    mean = jnp.where(flat, acc.min, shift + d)
    return mean, jnp.where(flat, zero, m2), jnp.where(flat, zero, m3), jnp.where(flat, zero, m4)


def needs_refinement(acc: Sums, shift: jax.Array, scale: jax.Array, rtol: float = 1e-6):
    """True per head when the pass binned with a scale or shift off the final std or mean.

    Then the z-histogram must be redone with the final values (the moments are exact anyway):
    |std - scale| > rtol std or |mean - shift| > rtol std, and std > 0.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from spinjax.kernels.elements import add_block, empty_sums, needs_refinement
      >>> x = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])  # mean 2.5, std sqrt(1.25)
      >>> shift, scale = jnp.array([2.5]), jnp.sqrt(jnp.array([1.25]))
      >>> acc = jax.jit(add_block)(empty_sums(1), x, shift, scale)
      >>> print(needs_refinement(acc, shift, scale), needs_refinement(acc, shift, 2 * scale))
      [False] [ True]
    """
    mean, m2, _, _ = central_moments(acc, shift)
    std = jnp.sqrt(m2)
    off = (jnp.abs(std - scale) > rtol * std) | (jnp.abs(mean - shift) > rtol * std)
    return off & (std > 0)


def log_bin_mass(m: jax.Array, s: jax.Array) -> jax.Array:
    """ln of the N(m, s^2) mass of every z bin, for per-head m, s (H,) -> (H, NZ).

    ln(Phi((e_{i+1} - m) / s) - Phi((e_i - m) / s)) in log space (``bins.log_normal_bin_mass``).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> from spinjax.kernels.elements import log_bin_mass
      >>> import jax
      >>> q = np.exp(jax.jit(log_bin_mass)(jnp.array([0.0, 0.5]), jnp.array([1.0, 2.0])))
      >>> print(q.shape, np.round(q.sum(-1), 4), f"{q[0, 201]:.5f}")  # [0, 0.05) under N(0, 1)
      (2, 402) [1. 1.] 0.01994
    """
    e = jnp.asarray(bins.zbin_edges(), jnp.float32)
    lo = (e[None, :-1] - m[:, None]) / s[:, None]
    hi = (e[None, 1:] - m[:, None]) / s[:, None]
    return bins.log_normal_bin_mass(lo, hi, xp=jnp, log_ndtr=jax.scipy.special.log_ndtr)


def _kl(p: jax.Array, log_q: jax.Array) -> jax.Array:
    """sum p ln(p/q) with 0 ln 0 = 0 (a bin with p > 0 always has finite ln q)."""
    safe = jnp.where(p > 0, p, 1.0)
    return jnp.where(p > 0, p * (jnp.log(safe) - log_q), 0.0).sum(-1)


def _solve3(m: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Coefficients 1 and 2 of m x = v for batches of 3x3 systems, by Cramer's rule.

    In closed form rather than a LAPACK call: the fit's normal matrix is small and well
    conditioned, and keeping LAPACK out of this program avoids concurrent LAPACK calls (see
    kernels/spectra.py).
    """

    def det(a):
        return (
            a[:, 0, 0] * (a[:, 1, 1] * a[:, 2, 2] - a[:, 1, 2] * a[:, 2, 1])
            - a[:, 0, 1] * (a[:, 1, 0] * a[:, 2, 2] - a[:, 1, 2] * a[:, 2, 0])
            + a[:, 0, 2] * (a[:, 1, 0] * a[:, 2, 1] - a[:, 1, 1] * a[:, 2, 0])
        )

    full = det(m)
    return tuple(det(m.at[:, :, i].set(v)) / full for i in (1, 2))


def _core_fit(p_inner: jax.Array, counts_inner: jax.Array):
    """Weighted least squares of ln(density) = a + b z + c z^2 over |centre| <= 2 (SPEC 4).

    Returns (m, s) in z units, NaN where c >= 0 or fewer than 3 bins qualify.
    """
    dz = 2.0 * bins.ZMAX / (bins.NZ - 2)
    centres = -bins.ZMAX + dz * (jnp.arange(bins.NZ - 2, dtype=jnp.float32) + 0.5)
    use = (jnp.abs(centres) <= 2.0)[None, :] & (counts_inner > 0)
    w = jnp.where(use, counts_inner, 0).astype(jnp.float32)
    y = jnp.log(jnp.where(use, p_inner, 1.0) / dz)
    basis = jnp.stack([jnp.ones_like(centres), centres, centres**2], -1)  # (B, 3)
    normal = jnp.einsum("hb,bi,bj->hij", w, basis, basis, precision="highest")
    rhs = jnp.einsum("hb,bi,hb->hi", w, basis, y, precision="highest")
    b, c = _solve3(normal, rhs)
    ok = (use.sum(-1) >= 3) & (c < 0)
    s = jnp.sqrt(jnp.where(ok, -0.5 / jnp.where(ok, c, -1.0), jnp.nan))
    return b * s * s, s


def summarize(acc: Sums, shift: jax.Array, scale: jax.Array) -> dict[str, jax.Array]:
    """Every element statistic of SPEC section 4 from one pass's sums, per head.

    ``shift`` and ``scale`` are those the pass was given (the final mean and std, see
    :func:`needs_refinement`). With n finite entries, mu, sigma (ddof 0) and m_k the central
    moments, p_i = zhist_i / n, dz = 0.05 the inner z-bin width, q_i the N(0, 1) mass of
    z-bin i:

    - skew = m3 / m2^1.5, kurt = m4 / m2^2 - 3 (both 0 when sigma = 0);
    - entropy S = ln sigma - sum_inner p_i ln(p_i / dz); entropy_residual =
      S - 0.5 ln(2 pi e sigma^2); entropy_mm = S + (m_inner - 1) / (2n), m_inner the occupied
      inner bins (Miller-Madow);
    - kl_gauss = sum_all p_i ln(p_i / q_i) (tail bins included, 0 ln 0 = 0, ln q_i in log
      space); kl_gauss_mm = kl_gauss - (m_all - 1) / (2n);
    - the Gaussian core fit: weighted least squares of ln(p_i / dz) = a + b z_i + c z_i^2 over
      the inner bins with |centre z_i| <= 2 and a count, weights the counts; s = sqrt(-1 / (2c)),
      m = b s^2, mu_fit = mu + sigma m, sigma_fit = sigma s, kl_fit = KL of p against the
      N(m, s^2) masses of the z bins; NaN when c >= 0 or fewer than 3 bins qualify;
    - tail_mass = (zhist_0 + zhist_last) / n.

    Every z-histogram value is NaN when sigma = 0 or n = 0 (``zhist`` then all zeros).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from scipy.special import ndtri
      >>> from spinjax.kernels.elements import add_block, empty_sums, summarize
      >>> q = ndtri((np.arange(4096) + 0.5) / 4096)  # evenly spaced quantiles of N(0, 1)
      >>> x = jnp.asarray(q / q.std(), jnp.float32).reshape(1, 64, 64)
      >>> shift, scale = jnp.zeros(1), jnp.ones(1)  # the exact mean and std
      >>> acc = jax.jit(add_block)(empty_sums(1), x, shift, scale)
      >>> out = jax.jit(summarize)(acc, shift, scale)
      >>> for k in ("std", "kurt", "entropy_residual", "kl_gauss", "kl_gauss_mm", "sigma_fit"):
      ...     print(k, round(float(out[k][0]), 3) + 0.0)
      std 1.0
      kurt -0.009
      entropy_residual -0.003
      kl_gauss 0.003
      kl_gauss_mm -0.013
      sigma_fit 1.001

      KL against the Gaussian of the same mean and variance is the negentropy, so kl_gauss
      ~ -entropy_residual; 131 more occupied bins than one make kl_gauss_mm 131 / 8192 lower.

    References:
      G. A. Miller, "Note on the bias of information estimates", in Information Theory in
      Psychology, 1955; L. Paninski, "Estimation of entropy and mutual information", Neural
      Computation 15(6), 2003.
    """
    zhist, hist = histograms(acc, shift, scale)
    mean, m2, m3, m4 = central_moments(acc, shift)
    std = jnp.sqrt(m2)
    flat = m2 == 0
    skew = jnp.where(flat, 0.0, m3 / jnp.where(flat, 1.0, m2) ** 1.5)
    kurt = jnp.where(flat, 0.0, m4 / jnp.where(flat, 1.0, m2) ** 2 - 3.0)
    usable = ~flat & (acc.n > 0)
    nan = jnp.float32(jnp.nan)
    n = acc.n.astype(jnp.float32)[:, None]
    zhist = jnp.where(usable[:, None], zhist, 0)
    p = zhist / n
    p_inner, c_inner = p[:, 1:-1], zhist[:, 1:-1]
    dz = 2.0 * bins.ZMAX / (bins.NZ - 2)
    safe = jnp.where(p_inner > 0, p_inner, 1.0)
    h_z = -jnp.where(p_inner > 0, p_inner * jnp.log(safe / dz), 0.0).sum(-1)
    entropy = jnp.log(std) + h_z
    mm_inner = ((c_inner > 0).sum(-1) - 1) / (2.0 * n[:, 0])
    mm_all = ((zhist > 0).sum(-1) - 1) / (2.0 * n[:, 0])
    log_q = jnp.asarray(bins.log_normal_bin_mass(bins.zbin_edges()[:-1], bins.zbin_edges()[1:]))
    kl_gauss = _kl(p, log_q.astype(jnp.float32)[None, :])
    m_fit, s_fit = _core_fit(p_inner, c_inner)
    fit_ok = jnp.isfinite(s_fit)
    log_q_fit = log_bin_mass(jnp.where(fit_ok, m_fit, 0.0), jnp.where(fit_ok, s_fit, 1.0))
    kl_fit = jnp.where(fit_ok, _kl(p, log_q_fit), nan)

    def hist_based(v):
        return jnp.where(usable, v, nan)

    return {
        "mean": mean,
        "std": std,
        "skew": skew,
        "kurt": kurt,
        "min": jnp.where(acc.n > 0, acc.min, nan),
        "max": jnp.where(acc.n > 0, acc.max, nan),
        "entropy": hist_based(entropy),
        "entropy_residual": hist_based(h_z - 0.5 * _LOG_2PI_E),
        "entropy_mm": hist_based(entropy + mm_inner),
        "kl_gauss": hist_based(kl_gauss),
        "kl_gauss_mm": hist_based(kl_gauss - mm_all),
        "mu_fit": hist_based(mean + std * m_fit),
        "sigma_fit": hist_based(std * s_fit),
        "kl_fit": hist_based(kl_fit),
        "tail_mass": hist_based((zhist[:, 0] + zhist[:, -1]) / n[:, 0]),
        "zhist": zhist.astype(jnp.uint32),
        "hist": hist.astype(jnp.uint32),
        "n_nonfinite": acc.n_nonfinite,
    }
