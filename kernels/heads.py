"""All statistics of every head of one layer: the per-layer entry point of the kernels.

Inputs are the per-head factors of one layer, float32:
  wq (n_heads, d_head, d_model), wk (n_kv_heads, d_head, d_model).
Query head h uses key head h // (n_heads // n_kv_heads) (SPEC section 1).
Outputs are arrays with leading dims (n_heads, 3) over the matrices (W_Q, W_K, W_QK).

W_QK's d_model x d_model entries exist only one block of rows (of one head on CPUs, of all
heads elsewhere: :func:`heads_per_block`) at a time, inside a compiled loop: peak memory is set
by ``block_rows``, which :func:`block_rows_for_budget` derives from a byte budget.

The examples below use one layer of two query heads sharing one key head (grouped-query
attention), d_head 2, d_model 4, whose W_QK can be checked by hand:
W_QK^0 = e0 (2 e0)^T + e1 e2^T and W_QK^1 = (e0 + e1)(2 e0)^T + e3 e2^T.

References:
  N. Elhage et al., "A Mathematical Framework for Transformer Circuits", Transformer Circuits
  Thread, 2021 (W_QK); J. Ainslie et al., "GQA: Training Generalized Multi-Query Transformer
  Models from Multi-Head Checkpoints", EMNLP 2023.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import bins, elements, spectra
from .null import SCALE_LOG, SCALE_MUL

_HIGHEST = jax.lax.Precision.HIGHEST
# Bytes live per W_QK entry of a block while it is summarised: the float32 block, its shifted
# copy and powers, z and two bin indices; a deliberate over-estimate so the budget holds.
BYTES_PER_BLOCK_ENTRY = 32
MIN_BLOCK_ROWS = 32  # XLA:CPU forms a block at a fraction of its matmul rate with fewer rows


def block_entries_cap() -> int | None:
    """Largest W_QK block (entries, all heads of a block) worth forming on this backend.

    On CPUs the element pass reads each block several times (the moments, the bin indices, the
    shifted copy); blocks of ~8 MB per float32 intermediate stay in cache, which made them
    markedly faster than budget-sized ones (benchmarks/RESULTS.md). Accelerators prefer the
    largest block the budget allows.

    Examples:
      >>> import jax
      >>> from spinjax.kernels import block_entries_cap
      >>> block_entries_cap() == (2**21 if jax.default_backend() == "cpu" else None)
      True
    """
    return 1 << 21 if jax.default_backend() == "cpu" else None


def block_rows_for_budget(
    n_heads: int, d_model: int, budget_bytes: int, *, max_entries: int | None = None, inner: bool = False
) -> int:
    """Rows of W_QK formed at once so that a block of :func:`heads_per_block` heads (all with
    ``inner``) fits in ``budget_bytes``.

    At most ``max_entries`` entries per block when given (see :func:`block_entries_cap`), unless
    that leaves fewer than ``MIN_BLOCK_ROWS`` rows. A divisor of d_model when one is at least
    half the affordable rows: then no block needs padding rows, which would force the slower
    masked pass.

    rows = budget_bytes // (32 bytes x heads per block x d_model), at least 1, at most d_model.

    Examples:
      >>> from spinjax.kernels import block_rows_for_budget
      >>> block_rows_for_budget(16, 2048, 64 << 20, inner=True)  # 64 MiB / (32 x 16 x 2048)
      64
      >>> block_rows_for_budget(4, 1000, 30 * 32 * 4 * 1000, inner=True)  # 30 -> divisor 25
      25
    """
    group = heads_per_block(n_heads, inner)
    rows = int(max(1, min(d_model, budget_bytes // (BYTES_PER_BLOCK_ENTRY * group * d_model))))
    if max_entries:
        # but never fewer than MIN_BLOCK_ROWS rows per head for the cap's sake: products of a few
        # rows of many heads (the 12B shape's 40 heads under the cap) run far below the matmul rate
        rows = max(1, min(rows, max(max_entries // (group * d_model), MIN_BLOCK_ROWS)))
    divisor = max(r for r in range(1, rows + 1) if d_model % r == 0)
    return divisor if 2 * divisor >= rows else rows


def expand_kv(wk: jax.Array, n_heads: int) -> jax.Array:
    """Key factor per query head: kv head h // (n_heads // n_kv), i.e. repeat, not tile.

    What Hugging Face's ``repeat_kv`` and ``torch.repeat_interleave`` do for grouped-query
    attention.

    Examples:
      >>> import jax.numpy as jnp
      >>> from spinjax.kernels.heads import expand_kv
      >>> print(expand_kv(jnp.array([0.0, 1.0]).reshape(2, 1, 1), 4).ravel())  # 2 kv heads
      [0. 0. 1. 1.]
    """
    return jnp.repeat(wk, n_heads // wk.shape[0], axis=0)


def _factor_blocks(n_heads: int, d_head: int, d_model: int) -> int:
    """Row blocks of a factor pass: on CPUs blocks of at most 2^20 entries (all heads) stay in
    cache and run faster than one pass over the whole (H, d_head, d_model) factors; GPUs take
    one."""
    if block_entries_cap() is None:
        return 1
    fit = max(1, (1 << 20) // (n_heads * d_model))
    return d_head // max(r for r in range(1, d_head + 1) if d_head % r == 0 and r <= fit)


@partial(jax.jit, static_argnames=("n_blocks", "masked", "subbins"))
def factor_sums(
    w: jax.Array, shift: jax.Array, scale: jax.Array, *, n_blocks: int, masked: bool,
    subbins: int = bins.SUBBINS, log2_scale: jax.Array | None = None,
) -> elements.Sums:  # fmt: skip
    """One pass over factor matrices (H, d_head, d_model) in ``n_blocks`` row blocks, binned
    with ``shift`` and ``scale`` (see :func:`elements.add_block`, also for ``log2_scale``;
    ``subbins`` as :func:`elements.empty_sums`)."""
    n_heads, d_head, d_model = w.shape
    blocks = w.reshape(n_heads, n_blocks, d_head // n_blocks, d_model)
    return jax.lax.fori_loop(
        0, n_blocks,
        lambda i, acc: elements.add_block(
            acc, blocks[:, i], shift, scale, masked=masked, log2_scale=log2_scale
        ),
        elements.empty_sums(n_heads, subbins),
    )  # fmt: skip


@jax.jit
def factor_moments_from_gram(w: jax.Array, gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and std of every factor (H, d_head, d_model) from its sum and its Gram's trace
    (see :func:`_gram`), so that the factor's pass needs no passes of its own for them.

    mean = sum(w) / n, std^2 = trace(w w^T) / n - mean^2 with n = d_head d_model.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels.heads import factor_grams, factor_moments_from_gram
      >>> wq = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 1]]], np.float32)
      >>> wk = np.array([[[2, 0, 0, 0], [0, 0, 1, 0]]], np.float32)
      >>> gram_q, _ = factor_grams(wq, wk)
      >>> print(np.round(factor_moments_from_gram(wq, gram_q), 4))  # [means, stds] of W_Q^0, W_Q^1
      [[0.25   0.375 ]
       [0.433  0.4841]]
    """
    n = w.shape[1] * w.shape[2]
    mean = w.sum((1, 2)) / n
    var = jnp.trace(gram, axis1=1, axis2=2) / n - mean * mean
    return mean, jnp.sqrt(jnp.maximum(var, 0.0))


def _gram(w: jax.Array) -> jax.Array:
    """w w^T per head, its diagonal summed pairwise: the diagonal carries nearly all of
    ||W_QK||_F^2, and a GEMM's running sums over d_model lost up to 1.5e-6 of it on fp16 weights
    (exact products, rounded sums), enough to fail the 1e-6 check of the binning scale and
    cost a second pass; the pairwise sums keep it within 1e-7."""
    gram = jnp.einsum("hai,hbi->hab", w, w, precision=_HIGHEST)
    diagonal = jnp.arange(w.shape[1])
    return gram.at[:, diagonal, diagonal].set(jnp.sum(w * w, axis=-1))


@jax.jit
def factor_grams(wq: jax.Array, wk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w w^T (d_head x d_head) of every query and key factor: the binning guess and the spectra
    (:func:`spectra.gram_singular_values`) both start from them.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels.heads import factor_grams
      >>> wq = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 1]]], np.float32)
      >>> wk = np.array([[[2, 0, 0, 0], [0, 0, 1, 0]]], np.float32)
      >>> gram_q, gram_k = factor_grams(wq, wk)
      >>> print(gram_q[1])
      [[2. 0.]
       [0. 1.]]
      >>> print(gram_k[0])
      [[4. 0.]
       [0. 1.]]
    """
    return _gram(wq), _gram(wk)


@jax.jit
def qk_moments_from_factors(
    wq: jax.Array, wk: jax.Array, gram_q: jax.Array, gram_k: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mean and std of every W_QK = wq^T wk (H, d, d) from d_head x d_head products only.

    ``wk`` and ``gram_k`` per key head (see :func:`factor_grams`). sum(W_QK) = (wq 1) . (wk 1)
    and ||W_QK||_F^2 = <wq wq^T, wk wk^T>. NaN when a factor has non-finite entries; the caller
    then falls back to a pass that measures them.

    mean = sum(W_QK) / d^2, std^2 = ||W_QK||_F^2 / d^2 - mean^2.

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels.heads import factor_grams, qk_moments_from_factors
      >>> wq = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 1]]], np.float32)
      >>> wk = np.array([[[2, 0, 0, 0], [0, 0, 1, 0]]], np.float32)
      >>> mean, std = qk_moments_from_factors(wq, wk, *factor_grams(wq, wk))
      >>> print(np.round(mean, 4), np.round(std, 4))  # 3/16 and 5/16; sqrt(5/16 - (3/16)^2), ...
      [0.1875 0.3125] [0.5266 0.6818]
    """
    n_heads, d = wq.shape[0], wq.shape[-1]
    total = jnp.einsum("ha,ha->h", wq.sum(-1), expand_kv(wk.sum(-1), n_heads), precision=_HIGHEST)
    mean = total / (d * d)
    var = (gram_q * expand_kv(gram_k, n_heads)).sum((1, 2)) / (d * d) - mean * mean
    return mean, jnp.sqrt(jnp.maximum(var, 0.0))


def heads_per_block(n_heads: int, inner: bool = False) -> int:
    """Heads in one W_QK block: one on a single CPU device (unless ``inner``), else all.

    XLA:CPU runs one head's long product (1024 rows of d_head, by d_head x d_model) well above
    the rate of a batch of many heads' short ones (benchmarks/RESULTS.md): the rows per product
    decide, so on CPUs a block holds one head's rows instead of a few rows of every head. The
    inner products between heads need every head's rows in the same block; GPUs want the one
    batched product; several devices split the head axis between them (:func:`_over_heads`).

    Examples:
      >>> import jax
      >>> from spinjax.kernels import heads_per_block
      >>> heads_per_block(16, inner=True)
      16
      >>> heads_per_block(16) == (1 if jax.default_backend() == "cpu" and jax.device_count() == 1 else 16)
      True
    """
    if jax.default_backend() == "cpu" and not inner and _head_mesh(n_heads) is None:
        return 1
    return n_heads


@partial(jax.jit, static_argnames=("block_rows", "masked", "inner", "group", "subbins"))
def qk_sums(
    wq: jax.Array,
    wk: jax.Array,
    shift: jax.Array,
    scale: jax.Array,
    *,
    block_rows: int,
    masked: bool,
    inner: bool = False,
    group: int | None = None,
    subbins: int = bins.SUBBINS,
    log2_scale: jax.Array | None = None,
) -> tuple[elements.Sums, jax.Array | None]:
    """One pass over every W_QK^h = wq[h]^T wk[h], ``block_rows`` rows of ``group`` heads
    (default all) at a time, one group after the other.

    ``masked=False`` assumes every entry finite, and ``log2_scale`` gives the matrices'
    scale (see :func:`elements.add_block`). With
    ``inner`` (and all heads in a block), also the Frobenius inner products <W_QK^h, W_QK^g>
    of every two heads (H, H), non-finite entries taken as 0: from the blocks already formed,
    2 H^2 d^2 FLOPs, instead of 4 H^2 d_head^2 d from the factors (``geometry.cross_inner``).
    """
    n_heads, d_head, d = wq.shape
    group = group or n_heads
    if n_heads % group or (inner and group != n_heads):
        raise ValueError(f"{n_heads} heads in groups of {group}" + " with inner products" * inner)
    n_blocks = -(-d // block_rows)
    pad = n_blocks * block_rows - d
    masked = masked or bool(pad)
    # (H, d, d_head) rows: a block is then a plain batched matmul, which XLA:CPU runs faster than
    # the same product as an einsum over wq's last axis
    q_by_row = jnp.pad(jnp.swapaxes(wq, 1, 2), ((0, 0), (0, pad), (0, 0)))

    sliced = group < n_heads  # a slice of all heads is a copy that XLA:CPU does not elide

    def body(i, carry):
        acc, gram = carry
        first, start = (i // n_blocks) * group, (i % n_blocks) * block_rows

        def heads(x):
            return jax.lax.dynamic_slice_in_dim(x, first, group, axis=0) if sliced else x

        def put_back(whole, part):
            return jax.lax.dynamic_update_slice_in_dim(whole, part, first, axis=0) if sliced else part

        q_rows = jax.lax.dynamic_slice(q_by_row, (first, start, 0), (group, block_rows, d_head))
        block = jnp.matmul(q_rows, heads(wk), precision=_HIGHEST)
        rows = (start + jnp.arange(block_rows) < d) if pad else None
        group_sums = elements.add_block(
            jax.tree.map(heads, acc), block, heads(shift), heads(scale), rows, masked=masked,
            log2_scale=None if log2_scale is None else heads(log2_scale),
        )  # fmt: skip
        acc = jax.tree.map(put_back, acc, group_sums)
        if inner:
            kept = jnp.where(jnp.isfinite(block), block, 0.0) if masked else block  # padding rows are 0
            flat = kept.reshape(n_heads, -1)  # one (H, rows*cols) GEMM: XLA:CPU runs it well, an einsum not
            gram = gram + jnp.dot(flat, flat.T, precision=_HIGHEST)
        return acc, gram

    gram = jnp.zeros((n_heads, n_heads) if inner else (0, 0), jnp.float32)
    n_steps = n_blocks * (n_heads // group)
    sums, gram = jax.lax.fori_loop(0, n_steps, body, (elements.empty_sums(n_heads, subbins), gram))
    return sums, (gram if inner else None)


@jax.jit
def _summaries(
    q: tuple[elements.Sums, jax.Array, jax.Array, jax.Array],
    k: tuple[elements.Sums, jax.Array, jax.Array, jax.Array],
    qk: tuple[elements.Sums, jax.Array, jax.Array, jax.Array],
    kv_of_head: jax.Array,
    svals: jax.Array,
) -> dict[str, jax.Array]:
    """Every statistic of the three matrices from their passes' (sums, shift, scale, log2_scale)."""
    per_matrix = [elements.summarize(*q), elements.summarize(*k), elements.summarize(*qk)]
    per_matrix[1] = {name: v[kv_of_head] for name, v in per_matrix[1].items()}
    out = {name: jnp.stack([m[name] for m in per_matrix], axis=1) for name in per_matrix[0]}
    out["singular_values"] = svals
    out.update(spectra.spectral_summaries(svals))
    return out


def _host() -> jax.Device | None:
    """Where the eigenvalues are computed: the host's CPU when the kernels run on an accelerator.

    LAPACK's geev takes ~2 ms for a 128 x 128 core on a CPU core; on CUDA, jax runs the batch
    one matrix at a time through cuSOLVER's geev (cuSOLVER >= 11.7.1) or through LAPACK on
    the host anyway, so the host's program, dispatched asynchronously, can overlap the
    device's element passes instead of stalling them (not measured yet: no GPU was lent).
    None (the default device) on CPUs, or when JAX was started without its CPU backend.
    """
    if jax.default_backend() == "cpu":
        return None
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def _head_mesh(n_heads: int) -> jax.sharding.Mesh | None:
    """A mesh over the local devices for the head axis, when there are several and they divide it."""
    devices = jax.local_devices()
    if len(devices) < 2 or n_heads % len(devices):
        return None
    return jax.sharding.Mesh(np.array(devices), ("heads",))


def _over_heads(x: jax.Array) -> jax.Array:
    """``x`` with its head axis sharded over the local devices (see :func:`_head_mesh`); the
    compiled kernels then run each device's heads there (GSPMD)."""
    mesh = _head_mesh(x.shape[0])
    if mesh is None:
        return x
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("heads")))


@jax.jit
def _pass_flags(
    sums: elements.Sums, shift: jax.Array, scale: jax.Array, log2_scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    nonfinite = elements.saw_nonfinite(sums, log2_scale).any()
    return nonfinite, elements.needs_refinement(sums, shift, scale).any()


def _factor_pass(
    w: jax.Array, log2_scale: jax.Array, n_blocks: int | None = None, subbins: int = bins.SUBBINS
):
    """:func:`factor_sums` over ``w`` as a pass for :func:`_settled_pass`."""
    n_blocks = n_blocks or _factor_blocks(*w.shape)

    def run(shift, scale, masked, _):
        sums = factor_sums(w, shift, scale, n_blocks=n_blocks, masked=masked, subbins=subbins,
                           log2_scale=log2_scale)  # fmt: skip
        return sums, None

    return run


def _settled_pass(run, shift: jax.Array, scale: jax.Array, log2_scale: jax.Array):
    """(sums, shift, scale, extra) of an element pass ``run(shift, scale, masked, with_extra)
    -> (Sums, extra)`` that binned with the final mean and std.

    ``shift`` and ``scale`` are guesses, NaN where none could be made. Finite inputs (the
    rule) make finite entries unless they overflow, so a pass with finite guesses runs unmasked
    first, and masked again if it met a non-finite entry. A guess off the measured mean or std
    (non-finite inputs, cancellation) makes it bin again with the measured ones, which are exact
    whatever the shift was; ``extra`` (the heads' inner products) does not depend on the
    binning and is kept from the pass before.
    """
    guessed = jnp.isfinite(shift) & jnp.isfinite(scale)
    shift, scale = jnp.where(guessed, shift, 0.0), jnp.where(guessed, scale, 1.0)
    masked = not bool(guessed.all())
    sums, extra = run(shift, scale, masked, True)
    nonfinite, off = (bool(flag) for flag in _pass_flags(sums, shift, scale, log2_scale))
    if nonfinite and not masked:
        masked = True
        sums, extra = run(shift, scale, masked, True)
        off = bool(_pass_flags(sums, shift, scale, log2_scale)[1])
    if off:
        shift, m2, _, _ = elements.central_moments(sums, shift)
        scale = jnp.sqrt(m2)
        sums, _ = run(shift, scale, masked, False)
    return sums, shift, scale, extra


def layer_statistics(
    wq, wk, *, block_rows: int, inner: bool = False, ks: bool = True, eigenvalues: bool = True
) -> dict[str, np.ndarray]:
    """Every statistic of SPEC section 4 for every query head of one layer.

    Args:
      wq: (n_heads, d_head, d_model) query factors.
      wk: (n_kv_heads, d_head, d_model) key factors; n_heads must be a multiple of n_kv_heads.
      block_rows: rows of W_QK formed at once, per head of a block (see
        :func:`block_rows_for_budget`, given the same ``inner``).
      inner: also return ``qk_inner`` (n_heads, n_heads), the Frobenius inner products of
        every two heads' W_QK (see :func:`qk_sums`), for the cross-head geometry.
      ks: also the Kolmogorov-Smirnov distance ``ks_normal`` (the element passes count z on
        the finer grid, ``bins.SUBBINS``).
      eigenvalues: also W_QK's eigen measures. Without either, a layer costs what
        ``spinjax bench`` times them against.

    Returns:
      name -> array with leading dims (n_heads, 3) over (W_Q, W_K, W_QK): the scalar statistics,
      ``zhist`` (.., NZ), ``hist`` (.., NB), ``singular_values`` (.., d_head), ``n_nonfinite``.
      W_K's values are those of each query head's key head (repeated under GQA); ``ks_normal``
      with ``ks``. With ``eigenvalues``, per head (n_heads, ...) of W_QK only: ``eig_re``,
      ``eig_im`` (.., d_head), ``eig_positivity``, ``sym_fraction`` (see
      :func:`spectra.core_eigenvalues`, :func:`spectra.qk_core`).

    Examples:
      >>> import numpy as np
      >>> from spinjax.kernels import layer_statistics
      >>> wq = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 1]]], np.float32)
      >>> wk = np.array([[[2, 0, 0, 0], [0, 0, 1, 0]]], np.float32)  # one key head for both
      >>> out = layer_statistics(wq, wk, block_rows=4)
      >>> print(np.round(out["mean"][:, 2], 4), np.round(out["std"][:, 2], 4))  # W_QK per head
      [0.1875 0.3125] [0.5266 0.6818]
      >>> print(np.round(out["singular_values"][:, 2], 4))  # 2, 1 and 2 sqrt(2), 1
      [[2.     1.    ]
       [2.8284 1.    ]]
      >>> print(np.round(out["stable_rank"], 4))  # (head, matrix): sum s^2 / s_1^2
      [[2.    1.25  1.25 ]
       [1.5   1.25  1.125]]
      >>> print(out["zhist"].sum(-1))  # every entry of every matrix counted once
      [[ 8  8 16]
       [ 8  8 16]]
      >>> print(out["n_nonfinite"])
      [[0 0 0]
       [0 0 0]]
      >>> print(out["eig_re"], out["eig_im"].any())  # W_QK^0 = 2 e0 e0^T + e1 e2^T: 2 and 0
      [[2. 0.]
       [2. 0.]] False
      >>> print(np.round(out["sym_fraction"], 4))  # (||W||^2 + tr(W W)) / (2 ||W||^2): 9/10, 13/18
      [0.9    0.7222]
    """
    wq, e_q = pow2_normalized(wq)
    wk, e_k = pow2_normalized(wk)
    n_heads = wq.shape[0]
    if wk.shape[1:] != wq.shape[1:] or n_heads % wk.shape[0]:
        raise ValueError(f"incompatible factors: wq {wq.shape}, wk {wk.shape}")
    kv_of_head = np.arange(n_heads) // (n_heads // wk.shape[0])
    # the matrices' scales: W_Q 2^e_q, W_K 2^e_k (per query head), W_QK 2^(e_q + e_k)
    log2_scale = np.stack([e_q, e_k[kv_of_head], e_q + e_k[kv_of_head]], axis=1)
    wq, wk, kv_of_head = jnp.asarray(wq), jnp.asarray(wk), jnp.asarray(kv_of_head)
    subbins = bins.SUBBINS if ks else 1
    gram_q, gram_k = factor_grams(wq, wk)
    svals, trusted = spectra.gram_singular_values(gram_q, gram_k)
    if not bool(trusted.all()):
        # ill-conditioned (or non-finite) factors: a Householder QR of the factors themselves,
        # kept for those heads only, so that a head's values never depend on its neighbours'
        redone = spectra.factor_singular_values(wq, wk)
        svals = jnp.where(trusted[:, None, None], svals, redone)
    guesses = [factor_moments_from_gram(wq, gram_q), factor_moments_from_gram(wk, gram_k)]
    guesses.append(qk_moments_from_factors(wq, wk, gram_q, gram_k))
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        # The spectra's LAPACK calls ran on one device (the same call on several CPU devices at
        # once deadlocks like two calls in one program, see spectra.py); they finish before any
        # program with a collective starts: devices waiting in an all-reduce hold the pool
        # workers that the LAPACK call on device 0 needs.
        svals = jax.block_until_ready(svals)
    eigen = {}
    if eigenvalues:
        # A program of its own, after the singular values' one: one LAPACK call at a time
        core, eigen["sym_fraction"] = spectra.qk_core(wq, wk, gram_q, gram_k)
        eigen.update(spectra.core_eigenvalues(jax.device_put(core, _host())))
        if on_cpu:
            eigen = jax.block_until_ready(eigen)
    wk_per_head = _over_heads(expand_kv(wk, n_heads))
    wq, wk = _over_heads(wq), _over_heads(wk)
    guesses = [tuple(_over_heads(v) for v in guess) for guess in guesses]
    blocks = {"block_rows": block_rows, "group": heads_per_block(n_heads, inner), "subbins": subbins}

    e_qk = _over_heads(jnp.asarray(log2_scale[:, 2]))

    def qk_pass(shift, scale, masked, with_inner):
        return qk_sums(wq, wk_per_head, shift, scale, masked=masked, inner=inner and with_inner,
                       log2_scale=e_qk, **blocks)  # fmt: skip

    q = _settled_pass(_factor_pass(wq, _over_heads(jnp.asarray(e_q)), subbins=subbins), *guesses[0], e_q)
    k = _settled_pass(_factor_pass(wk, _over_heads(jnp.asarray(e_k)), subbins=subbins), *guesses[1], e_k)
    *qk, gram = _settled_pass(qk_pass, *guesses[2], e_qk)
    out = _summaries((*q[:3], e_q), (*k[:3], e_k), (*qk, e_qk), kv_of_head, svals)
    out.update(eigen)
    if inner:
        out["qk_inner"] = gram
    return at_scale(jax.device_get(out), log2_scale)


def pow2_normalized(w) -> tuple[np.ndarray, np.ndarray]:
    """Float32 factors (H, ...) divided, per head, by the power of two 2^e that brings their
    largest finite magnitude into [0.5, 1), and the exponents e (H,) int32 (0 for a head
    without a finite non-zero entry).

    On the host, in numpy, so subnormal weights are scaled exactly (XLA flushes them to zero):
    dividing by a power of two is exact, so every statistic of the normalized factors is that
    of the weights brought to a scale where no power of an entry over- or underflows float32
    (:func:`at_scale` scales the results back). Entries of W_QK at the weights' scale are
    never formed: fp16 weights near 65,504, weights times 2^40 or 2^-70 give the same
    scale-free statistics as the weights themselves.

    Examples:
      >>> import numpy as np
      >>> w, e = pow2_normalized(np.array([[[3.0, -0.5]], [[1e-40, 0.0]], [[0.0, 0.0]]], np.float32))
      >>> print(np.round(w.ravel(), 4), e)  # 3 = 0.75 * 2^2; 1e-40 is subnormal, scaled up exactly
      [ 0.75   -0.125   0.5444  0.      0.      0.    ] [   2 -132    0]
    """
    w = np.asarray(w, np.float32)
    magnitude = np.abs(np.where(np.isfinite(w), w, 0.0)).reshape(len(w), -1).max(axis=1)
    e = np.frexp(magnitude)[1].astype(np.int32)  # 0 for a zero magnitude
    return np.ldexp(w, -e.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32), e


def at_scale(out: dict[str, np.ndarray], log2_scale: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of :func:`layer_statistics`'s normalized factors brought back to the
    matrices' own scales 2^log2_scale (H, 3): what scales with a matrix is multiplied
    (``null.SCALE_MUL``: exact, by a power of two), entropies shifted by e ln 2, W_QK's
    eigenvalues and the heads' inner products scaled (the latter in float64); everything
    else is scale-free."""
    e = np.asarray(log2_scale, np.int32)
    with np.errstate(over="ignore", under="ignore"):  # inf or a subnormal: float32's own value
        for name in SCALE_MUL:
            if name in out:
                out[name] = np.ldexp(out[name], e[..., None] if name == "singular_values" else e)
        for name in SCALE_LOG:
            out[name] = (out[name] + e * np.float32(np.log(2.0))).astype(np.float32)
        for name in ("eig_re", "eig_im"):
            if name in out:
                out[name] = np.ldexp(out[name], e[:, 2:3])
        if "qk_inner" in out:
            e_qk = e[:, 2]
            out["qk_inner"] = np.ldexp(np.asarray(out["qk_inner"], np.float64), e_qk[:, None] + e_qk[None, :])
    return out
