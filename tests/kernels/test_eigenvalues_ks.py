"""W_QK's eigenvalues and the Kolmogorov-Smirnov distance from the normal, against float64
numpy/scipy: ``numpy.linalg.eig`` of the explicit d_model x d_model W_QK and ``scipy.stats.kstest``
of the explicit matrix (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import eigen_distance, head_eigen, head_reference
from scipy import stats

from spinjax.kernels import layer_statistics
from spinjax.kernels.bins import fine_zbin_edges
from spinjax.kernels.elements import add_block, empty_sums, ks_from_counts, summarize

EIGEN = ("eig_re", "eig_im", "eig_positivity", "sym_fraction")


def _orthonormal(rng, d: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


def _check_eigen(out, h, wq, wk, *, atol=1e-4):
    """Head h's eigen measures against numpy's eig of the explicit float64 W_QK."""
    ref = head_eigen(wq, wk)
    got = out["eig_re"][h] + 1j * out["eig_im"][h]
    top = np.abs(ref["eig"]).max()
    assert eigen_distance(got, ref["eig"]) <= atol * top, (h, got, ref["eig"])
    assert np.abs(ref["rest"]).max(initial=0) <= 1e-9 * top  # the other d_model - d_head vanish
    assert out["sym_fraction"][h] == pytest.approx(ref["sym_fraction"], abs=1e-5)
    assert out["eig_positivity"][h] == pytest.approx(ref["eig_positivity"], abs=atol)
    modulus = np.abs(got)
    assert (np.diff(modulus) <= 1e-6 * top).all(), modulus  # sorted by modulus, descending
    # a complex eigenvalue's conjugate is its neighbour, +b first
    for i in np.flatnonzero(out["eig_im"][h] > 0):
        assert out["eig_im"][h][i + 1] == -out["eig_im"][h][i] and out["eig_re"][h][i + 1] == got[i].real


# Two shapes only (each new shape compiles the layer's programs anew): GQA layers of 6 query heads
# over 2 key heads, and pairs of heads, d_head 8, d_model 48.
D_HEAD, D = 8, 48


def _gqa_layer(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    wq = rng.normal(0.01, 0.2, (6, D_HEAD, D)).astype(np.float32)
    wk = rng.normal(0.0, 0.3, (2, D_HEAD, D)).astype(np.float32)
    return wq, wk


@pytest.mark.slow
def test_eigenvalues_match_numpy_on_the_explicit_matrix_under_gqa():
    wq, wk = _gqa_layer(0)
    wk[1] += 0.5 * wq[3]  # head 3 leans towards matching directions with themselves
    out = layer_statistics(wq, wk, block_rows=16)
    for h in range(6):
        _check_eigen(out, h, wq[h], wk[h // 3])
    assert out["eig_re"].dtype == np.float32 and out["sym_fraction"].dtype == np.float32
    assert out["eig_positivity"][3] > 0.5 > abs(out["eig_positivity"][0])


@pytest.mark.slow
def test_symmetric_heads_have_real_eigenvalues_and_sym_fraction_one():
    rng = np.random.default_rng(1)
    wq = rng.normal(0, 1, (2, D_HEAD, D)).astype(np.float32)
    signs = np.ones(D_HEAD, np.float32), np.array([1, -1] * (D_HEAD // 2), np.float32)
    wk = np.stack([s[:, None] * w for s, w in zip(signs, wq, strict=True)])  # W = W_Q^T D W_Q
    out = layer_statistics(wq, wk, block_rows=16)
    assert (out["eig_im"] == 0).all()
    np.testing.assert_allclose(out["sym_fraction"], 1.0, atol=1e-6)
    assert out["eig_positivity"][0] == pytest.approx(1.0, abs=1e-6)  # positive semi-definite
    assert (out["eig_re"][0] > 0).all() and (out["eig_re"][1] > 0).sum() == D_HEAD // 2  # inertia of D
    for h in range(2):
        _check_eigen(out, h, wq[h], wk[h])


def test_antisymmetric_head_and_a_rotation():
    rng = np.random.default_rng(2)
    u = _orthonormal(rng, D, D_HEAD).T  # orthonormal rows u_0 .. u_7
    # head 0: W = sum_i c_i^2 (u_2i^T u_2i+1 - u_2i+1^T u_2i), antisymmetric, eigenvalues +-i c_i^2
    c = np.array([3.0, 2.0, 1.0, 0.5])[:, None]
    pairs_a, pairs_b = u[0::2] * c, u[1::2] * c
    wq0 = np.concatenate([pairs_a, pairs_b])
    wk0 = np.concatenate([pairs_b, -pairs_a])
    # head 1: W_QK = U R U^T, R a rotation by the angles t_i in four planes
    angles = np.array([0.3, 1.2, 2.9, 2.0])
    rot = np.zeros((D_HEAD, D_HEAD))
    for i, t in enumerate(angles):  # blocks [[cos, -sin], [sin, cos]]
        rot[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    wq = np.stack([wq0, u]).astype(np.float32)
    wk = np.stack([wk0, rot @ u]).astype(np.float32)
    out = layer_statistics(wq, wk, block_rows=16)

    assert out["sym_fraction"][0] == pytest.approx(0.0, abs=1e-6)
    assert np.abs(out["eig_re"][0]).max() <= 1e-5 * np.abs(out["eig_im"][0]).max()
    np.testing.assert_allclose(out["eig_im"][0], [9, -9, 4, -4, 1, -1, 0.25, -0.25], rtol=1e-5)
    assert out["eig_positivity"][0] == pytest.approx(0.0, abs=1e-5)

    got = out["eig_re"][1] + 1j * out["eig_im"][1]
    np.testing.assert_allclose(np.abs(got), 1.0, atol=1e-5)
    assert eigen_distance(got, np.exp(1j * np.concatenate([angles, -angles]))) <= 1e-5
    # sum Re / sum |.| = mean cos; the symmetric part of a rotation by t keeps cos^2 t of it
    assert out["eig_positivity"][1] == pytest.approx(np.cos(angles).mean(), abs=1e-5)
    assert out["sym_fraction"][1] == pytest.approx((np.cos(angles) ** 2).mean(), abs=1e-5)
    for h in range(2):
        _check_eigen(out, h, wq[h], wk[h])


def test_batched_heads_equal_each_head_alone():
    wq, wk = _gqa_layer(4)
    wq[1] = np.random.default_rng(4).standard_t(3, wq[1].shape)
    batched = layer_statistics(wq, wk, block_rows=16)
    for h in (0, 1, 5):
        alone = layer_statistics(np.stack([wq[h], wq[h]]), np.stack([wk[h // 3]] * 2), block_rows=16)
        for name in EIGEN:
            np.testing.assert_allclose(alone[name][0], batched[name][h], rtol=1e-6, atol=1e-7, err_msg=name)
        assert alone["ks_normal"][0] == pytest.approx(batched["ks_normal"][h], abs=1e-6)


def test_nonfinite_and_zero_heads_give_nan():
    wq, wk = _gqa_layer(5)
    wq[1, 2, 3] = np.nan
    wk[1] = 0.0  # heads 3, 4, 5: W_QK = 0
    out = layer_statistics(wq, wk, block_rows=16)
    for name in EIGEN:
        assert np.isnan(out[name][1]).all(), name  # a NaN factor entry: nothing to decompose
    assert (out["eig_re"][3:] == 0).all() and np.isnan(out["eig_positivity"][3:]).all()
    assert np.isnan(out["sym_fraction"][3:]).all()
    for h in (0, 2):
        _check_eigen(out, h, wq[h], wk[0])


def test_measures_off_leave_them_out_and_the_rest_unchanged():
    wq, wk = _gqa_layer(6)
    on = layer_statistics(wq, wk, block_rows=16)
    no_ks = layer_statistics(wq, wk, block_rows=16, ks=False)
    off = layer_statistics(wq, wk, block_rows=16, ks=False, eigenvalues=False)
    assert set(on) - set(no_ks) == {"ks_normal"} and set(no_ks) - set(off) == set(EIGEN)
    for name in ("mean", "std", "kurt", "singular_values", "hist"):
        np.testing.assert_array_equal(on[name], off[name], err_msg=name)
    for name in EIGEN:
        np.testing.assert_array_equal(on[name], no_ks[name], err_msg=name)


def _ks_of(x: np.ndarray) -> float:
    """ks_normal of one matrix through the element pass, binned at its exact mean and std."""
    x64 = x.astype(np.float64)
    shift, scale = np.array([x64.mean()], np.float32), np.array([x64.std()], np.float32)
    acc = add_block(empty_sums(1), x[None].astype(np.float32), shift, scale)
    return float(summarize(acc, shift, scale)["ks_normal"][0])


@pytest.mark.parametrize(
    "kind", ["gaussian", "student_t", "uniform", "half_zeros", "lognormal", "two_point", "few"]
)
@pytest.mark.slow
def test_ks_normal_within_the_derived_bound_of_scipy(kind):
    rng = np.random.default_rng(sum(map(ord, kind)))
    shape = (4, 16) if kind == "few" else (256, 512)
    x = {
        "gaussian": lambda: rng.normal(0.3, 2.0, shape),
        "student_t": lambda: rng.standard_t(2.5, shape),
        "uniform": lambda: rng.uniform(-1, 1, shape),
        "half_zeros": lambda: np.where(rng.random(shape) < 0.5, 0.0, rng.normal(0, 1, shape)),
        "lognormal": lambda: rng.lognormal(0, 1, shape),
        "two_point": lambda: np.where(rng.random(shape) < 0.2, 4.0, -1.0),
        "few": lambda: rng.normal(0, 1, shape),
    }[kind]().astype(np.float32)
    x64 = x.astype(np.float64).ravel()
    exact = stats.kstest(x64, "norm", args=(x64.mean(), x64.std())).statistic
    # bins of 0.0025: half the largest Phi mass of a bin, plus float32 rounding of z
    assert abs(_ks_of(x) - exact) <= 5.0e-4 + 1e-6, (kind, _ks_of(x), exact)


def test_ks_from_counts_brackets_the_exact_statistic():
    # the estimate is the midpoint of [L, U], U - L <= the largest bin mass of Phi
    rng = np.random.default_rng(7)
    edges = fine_zbin_edges()
    for n in (10, 1000, 100_000):
        z = rng.standard_t(4, n)
        z = (z - z.mean()) / z.std()
        counts = np.histogram(z, edges)[0][None]
        got = float(ks_from_counts(counts, np.array([n]))[0])
        exact = stats.kstest(z, "norm").statistic
        assert abs(got - exact) <= 0.5 * (np.diff(stats.norm.cdf(edges[1:-1])).max()) + 1e-6, n


@pytest.mark.slow
def test_ks_normal_of_a_12b_sized_head_matches_scipy():
    # 26M entries of one head's W_QK at the 12B shape (d_model 5120, d_head 128), fp16 factors
    rng = np.random.default_rng(8)
    wq = (rng.standard_normal((1, 128, 5120)) * 0.02).astype(np.float16).astype(np.float32)
    wk = (rng.standard_t(4, (1, 128, 5120)) * 0.02).astype(np.float16).astype(np.float32)
    out = layer_statistics(wq, wk, block_rows=512)
    w = wq[0].astype(np.float64).T @ wk[0].astype(np.float64)
    w = w.ravel()
    exact = stats.kstest(w, "norm", args=(w.mean(), w.std())).statistic
    assert out["ks_normal"][0, 2] == pytest.approx(exact, abs=1e-3)


def test_ks_normal_of_every_matrix_in_layer_statistics():
    rng = np.random.default_rng(9)
    wq, wk = _gqa_layer(9)
    wq[0] = rng.standard_t(3, wq[0].shape)
    wk[0] = rng.uniform(-1, 1, wk[0].shape)
    out = layer_statistics(wq, wk, block_rows=16)
    for h in (0, 1, 4):
        ref = head_reference(wq[h], wk[h // 3])
        for m, name in enumerate(("W_Q", "W_K", "W_QK")):
            assert out["ks_normal"][h, m] == pytest.approx(ref[name]["ks_normal"], abs=5.0e-4 + 1e-6)
