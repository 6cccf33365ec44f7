"""The figures' analysis side (spinjax.analysis: rmt, study, headmaps): analytic laws against
their known moments and against sampled matrices, null bands against the baseline group's own
quantiles, estimators against the stored statistics, head distances against the kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import STUDY_NULL_SAMPLES, STUDY_STEPS
from scipy import integrate

from spinjax.analysis import headmaps, rmt, study
from spinjax.errors import InputError
from spinjax.run import run_baseline

TP = "tiny-pythia"


# ---- analytic laws -----------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.05, 0.25, 1.0])
def test_marchenko_pastur_moments(ratio):
    a, b = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    pdf = lambda x: rmt.marchenko_pastur_pdf(np.array([x]), ratio)[0]  # noqa: E731
    moments = [integrate.quad(lambda x, k=k: x**k * pdf(x), a, b, limit=200)[0] for k in range(3)]
    np.testing.assert_allclose(moments, [1.0, 1.0, 1.0 + ratio], atol=1e-6)  # mass, mean, E x^2


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
@pytest.mark.slow
def test_free_product_of_marchenko_pastur(ratio):
    x = np.linspace(1e-4, 4.5, 4001)
    # one factor: the quadratic of the S-transform gives back the closed form
    np.testing.assert_allclose(
        rmt.free_mp_product_pdf(x, ratio, 1), rmt.marchenko_pastur_pdf(x, ratio), atol=1e-9
    )
    # two free factors of mean 1, variance r: mean 1, E x^2 = 1 + 2 r
    lo, hi = rmt.free_mp_product_support(ratio)
    grid = np.linspace(lo, hi, 20001)
    p = rmt.free_mp_product_pdf(grid, ratio)
    moments = [np.trapezoid(p * grid**k, grid) for k in range(3)]
    np.testing.assert_allclose(moments, [1.0, 1.0, 1.0 + 2 * ratio], atol=2e-3)


def test_free_product_law_matches_sampled_heads():
    """Squared non-zero singular values of W_Q^T W_K / (d sigma^2)^2 follow the free product."""
    rng = np.random.default_rng(1)
    d, dh = 400, 100
    lam = []
    for _ in range(20):
        q, k = rng.standard_normal((dh, d)), rng.standard_normal((dh, d))
        lam.append(np.linalg.eigvals((q @ q.T / d) @ (k @ k.T / d)).real)
    lam = np.concatenate(lam)
    grid = np.linspace(1e-4, lam.max() * 1.2, 4001)
    cdf = np.concatenate([[0], np.cumsum(rmt.free_mp_product_pdf(grid[1:], dh / d) * np.diff(grid))])
    empirical = np.searchsorted(np.sort(lam), grid) / lam.size
    assert np.abs(empirical - cdf).max() < 0.03  # Kolmogorov distance


def test_singular_value_quantiles_of_a_square_gaussian():
    q = rmt.singular_value_quantiles(300)
    assert np.all(np.diff(q) < 0) and 0 <= q[-1] < 0.01 and 1.97 < q[0] <= 2.0
    s = np.linalg.svd(np.random.default_rng(0).standard_normal((300, 300)) / math.sqrt(300), compute_uv=False)
    assert np.abs(s - q).max() < 0.08  # within the edge fluctuations of one draw


@pytest.mark.parametrize("d_head", [1, 2, 8, 61, 500])  # 61, 500: Debye's expansion
def test_variance_gamma_moments(d_head):
    s = 1 / math.sqrt(d_head)  # unit variance
    z = np.linspace(-14, 14, 140_000)  # even count: skips z = 0 (infinite for d_head 1)
    p = rmt.variance_gamma_pdf(z, d_head, s)
    np.testing.assert_allclose(
        [np.trapezoid(p, z), np.trapezoid(p * z * z, z), np.trapezoid(p * z**4, z) - 3],
        [1.0, 1.0, 6 / d_head],
        atol={1: 2e-2, 2: 3e-4}.get(d_head, 1e-6),  # heavy tails and a singular density need more grid
    )


def test_debye_branch_continues_the_bessel_one():
    from scipy import special

    y = np.array([0.0, 0.5, 3.0, 20.0, 60.0])
    for nu in (30.0, 31.5):
        safe = np.where(y > 0, y, 1.0)
        exact = nu * np.log(safe) + np.log(special.kve(nu, safe)) - safe
        exact[0] = (nu - 1) * math.log(2) + special.gammaln(nu)
        np.testing.assert_allclose(rmt._log_ynu_knu(y, nu), exact, atol=1e-7)


def test_negentropy_and_null_curves():
    assert rmt.negentropy(8) == pytest.approx(0.00755, abs=2e-5)  # tests/test_baseline.py's quadrature
    assert rmt.negentropy(64) == pytest.approx(36 / (48 * 64**2), rel=0.1)  # Edgeworth: kurt^2 / 48
    curves = rmt.null_curves(1000, np.array([10, 50, 100, 500]))
    dh = np.array([10, 50, 100, 500])
    np.testing.assert_allclose(curves["std"], np.sqrt(dh / 1000))
    np.testing.assert_allclose(curves["entropy_gauss"], 0.5 * np.log(2 * np.pi * np.e * dh / 1000))
    np.testing.assert_allclose(curves["entropy_gauss"] - curves["entropy"], curves["kl_gauss"])
    np.testing.assert_allclose(curves["kurt"], 6 / dh)
    assert np.all(np.diff(curves["kl_gauss"]) < 0)
    assert rmt.study_scale(1000, 1000**-0.25) == pytest.approx(
        {"W_Q": 1000**0.25, "W_K": 1000**0.25, "W_QK": 1.0}
    )


# ---- estimators, null bands --------------------------------------------------------------


def test_statistic_estimators(study_ds):
    at = study_ds.isel(step=-1)
    mm = study.statistic(at, "entropy")
    assert mm.name == "entropy_mm" and mm.attrs["label"] == "entropy S (nats) (Miller-Madow)"
    np.testing.assert_array_equal(mm.values, at["entropy_mm"].values)
    plug = study.statistic(at, "kl_gauss", "plugin")
    assert plug.name == "kl_gauss" and plug.attrs["label"].endswith("(plug-in)")
    resid = study.statistic(at, "entropy_residual").values
    std = at["std"].values.astype(np.float64)
    np.testing.assert_allclose(
        resid, at["entropy_mm"].values - 0.5 * np.log(2 * np.pi * np.e * std**2), rtol=1e-6
    )
    # the plug-in residual is stored: the same formula with the plug-in entropy
    np.testing.assert_allclose(
        study.statistic(at, "entropy_residual", "plugin").values,
        at["entropy"].values - 0.5 * np.log(2 * np.pi * np.e * std**2),
        atol=1e-5,
    )
    excess = study.statistic(at, "fit_excess").values
    np.testing.assert_allclose(excess, at["sigma_fit"].values.astype(float) ** 2 - std**2)
    assert study.statistic(at, "kurt_z").attrs["label"] == "kurt: z-score against the random-matrix null"
    with pytest.raises(InputError, match="--estimator must be one of mm, plugin"):
        study.statistic(at, "entropy", "bayes")
    with pytest.raises(InputError, match="no statistic 'nope'"):
        study.statistic(at, "nope")


def test_scale_rules_match_the_kernels():
    from spinjax.kernels import null as kn

    assert {k for k, p in study.SCALE_POWER.items() if p == 1} == set(kn.SCALE_MUL)
    assert set(study.SCALE_LOG) == set(kn.SCALE_LOG)


def test_matched_scale_matches_the_kernels(study_ds, study_null):
    from spinjax.kernels import matched_scale

    ours = study.matched_scale(study_ds, study_null).transpose("step", "layer", "head", "matrix").values
    theirs = np.asarray(
        matched_scale(
            study_ds["frobenius_norm"].transpose("step", "layer", "head", "matrix").values,
            d_model=64,
            d_head=16,
        )
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_null_band_is_the_baseline_quantiles_at_each_heads_scale(study_ds, study_null):
    """kurt (scale-free): the group's quantiles as they are; std: times each matrix's matched
    scale; entropy: shifted by its log; singular values: per index."""
    from spinjax.kernels import matched_scale

    assert study_null.sizes["sample"] == STUDY_NULL_SAMPLES
    scale = np.asarray(
        matched_scale(study_ds["frobenius_norm"].values, d_model=64, d_head=16)
    )  # (step, layer, head, 3)
    pick = {"step": STUDY_STEPS[-1], "layer": 2, "head": 1}
    s = scale[-1, 2, 1]
    for name, stored, transform in (
        ("kurt", "kurt", lambda q, m: q),
        ("std", "std", lambda q, m: q * s[m]),
        ("entropy", "entropy_mm", lambda q, m: q + np.log(s[m])),
    ):
        band = study.null_band(study_ds, study_null, name).sel(**pick)
        assert band.dims == ("matrix", "band")
        for m in range(3):
            x = study_null[stored].values[:, m].astype(np.float64)
            want = transform(np.array([np.quantile(x, 0.025), x.mean(), np.quantile(x, 0.975)]), m)
            np.testing.assert_allclose(band.values[m], want, rtol=1e-6, err_msg=name)
    sv = study.null_band(study_ds, study_null, "singular_values").sel(**pick, matrix="W_QK")
    x = study_null["singular_values"].sel(matrix="W_QK").values.astype(np.float64)
    np.testing.assert_allclose(sv.sel(band="upper").values, np.quantile(x, 0.975, axis=0) * s[2], rtol=1e-6)
    # the band is what `run --study_null` scores against: a head's std_z is its distance from the mean
    band = study.null_band(study_ds, study_null, "std").sel(**pick, matrix="W_QK")
    z = (float(study_ds["std"].sel(**pick, matrix="W_QK")) - float(band.sel(band="mean"))) / (
        study_null["std"].sel(matrix="W_QK").values.std(ddof=1) * s[2]
    )
    assert z == pytest.approx(float(study_ds["std_z"].sel(**pick, matrix="W_QK")), rel=1e-4, abs=1e-4)


def test_model_baseline_and_sweep(study_store, study_ds):
    key, null = study.model_baseline(study_store, study_ds)
    assert key == "64x16" and int(null.attrs["samples"]) == STUDY_NULL_SAMPLES
    assert list(study.open_baselines(study_store)) == ["64x4", "64x16", "64x32"]
    sweep = study.baseline_sweep(study_store)
    assert list(sweep["d_head"].values) == [4, 16, 32] and sweep.attrs["d"] == 64
    g = study.open_baselines(study_store)["64x4"].sel(matrix="W_QK")
    c = 1 / math.sqrt(64)  # sigma 1: W_QK is the study's times sqrt(d)
    std = g["std"].values.astype(np.float64) * c
    want = [np.quantile(std, 0.025), std.mean(), np.quantile(std, 0.975)]
    np.testing.assert_allclose(sweep["std"].sel(d_head=4).values, want, rtol=1e-6)
    ent = g["entropy_mm"].values.astype(np.float64) + math.log(c)
    assert float(sweep["entropy"].sel(d_head=4, band="mean")) == pytest.approx(ent.mean(), rel=1e-6)
    # the sampled null follows the analytic curves of the study's scaling
    curves = rmt.null_curves(64, np.array([4, 16, 32]))
    np.testing.assert_allclose(sweep["std"].sel(band="mean").values, curves["std"], rtol=0.01)
    np.testing.assert_allclose(sweep["kurt"].sel(band="mean").values, curves["kurt"], rtol=0.25, atol=0.02)
    with pytest.raises(InputError, match="no baseline group with d = 100"):
        study.baseline_sweep(study_store, 100)


def test_depth_profile(study_ds, study_null):
    at = study_ds.isel(step=-1)
    prof = study.depth_profile({TP: at}, "kurt", nulls={TP: study_null})[TP]
    np.testing.assert_allclose(prof["layer_fraction"].values, [0, 1 / 3, 2 / 3, 1])
    kurt = at["kurt"].sel(matrix="W_QK").values.astype(np.float64)
    np.testing.assert_allclose(
        prof["value"].sel(matrix="W_QK").values, np.stack([kurt.min(1), kurt.mean(1), kurt.max(1)], axis=1)
    )
    band = study.null_band(at, study_null, "kurt").mean("head").sel(matrix="W_QK")
    np.testing.assert_allclose(prof["null"].sel(matrix="W_QK").values, band.values)


# ---- histograms, steps -------------------------------------------------------------------


def test_rebin_conserves_and_splits_by_width():
    edges = np.array([-np.inf, 0.0, 1.0, 3.0, np.inf])
    counts = np.array([[5.0, 2.0, 4.0, 7.0]])
    np.testing.assert_allclose(study.rebin(counts, edges, np.array([0.0, 0.5, 2.0, 3.0])), [[1.0, 3.0, 2.0]])
    np.testing.assert_allclose(study.rebin(counts, edges, np.array([-1.0, 4.0])), [[6.0]])  # tails dropped


def test_raw_density_integrates_to_the_share_inside(study_ds):
    d = study_ds.isel(step=-1).sel(matrix="W_QK", layer=0)
    edges = np.linspace(-1, 1, 201)
    dens = study.raw_density(d, edges)
    assert dens.dims == ("head", "value")
    np.testing.assert_allclose((dens * 0.01).sum("value").values, 1.0, atol=1e-9)  # every entry in [-1, 1]


def test_pick_steps():
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280]
    assert study.pick_steps(steps) == [0, 4, 32, 512, 1280]
    assert study.pick_steps(steps, include=768) == [0, 4, 32, 768, 1280]
    assert study.pick_steps(steps[:3]) == [0, 1, 2]


# ---- heads as points ---------------------------------------------------------------------


def test_js_matrix_matches_the_kernel(study_ds):
    from spinjax.kernels import pairwise_js

    hist = study_ds["hist"].isel(step=-1).sel(matrix="W_QK").values.reshape(16, -1)
    np.testing.assert_allclose(headmaps.js_matrix(hist), pairwise_js(hist), atol=2e-6)


def test_head_distances(study_ds):
    step = STUDY_STEPS[-1]
    cos = headmaps.head_distances(study_ds, step, kind="cosine")
    np.testing.assert_array_equal(cos.values, study_ds["qk_cosine"].sel(step=step).values)
    js = headmaps.head_distances(study_ds, step, kind="js", scope="model")
    assert js.dims == ("unit", "unit2") and js.shape == (16, 16)
    np.testing.assert_allclose(
        js.values[4:8, 4:8], study_ds["js_head"].sel(step=step, layer=1).values, atol=2e-6
    )
    assert list(js["layer"].values[:5]) == [0, 0, 0, 0, 1] and list(js["head"].values[:5]) == [0, 1, 2, 3, 0]
    with pytest.raises(InputError, match="--pairs model"):
        headmaps.head_distances(study_ds, step, kind="cosine", scope="model")


def test_ward_tree(study_ds):
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    tree, labels = headmaps.ward_tree(study_ds, STUDY_STEPS[-1], kind="js")
    assert tree.shape == (15, 4) and labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    js = headmaps.head_distances(study_ds, STUDY_STEPS[-1], kind="js", scope="model").values
    np.fill_diagonal(js, 0)
    np.testing.assert_allclose(tree, linkage(squareform(np.sqrt(js), checks=False), "ward"), rtol=1e-9)


def test_trajectory_features(study_ds):
    f = headmaps.trajectory_features(study_ds)
    assert len(f) == 16 * len(STUDY_STEPS) and f.index.names == ["layer", "head", "step"]
    assert "W_QK:kl_gauss" in f.columns and "W_Q:std" in f.columns
    np.testing.assert_allclose(f.mean().values, 0, atol=1e-9)
    np.testing.assert_allclose(f.std().values, 1, rtol=1e-9)
    row = f.loc[(1, 2, 512)]
    col = np.log(study_ds["std"].sel(matrix="W_QK").values.astype(np.float64)).ravel()
    one = math.log(float(study_ds["std"].sel(step=512, layer=1, head=2, matrix="W_QK")))
    assert row["W_QK:std"] == pytest.approx((one - col.mean()) / col.std(ddof=1))


@pytest.mark.slow
def test_trajectory_map(study_ds):
    """UMAP (numba compiles it on first use: slow) with a fixed random_state, kNN and HDBSCAN."""
    a = headmaps.trajectory_map(study_ds)
    assert list(a.columns) == ["layer", "head", "step", "x", "y", "cluster"] and len(a) == 16 * len(
        STUDY_STEPS
    )
    assert np.isfinite(a[["x", "y"]].values).all() and a["cluster"].min() >= -1
    nb = a.attrs["neighbours"]
    assert nb.shape == (len(a), 5) and not np.any(nb == np.arange(len(a))[:, None])
    feats = headmaps.trajectory_features(study_ds).values
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    np.testing.assert_array_equal(np.sort(nb, 1), np.sort(np.argsort(dist, 1)[:, :5], 1))
    b = headmaps.trajectory_map(study_ds)
    np.testing.assert_array_equal(a[["x", "y"]].values, b[["x", "y"]].values)  # reproducible


def test_null_ensembles_are_opened_again_only_when_they_change(tmp_path):
    path = tmp_path / "nulls.zarr"
    run_baseline(8, 2, store_path=path, samples=4)
    first = study.open_baselines(path)
    assert list(first) == ["8x2"] and study.open_baselines(path)["8x2"] is first["8x2"]  # reused
    run_baseline(8, 4, store_path=path, samples=4)
    assert list(study.open_baselines(path)) == ["8x2", "8x4"]  # a new group is seen
    std = first["8x2"]["std"].values
    run_baseline(8, 2, store_path=path, samples=4, seed=1, recompute=True)
    again = study.open_baselines(path)["8x2"]
    assert again is not first["8x2"] and not np.array_equal(again["std"].values, std)  # a recomputed one too
