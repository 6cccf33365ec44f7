"""Random-matrix null model: Gaussian factors, and z-scores of statistics against their null.

The null of a head of geometry (d_model, d_head) is W_QK = W_Q^T W_K with W_Q, W_K
(d_head, d_model) of i.i.d. N(0, sigma^2) entries. Its statistics are those of SPEC section 4,
computed by the same kernels as real heads (``heads.layer_statistics`` on a batch of draws
treated as the heads of one layer): this module only draws the factors and compares.

Draw ``i`` of seed ``s`` uses the key ``fold_in(PRNGKey(s), i)``, so an ensemble does not
depend on how it was cut into batches, and draws ``n..m`` of a seed extend draws ``0..n``.

Scale: a null at sigma0 describes heads at any other scale exactly. With W_Q = a Z_Q and
W_K = b Z_K, W_QK = a b Z_Q^T Z_K, so the statistics of W_Q, W_K, W_QK at scales
(a, b, a b) relative to the null are those of the null with ``SCALE_MUL`` statistics
multiplied by the scale, ``SCALE_LOG`` ones shifted by its log, and all others unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp

# statistics proportional to the matrix scale; entropies shift by ln(scale); the rest are
# scale-free (skew, kurt, entropy_residual, kl_*, tail_mass, spectral ratios)
SCALE_MUL = (
    "mean", "std", "min", "max", "mu_fit", "sigma_fit",
    "spectral_norm", "frobenius_norm", "singular_values",
)  # fmt: skip
SCALE_LOG = ("entropy", "entropy_mm")
NOT_SCORED = ("zhist", "hist", "n_nonfinite")  # counts: no z-score


@partial(jax.jit, static_argnames=("n", "d_model", "d_head"))
def gaussian_factors(
    key: jax.Array,
    first: jax.Array | int,
    sigma: jax.Array | float = 1.0,
    *,
    n: int,
    d_model: int,
    d_head: int,
) -> tuple[jax.Array, jax.Array]:
    """Draws ``first .. first + n - 1`` of the null: W_Q, W_K each (n, d_head, d_model), N(0, sigma^2).

    ``key`` is the ensemble's key (``jax.random.PRNGKey(seed)``); draw i uses
    ``fold_in(key, i)``. ``first`` is traced, so every batch of one size shares a compilation.

    Examples:
      >>> import jax, numpy as np
      >>> from spinjax.kernels import gaussian_factors
      >>> key = jax.random.PRNGKey(0)
      >>> wq, wk = gaussian_factors(key, 0, 1.0, n=4, d_model=8, d_head=2)  # draws 0..3
      >>> wq2, wk2 = gaussian_factors(key, 2, 0.5, n=4, d_model=8, d_head=2)  # draws 2..5
      >>> print(wq.shape, np.array_equal(wq[2:], 2 * wq2[:2]), np.array_equal(wk[2:], 2 * wk2[:2]))
      (4, 2, 8) True True
    """

    def one(i):
        kq, kk = jax.random.split(jax.random.fold_in(key, i))
        shape = (d_head, d_model)
        return jax.random.normal(kq, shape, jnp.float32), jax.random.normal(kk, shape, jnp.float32)

    wq, wk = jax.vmap(one)(jnp.asarray(first, jnp.uint32) + jnp.arange(n, dtype=jnp.uint32))
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma * wq, sigma * wk


def null_moments(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and standard deviation (ddof 1) over the first axis, finite samples only.

    NaN where fewer than two samples are finite.

    Examples:
      >>> import jax.numpy as jnp
      >>> from spinjax.kernels.null import null_moments
      >>> print(*null_moments(jnp.array([1.0, 2.0, 3.0, jnp.nan])))
      2.0 1.0
    """
    x = jnp.asarray(samples, jnp.float32)
    finite = jnp.isfinite(x)
    n = finite.sum(0)
    mean = jnp.where(finite, x, 0.0).sum(0) / jnp.where(n > 0, n, 1)
    dev = jnp.where(finite, x - mean, 0.0)
    var = (dev * dev).sum(0) / jnp.where(n > 1, n - 1, 1)
    ok = n > 1
    return jnp.where(ok, mean, jnp.nan), jnp.where(ok, jnp.sqrt(var), jnp.nan)


def matched_scale(frobenius_norm: jax.Array, *, d_model: int, d_head: int, sigma: float = 1.0) -> jax.Array:
    """Scale of each matrix relative to a null at ``sigma``, from the heads' own Frobenius norms.

    ``frobenius_norm`` (..., 3) over (W_Q, W_K, W_QK) as stored; the factors' RMS entries
    r_Q = ||W_Q||_F / sqrt(d_head d_model), r_K likewise, give (r_Q, r_K, r_Q r_K) / (sigma,
    sigma, sigma^2): the ``scale`` argument of :func:`null_zscores`.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels import matched_scale
      >>> # W_Q with RMS entry 0.5, W_K with RMS entry 2 (d_head 2 x d_model 4: 8 entries)
      >>> f = np.array([0.5 * np.sqrt(8), 2.0 * np.sqrt(8), 1.0], np.float32)
      >>> print(np.round(matched_scale(f, d_model=4, d_head=2), 4))
      [0.5 2.  1. ]
    """
    f = jnp.asarray(frobenius_norm, jnp.float32)
    rms = f[..., :2] / jnp.sqrt(jnp.float32(d_head * d_model))
    rq, rk = rms[..., 0], rms[..., 1]
    return jnp.stack([rq / sigma, rk / sigma, rq * rk / (sigma * sigma)], axis=-1)


def null_zscores(
    stats: Mapping[str, jax.Array],
    baseline: Mapping[str, jax.Array],
    *,
    scale: jax.Array | None = None,
    names: tuple[str, ...] | None = None,
) -> dict[str, jax.Array]:
    """``<stat>_z`` = (value - mean over null samples) / std over null samples, per matrix.

    Args:
      stats: name -> array (..., 3[, sv]) with the ``matrix`` dim (W_Q, W_K, W_QK) where the
        store has it, e.g. the output of ``layer_statistics`` (heads, 3) or a store variable
        (step, layer, head, matrix).
      baseline: name -> array (samples, 3[, sv]), the null ensemble (a ``baseline/<d>x<dh>``
        group of the store, or the output of ``spinjax.baseline.compute_baseline``).
      scale: optional (..., 3), each matrix's scale relative to the null's (see
        :func:`matched_scale`); values are brought to the null's scale first (``SCALE_MUL``
        divided, ``SCALE_LOG`` shifted by -ln(scale)). None: same scale.
      names: statistics to score; default every one in both mappings except the counts.

    Returns:
      ``<name>_z`` -> float32 array of the value's shape; NaN where the null's std is 0 or
      not finite, or the value is NaN; an infinite value gives an infinite z-score.

    Examples:
      >>> import jax.numpy as jnp
      >>> from spinjax.kernels import null_zscores
      >>> null = {"std": jnp.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]]),
      ...         "kurt": jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])}
      >>> head = {"std": jnp.array([[4.0, 2.0, 0.5]]), "kurt": jnp.array([[3.0, 1.0, 1.0]])}
      >>> z = null_zscores(head, null)  # null mean 2 and std 1 for std; 1 and 1 for kurt
      >>> print(z["std_z"], z["kurt_z"])
      [[ 2.   0.  -1.5]] [[2. 0. 0.]]
      >>> z = null_zscores(head, null, scale=jnp.array([[2.0, 1.0, 0.25]]))  # std / scale first
      >>> print(z["std_z"], z["kurt_z"])  # kurt is scale-free
      [[0. 0. 0.]] [[2. 0. 0.]]
    """
    if names is None:
        names = tuple(n for n in stats if n in baseline and n not in NOT_SCORED)
    out = {}
    for name in names:
        v = jnp.asarray(stats[name], jnp.float32)
        if scale is not None and name in SCALE_MUL + SCALE_LOG:
            s = jnp.asarray(scale, jnp.float32)
            s = s[..., None] if name == "singular_values" else s  # scale is per matrix
            v = v / s if name in SCALE_MUL else v - jnp.log(s)
        mean, std = null_moments(baseline[name])
        ok = (std > 0) & jnp.isfinite(std)
        out[f"{name}_z"] = jnp.where(ok, (v - mean) / jnp.where(ok, std, 1.0), jnp.nan)
    return out
