"""Scale-free statistics do not depend on the weights' scale, over float32's range: the kernels
take the factors divided by powers of two (exact), so fp16 weights near 65,504, weights times
2^40 or 2^-70, and subnormal weights give the statistics of the same weights at unit scale."""

from __future__ import annotations

import numpy as np
import pytest

from spinjax.kernels.heads import layer_statistics, pow2_normalized
from spinjax.kernels.null import SCALE_LOG, SCALE_MUL

SCALE_FREE = (
    "skew", "kurt", "entropy_residual", "kl_gauss", "kl_gauss_mm", "kl_fit", "tail_mass", "ks_normal",
    "stable_rank", "spectral_entropy", "effective_rank", "participation_ratio", "condition_number",
    "zhist", "n_nonfinite", "sym_fraction", "eig_positivity",
)  # fmt: skip


def _layer(rng, n_heads=4, n_kv=2, d_head=8, d=64):
    wq = rng.standard_t(4, (n_heads, d_head, d)).astype(np.float32)
    wk = (rng.normal(0.1, 1.0, (n_kv, d_head, d))).astype(np.float32)
    return wq, wk


@pytest.fixture(scope="module")
def unit():
    wq, wk = _layer(np.random.default_rng(0))
    return wq, wk, layer_statistics(wq, wk, block_rows=16)


@pytest.mark.parametrize("log2", [-70, -20, 20, 40])
def test_scale_free_statistics_are_those_of_unit_scale(unit, log2):
    # products of weights times 2^-70 are subnormal in float32 (XLA flushed them to zero: skew
    # = kurt = 0); times 2^40 their fourth powers overflowed (NaN skew and kurt)
    wq, wk, ref = unit
    got = layer_statistics(np.ldexp(wq, log2), np.ldexp(wk, log2), block_rows=16)
    for name in SCALE_FREE:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    e = np.array([log2, log2, 2 * log2])  # W_Q, W_K, W_QK
    for name in SCALE_MUL:  # the scale-carrying ones, exactly scaled where float32 holds them
        scaled = np.ldexp(ref[name].astype(np.float64), e[:, None] if name == "singular_values" else e)
        normal = np.abs(scaled) >= np.finfo(np.float32).tiny
        np.testing.assert_array_equal(got[name][normal], scaled[normal].astype(np.float32), err_msg=name)
    for name in SCALE_LOG:
        np.testing.assert_allclose(got[name], ref[name] + e * np.log(2.0), rtol=0, atol=2e-5, err_msg=name)
    assert got["hist"].sum() == ref["hist"].sum()  # raw values move with the scale, none are lost


def test_fp16_weights_near_their_maximum():
    # fp16 weights up to 65,504: W_QK's entries are ~1e9 and their fourth powers ~1e38 (kurt was
    # inf, the participation ratio wrong); the same weights divided by 2^15 are small
    rng = np.random.default_rng(1)
    wq, wk = (np.clip(w * 20000, -65504, 65504).astype(np.float16) for w in _layer(rng))
    big = layer_statistics(wq.astype(np.float32), wk.astype(np.float32), block_rows=16)
    small = layer_statistics(np.ldexp(wq.astype(np.float32), -15), np.ldexp(wk.astype(np.float32), -15),
                             block_rows=16)  # fmt: skip
    assert np.abs(wq).max() > 60000 and np.isfinite(big["kurt"]).all()
    for name in SCALE_FREE:
        np.testing.assert_array_equal(big[name], small[name], err_msg=name)


def test_subnormal_weights():
    # weights of 2^-130: subnormal float32 (19 bits of mantissa left), no longer flushed to zero
    wq, wk = _layer(np.random.default_rng(2))
    tiny = layer_statistics(np.ldexp(wq, -130), np.ldexp(wk, -130), block_rows=16)
    rounded = [np.ldexp(np.ldexp(w, -130), 130) for w in (wq, wk)]  # the same values at unit scale
    ref = layer_statistics(*rounded, block_rows=16)
    assert (np.abs(np.ldexp(wq, -130)) < np.finfo(np.float32).tiny).all()
    for name in ("skew", "kurt", "stable_rank", "participation_ratio", "kl_gauss_mm", "ks_normal"):
        np.testing.assert_array_equal(tiny[name], ref[name], err_msg=name)
    assert (tiny["kurt"] != 0).all() and (tiny["n_nonfinite"] == 0).all()


def test_pow2_normalized_is_exact_and_bounded():
    rng = np.random.default_rng(3)
    scales = np.float32(2.0) ** np.arange(-140, 100, 48)[:, None, None]  # subnormal to 2^100
    w = (rng.normal(0, 1, (5, 4, 16)) * scales).astype(np.float32)
    w[2, 0, 0] = np.nan
    n, e = pow2_normalized(w)
    magnitude = np.nanmax(np.abs(n).reshape(5, -1), axis=1)
    assert ((0.5 <= magnitude) & (magnitude < 1)).all()
    np.testing.assert_array_equal(np.ldexp(n, e[:, None, None]), w)  # nothing rounded
