"""Singular values of W_Q, W_K and W_QK = W_Q^T W_K from the factors, and their summaries.

W_QK is never decomposed as a d_model x d_model matrix: with W_Q^T = Q_q R_q and
W_K^T = Q_k R_k (thin QR, orthonormal Q), W_QK = Q_q (R_q R_k^T) Q_k^T, so its singular
values are those of the d_head x d_head matrix R_q R_k^T (SPEC section 4).

Two ways to the R factors: :func:`gram_singular_values` takes them from the Grams w w^T that
the binning guess computes anyway (Cholesky QR: R = chol(w w^T)^T), much cheaper than a
Householder QR of the factors on CPUs (no pass over the d_model-long factors), but its error
grows with the factors' conditioning; :func:`factor_singular_values` (Householder, accurate at
any conditioning) takes the heads whose conditioning the Gram route cannot afford.

References:
  G. H. Golub, C. F. Van Loan, "Matrix Computations", 4th ed., 2013 (thin QR, SVD);
  A. Stathopoulos, K. Wu, "A block orthogonalization procedure with constant synchronization
  requirements", SIAM J. Sci. Comput. 23(6), 2002 (Cholesky QR); Y. Yamamoto et al.,
  "Roundoff error analysis of the CholeskyQR2 algorithm", ETNA 44, 2015.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
# The Gram route's error relative to s_1 (float64 reference, fp16-valued factors, d_model
# 768..5120) stayed below 1.5e-8 x (cond(W_Q) + cond(W_K)) x s_1(W_Q) s_1(W_K) / s_1(W_QK), and at
# 2e-6..5e-6 on random factors, like the Householder route. Trusting it while that product is at
# most this limit keeps it under ~3e-5, 3x inside SPEC's 1e-4 (worst trusted seen: 1.6e-5).
GRAM_ROUTE_LIMIT = 2000.0


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

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels.spectra import factor_singular_values
      >>> wq = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 1]]], np.float32)
      >>> wk = np.array([[[2, 0, 0, 0], [0, 0, 1, 0]]], np.float32)  # shared by both heads
      >>> print(np.round(factor_singular_values(wq, wk)[1], 4))  # head 1: W_Q, W_K, W_QK
      [[1.4142 1.    ]
       [2.     1.    ]
       [2.8284 1.    ]]
      >>> W_QK = wq[1].T @ wk[0]  # the same from the explicit 4 x 4 matrix
      >>> print(np.round(np.linalg.svd(W_QK, compute_uv=False)[:2], 4))
      [2.8284 1.    ]
    """
    n_q = wq.shape[0]
    w = jnp.concatenate([wq, wk])
    w = jnp.where(jnp.isfinite(w), w, 0.0)
    # One batched QR and one batched SVD: XLA:CPU runs independent LAPACK calls of one program
    # concurrently, and each blocks a worker of the intra-op pool while its batch is spread over
    # that pool; with two cores, two such calls in flight wait on each other forever.
    r = _r_factor(w)
    return _singular_values(r[:n_q], r[n_q:])


def _singular_values(rq: jax.Array, rk: jax.Array) -> jax.Array:
    """(H, 3, d_head) singular values of R_q, R_k (per query head) and R_q R_k^T: one batched SVD."""
    n_q, n_kv = rq.shape[0], rk.shape[0]
    core = jnp.matmul(rq, jnp.swapaxes(jnp.repeat(rk, n_q // n_kv, axis=0), -1, -2), precision=_HIGHEST)
    s = jnp.linalg.svd(jnp.concatenate([rq, rk, core]), compute_uv=False)
    s_k = jnp.repeat(s[n_q : n_q + n_kv], n_q // n_kv, axis=0)
    return jnp.stack([s[:n_q], s_k, s[n_q + n_kv :]], axis=-2)


@jax.jit
def gram_singular_values(gram_q: jax.Array, gram_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`factor_singular_values` from the factors' Grams, and whether each head is trusted.

    Args:
      gram_q: (H, d_head, d_head) w w^T of the query factors.
      gram_k: (H_kv, d_head, d_head) the same of the key factors.

    Returns:
      (H, 3, d_head) singular values, and (H,) bool: False where the conditioning makes them
      less accurate than SPEC's 1e-4 might need (see ``GRAM_ROUTE_LIMIT``), or where a Gram is
      not positive definite (rank-deficient or non-finite factors): recompute those with
      :func:`factor_singular_values`.

    A head is trusted when (cond(W_Q) + cond(W_K)) s_1(W_Q) s_1(W_K) / s_1(W_QK) <=
    ``GRAM_ROUTE_LIMIT``, every value is finite and W_Q, W_K have full rank (s_k > 0).

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels.heads import factor_grams
      >>> from spinjax.kernels.spectra import gram_singular_values
      >>> wq = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 0]]], np.float32)
      >>> wk = np.array([[[2, 0, 0, 0], [0, 0, 1, 0]]], np.float32)
      >>> s, trusted = gram_singular_values(*factor_grams(wq, wk))
      >>> print(np.round(s[0], 4))  # head 0: W_Q, W_K, W_QK
      [[1. 1.]
       [2. 1.]
       [2. 1.]]
      >>> print(trusted)  # head 1's W_Q has rank 1: its Gram has no Cholesky factor
      [ True False]
    """
    n_q = gram_q.shape[0]
    # One Cholesky and one SVD, one after the other: never two LAPACK calls in flight at once
    # (see factor_singular_values).
    r = jnp.swapaxes(jnp.linalg.cholesky(jnp.concatenate([gram_q, gram_k])), -1, -2)
    s = _singular_values(r[:n_q], r[n_q:])
    top, bottom = s[..., 0], s[..., -1]
    cond = top[:, :2] / bottom[:, :2]
    amplification = top[:, 0] * top[:, 1] / top[:, 2]
    bound = cond.sum(-1) * amplification
    trusted = jnp.isfinite(s).all((-2, -1)) & (bottom[:, :2] > 0).all(-1) & (bound <= GRAM_ROUTE_LIMIT)
    return s, trusted


def spectral_summaries(s: jax.Array) -> dict[str, jax.Array]:
    """SPEC section 4 spectral statistics of descending singular values ``s`` (..., k).

    With lambda_i = s_i^2 and p_i = lambda_i / sum(lambda): spectral_norm = s_1,
    frobenius_norm = sqrt(sum lambda), stable_rank = sum(lambda) / lambda_1,
    spectral_entropy = -sum p_i ln p_i (0 ln 0 = 0), effective_rank = exp(spectral_entropy),
    participation_ratio = (sum lambda)^2 / sum(lambda^2) (in [1, k]), condition_number =
    s_1 / s_k (inf when s_k = 0). An all-zero spectrum has zero norms and NaN for the rest.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from spinjax.kernels.spectra import spectral_summaries
      >>> out = jax.jit(spectral_summaries)(jnp.array([2.0, 1.0, 1.0, 0.0]))  # lambda 4, 1, 1, 0
      >>> for name in ("spectral_norm", "frobenius_norm", "stable_rank", "spectral_entropy",
      ...              "effective_rank", "participation_ratio", "condition_number"):
      ...     print(name, round(float(out[name]), 4))
      spectral_norm 2.0
      frobenius_norm 2.4495
      stable_rank 1.5
      spectral_entropy 0.8676
      effective_rank 2.3811
      participation_ratio 2.0
      condition_number inf

      Here sqrt(6), 6 / 4, -(2/3 ln(2/3) + 2 (1/6) ln(1/6)) and 6^2 / (16 + 1 + 1).

    References:
      M. Rudelson, R. Vershynin, "Sampling from large matrices: an approach through geometric
      functional analysis", J. ACM 54(4), 2007 (stable rank); O. Roy, M. Vetterli, "The
      effective rank: a measure of effective dimensionality", EUSIPCO 2007; P. Gao et al., "A
      theory of multineuronal dimensionality, dynamics and measurement", bioRxiv 2017
      (participation ratio).
    """
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
