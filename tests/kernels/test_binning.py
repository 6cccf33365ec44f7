"""Both histograms from the element pass's one merged scatter, against float64 binning.

kernels/elements.py counts each entry once, in the bin of the merged (raw + z) edges, and
``histograms`` splits the merged counts back into the raw and the (finer, counting) z histograms.
These tests pin the split on values of every scale, edges of both grids that coincide, a
collapsed z grid, and masked entries; counts may differ from float64 binning only for entries
within rounding of an edge.
The same pass's power sums, min and max (one reduction with six results) are pinned too.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from reference import near_edge_count

from spinjax.kernels import bin_edges, elements, zbin_edges
from spinjax.kernels.bins import fine_zbin_edges


def _reference(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts on bins [e_i, e_{i+1}) in float64 (first and last edges are -inf, +inf)."""
    return np.bincount(np.searchsorted(edges, values, side="right") - 1, minlength=edges.size - 1)


def _histograms(x, shift, scale, *, masked=False, rows=None):
    shift, scale = jnp.asarray(shift, jnp.float32), jnp.asarray(scale, jnp.float32)
    acc = elements.add_block(
        elements.empty_sums(x.shape[0]), jnp.asarray(x, jnp.float32), shift, scale, rows, masked=masked
    )
    zhist, hist = elements.histograms(acc, shift, scale)
    return np.asarray(zhist), np.asarray(hist), acc


def _assert_close_counts(got, values, edges, where, atol=0.0):
    ref = _reference(values, edges)
    allowed = 2 * near_edge_count(values, edges, rtol=1e-6, atol=atol)
    diff = int(np.abs(got.astype(np.int64) - ref).sum())
    assert diff <= allowed, f"{where}: {diff} counts differ, {allowed} allowed"
    assert got.sum() == values.size, where


@pytest.mark.slow
def test_both_histograms_match_float64_binning_at_every_scale():
    rng = np.random.default_rng(0)
    # per head: (centre, spread); shift/scale deliberately a little off the true mean/std
    heads = [(0.0, 1e-6), (0.0, 1e-3), (0.1, 1.0), (0.0, 300.0), (5.0, 0.1), (-2e-4, 3e-5)]
    x = np.stack([rng.normal(c, s, (16, 64)) for c, s in heads]).astype(np.float32)
    x[1, 0, :8] = [1e-9, -1e-9, 0.0, -0.0, 2e4, -2e4, 1e-7, -1e-7]  # tails and the central bin
    shift = np.array([c for c, _ in heads]) + 0.01 * np.array([s for _, s in heads])
    scale = np.array([s for _, s in heads]) * 1.02
    zhist, hist, _ = _histograms(x, shift, scale)
    for h in range(len(heads)):
        v = x[h].astype(np.float64).ravel()
        _assert_close_counts(hist[h], v, bin_edges(), f"head {h} raw")
        z = (v - np.float32(shift[h])) / np.float32(scale[h])
        _assert_close_counts(zhist[h], z, fine_zbin_edges(), f"head {h} z")
        coarse = np.asarray(elements.coarse_zhist(zhist[h]))
        _assert_close_counts(coarse, z, zbin_edges(), f"head {h} stored z")
        assert np.count_nonzero(hist[h]) > 2 and np.count_nonzero(coarse) > 5  # not one bin


@pytest.mark.slow
def test_coinciding_edges_of_both_grids_split_consistently():
    # shift 0, scale 1: z edges k * 0.05 meet raw edges 10**(k/48) at 1 and 10 (and the mirror)
    edges_both = [1.0, -1.0, 10.0, -10.0]
    near = [e * (1 + d) for e in edges_both for d in (-1e-3, 0.0, 1e-3)]
    x = np.array(near * 40 + list(np.linspace(-12, 12, 160)), np.float32).reshape(1, 4, -1)
    zhist, hist, acc = _histograms(x, [0.0], [1.0])
    v = x.ravel().astype(np.float64)
    _assert_close_counts(hist[0], v, bin_edges(), "raw")
    _assert_close_counts(zhist[0], v, fine_zbin_edges(), "z")
    assert int(acc.n[0]) == v.size


@pytest.mark.slow
def test_a_collapsed_z_grid_still_splits_exactly():
    # scale so small that every z edge rounds onto the shift: all z mass goes to the two tails
    x = np.array([[0.4, 0.5, 0.6, 0.7] * 8], np.float32).reshape(1, 4, 8)
    zhist, hist, _ = _histograms(x, [0.55], [1e-30])
    v = x.ravel().astype(np.float64)
    assert np.array_equal(hist[0], _reference(v, bin_edges()))
    assert zhist[0, 0] == 16 and zhist[0, -1] == 16 and zhist[0].sum() == 32


def test_masked_entries_and_padding_rows_are_in_neither_histogram():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 8, 32)).astype(np.float32)
    x[0, 1, 3], x[0, 2, 5], x[1, 0, 0] = np.nan, np.inf, -np.inf
    rows = jnp.arange(8) < 6  # rows 6 and 7 are padding
    zhist, hist, acc = _histograms(x, [0.0, 0.0], [1.0, 1.0], masked=True, rows=rows)
    for h in range(2):
        v = x[h, :6].astype(np.float64).ravel()
        v = v[np.isfinite(v)]
        _assert_close_counts(hist[h], v, bin_edges(), f"head {h} raw")
        _assert_close_counts(zhist[h], v, fine_zbin_edges(), f"head {h} z")
    assert acc.n_nonfinite.tolist() == [2, 1]


@pytest.mark.parametrize("masked", [False, True])
def test_power_sums_over_long_rows_match_float64(masked):
    # rows of 12B's d_model and longer, heavy tails, a shift off the mean: the sums run along
    # each row in float32 before the rows are added
    rng = np.random.default_rng(2)
    x = np.stack([rng.standard_t(3, (3, 8192)) * 0.02 + 0.005, rng.normal(-1.0, 1e-3, (3, 8192))])
    x = x.astype(np.float32)
    if masked:
        x[0, 1, 7], x[1, 2, 100] = np.nan, -np.inf
    shift = np.array([0.004, -1.0], np.float32)
    _, _, acc = _histograms(x, shift, [0.03, 1e-3], masked=masked)
    for h in range(2):
        v = x[h].astype(np.float64).ravel()
        v = v[np.isfinite(v)] - shift[h]
        for k, got in enumerate([acc.s1, acc.s2, acc.s3, acc.s4], start=1):
            want = (v**k).sum()
            scale_k = (np.abs(v) ** k).sum()  # cancelling odd sums are judged against this
            assert abs(float(got[h]) - want) <= 2e-6 * scale_k, (h, k, float(got[h]), want)
        assert float(acc.min[h]) == (v + shift[h]).min() and float(acc.max[h]) == (v + shift[h]).max()
        assert int(acc.n[h]) == v.size


def test_a_zero_scale_bins_like_scale_one():
    # the pass and the split both take scale <= 0 as 1 (std 0: z-statistics are NaN anyway)
    x = np.linspace(-3, 3, 64, dtype=np.float32).reshape(1, 2, 32)
    zhist, hist, _ = _histograms(x, [0.0], [0.0])
    v = x.ravel().astype(np.float64)
    _assert_close_counts(zhist[0], v, fine_zbin_edges(), "z")
    _assert_close_counts(hist[0], v, bin_edges(), "raw")


@pytest.mark.slow
@pytest.mark.parametrize("n_blocks", [1, 4, 16])
def test_factor_pass_in_row_blocks_matches_float64(n_blocks):
    from reference import element_stats

    from spinjax.kernels import heads

    rng = np.random.default_rng(2)
    shape = (16, 64)
    w = np.stack([rng.normal(0.01, 0.2, shape), rng.standard_t(3, shape), rng.normal(5, 1e-3, shape)])
    w[1, 3, 7], w[1, 9, 0] = np.nan, -np.inf  # the masked branch, for every block count
    w_j = jnp.asarray(w, jnp.float32)  # heads 1 (NaN) and 2 (cancellation) need the measured std
    guess = heads.factor_moments_from_gram(w_j, heads.factor_grams(w_j, w_j)[0])
    unscaled = jnp.zeros(3, jnp.int32)  # the factors as they are (no power of two taken out)
    sums, mean, scale, _ = heads._settled_pass(heads._factor_pass(w_j, unscaled, n_blocks), *guess, unscaled)
    got = {k: np.asarray(v) for k, v in elements.summarize(sums, mean, scale).items()}
    for h in range(3):
        ref = element_stats(w[h].astype(np.float32).astype(np.float64))
        assert got["n_nonfinite"][h] == ref["n_nonfinite"]
        for k in ("mean", "std", "skew", "kurt"):
            assert got[k][h] == pytest.approx(ref[k], rel=1e-4, abs=1e-4 * ref["std"]), (h, k)
        for k in ("entropy", "kl_gauss"):  # SPEC: 1e-3 absolute
            assert got[k][h] == pytest.approx(ref[k], abs=1e-3), (h, k)
        finite = w[h][np.isfinite(w[h])].astype(np.float32).astype(np.float64)
        _assert_close_counts(got["hist"][h], finite, bin_edges(), f"head {h} raw")
        z = (finite - ref["mean"]) / ref["std"]
        # z moves by float32 rounding of the mean, relative to the std: 5e-4 for head 2
        slack = 1e-6 * np.abs(finite).max() / ref["std"]
        _assert_close_counts(got["zhist"][h], z, zbin_edges(), f"head {h} z", atol=slack)
