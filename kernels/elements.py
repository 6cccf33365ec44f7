"""Element statistics of SPEC section 4: one fused pass of sums and histograms, then summaries.

A pass over a batch of blocks ``x`` of shape (H, rows, cols) accumulates, per head, the finite
count, the power sums of ``x - shift`` (orders 1..4), min, max, the non-finite count and both
histograms. ``shift`` and ``scale`` are the mean and std the caller expects; the z-histogram
bins ``(x - shift) / scale``, on a grid ``bins.SUBBINS`` times finer than the stored one, which
gives the stored z-histogram and the Kolmogorov-Smirnov distance from the normal. The
summaries then recover the exact central moments from the shifted sums, so a slightly-off
shift costs no accuracy; a caller checks with :func:`needs_refinement` that the scale used for
binning was the final std.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np
import scipy.special

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
    counts: jax.Array  # int32 (H, n_merged(subbins)): both histograms at once, see :func:`histograms`


def empty_sums(n_heads: int, subbins: int = bins.SUBBINS) -> Sums:
    """The identity of :func:`add_block`: zero counts and sums, min +inf, max -inf.

    ``subbins``: the z grid counts each stored z bin in that many parts (1: only the stored
    grid, no Kolmogorov-Smirnov distance); the passes adding to these sums follow it.
    """
    zf = jnp.zeros((n_heads,), jnp.float32)
    zi = jnp.zeros((n_heads,), jnp.int32)
    return Sums(
        n=zi, s1=zf, s2=zf, s3=zf, s4=zf,
        min=jnp.full((n_heads,), jnp.inf, jnp.float32),
        max=jnp.full((n_heads,), -jnp.inf, jnp.float32),
        n_nonfinite=zi,
        counts=jnp.zeros((n_heads, n_merged(subbins)), jnp.int32),
    )  # fmt: skip


def zbin_index(z: jax.Array, subbins: int = bins.SUBBINS) -> jax.Array:
    """Index into ``bins.fine_zbin_edges(subbins)`` of each z (bin i is [e_i, e_{i+1})).

    i = clip(floor((z + zmax) / dz), -1, m) + 1 with m = (nz - 2) subbins inner bins of width
    dz = 2 zmax / m: 0 is the lower tail (z < -zmax), m + 1 the upper one (z >= zmax, +inf
    included).

    Examples:
      >>> import jax.numpy as jnp
      >>> from spinjax.kernels.elements import zbin_index
      >>> z = jnp.array([-11.0, -10.0, -0.01, 0.0, 9.99, 10.0, jnp.inf])
      >>> print(zbin_index(z, 1))  # the stored grid: inner bins of 0.05
      [  0   1 200 201 400 401 401]
      >>> print(zbin_index(z))  # the counting grid: inner bins of 0.0025
      [   0    1 3997 4001 7997 8001 8001]
    """
    m = (bins.NZ - 2) * subbins
    inner = jnp.floor((z + bins.ZMAX) * (m / (2.0 * bins.ZMAX)))
    return (jnp.clip(inner, -1, m) + 1).astype(jnp.int32)


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
# costliest step of the pass on CPUs, where XLA's scatter-add runs one entry at a time; the
# finer z grid costs no work per entry, only a larger array of counts.
def n_merged(subbins: int = bins.SUBBINS) -> int:
    """Bins of the merged grid: NB raw bins, (NZ - 2) subbins + 2 z bins, less one."""
    return bins.NB + (bins.NZ - 2) * subbins + 1


def _subbins(acc: Sums) -> int:
    """The z grid's ``subbins`` of a pass, from the size of its counts (see :func:`n_merged`)."""
    return (acc.counts.shape[1] - bins.NB - 1) // (bins.NZ - 2)


def _running_sum(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum of int counts along the last axis, exact.

    XLA:CPU lowers ``jnp.cumsum`` to an associative scan, ~4x slower on (16, 9060) counts than
    a loop adding one column to the next in place; accelerators want the scan (a loop of
    thousands of steps is thousands of launches there).
    """
    if jax.default_backend() != "cpu":
        return jnp.cumsum(x, axis=-1, dtype=x.dtype)
    return jax.lax.fori_loop(1, x.shape[-1], lambda i, a: a.at[..., i].add(a[..., i - 1]), x)


def histograms(
    acc: Sums, shift: jax.Array, scale: jax.Array, log2_scale: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(fine zhist (H, (NZ - 2) subbins + 2), hist (H, NB)) from a pass's merged counts.

    Same ``shift``, ``scale`` and ``log2_scale`` as the pass. The z counts are on
    ``bins.fine_zbin_edges(subbins)``; :func:`coarse_zhist` sums them to the stored grid.
    Merged bin m holds the entries whose raw bin r and z bin j add up to m: the bin between
    consecutive edges of both grids, merged in order. Raw edge i has c_i z edges at or below
    it (``zbin_index`` of its z), so it is edge number i + c_i of the merged grid, and z edge j
    comes after the raw edges with c_i < j: each raw or z bin is a run of consecutive merged
    bins, a difference of the counts' running sum.
    Both grids' places come from the one c, so they interleave exactly; entries within float32
    rounding of an edge may land one bin over, as binning allows.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from spinjax.kernels.elements import add_block, coarse_zhist, empty_sums, histograms
      >>> x = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])  # one head, z = x about shift 0, scale 1
      >>> acc = jax.jit(add_block)(empty_sums(1), x, jnp.zeros(1), jnp.ones(1))
      >>> zfine, hist = jax.jit(histograms)(acc, jnp.zeros(1), jnp.ones(1))
      >>> print(np.flatnonzero(zfine[0]))  # z = 1: bin 4001 + 1 / 0.0025
      [4401 4801 5201 5601]
      >>> print(np.flatnonzero(coarse_zhist(zfine)[0]), np.flatnonzero(hist[0]))  # 201 + 1 / 0.05
      [221 241 261 281] [866 880 888 894]
    """
    scale = jnp.where(scale > 0, scale, 1.0)
    subbins = _subbins(acc)
    raw = jnp.asarray(bins.bin_edges()[1:-1], jnp.float32)
    zgrid = jnp.asarray(bins.fine_zbin_edges(subbins)[1:-1], jnp.float32)
    if log2_scale is not None:  # the raw edges in the units of the normalized entries
        raw = times_pow2(raw[None, :], -log2_scale[:, None])
    z_at_raw = (raw - shift[:, None]) * (1.0 / scale)[:, None]  # as add_block computes z
    below = zbin_index(z_at_raw, subbins)  # c: z edges at or below each raw edge, (H, NB - 1)
    raw_starts = jnp.arange(1, below.shape[1] + 1) + below
    # raw edges below z edge j: #(c_i < j), a running sum of the c's counts (no search, no log)
    heads = jnp.arange(below.shape[0])[:, None]
    raw_below = _running_sum(jnp.zeros((below.shape[0], zgrid.size + 1), jnp.int32).at[heads, below].add(1))
    z_starts = jnp.arange(1, zgrid.size + 1) + raw_below[:, :-1]
    total = jnp.pad(_running_sum(acc.counts), ((0, 0), (1, 0)))

    def runs(starts):  # counts of the runs of merged bins starting at ``starts``
        bounds = jnp.pad(starts, ((0, 0), (1, 1)), constant_values=(0, acc.counts.shape[1]))
        return jnp.diff(jnp.take_along_axis(total, bounds, axis=1, mode="promise_in_bounds"), axis=1)

    return runs(z_starts), runs(raw_starts)


def coarse_zhist(zfine: jax.Array) -> jax.Array:
    """The stored z-histogram (.., NZ) from counts on the finer grid (.., (NZ - 2) s + 2):
    the tails as they are, each inner bin the sum of its s sub-bins."""
    inner = zfine[..., 1:-1]
    inner = inner.reshape(*inner.shape[:-1], bins.NZ - 2, -1).sum(-1)
    return jnp.concatenate([zfine[..., :1], inner, zfine[..., -1:]], axis=-1)


def ks_from_counts(zfine: jax.Array, n: jax.Array) -> jax.Array:
    """Kolmogorov-Smirnov distance sup_z |F_n(z) - Phi(z)| from counts of z on a grid.

    ``zfine`` (H, m + 2) counts the n entries' z on ``bins.fine_zbin_edges`` (m inner bins).
    At each edge e_k the empirical CDF's left limit F_k = #(z < e_k) / n is known exactly, so
    L = max_k |F_k - Phi(e_k)| <= D. Inside a bin [e_k, e_{k+1}) F_n lies between F_k and
    F_{k+1}, so F_n - Phi <= F_{k+1} - Phi(e_k) and Phi - F_n <= Phi(e_{k+1}) - F_k; U, the
    largest of these, is >= D, and U - L <= max_k (Phi(e_{k+1}) - Phi(e_k)) whatever the
    entries (each term is one edge's |F - Phi| plus the bin's Phi mass). The midpoint
    (L + U) / 2 is returned: within half the largest bin mass of D, dz phi(0) / 2 = 5.0e-4 on
    bins of 0.0025 (the tails' mass, Phi(-10) = 7.6e-24, is nothing), plus what float32
    rounding moves across an edge.

    Examples:
      >>> import numpy as np
      >>> from scipy import stats
      >>> from spinjax.kernels.bins import fine_zbin_edges
      >>> from spinjax.kernels.elements import ks_from_counts
      >>> u = (np.arange(1000) + 0.5) / 1000  # a uniform sample, standardized
      >>> z = (u - u.mean()) / u.std()
      >>> counts = np.histogram(z, fine_zbin_edges())[0][None]
      >>> print(round(float(ks_from_counts(counts, np.array([1000]))[0]), 4))
      0.0581
      >>> print(round(stats.kstest(z, "norm").statistic, 4))  # exact, from the sorted entries
      0.0577

    References:
      A. N. Kolmogorov, "Sulla determinazione empirica di una legge di distribuzione",
      Giornale dell'Istituto Italiano degli Attuari 4, 1933; H. W. Lilliefors, "On the
      Kolmogorov-Smirnov test for normality with mean and variance unknown", JASA 62, 1967.
    """
    edges = bins.fine_zbin_edges((zfine.shape[-1] - 2) // (bins.NZ - 2))
    phi = jnp.asarray(scipy.special.ndtr(edges), jnp.float32)  # 0 at -inf, 1 at +inf
    n = jnp.asarray(n, jnp.float32)[:, None]
    cdf = _running_sum(zfine)[:, :-1] / n  # F at the finite edges
    cdf = jnp.pad(cdf, ((0, 0), (1, 0)))
    cdf = jnp.concatenate([cdf, jnp.ones_like(cdf[:, :1])], axis=-1)  # F at all edges, ends 0 and 1
    lower = jnp.abs(cdf - phi).max(-1)
    upper = jnp.maximum(cdf[:, 1:] - phi[:-1], phi[1:] - cdf[:, :-1]).max(-1)
    return 0.5 * (lower + upper)


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


def times_pow2(x: jax.Array, e: jax.Array) -> jax.Array:
    """``x * 2**e``, exact wherever the result is a normal float32: in two factors, since
    ``2**e`` alone may lie beyond float32's range while the product does not."""
    half = e // 2
    one = jnp.float32(1)
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, e - half)


def add_block(
    acc: Sums,
    x: jax.Array,
    shift: jax.Array,
    scale: jax.Array,
    row_valid: jax.Array | None = None,
    *,
    masked: bool = True,
    log2_scale: jax.Array | None = None,
) -> Sums:
    """Adds a block ``x`` (H, rows, cols) to the running sums.

    ``row_valid`` (rows,) marks padding rows that are not part of the matrix. With
    ``masked=False`` every entry is taken as finite and real, which skips the masks (a large
    share of the pass's work); a non-finite entry then still shows as a non-finite min or max
    (see :func:`saw_nonfinite`), and the caller redoes the pass masked.

    ``x`` may be the matrix divided by a power of two per head, ``2**log2_scale`` (H,) int: the
    sums and the z bins are then those of ``x`` (scale-free), while raw bins and finiteness are
    those of the matrix itself, ``x * 2**log2_scale`` (an entry beyond float32's range counts as
    non-finite, like a product that overflowed).

    Per head, over the kept (finite, real) entries x: n += count, s_k += sum (x - shift)^k for
    k = 1..4, min and max, n_nonfinite += non-finite real entries, and one count per entry in
    the merged bin ``raw_bin_index(x) + zbin_index((x - shift) / scale, subbins)`` (see
    :func:`histograms`; ``subbins`` as ``acc`` was made by :func:`empty_sums`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from spinjax.kernels.elements import add_block, empty_sums
      >>> x = jnp.array([[[1.0, 2.0], [jnp.nan, 4.0]]])  # one head, a 2 x 2 block
      >>> acc = jax.jit(add_block)(empty_sums(1), x, jnp.zeros(1), jnp.ones(1))
      >>> print(acc.n, acc.s1, acc.s2, acc.min, acc.max, acc.n_nonfinite)
      [3] [7.] [21.] [1.] [4.] [1]
    """
    scale = jnp.where(scale > 0, scale, 1.0)  # std 0: z-statistics are NaN, bins must exist
    raw = x if log2_scale is None else times_pow2(x, log2_scale[:, None, None])
    if masked:
        finite = jnp.isfinite(raw)  # NaN and Inf in x stay so at any scale
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
        counts=acc.counts
        + _per_head_counts(raw_bin_index(raw) + zbin_index(z, _subbins(acc)), keep, acc.counts.shape[1]),
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


def saw_nonfinite(acc: Sums, log2_scale: jax.Array | None = None) -> jax.Array:
    """Whether an unmasked pass met a NaN or Inf (min and max propagate them), or, with
    ``log2_scale`` (see :func:`add_block`), an entry beyond float32's range at the matrix's scale."""
    seen = ~(jnp.isfinite(acc.min) & jnp.isfinite(acc.max))
    if log2_scale is None:
        return seen
    largest = jnp.maximum(jnp.abs(acc.min), jnp.abs(acc.max))
    return seen | ~jnp.isfinite(times_pow2(largest, log2_scale))


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


def summarize(
    acc: Sums, shift: jax.Array, scale: jax.Array, log2_scale: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Every element statistic of SPEC section 4 from one pass's sums, per head.

    ``shift``, ``scale`` and ``log2_scale`` are those the pass was given (the final mean and std, see
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
    - tail_mass = (zhist_0 + zhist_last) / n;
    - ks_normal = sup_z |F_n(z) - Phi(z)| from the finer counts (:func:`ks_from_counts`), only
      when the pass counted on a finer grid (``subbins`` > 1 in :func:`empty_sums`).

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
      >>> for k in ("std", "kurt", "entropy_residual", "kl_gauss", "kl_gauss_mm", "sigma_fit",
      ...           "ks_normal"):
      ...     print(k, round(float(out[k][0]), 4) + 0.0)
      std 1.0
      kurt -0.0085
      entropy_residual -0.0026
      kl_gauss 0.0027
      kl_gauss_mm -0.0133
      sigma_fit 1.0009
      ks_normal 0.0006

      KL against the Gaussian of the same mean and variance is the negentropy, so kl_gauss
      ~ -entropy_residual; 131 more occupied bins than one make kl_gauss_mm 131 / 8192 lower;
      the quantiles' empirical CDF is 1 / (2n) = 0.0001 from Phi (ks_normal: within 5e-4).

    References:
      G. A. Miller, "Note on the bias of information estimates", in Information Theory in
      Psychology, 1955; L. Paninski, "Estimation of entropy and mutual information", Neural
      Computation 15(6), 2003.
    """
    zfine, hist = histograms(acc, shift, scale, log2_scale)
    zhist = coarse_zhist(zfine)
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

    finer = {}
    if _subbins(acc) > 1:
        finer["ks_normal"] = hist_based(ks_from_counts(jnp.where(usable[:, None], zfine, 0), acc.n))
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
        **finer,
    }
