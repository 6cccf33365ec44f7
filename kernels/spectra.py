"""Singular values of W_Q, W_K and W_QK = W_Q^T W_K from the factors, and their summaries.

W_QK is never decomposed as a d_model x d_model matrix: with W_Q^T = Q_q R_q and
W_K^T = Q_k R_k (thin QR, orthonormal Q), W_QK = Q_q (R_q R_k^T) Q_k^T, so its singular
values are those of the d_head x d_head matrix R_q R_k^T (SPEC section 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _r_factor(w: jax.Array) -> jax.Array:
    """R of the thin QR of w^T, for w (..., d_head, d_model) with d_model >= d_head."""
    return jnp.linalg.qr(jnp.swapaxes(w, -1, -2), mode="r")


@jax.jit
def factor_singular_values(wq: jax.Array, wk: jax.Array) -> jax.Array:
    """Singular values, descending, of W_Q, W_K and W_QK per query head.

    Args:
      wq: (H, d_head, d_model) query factors.
      wk: (H_kv, d_head, d_model) key factors; query head h uses key head h // (H // H_kv),
        and each key head is decomposed once. Non-finite entries are treated as zero.

    Returns:
      (H, 3, d_head) for the matrices (W_Q, W_K, W_QK) in that order.
    """
    n_q, n_kv = wq.shape[0], wk.shape[0]
    w = jnp.concatenate([wq, wk])
    w = jnp.where(jnp.isfinite(w), w, 0.0)
    # One batched QR and one batched SVD: XLA:CPU runs independent LAPACK calls of one program
    # concurrently, and each blocks a worker of the intra-op pool while its batch is spread over
    # that pool; with two cores, two such calls in flight wait on each other forever.
    r = _r_factor(w)
    rq, rk = r[:n_q], r[n_q:]
    core = jnp.matmul(rq, jnp.swapaxes(jnp.repeat(rk, n_q // n_kv, axis=0), -1, -2), precision=_HIGHEST)
    s = jnp.linalg.svd(jnp.concatenate([rq, rk, core]), compute_uv=False)
    s_k = jnp.repeat(s[n_q : n_q + n_kv], n_q // n_kv, axis=0)
    return jnp.stack([s[:n_q], s_k, s[n_q + n_kv :]], axis=-2)


def spectral_summaries(s: jax.Array) -> dict[str, jax.Array]:
    """SPEC section 4 spectral statistics of descending singular values ``s`` (..., k)."""
    lam = s * s
    total = lam.sum(-1)
    p = lam / total[..., None]
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    entropy = jnp.where(total > 0, -plogp.sum(-1), jnp.nan)  # all-zero spectrum: undefined
    s_min = s[..., -1]
    condition = jnp.where(s_min > 0, s[..., 0] / jnp.where(s_min > 0, s_min, 1.0), jnp.inf)
    return {
        "spectral_norm": s[..., 0],
        "frobenius_norm": jnp.sqrt(total),
        "stable_rank": total / lam[..., 0],
        "spectral_entropy": entropy,
        "effective_rank": jnp.exp(entropy),
        "participation_ratio": total * total / (lam * lam).sum(-1),
        "condition_number": jnp.where(total > 0, condition, jnp.nan),
    }
