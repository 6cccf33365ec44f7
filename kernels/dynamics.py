"""Training dynamics of a head across checkpoints: leading singular directions of W_QK, their
overlaps between consecutive steps, level crossings and repulsions, histogram divergences.

Singular directions come from the factors, like the spectrum (kernels/spectra.py): with
W_Q^T = Q_q R_q and W_K^T = Q_k R_k (thin QR), W_QK = Q_q (R_q R_k^T) Q_k^T, and with the SVD
R_q R_k^T = U S V^T the left / right singular vectors of W_QK are Q_q U and Q_k V. No
d_model x d_model matrix is formed.

Overlaps between steps a < b: O[i, j] = |u_i(a) . u_j(b)| (absolute: a singular vector is
defined up to its sign), one k x k matrix per head and side (left, right).

Mode events, per pair of neighbouring modes (i, i + 1) at step t (from t - 1 to t):

- relative gap g_t(i) = (s_i - s_{i+1}) / s_i at each step (NaN where s_i = 0); the pair is
  near-degenerate when g < ``gap_tol`` (default 0.1: the two values within 10% of each other).
- from the overlaps of t - 1 -> t restricted to the pair's 2 x 2 block, squared and averaged
  over both sides (left and right singular vectors, which rotate together in a degenerate
  pair): kept = (O_ii^2 + O_{i+1,i+1}^2) / 2, swapped = (O_{i,i+1}^2 + O_{i+1,i}^2) / 2.
  kept + swapped <= 1, with equality when the pair's plane is preserved; for a rotation of
  that plane by an angle theta they are cos^2 theta and sin^2 theta.
- **crossing** (code 1) at t: swapped > 1/2 (each direction moved mostly onto the other one's
  place, so the values of the two tracked modes changed order) and the pair is near-degenerate
  at t - 1 or at t.
- **repulsion** (code 2) at t: the gap closed and reopened with the directions kept: the pair
  is near-degenerate at t - 1, g_{t-1} is a strict local minimum (g_{t-2} > g_{t-1} < g_t), and
  kept > 1/2 on both transitions t-2 -> t-1 and t-1 -> t. Recorded at t, when the reopening is
  seen (so never before the third step).
- 0 otherwise, and always for the last mode (it has no partner). The first step is -1 (no
  predecessor; also the fill value of steps not computed). kept and swapped cannot both
  exceed 1/2, so the codes exclude each other.

KL between histograms on the shared raw grid is smoothed so that it is always finite: 0.5 is
added to the count of every bin occupied in either histogram (Krichevsky-Trofimov / Jeffreys
pseudo-count), bins empty in both are left out, then KL(P || Q) = sum p ln(p / q). Identical
histograms give exactly 0. (Jensen-Shannon needs no smoothing: :func:`geometry.js_divergence`.)

References:
  J. von Neumann, E. Wigner, "Über das Verhalten von Eigenwerten bei adiabatischen Prozessen",
  Physikalische Zeitschrift 30, 1929 (avoided crossings, level repulsion); R. E. Krichevsky,
  V. K. Trofimov, "The performance of universal encoding", IEEE Trans. Inf. Theory 27(2),
  1981 (the 1/2 pseudo-count).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
GAP_TOL = 0.1
PSEUDO_COUNT = 0.5
NO_EVENT, CROSSING, REPULSION, NO_PREDECESSOR = 0, 1, 2, -1
EVENT_CODES = {
    NO_PREDECESSOR: "first step (no predecessor) or not computed",
    NO_EVENT: "none",
    CROSSING: "crossing",
    REPULSION: "repulsion",
}


@partial(jax.jit, static_argnames="k")
def top_singular_vectors(wq: jax.Array, wk: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-``k`` singular values and vectors of every query head's W_QK, from the factors.

    Args:
      wq: (H, d_head, d_model) query factors; wk: (H_kv, d_head, d_model) key factors, query
        head h using key head h // (H // H_kv). Non-finite entries are treated as zero.
      k: how many leading modes, at most d_head (W_QK has rank <= d_head).

    Returns:
      ``s`` (H, k) descending, ``left`` (H, d_model, k) and ``right`` (H, d_model, k) with
      orthonormal columns: W_QK^h = sum_i s_i left_i right_i^T + (the other d_head - k modes).

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels import top_singular_vectors
      >>> wq = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 1]]], np.float32)
      >>> wk = np.array([[[2, 0, 0, 0], [0, 0, 1, 0]]], np.float32)
      >>> s, left, right = top_singular_vectors(wq, wk, 2)
      >>> print(np.round(s, 4))
      [[2.     1.    ]
       [2.8284 1.    ]]
      >>> print(np.round(np.abs(right[0].T), 4) + 0.0)  # W_QK^0 = 2 e0 e0^T + e1 e2^T
      [[1. 0. 0. 0.]
       [0. 0. 1. 0.]]
      >>> rebuilt = np.einsum("hk,hdk,hek->hde", s, left, right)
      >>> print(np.allclose(rebuilt[1], wq[1].T @ wk[0], atol=1e-6))
      True
    """
    n_q, n_kv = wq.shape[0], wk.shape[0]
    if not 1 <= k <= wq.shape[1]:
        raise ValueError(f"k must be in 1..d_head={wq.shape[1]}, not {k}")
    w = jnp.concatenate([wq, wk])
    w = jnp.where(jnp.isfinite(w), w, 0.0)
    # One batched QR, then one batched SVD that depends on it: never two independent LAPACK
    # calls in one program (they deadlock XLA:CPU's pool on two cores; see kernels/spectra.py).
    q, r = jnp.linalg.qr(jnp.swapaxes(w, -1, -2))  # (n, d_model, d_head), (n, d_head, d_head)
    group = n_q // n_kv
    qk, rk = jnp.repeat(q[n_q:], group, axis=0), jnp.repeat(r[n_q:], group, axis=0)
    core = jnp.matmul(r[:n_q], jnp.swapaxes(rk, -1, -2), precision=_HIGHEST)
    u, s, vt = jnp.linalg.svd(core, full_matrices=False)
    left = jnp.matmul(q[:n_q], u[..., :k], precision=_HIGHEST)
    right = jnp.matmul(qk, jnp.swapaxes(vt, -1, -2)[..., :k], precision=_HIGHEST)
    return s[:, :k], left, right


@jax.jit
def overlaps(before: jax.Array, after: jax.Array) -> jax.Array:
    """|before_i . after_j| for singular vectors (..., d, k) of two steps: (..., k, k).

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels import overlaps
      >>> c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)  # the plane turned by 30 degrees
      >>> print(np.round(overlaps(np.eye(2), np.array([[c, -s], [s, c]])), 4))
      [[0.866 0.5  ]
       [0.5   0.866]]
    """
    return jnp.abs(jnp.einsum("...di,...dj->...ij", before, after, precision=_HIGHEST))


def relative_gaps(s: jax.Array) -> jax.Array:
    """(s_i - s_{i+1}) / s_i for descending values (..., k): (..., k - 1), NaN where s_i = 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> from spinjax.kernels.dynamics import relative_gaps
      >>> print(relative_gaps(jnp.array([4.0, 3.0, 3.0, 0.0])), relative_gaps(jnp.array([2.0, 0.0, 0.0])))
      [0.25 0.   1.  ] [ 1. nan]
    """
    s = jnp.asarray(s, jnp.float32)
    top = s[..., :-1]
    return jnp.where(top > 0, (top - s[..., 1:]) / jnp.where(top > 0, top, 1.0), jnp.nan)


def pair_weights(overlap_left: jax.Array, overlap_right: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(kept, swapped) weight of each neighbour pair (i, i + 1), from overlaps (..., k, k):
    each (..., k - 1), averaged over the two sides (see the module docstring).

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels.dynamics import pair_weights
      >>> c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
      >>> o = np.abs(np.array([[c, -s], [s, c]]))  # both sides turned by 30 degrees
      >>> kept, swapped = pair_weights(o, o)
      >>> print(np.round(kept, 4), np.round(swapped, 4))  # cos^2 and sin^2 of 30 degrees
      [0.75] [0.25]
    """

    def side(o):
        o2 = jnp.square(jnp.asarray(o, jnp.float32))
        diag = jnp.diagonal(o2, axis1=-2, axis2=-1)
        kept = 0.5 * (diag[..., :-1] + diag[..., 1:])
        swapped = 0.5 * (jnp.diagonal(o2, 1, -2, -1) + jnp.diagonal(o2, -1, -2, -1))
        return kept, swapped

    (kl, sl), (kr, sr) = side(overlap_left), side(overlap_right)
    return 0.5 * (kl + kr), 0.5 * (sl + sr)


@partial(jax.jit, static_argnames="gap_tol")
def mode_events(
    s: jax.Array, overlap_left: jax.Array, overlap_right: jax.Array, gap_tol: float = GAP_TOL
) -> jax.Array:
    """Crossing / repulsion codes of neighbouring modes along a trajectory.

    Args:
      s: (T, ..., k) descending singular values at T consecutive steps.
      overlap_left, overlap_right: (T, ..., k, k) overlaps of step t - 1 with step t (entry 0
        is ignored).
      gap_tol: relative gap below which a pair is near-degenerate.

    Returns:
      int8 (T, ..., k): code of the pair (i, i + 1) at each step (module docstring): -1 at
      t = 0, else 0 none, 1 crossing, 2 repulsion; the last mode is always 0.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels import mode_events
      >>> swap, keep = np.array([[0.0, 1.0], [1.0, 0.0]]), np.eye(2)
      >>> s = np.array([[1.0, 0.95], [1.0, 0.96]])  # near-degenerate, directions swapped
      >>> print(mode_events(s, np.stack([swap, swap]), np.stack([swap, swap])))
      [[-1 -1]
       [ 1  0]]
      >>> s = np.array([[1.0, 0.8], [1.0, 0.95], [1.0, 0.8]])  # gap 0.2, 0.05, 0.2, kept
      >>> print(mode_events(s, np.stack([keep] * 3), np.stack([keep] * 3)))
      [[-1 -1]
       [ 0  0]
       [ 2  0]]
    """
    g = relative_gaps(s)  # (T, ..., k-1)
    kept, swapped = pair_weights(overlap_left, overlap_right)
    nan = jnp.full_like(g[:1], jnp.nan)
    g_prev = jnp.concatenate([nan, g[:-1]])
    g_prev2 = jnp.concatenate([nan, nan, g[:-2]])[: g.shape[0]]
    kept_prev = jnp.concatenate([nan, kept[:-1]])
    near = jnp.fmin(g_prev, g) < gap_tol  # fmin: a NaN gap at one end does not hide the other
    crossing = (swapped > 0.5) & near
    repulsion = (g_prev < gap_tol) & (g_prev2 > g_prev) & (g > g_prev) & (kept > 0.5) & (kept_prev > 0.5)
    code = jnp.where(crossing, CROSSING, jnp.where(repulsion, REPULSION, NO_EVENT)).astype(jnp.int8)
    code = jnp.concatenate([code, jnp.zeros(code.shape[:-1] + (1,), code.dtype)], axis=-1)  # last mode
    return code.at[0].set(NO_PREDECESSOR)


@partial(jax.jit, static_argnames="pseudo")
def kl_smoothed(p_counts: jax.Array, q_counts: jax.Array, pseudo: float = PSEUDO_COUNT) -> jax.Array:
    """KL(P || Q) (natural log) between count histograms (..., B) on the same bins, finite.

    ``pseudo`` is added to every bin occupied in P or Q (bins empty in both stay out), then
    each is normalised. 0 for identical histograms; NaN when both are empty.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels import kl_smoothed
      >>> p, q = np.array([2.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0])
      >>> print(np.round(kl_smoothed(p, q), 4), kl_smoothed(p, p))  # (5/6 - 1/6) ln 5, and 0
      1.073 0.0
    """
    p = jnp.asarray(p_counts, jnp.float32)
    q = jnp.asarray(q_counts, jnp.float32)
    support = (p > 0) | (q > 0)
    p = jnp.where(support, p + pseudo, 0.0)
    q = jnp.where(support, q + pseudo, 0.0)
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    ratio = jnp.where(support, p / jnp.where(support, q, 1.0), 1.0)
    return jnp.where(support, p * jnp.log(ratio), 0.0).sum(-1)
