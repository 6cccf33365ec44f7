"""Cross-head geometry: how far apart the W_QK matrices of two heads are, from the factors.

For heads i, j with factors W_Q (d_head, d_model) and W_K (d_head, d_model):

  <W_QK^i, W_QK^j>_F = trace(W_K^iT W_Q^i W_Q^jT W_K^j)
                     = sum_ab (W_Q^i W_Q^jT)_ab (W_K^i W_K^jT)_ab,

two d_head x d_head cross-Gram matrices multiplied entry by entry: no d_model x d_model
matrix is ever formed. Hence the squared Frobenius distance ||W^i - W^j||^2 = n_i + n_j -
2 <i, j> (n_i = <i, i>) and the cosine similarity <i, j> / sqrt(n_i n_j) (:func:`pair_summaries`).
The cost is O(N_a N_b d_head^2 d_model) for two blocks of N_a and N_b heads: a run holds blocks of
layers that fit its memory budget (``spinjax.run.features.model_pairs``). Within one layer the
run takes the inner products from the W_QK blocks its element pass forms anyway
(``heads.qk_sums(..., inner=True)``).

Distances come from a difference of inner products, so their absolute error is about
float32 eps * (n_i + n_j): two heads closer than ~1e-3 of their norms are not resolved.
Diagonals are exact: distance 0, cosine 1.

Jensen-Shannon divergence between element distributions uses the raw histograms on the
shared grid (``hist``), natural log: always finite, in [0, ln 2].

The examples use two heads sharing a key head, d_head 2, d_model 4: W_QK^0 has the entries
(0, 0) = 2 and (1, 2) = 1, W_QK^1 the entries (0, 0) = 2, (1, 0) = 2 and (3, 2) = 1, so
n_0 = 5, n_1 = 9, <0, 1> = 4, distance sqrt(5 + 9 - 8) and cosine 4 / sqrt(45).

References:
  J. Lin, "Divergence measures based on the Shannon entropy", IEEE Trans. Inf. Theory 37(1),
  1991 (Jensen-Shannon divergence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def cross_inner(wq_a: jax.Array, wk_a: jax.Array, wq_b: jax.Array, wk_b: jax.Array) -> jax.Array:
    """<W_QK^i, W_QK^j>_F for every head i of a and j of b: (H_a, H_b).

    Args:
      wq_a, wk_a: (H_a, d_head, d_model) per-head query and key factors (key heads already
        repeated per query head, see :func:`heads.expand_kv`); likewise ``wq_b``, ``wk_b``.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels.geometry import cross_inner, squared_norms
      >>> wq = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 1]]], np.float32)
      >>> wk = np.array([[[2, 0, 0, 0], [0, 0, 1, 0]]], np.float32)  # one key head for both
      >>> wk = np.repeat(wk, 2, axis=0)  # per query head
      >>> print(cross_inner(wq, wk, wq, wk))
      [[5. 4.]
       [4. 9.]]
      >>> print(squared_norms(wq, wk))
      [5. 9.]
    """
    gq = jnp.einsum("iad,jbd->ijab", wq_a, wq_b, precision=_HIGHEST)
    gk = jnp.einsum("iad,jbd->ijab", wk_a, wk_b, precision=_HIGHEST)
    return (gq * gk).sum((2, 3))


@jax.jit
def squared_norms(wq: jax.Array, wk: jax.Array) -> jax.Array:
    """||W_QK^h||_F^2 = <W_Q W_Q^T, W_K W_K^T> per head (H,), from (H, d_head, d_model) factors
    (example: :func:`cross_inner`)."""
    gq = jnp.einsum("had,hbd->hab", wq, wq, precision=_HIGHEST)
    gk = jnp.einsum("had,hbd->hab", wk, wk, precision=_HIGHEST)
    return (gq * gk).sum((1, 2))


def pair_summaries(inner: np.ndarray, norms: np.ndarray) -> dict[str, np.ndarray]:
    """Distances and cosines from inner products (N, N) and squared norms (N,), numpy float32:
    exactly symmetric, distance 0 and cosine 1 on the diagonal, cosine NaN for a zero norm.

    sq_distance_ij = max(n_i + n_j - 2 <i, j>, 0), cosine_ij = <i, j> / sqrt(n_i n_j) clipped
    to [-1, 1].

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels.geometry import pair_summaries
      >>> out = pair_summaries(np.array([[5.0, 4.0], [4.0, 9.0]]), np.array([5.0, 9.0]))
      >>> print(out["sq_distance"][0, 1], round(float(out["cosine"][0, 1]), 4))
      6.0 0.5963
    """
    n = inner.shape[0]
    eye = np.eye(n, dtype=bool)
    inner = 0.5 * (inner + inner.T)
    inner = np.where(eye, norms[:, None], inner)  # the diagonal is the norm, exactly
    sq = np.maximum(norms[:, None] + norms[None, :] - 2.0 * inner, 0.0)
    sq[eye] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = np.sqrt(norms[:, None] * norms[None, :])
        cosine = np.clip(np.where(denom > 0, inner / denom, np.nan), -1.0, 1.0)
    cosine[eye & (norms[:, None] > 0)] = 1.0
    return {
        "inner": inner.astype(np.float32),
        "sq_distance": sq.astype(np.float32),
        "distance": np.sqrt(sq).astype(np.float32),
        "cosine": cosine.astype(np.float32),
        "sq_norm": norms.astype(np.float32),
    }


@jax.jit
def js_divergence(p_counts: jax.Array, q_counts: jax.Array) -> jax.Array:
    """Jensen-Shannon divergence (natural log) between histograms on the same bins.

    ``p_counts``, ``q_counts`` (..., B) broadcast against each other (counts or
    probabilities; each is normalised). JS = KL(P || M)/2 + KL(Q || M)/2 with M = (P + Q)/2:
    finite, in [0, ln 2], 0 for identical and ln 2 for disjoint histograms; NaN when a
    histogram is empty.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels import js_divergence
      >>> print(np.round(js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])), 4))  # ln 2
      0.6931
      >>> print(js_divergence(np.array([1.0, 3.0]), np.array([2.0, 6.0])))  # same shape: 0
      0.0
      >>> print(js_divergence(np.zeros(2), np.ones(2)))
      nan
    """
    p = jnp.asarray(p_counts, jnp.float32)
    q = jnp.asarray(q_counts, jnp.float32)
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    m = p + q  # 2 M

    def half_kl(x):  # sum x ln(x / M) = sum x ln(2 x / (x + y)); terms with x = 0 are 0
        ratio = 2.0 * x / jnp.where(x > 0, m, 1.0)
        return jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, ratio, 1.0)), 0.0).sum(-1)

    return 0.5 * (half_kl(p) + half_kl(q))


def pairwise_js(hist_a, hist_b=None, *, block: int = 64) -> np.ndarray:
    """JS divergence between every histogram of ``hist_a`` (Na, B) and of ``hist_b`` (Nb, B).

    ``hist_b`` defaults to ``hist_a`` (then the result is symmetric with a zero diagonal).
    Rows are processed ``block`` at a time, so memory is ~ block * Nb * B floats.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels import pairwise_js
      >>> print(np.round(pairwise_js(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])), 4))
      [[0.     0.6931 0.2158]
       [0.6931 0.     0.2158]
       [0.2158 0.2158 0.    ]]
    """
    a = np.asarray(hist_a, np.float32)
    b = a if hist_b is None else np.asarray(hist_b, np.float32)
    n = a.shape[0]
    block = max(1, min(block, n))
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    if pad:  # one shape for every call; padding rows are all ones (finite) and dropped
        a = np.concatenate([a, np.ones((pad, a.shape[1]), np.float32)])
    bd = jax.device_put(b)
    rows = [
        np.asarray(js_divergence(a[i * block : (i + 1) * block, None, :], bd[None, :, :]))
        for i in range(n_blocks)
    ]
    out = np.concatenate(rows)[:n]
    if hist_b is None:
        out = 0.5 * (out + out.T)
        np.fill_diagonal(out, np.where(a[:n].sum(-1) > 0, 0.0, np.nan))
    return out
