"""Cross-head geometry against explicit float64 d x d computations: the layer pairs from the
element pass (``layer_statistics(..., inner=True)``), the model pairs from the factors' cross-Grams
in blocks of layers (``run.features.model_pairs``), JS divergences of histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import js_divergence as js_reference

from spinjax.kernels.geometry import js_divergence, pair_summaries, pairwise_js
from spinjax.kernels.heads import layer_statistics
from spinjax.run.features import model_pairs


def _factors(rng, n_layers=2, n_heads=6, n_kv=2, d_head=4, d=24):
    wq = rng.normal(0.0, 0.3, (n_layers, n_heads, d_head, d)).astype(np.float32)
    wk = rng.normal(0.05, 0.5, (n_layers, n_kv, d_head, d)).astype(np.float32)
    return wq, wk


def _explicit(wq, wk):
    """Every head's W_QK as a float64 d x d matrix, flattened layer-major: (L * H, d, d)."""
    n_layers, n_heads = wq.shape[:2]
    group = n_heads // wk.shape[1]
    mats = [
        wq[layer, h].astype(np.float64).T @ wk[layer, h // group].astype(np.float64)
        for layer in range(n_layers)
        for h in range(n_heads)
    ]
    return np.stack(mats)


def _reference(mats):
    flat = mats.reshape(mats.shape[0], -1)
    inner = flat @ flat.T
    diff = mats[:, None] - mats[None, :]
    sq = (diff**2).sum((2, 3))
    norms = np.diag(inner)
    return inner, sq, inner / np.sqrt(norms[:, None] * norms[None, :])


def _layer_pairs(wq, wk):
    """What ``run --pairs layer`` computes for one layer: inner products from the element pass."""
    inner = np.asarray(layer_statistics(wq, wk, block_rows=7, inner=True)["qk_inner"], np.float64)
    return pair_summaries(inner, np.diagonal(inner).copy())


def _model_pairs(wq, wk, layers_per_block=None):
    """What ``run --pairs model`` computes, in blocks of ``layers_per_block`` layers (all: None)."""
    per_layer = 2 * wq[0].nbytes
    budget = 2 * per_layer * (layers_per_block or len(wq))
    out = model_pairs(lambda layer: (wq[layer], wk[layer]), len(wq), budget)
    n = wq.shape[0] * wq.shape[1]
    return {name.removesuffix("_model"): v.reshape(n, n) for name, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("n_kv", [6, 2], ids=["mha", "gqa"])
def test_layer_pairs_equal_explicit_float64(n_kv):
    wq, wk = _factors(np.random.default_rng(0), n_kv=n_kv)
    mats = _explicit(wq, wk).reshape(2, 6, *wq.shape[-1:] * 2)
    for layer in range(2):
        got = _layer_pairs(wq[layer], wk[layer])
        assert got["distance"].shape == (6, 6) and got["sq_norm"].shape == (6,)
        inner, sq, cos = _reference(mats[layer])
        scale = np.diag(inner).max()
        np.testing.assert_allclose(got["inner"], inner, atol=1e-5 * scale)
        np.testing.assert_allclose(got["sq_distance"], sq, atol=1e-5 * scale)
        np.testing.assert_allclose(got["distance"], np.sqrt(sq), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["cosine"], cos, atol=1e-5)
        np.testing.assert_allclose(got["sq_norm"], np.diag(inner), rtol=1e-5)


@pytest.mark.slow
def test_model_pairs_blockwise_equal_explicit_and_unblocked():
    wq, wk = _factors(np.random.default_rng(1), n_layers=3, n_heads=4, n_kv=2)
    inner, sq, cos = _reference(_explicit(wq, wk))
    whole = _model_pairs(wq, wk)
    blocked = _model_pairs(wq, wk, layers_per_block=2)  # 3 layers: blocks of 2 and 1
    single = _model_pairs(wq, wk, layers_per_block=1)
    scale = np.diag(inner).max()
    for got in (whole, blocked, single):
        assert got["qk_distance"].shape == (12, 12)
        np.testing.assert_allclose(got["qk_distance"] ** 2, sq, atol=1e-5 * scale)
        np.testing.assert_allclose(got["qk_cosine"], cos, atol=1e-5)
        np.testing.assert_allclose(got["qk_distance"], whole["qk_distance"], rtol=1e-6, atol=1e-6)
    # within-layer pairs of the model matrix are the layer pairs of the element pass
    for layer in range(3):
        s = slice(4 * layer, 4 * layer + 4)
        per_layer = _layer_pairs(wq[layer], wk[layer])
        np.testing.assert_allclose(blocked["qk_distance"][s, s], per_layer["distance"], atol=1e-5)


@pytest.mark.slow
def test_symmetric_zero_diagonal_and_related_heads():
    wq, wk = _factors(np.random.default_rng(2), n_layers=1, n_heads=5, n_kv=5)
    wq[0, 3], wk[0, 3] = wq[0, 1], wk[0, 1]  # head 3 is a copy of head 1
    wq[0, 4], wk[0, 4] = -2.0 * wq[0, 0], wk[0, 0]  # W_QK of head 4 is -2 W_QK of head 0
    layer = _layer_pairs(wq[0], wk[0])
    model = _model_pairs(wq, wk)
    n = layer["sq_norm"]
    for d, c in ((layer["distance"], layer["cosine"]), (model["qk_distance"], model["qk_cosine"])):
        assert np.array_equal(d, d.T) and np.array_equal(c, c.T)
        assert np.all(np.diag(d) == 0.0) and np.all(np.diag(c) == 1.0)
        assert d[1, 3] < 1e-3 * math.sqrt(n[1]) and c[1, 3] == pytest.approx(1.0, abs=1e-6)
        assert c[0, 4] == pytest.approx(-1.0, abs=1e-6)
        assert d[0, 4] ** 2 == pytest.approx(9.0 * n[0], rel=1e-5)  # ||W + 2W||^2
    assert n[4] == pytest.approx(4.0 * n[0], rel=1e-5)


@pytest.mark.slow
def test_zero_head_has_nan_cosine_and_norm_distance():
    wq, wk = _factors(np.random.default_rng(4), n_layers=1, n_heads=3, n_kv=3)
    wq[0, 2] = 0.0
    layer = _layer_pairs(wq[0], wk[0])
    model = _model_pairs(wq, wk)
    for c in (layer["cosine"], model["qk_cosine"]):
        assert np.isnan(c[2, 0]) and np.isnan(c[2, 2])
    assert layer["sq_distance"][2, 0] == pytest.approx(layer["sq_norm"][0], rel=1e-6)
    assert model["qk_distance"][2, 0] ** 2 == pytest.approx(layer["sq_norm"][0], rel=1e-5)


def test_js_identical_disjoint_and_reference():
    rng = np.random.default_rng(5)
    h = rng.integers(0, 50, (4, 1059)).astype(np.uint32)
    assert float(js_divergence(h[0], h[0])) == 0.0
    assert float(js_divergence(h[0], 3 * h[0])) == pytest.approx(0.0, abs=1e-7)  # normalised
    a = np.zeros(1059, np.uint32)
    b = np.zeros(1059, np.uint32)
    a[:500], b[500:] = 7, 3
    assert float(js_divergence(a, b)) == pytest.approx(math.log(2.0), abs=1e-6)
    for i, j in ((0, 1), (2, 3)):
        assert float(js_divergence(h[i], h[j])) == pytest.approx(js_reference(h[i], h[j]), abs=1e-6)
    sparse = np.zeros(1059, np.uint32)
    sparse[[10, 600]] = (1, 1000)
    assert np.isfinite(float(js_divergence(sparse, a)))


def test_pairwise_js_blocks_symmetric():
    rng = np.random.default_rng(6)
    h = rng.integers(0, 20, (7, 300)).astype(np.uint32)
    h[5] = 0  # an empty histogram (no finite entry): NaN row
    got = pairwise_js(h, block=3)
    assert got.shape == (7, 7) and np.array_equal(got, got.T, equal_nan=True)
    ok = [0, 1, 2, 3, 4, 6]
    assert np.all(np.diag(got)[ok] == 0.0) and np.all(np.isnan(got[5]))
    for i in ok:
        for j in ok:
            assert got[i, j] == pytest.approx(js_reference(h[i], h[j]), abs=1e-6)
    cross = pairwise_js(h[:2], h[2:5])
    np.testing.assert_allclose(cross, got[:2, 2:5], atol=1e-7)


@pytest.mark.parametrize("block_rows", [24, 7])  # whole blocks, and padded last block (masked pass)
@pytest.mark.slow
def test_inner_products_from_the_element_pass_equal_float64(block_rows):
    rng = np.random.default_rng(5)
    wq, wk = _factors(rng, n_layers=1)
    wq, wk = wq[0], wk[0]
    wk_per_head = np.repeat(wk, wq.shape[0] // wk.shape[0], axis=0)
    flat = np.einsum("had,hae->hde", wq.astype(np.float64), wk_per_head.astype(np.float64)).reshape(6, -1)
    out = layer_statistics(wq, wk, block_rows=block_rows, inner=True)
    np.testing.assert_allclose(out["qk_inner"], flat @ flat.T, rtol=1e-5, atol=1e-5 * np.abs(flat).max() ** 2)
    # a non-finite factor entry: its products are left out (taken as 0), the rest is exact
    wq_bad = wq.copy()
    wq_bad[1, 0, 3] = np.nan
    bad = np.einsum("had,hae->hde", np.nan_to_num(wq_bad.astype(np.float64), nan=0.0), wk_per_head)
    bad = bad.reshape(6, -1)
    keep = np.isfinite(np.einsum("had,hae->hde", wq_bad, wk_per_head)).reshape(6, -1)
    bad = np.where(keep, bad, 0.0)
    got = layer_statistics(wq_bad, wk, block_rows=block_rows, inner=True)["qk_inner"]
    np.testing.assert_allclose(got, bad @ bad.T, rtol=1e-5, atol=1e-5 * np.abs(flat).max() ** 2)
    assert "qk_inner" not in layer_statistics(wq, wk, block_rows=block_rows)
