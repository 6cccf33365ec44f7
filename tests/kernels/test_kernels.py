"""The kernels against the float64 reference (tests/reference.py), within SPEC tolerances."""

from __future__ import annotations

import jax
import jax.extend
import numpy as np
import pytest
from reference import MATRICES, SPECTRAL_KEYS, head_reference, head_singular_values

from spinjax.kernels import bin_edges, bins, layer_statistics, zbin_edges
from spinjax.kernels.spectra import spectral_summaries

MOMENTS = ("std", "skew", "kurt", "min", "max")
BINNED = ("entropy", "entropy_residual", "entropy_mm", "kl_gauss", "kl_gauss_mm",
          "mu_fit", "sigma_fit", "kl_fit", "tail_mass", "ks_normal")  # fmt: skip
PER_HEAD = ("eig_re", "eig_im", "eig_positivity", "sym_fraction")  # W_QK only: no matrix axis


def _factors(kind: str, rng, n_heads=6, n_kv=2, d_head=16, d=96):
    shape_q, shape_k = (n_heads, d_head, d), (n_kv, d_head, d)
    if kind == "gaussian":
        return rng.normal(0.01, 0.2, shape_q), rng.normal(-0.02, 0.3, shape_k)
    if kind == "heavy":  # Student t with 2.5 dof: heavy tails in the factors and W_QK
        return rng.standard_t(2.5, shape_q), rng.standard_t(2.5, shape_k) * 1e-3
    if kind == "two_point":  # W_Q entries take two values only
        return np.where(rng.random(shape_q) < 0.3, 1.5, -0.5), rng.normal(0, 1, shape_k)
    if kind == "tiny_scale":
        return rng.normal(0, 3e-4, shape_q), rng.normal(0, 2e-3, shape_k)
    if kind == "large_scale":
        return rng.normal(5, 40, shape_q), rng.normal(0, 20, shape_k)
    raise ValueError(kind)


def _ambiguous(values, slack, edges) -> int:
    """Entries whose bin could change within +-slack (float32 rounding of an edge)."""
    lo = np.searchsorted(edges, values - slack, side="right")
    hi = np.searchsorted(edges, values + slack, side="right")
    return int((lo != hi).sum())


def _count_diff(got, ref) -> int:
    return int(np.abs(got.astype(np.int64) - ref).sum())


def _edge_crossings(got, ref) -> int:
    """Entries that moved between histograms ``got`` and ``ref`` (..., bins) of the same values,
    counted once per edge crossed: the running difference of the counts at each edge."""
    diff = np.asarray(got, np.int64) - np.asarray(ref, np.int64)
    assert (diff.sum(-1) == 0).all(), "the totals differ: entries were lost, not moved"
    return int(np.abs(np.cumsum(diff, axis=-1)).sum())


def _check_head(out, h, wq, wk_head):
    ref = head_reference(wq.astype(np.float64), wk_head.astype(np.float64))
    zedges, redges = zbin_edges(), bin_edges()
    for m, name in enumerate(MATRICES):
        r = ref[name]
        got = {k: out[k][h, m] for k in out if k not in PER_HEAD}
        where = f"head {h} {name}"
        assert got["n_nonfinite"] == r["n_nonfinite"], where
        # mean: relative to the spread (means near zero have no useful relative error)
        assert abs(got["mean"] - r["mean"]) <= 1e-4 * (abs(r["mean"]) + r["std"]) + 1e-30, where
        for k in MOMENTS:
            scale = r["std"] if k in ("min", "max") else 1.0
            assert got[k] == pytest.approx(r[k], rel=1e-4, abs=1e-4 * scale), f"{where} {k}"
        for k in BINNED:  # the fit's location and scale in units of std (scale-free)
            tol = 1e-3 * (r["std"] if k in ("mu_fit", "sigma_fit") else 1.0)
            assert got[k] == pytest.approx(r[k], abs=tol, nan_ok=True), f"{where} {k}"
        s_ref = r["singular_values"]
        assert np.allclose(got["singular_values"], s_ref, rtol=0, atol=1e-4 * s_ref[0]), where
        for k in SPECTRAL_KEYS:
            if k == "condition_number":  # s_k / s_1 is known to 1e-4 (like every s_i / s_1)
                assert 1 / got[k] == pytest.approx(1 / r[k], abs=1e-4, nan_ok=True), where
            else:
                assert got[k] == pytest.approx(r[k], rel=2e-4, nan_ok=True), f"{where} {k}"
        # histograms: identical except entries within float32 rounding of an edge, where an
        # entry's rounding is bounded by eps * sum_a |q_ai k_aj| (cancellation in W_QK)
        q64, k64 = wq.astype(np.float64), wk_head.astype(np.float64)
        w, bound = {
            "W_Q": (q64, np.abs(q64)), "W_K": (k64, np.abs(k64)),
            "W_QK": (q64.T @ k64, np.abs(q64).T @ np.abs(k64)),
        }[name]  # fmt: skip
        finite = np.isfinite(w)
        w, slack = w[finite], 1e-6 * bound[finite] + 1e-6 * np.abs(w[finite])
        assert _count_diff(got["hist"], r["hist"]) <= 2 * _ambiguous(w, slack, redges), where
        if r["std"] > 0:
            z = (w - r["mean"]) / r["std"]
            z_slack = slack / r["std"] + 1e-5 * (1 + np.abs(z))
            assert _count_diff(got["zhist"], r["zhist"]) <= 2 * _ambiguous(z, z_slack, zedges), where
        assert got["zhist"].sum() == (len(w) if r["std"] > 0 else 0)
        assert got["hist"].sum() == len(w)


# 20 rows: 5 blocks, the last padded (masked pass); 32 rows divide 96 (unmasked fast pass)
@pytest.mark.parametrize("block_rows", [20, 32])
@pytest.mark.parametrize("kind", ["gaussian", "heavy", "two_point", "tiny_scale", "large_scale"])
def test_layer_statistics_match_float64_reference(kind, block_rows):
    rng = np.random.default_rng(sum(map(ord, kind)))
    wq, wk = (a.astype(np.float32) for a in _factors(kind, rng))
    group = wq.shape[0] // wk.shape[0]
    out = layer_statistics(wq, wk, block_rows=block_rows)
    for h in range(wq.shape[0]):
        _check_head(out, h, wq[h], wk[h // group])


def test_nonfinite_entries_are_counted_and_excluded():
    rng = np.random.default_rng(1)
    wq, wk = (a.astype(np.float32) for a in _factors("gaussian", rng))
    wq[1, 3, 5] = np.nan
    wk[0, 2, 7] = np.inf
    wk[1, 0, 0] = -np.inf
    out = layer_statistics(wq, wk, block_rows=32)
    assert out["n_nonfinite"][1, 0] == 1 and out["n_nonfinite"][0, 1] == 1
    # a NaN in W_Q[1] spoils row 5 of W_QK[1]; an Inf in W_K spoils a whole column
    assert out["n_nonfinite"][1, 2] == 96 + 96 - 1
    for h in range(6):
        _check_head(out, h, wq[h], wk[h // 3])


@pytest.mark.slow
def test_constant_and_zero_matrices():
    d_head, d = 4, 24
    wq = np.full((2, d_head, d), 0.25, np.float32)
    wk = np.random.default_rng(2).normal(size=(2, d_head, d)).astype(np.float32)
    wk[1] = 0.0
    out = layer_statistics(wq, wk, block_rows=7)
    assert out["std"][0, 0] == 0 and out["skew"][0, 0] == 0 and out["kurt"][0, 0] == 0
    assert out["mean"][0, 0] == np.float32(0.25)
    assert np.isnan(out["entropy"][0, 0]) and np.isnan(out["kl_gauss"][0, 0])
    assert out["zhist"][0, 0].sum() == 0 and out["hist"][0, 0].sum() == d_head * d
    # W_Q is rank one: one non-zero singular value
    assert out["singular_values"][0, 0, 1:].max() <= 1e-6 * out["singular_values"][0, 0, 0]
    # an all-zero W_K: zero norms, undefined ratios
    assert out["spectral_norm"][1, 1] == 0 and np.isnan(out["stable_rank"][1, 1])
    for h in range(2):
        _check_head(out, h, wq[h], wk[h])


def test_block_size_does_not_change_results():
    rng = np.random.default_rng(3)
    wq, wk = (a.astype(np.float32) for a in _factors("heavy", rng))
    a = layer_statistics(wq, wk, block_rows=96)
    b = layer_statistics(wq, wk, block_rows=7)
    for k in a:
        if k in ("zhist", "hist", "n_nonfinite"):
            assert np.abs(a[k].astype(np.int64) - b[k]).sum() <= 4, k
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("block_rows", [96, 7])  # whole rows, and a padded last block (masked)
@pytest.mark.slow
def test_heads_per_block_does_not_change_sums(block_rows):
    # one head at a time (CPUs), two, and all heads in one batched product (GPUs, inner products)
    from spinjax.kernels.bins import fine_zbin_edges
    from spinjax.kernels.elements import histograms
    from spinjax.kernels.heads import expand_kv, factor_grams, qk_moments_from_factors, qk_sums

    rng = np.random.default_rng(4)
    wq, wk = (jax.numpy.asarray(a, jax.numpy.float32) for a in _factors("heavy", rng))
    wk = expand_kv(wk, wq.shape[0])
    wq = wq.at[4, 3, 5].set(np.nan)  # head 4 gets non-finite entries: the masked pass
    shift, scale = qk_moments_from_factors(wq, wk, *factor_grams(wq, wk))
    shift, scale = jax.numpy.nan_to_num(shift), jax.numpy.nan_to_num(scale, nan=1.0)
    rows = {"block_rows": block_rows, "masked": True}
    runs = {g: qk_sums(wq, wk, shift, scale, group=g, **rows)[0] for g in (1, 2, 6)}
    whole = runs[6]
    assert int(whole.n_nonfinite[4]) == 96 and whole.counts.sum() == 6 * 96 * 96 - 96
    # Blocked differently, a float32 product may round an entry sitting on a bin edge either
    # way: count the entries within float32 rounding of an edge (float64 values, error bound
    # of a d_head-term float32 dot product), and allow each of them to cross one edge.
    q64, k64 = np.asarray(wq, np.float64), np.asarray(wk, np.float64)
    qk64 = np.einsum("hai,haj->hij", q64, k64)
    slack = 4 * 16 * 2.0**-24 * np.einsum("hai,haj->hij", np.abs(q64), np.abs(k64))
    finite = np.isfinite(qk64)
    s64, c64 = np.asarray(shift, np.float64)[:, None, None], np.asarray(scale, np.float64)[:, None, None]
    movable = _ambiguous(qk64[finite], slack[finite], bin_edges()) + _ambiguous(
        ((qk64 - s64) / c64)[finite], (slack / c64)[finite], fine_zbin_edges()
    )
    for g, sums in runs.items():
        for name in ("n", "n_nonfinite"):
            np.testing.assert_array_equal(getattr(sums, name), getattr(whole, name), err_msg=f"{g} {name}")
        for name in ("min", "max"):
            np.testing.assert_allclose(getattr(sums, name), getattr(whole, name), rtol=1e-6, err_msg=name)
        pairs = zip(histograms(sums, shift, scale), histograms(whole, shift, scale), strict=True)
        crossings = sum(_edge_crossings(a, b) for a, b in pairs)
        assert crossings <= movable, (g, crossings, movable)
        for name in ("s1", "s2", "s3", "s4"):
            scale_k = np.abs(getattr(whole, name)).max()
            np.testing.assert_allclose(getattr(sums, name), getattr(whole, name), atol=1e-6 * scale_k)
    with pytest.raises(ValueError, match="groups of 4"):
        qk_sums(wq, wk, shift, scale, group=4, **rows)
    with pytest.raises(ValueError, match="inner products"):
        qk_sums(wq, wk, shift, scale, group=2, inner=True, **rows)


@pytest.mark.slow
def test_binning_guess_from_fp16_factors_needs_no_second_pass(monkeypatch):
    # fp16 weights (Pythia's) make exact products whose running sums in a GEMM drift: the Gram
    # diagonal then lost ~1.5e-6 of ||W_QK||^2, the guessed std failed the 1e-6 check and every
    # layer ran the W_QK pass twice. The guesses (W_QK's and the factors' own, from the same
    # Grams) must be float32-accurate, and one pass of each matrix enough.
    from spinjax.kernels import heads

    rng = np.random.default_rng(5)
    wq, wk = (np.float32(np.float16(rng.standard_normal((4, 128, 2048)) * 0.02 + 0.001)) for _ in "qk")
    wq_j, wk_j = jax.numpy.asarray(wq), jax.numpy.asarray(wk)
    grams = heads.factor_grams(wq_j, wk_j)
    _, std = heads.qk_moments_from_factors(wq_j, wk_j, *grams)
    for h in range(4):
        exact = (wq[h].astype(np.float64).T @ wk[h].astype(np.float64)).std()
        assert abs(float(std[h]) - exact) <= 3e-7 * exact, h
    for w, gram in zip((wq, wk), grams, strict=True):
        mean, std = heads.factor_moments_from_gram(jax.numpy.asarray(w), gram)
        w64 = w.astype(np.float64)
        for h in range(4):
            assert abs(float(std[h]) - w64[h].std()) <= 3e-7 * w64[h].std(), h
            assert abs(float(mean[h]) - w64[h].mean()) <= 3e-7 * w64[h].std(), h
    passes = {"qk_sums": [], "factor_sums": []}
    for name, original in [(name, getattr(heads, name)) for name in passes]:

        def counting(*args, _name=name, _original=original, **kwargs):
            passes[_name].append(kwargs["masked"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(heads, name, counting)
    heads.layer_statistics(wq, wk, block_rows=512)
    assert passes == {"qk_sums": [False], "factor_sums": [False, False]}


def test_random_product_matches_analytic_moments():
    # W_QK^ij = sum_a q_ai k_aj with i.i.d. unit normals: variance d_head, excess kurtosis
    # 6 / d_head (a product of two normals has excess kurtosis 6), zero skew.
    d_head, d = 16, 384
    rng = np.random.default_rng(4)
    wq = rng.normal(size=(4, d_head, d)).astype(np.float32)
    wk = rng.normal(size=(4, d_head, d)).astype(np.float32)
    out = layer_statistics(wq, wk, block_rows=128)
    assert np.allclose(out["std"][:, 2], np.sqrt(d_head), rtol=0.03)
    assert np.allclose(out["kurt"][:, 2], 6 / d_head, atol=0.1)
    assert np.allclose(out["skew"][:, 2], 0, atol=0.05)
    # W_Q (d_head x d, d >> d_head): squared singular values near d (Marchenko-Pastur edge
    # (sqrt(d) +- sqrt(d_head))^2), so the stable rank is close to d_head.
    s = out["singular_values"][:, 0]
    assert s.max() <= (np.sqrt(d) + np.sqrt(d_head)) * 1.05
    assert s.min() >= (np.sqrt(d) - np.sqrt(d_head)) * 0.95


def test_spectral_summaries_hand_computed():
    got = {k: float(v) for k, v in spectral_summaries(np.array([2.0, 1.0, 0.0], np.float32)).items()}
    assert got["spectral_norm"] == 2.0
    assert got["frobenius_norm"] == pytest.approx(np.sqrt(5))
    assert got["stable_rank"] == pytest.approx(1.25)
    assert got["participation_ratio"] == pytest.approx(25 / 17)
    p = np.array([0.8, 0.2])
    assert got["spectral_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert got["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert got["condition_number"] == np.inf


@pytest.mark.slow
def test_overflow_to_inf_in_w_qk_is_caught_by_the_fast_pass():
    # finite factors whose product overflows float32: the unmasked pass must notice and redo
    wq = np.full((1, 2, 8), 1e20, np.float32)
    wk = np.full((1, 2, 8), 1e20, np.float32)
    out = layer_statistics(wq, wk, block_rows=4)
    assert out["n_nonfinite"][0, 2] == 64 and out["n_nonfinite"][0, 0] == 0
    assert np.isnan(out["mean"][0, 2]) and out["hist"][0, 2].sum() == 0


@pytest.mark.parametrize("inner", [False, True])
def test_budget_prefers_block_sizes_that_divide_d_model(inner):
    from spinjax.kernels import block_rows_for_budget
    from spinjax.kernels.heads import BYTES_PER_BLOCK_ENTRY, heads_per_block

    # one CPU device: a block holds one head's rows, unless the heads' inner products need all
    assert heads_per_block(16, inner) == (16 if inner else 1)
    per_row = BYTES_PER_BLOCK_ENTRY * heads_per_block(16, inner) * 2048
    assert block_rows_for_budget(16, 2048, 300 * per_row, inner=inner) == 256  # 2048 = 8 * 256
    assert block_rows_for_budget(16, 2048, 10**15, inner=inner) == 2048
    per_row_97 = BYTES_PER_BLOCK_ENTRY * heads_per_block(4, inner) * 97
    assert block_rows_for_budget(4, 97, 60 * per_row_97, inner=inner) == 60  # 97 is prime
    assert block_rows_for_budget(16, 2048, 1, inner=inner) == 1
    # the CPU cap counts the entries of a whole block
    capped = block_rows_for_budget(16, 2048, 10**15, max_entries=1 << 21, inner=inner)
    assert capped == (64 if inner else 1024)
    # ... but leaves at least 32 rows (12B's 40 heads of 5120: 10 rows would fit in 2M entries)
    assert block_rows_for_budget(40, 5120, 10**15, max_entries=1 << 21, inner=inner) == (32 if inner else 320)
    tight = 20 * BYTES_PER_BLOCK_ENTRY * heads_per_block(40, inner) * 5120  # the budget still rules
    assert block_rows_for_budget(40, 5120, tight, max_entries=1 << 21, inner=inner) == 20


def test_raw_grid_resolves_every_scale():
    edges = bin_edges()
    assert edges[0] == -np.inf and edges[-1] == np.inf and len(edges) == bins.NB + 1
    finite = edges[1:-1]
    pos = finite[finite > 0]
    assert pos.min() <= 1e-6 and pos.max() >= 1e3
    assert (pos[1:] / pos[:-1] - 1).max() <= 0.05
    assert np.all(np.diff(finite) > 0)


@pytest.mark.slow
def test_heads_sharded_over_four_devices_give_the_same_values(tmp_path):
    # A fresh interpreter with 4 virtual CPU devices (the flag must precede JAX's start). The
    # 8 x 64 x 512 layer without GQA is one at which the factors' QR on several CPU devices at
    # once deadlocked within a few calls, before the spectra were kept on one device.
    import os
    import subprocess
    import sys

    script = (
        "import numpy as np, jax\n"
        "from spinjax.kernels import layer_statistics\n"
        "assert len(jax.local_devices()) == 4\n"
        "rng = np.random.default_rng(5)\n"
        "wq = rng.normal(0, 0.2, (8, 64, 512)).astype(np.float32)\n"
        "wk = rng.normal(0, 0.3, (8, 64, 512)).astype(np.float32)\n"
        "for n_kv in (8, 8, 8, 4):\n"
        "    out = layer_statistics(wq, wk[:n_kv], block_rows=64)\n"
        f"    np.savez({str(tmp_path)!r} + f'/sharded{{n_kv}}.npz', **out)\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    rng = np.random.default_rng(5)
    wq = rng.normal(0, 0.2, (8, 64, 512)).astype(np.float32)
    wk = rng.normal(0, 0.3, (8, 64, 512)).astype(np.float32)
    for n_kv in (8, 4):  # MHA and GQA
        single = layer_statistics(wq, wk[:n_kv], block_rows=64)
        sharded = np.load(tmp_path / f"sharded{n_kv}.npz")
        for k, v in single.items():
            if k in ("zhist", "hist", "n_nonfinite"):
                assert np.abs(sharded[k].astype(np.int64) - v).sum() <= 2, k
            else:
                np.testing.assert_allclose(sharded[k], v, rtol=1e-5, atol=1e-5, err_msg=k)  # summation order


def _primitives(jaxpr) -> list[str]:
    """Every primitive of a jaxpr, nested calls included."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names.extend(_primitives(sub))
    return names


def test_each_program_holds_at_most_one_qr_and_one_svd():
    # Independent LAPACK calls in one XLA:CPU program run concurrently, and each blocks a worker
    # of the intra-op pool while it spreads its batch over that pool: on two cores two of them
    # deadlock (seen as runs hanging forever). The kernels keep one batched call of each, and the
    # Gram route's Cholesky feeds its SVD (one after the other).
    from spinjax.kernels import heads, spectra

    wq = np.zeros((4, 8, 32), np.float32)
    wk = np.zeros((2, 8, 32), np.float32)
    lapack_names = ("svd", "qr", "geqrf", "householder_product", "lu", "eigh", "cholesky")

    def lapack(fn, *args):
        return sorted(n for n in _primitives(jax.make_jaxpr(fn)(*args).jaxpr) if n in lapack_names)

    assert lapack(spectra.factor_singular_values, wq, wk) in (["geqrf", "svd"], ["qr", "svd"])
    grams = heads.factor_grams(wq, wk)
    assert lapack(spectra.gram_singular_values, *grams) == ["cholesky", "svd"]
    assert lapack(heads.qk_moments_from_factors, wq, wk, *grams) == []
    assert lapack(heads.factor_moments_from_gram, wq, grams[0]) == []
    sums = heads.factor_sums(wq, np.zeros(4, np.float32), np.ones(4, np.float32), n_blocks=1, masked=True)
    sums = (sums, np.zeros(4, np.float32), np.ones(4, np.float32))
    out = jax.make_jaxpr(heads._summaries)(sums, sums, sums, np.arange(4), np.ones((4, 3, 8), np.float32))
    assert not {"svd", "qr", "geqrf", "lu", "lu_pivots_to_permutation", "triangular_solve"} & set(
        _primitives(out.jaxpr)
    )


def _conditioned(rng, conds, basis, d, reverse=False):
    """fp16-valued factors (one per entry of ``conds``), singular values log-spaced from 0.02 down
    by the factor cond (ascending with ``reverse``), left singular vectors ``basis``."""
    out = []
    for cond in conds:
        right, _ = np.linalg.qr(rng.standard_normal((d, basis.shape[0])))
        s = 0.02 * np.logspace(0, -np.log10(cond), basis.shape[0])
        out.append((basis * (s[::-1] if reverse else s)) @ right.T)
    return np.float32(np.float16(np.array(out)))


def _reference_singular_values(wq, wk):
    """(H, 3, d_head) float64 singular values; W_QK's from the explicit d x d matrix."""
    return np.array([list(head_singular_values(q, k).values()) for q, k in zip(wq, wk, strict=True)])


def _worst_aligned(rng, conds, conds_k=None, d_head=32, d=512):
    # W_K's weakest directions meet W_Q's strongest: every singular value of W_QK is ~s_1 / cond,
    # the Gram route's worst case for a given conditioning
    basis, _ = np.linalg.qr(rng.standard_normal((d_head, d_head)))
    wk = _conditioned(rng, conds if conds_k is None else conds_k, basis, d, reverse=True)
    return _conditioned(rng, conds, basis, d), wk


@pytest.mark.slow
def test_gram_route_is_trusted_only_where_accurate():
    # Cholesky QR from the Grams: its error grows with cond x amplification (2e-3 at cond 300
    # here). Heads it trusts must meet SPEC's 1e-4; well-conditioned heads must be trusted, or the
    # fast route would never run.
    from spinjax.kernels import heads, spectra

    rng = np.random.default_rng(6)
    conds = [1, 10, 30, 100, 300, 1e4]
    wq, wk = _worst_aligned(rng, conds)
    s, trusted = (np.asarray(a) for a in spectra.gram_singular_values(*heads.factor_grams(wq, wk)))
    ref = _reference_singular_values(wq, wk)
    err = (np.abs(s - ref) / ref[..., :1]).max(axis=(1, 2))
    np.testing.assert_array_equal(trusted, [True, True, True, False, False, False])
    assert (err[trusted] <= 2e-5).all(), err
    assert not (err[4:] <= 1e-4).any(), err  # what the guard keeps out (NaN: the Cholesky failed)
    # random factors (a model at initialisation): trusted, as accurate as the Householder route
    wq, wk = (np.float32(np.float16(rng.normal(0, 0.02, (4, 32, 512)))) for _ in "qk")
    s, trusted = spectra.gram_singular_values(*heads.factor_grams(wq, wk))
    ref = _reference_singular_values(wq, wk)
    assert bool(trusted.all())
    assert (np.abs(np.asarray(s) - ref) / ref[..., :1]).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("conds_k", [[1, 2], [300, 2]])
def test_untrusted_heads_take_the_householder_route(monkeypatch, conds_k):
    from spinjax.kernels import heads

    rng = np.random.default_rng(7)
    wq, wk = _worst_aligned(rng, [1, 300, 2, 3], conds_k, d_head=16, d=128)  # GQA: 2 heads per key
    calls, original = [], heads.spectra.factor_singular_values

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(heads.spectra, "factor_singular_values", counting)
    out = layer_statistics(wq, wk, block_rows=64)
    # W_Q[1] at cond 300 is fine against a well-conditioned W_K (W_QK's spectrum then follows W_Q's)
    assert len(calls) == (max(conds_k) > 10)
    for h in range(4):
        _check_head(out, h, wq[h], wk[h // 2])
