"""Random-matrix null (kernels/null.py, spinjax/run/baseline.py, `spinjax baseline`): known results.

W_QK = W_Q^T W_K with i.i.d. N(0, sigma^2) factors, sigma^2 = 1/sqrt(d): each entry is a dot
product of two independent Gaussian d_head-vectors scaled by 1/sqrt(d), variance d_head/d.
Its exact law (variance-gamma, a Bessel-K density) gives the exact excess kurtosis 6/d_head and
the exact negentropy J = KL(P || Gaussian), computed below by float64 quadrature.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from scipy import special, stats

from spinjax.cli import main
from spinjax.kernels import block_entries_cap, block_rows_for_budget, layer_statistics
from spinjax.kernels.null import gaussian_factors, matched_scale, null_zscores
from spinjax.run.baseline import compute_baseline
from spinjax.store.baseline import read_baseline

D = 128  # geometry of the analytic checks (entries of one matrix: D^2 = 16384)
SIGMA = D**-0.25  # sigma^2 = 1/sqrt(d): W_QK = (unit W_Q)^T (unit W_K) / sqrt(d)
BATCH = 64


def _negentropy(d_head: int) -> float:
    """KL(P || N(0, 1)) of z = q.k / sqrt(d_head), q, k ~ N(0, I_{d_head}), by quadrature."""
    nu, s = (d_head - 1) / 2, math.sqrt(d_head)
    z = np.linspace(-14.0, 14.0, 280_000)  # even count: z = 0 (the log singularity) is skipped
    a = np.abs(z) * s
    log_pdf = (nu * np.log(a) + np.log(special.kve(nu, a)) - a - nu * math.log(2.0)
               - 0.5 * math.log(math.pi) - special.gammaln(d_head / 2) + math.log(s))  # fmt: skip
    pdf = np.exp(log_pdf)
    assert np.trapezoid(pdf * z * z, z) == pytest.approx(1.0, abs=1e-6)
    return float(np.trapezoid(pdf * (log_pdf + 0.5 * z * z + 0.5 * math.log(2 * math.pi)), z))


@pytest.fixture(scope="module")
def known_nulls():
    """64 random heads at d = 128 for d_head 8 and 32, W_QK scaled to variance d_head/d."""
    return {dh: compute_baseline(D, dh, sigma=SIGMA, samples=BATCH, seed=0, batch=BATCH) for dh in (8, 32)}


def _mean_se(x):
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def test_negentropy_reference():
    # Edgeworth: J ~ kurt^2 / 48 with kurt = 6/d_head, approached as d_head grows
    assert _negentropy(64) == pytest.approx(36 / (48 * 64**2), rel=0.1)
    assert _negentropy(8) == pytest.approx(0.00755, abs=2e-5)


@pytest.mark.parametrize("d_head", [8, 32])
def test_element_std_and_entropy(known_nulls, d_head):
    s = known_nulls[d_head]
    mean, se = _mean_se(s["std"][:, 2])
    assert abs(mean - math.sqrt(d_head / D)) < 4 * se and se < 5e-3 * mean
    gauss = 0.5 * math.log(2 * math.pi * math.e * d_head / D)
    entropy = float(s["entropy_mm"][:, 2].mean())
    # differential entropy = Gaussian entropy - negentropy; plug-in bias left after
    # Miller-Madow (entries of one matrix are not independent) is ~1e-3 at d = 128
    assert entropy == pytest.approx(gauss - _negentropy(d_head), abs=3e-3)
    if d_head == 32:
        assert entropy == pytest.approx(gauss, abs=3e-3)
    for m in (0, 1):  # the factors: std sigma
        mean, se = _mean_se(s["std"][:, m])
        assert abs(mean - SIGMA) < 4 * se


def test_kl_small_and_falling_with_d_head(known_nulls):
    kl = {dh: float(known_nulls[dh]["kl_gauss_mm"][:, 2].mean()) for dh in (8, 32)}
    for dh in (8, 32):
        assert kl[dh] == pytest.approx(_negentropy(dh), abs=1.5e-3)
        assert float(known_nulls[dh]["kurt"][:, 2].mean()) == pytest.approx(6 / dh, rel=0.15)
    assert kl[32] < 2e-3
    assert kl[8] > 3 * kl[32]


def test_exactly_d_head_nonzero_singular_values(known_nulls):
    d_head = 32
    sv = known_nulls[d_head]["singular_values"][:, 2]  # (samples, d_head), descending
    assert sv.shape == (BATCH, d_head)
    assert np.all(sv[:, -1] / sv[:, 0] > 0.05)  # clear gap to zero: full rank d_head
    # against the explicit float64 d x d matrix: d_head values agree, the other d - d_head vanish
    wq, wk = (np.asarray(w, np.float64) for w in gaussian_factors(
        jax.random.PRNGKey(0), 0, SIGMA, n=BATCH, d_model=D, d_head=d_head))  # fmt: skip
    for i in (0, 1):
        full = np.linalg.svd(wq[i].T @ wk[i], compute_uv=False)
        np.testing.assert_allclose(sv[i], full[:d_head], atol=1e-4 * full[0])
        assert np.all(full[d_head:] < 1e-12 * full[0])
    # a factor with 4 zero rows: rank d_head - 4, and the kernel says so
    wq32, wk32 = gaussian_factors(jax.random.PRNGKey(0), 0, SIGMA, n=BATCH, d_model=D, d_head=d_head)
    wq32 = wq32.at[:, -4:, :].set(0.0)
    rows = block_rows_for_budget(BATCH, D, 1 << 30, max_entries=block_entries_cap())
    out = layer_statistics(wq32, wk32, block_rows=rows)
    for m in (0, 2):  # W_Q and W_QK
        s = out["singular_values"][:, m]
        assert np.all(s[:, d_head - 5] / s[:, 0] > 0.05)
        assert np.all(s[:, d_head - 4 :] <= 1e-5 * s[:, :1])
        assert np.all(out["condition_number"][:, m] > 1e5)


@pytest.fixture(scope="module")
def null_and_heads():
    """A unit-sigma null of 400 draws (seed 0) and 400 other random heads (seed 1) at d = 128,
    d_head = 32, in batches of the `known_nulls` shape (compiling the kernels costs ~100x a batch)."""
    kw = dict(samples=400, batch=BATCH)
    return compute_baseline(D, 32, seed=0, **kw), compute_baseline(D, 32, seed=1, **kw)


SCORED = ("std", "kurt", "entropy_mm", "kl_gauss_mm", "spectral_norm", "stable_rank", "max")


@pytest.mark.slow
def test_zscores_of_random_heads_are_standard_normal(null_and_heads):
    baseline, heads = null_and_heads
    z = null_zscores(heads, baseline)
    assert "hist_z" not in z and "n_nonfinite_z" not in z and z["singular_values_z"].shape == (400, 3, 32)
    assert np.all(np.isnan(z["tail_mass_z"]))  # no entry beyond zmax in any draw: the null is 0
    n = 1 / 400 + 1 / 400  # the heads' and the null's sampling errors
    checked = 0
    for name, values in z.items():
        for m in range(3):
            x = np.asarray(values[:, m]).ravel()
            if name in ("tail_mass_z",):
                continue
            assert np.all(np.isfinite(x)), name
            # within 4 standard errors: of a mean, and of a std (delta method, z's own kurtosis)
            k4 = stats.kurtosis(x, fisher=False)
            assert abs(x.mean()) < 4 * math.sqrt(n), (name, m, x.mean())
            assert abs(x.std() - 1.0) < 4 * math.sqrt((k4 - 1) / 4 * n), (name, m, x.std(), k4)
            checked += 1
    assert checked == 3 * 22 + 3  # the 23 scalars but tail_mass, and the singular values
    # element statistics of W_QK (sums over many entries) are close to normal themselves;
    # spectral ones (e.g. the largest singular value) are standardised but skewed
    for name in ("std", "kurt", "entropy_mm", "kl_gauss_mm"):
        assert stats.kstest(np.asarray(z[f"{name}_z"][:, 2]), "norm").pvalue > 1e-2, name
    # heads of another scale: exact rescaling of the null (W_Q, W_K by a, W_QK by a^2)
    scaled = compute_baseline(D, 32, sigma=2.5, seed=1, samples=200, batch=BATCH)
    z_scaled = null_zscores(scaled, baseline, scale=np.array([2.5, 2.5, 6.25]))
    for name in SCORED + ("entropy", "mean", "singular_values"):
        # histogram-based values move when rounding puts an entry across a bin edge
        binned = name in ("entropy", "entropy_mm", "kl_gauss_mm")
        np.testing.assert_allclose(z_scaled[f"{name}_z"], z[f"{name}_z"][:200], atol=0.05 if binned else 2e-3,
                                   err_msg=name)  # fmt: skip
    est = np.asarray(matched_scale(scaled["frobenius_norm"], d_model=D, d_head=32))
    np.testing.assert_allclose(est.mean(0), [2.5, 2.5, 6.25], rtol=0.01)


def test_null_zscores_values():
    baseline = {"std": np.array([[1.0], [2.0], [3.0], [4.0], [np.inf]]),
                "kurt": np.ones((5, 1)), "zhist": np.ones((5, 1, 3))}  # fmt: skip
    got = null_zscores({"std": np.array([[5.0], [2.5]]), "kurt": np.array([[1.0]]),
                        "zhist": np.ones((1, 1, 3))}, baseline)  # fmt: skip
    assert set(got) == {"std_z", "kurt_z"}
    np.testing.assert_allclose(got["std_z"][:, 0], [2.5 / np.std([1, 2, 3, 4], ddof=1), 0.0], rtol=1e-6)
    assert np.isnan(got["kurt_z"][0, 0])  # the null does not vary
    log = null_zscores({"entropy": np.array([[math.log(3.0)]])}, {"entropy": np.array([[-1.0], [1.0]])},
                       scale=np.array([3.0]))  # fmt: skip
    assert float(log["entropy_z"][0, 0]) == pytest.approx(0.0, abs=1e-6)


def test_draws_do_not_depend_on_batching():
    key = jax.random.PRNGKey(0)  # the shapes of the `known` draws: no new compilation
    whole = gaussian_factors(key, 0, SIGMA, n=BATCH, d_model=D, d_head=32)
    later = gaussian_factors(key, BATCH // 2, SIGMA, n=BATCH, d_model=D, d_head=32)
    for a, b in zip(whole, later, strict=True):
        np.testing.assert_array_equal(np.asarray(a[BATCH // 2 :]), np.asarray(b[: BATCH // 2]))
    wq, wk = (np.asarray(w) for w in whole)
    assert not np.array_equal(wq[0], wk[0]) and not np.array_equal(wq[0], wq[1])
    assert wq.std() == pytest.approx(SIGMA, rel=0.01) and abs(wk.mean()) < 0.01 * SIGMA


def test_cli_writes_xarray_readable_group(tmp_path, null_and_heads):
    store = tmp_path / "s.zarr"
    args = ["baseline", "--d", "128", "--d-head", "32", "--samples", "64", "--store", str(store)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "baseline/128x32: 64 draws" in res.output
    ds = xr.open_zarr(store, group="baseline/128x32")
    assert ds["std"].dims == ("sample", "matrix") and ds["hist"].dims == ("sample", "matrix", "bin")
    assert ds["singular_values"].dims == ("sample", "matrix", "sv") and ds.sizes["sample"] == 64
    assert [str(m) for m in ds["matrix"].values] == ["W_Q", "W_K", "W_QK"]
    assert {k: ds.attrs[k] for k in ("d", "d_head", "sigma", "samples", "seed")} == {
        "d": 128, "d_head": 32, "sigma": 1.0, "samples": 64, "seed": 0}  # fmt: skip
    assert "spinjax_version" in ds.attrs
    group = zarr.open_group(str(store), path="baseline/128x32", mode="r")
    for name, arr in group.arrays():
        assert arr.metadata.dimension_names is not None, name
    expected = null_and_heads[0]  # draws 0..63 of seed 0: the same batch, the same computation
    for name in ("std", "kl_gauss_mm", "zhist", "hist", "singular_values", "n_nonfinite"):
        np.testing.assert_array_equal(ds[name].values, expected[name][:64], err_msg=name)
    # the stored null scores heads like the in-memory one, from the xarray Dataset
    heads = {"std": null_and_heads[1]["std"]}
    z = null_zscores(heads, read_baseline(store, D, 32))
    np.testing.assert_allclose(
        z["std_z"], null_zscores(heads, {"std": expected["std"][:64]})["std_z"], rtol=1e-6
    )

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already there" in again.output
    other = CliRunner().invoke(main, args + ["--seed", "1"])
    assert other.exit_code == 2 and "--recompute" in other.output
    replaced = CliRunner().invoke(main, args + ["--seed", "1", "--recompute"])
    assert replaced.exit_code == 0, replaced.output
    ds = xr.open_zarr(store, group="baseline/128x32")
    assert ds.attrs["seed"] == 1
    np.testing.assert_array_equal(ds["std"].values, null_and_heads[1]["std"][:64])
    bad = CliRunner().invoke(main, ["baseline", "--d", "8", "--d-head", "16", "--store", str(store)])
    assert bad.exit_code == 2 and "d_head" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_a_baseline_group_beside_a_model_is_not_taken_for_a_model(tmp_path, neox_store):
    import shutil

    import spinjax

    store = tmp_path / "s.zarr"
    shutil.copytree(neox_store, store)
    args = ["baseline", "--d", "32", "--d-head", "8", "--samples", "8", "--store", str(store)]
    assert CliRunner().invoke(main, args).exit_code == 0
    shown = CliRunner().invoke(main, ["show", str(store), "--json"])
    assert shown.exit_code == 0, shown.output
    import json

    assert list(json.loads(shown.output)["models"]) == ["gpt_neox"]
    assert spinjax.open_store(store).models == ["gpt_neox"]


@pytest.mark.parametrize("budget", [0, -1])
def test_non_positive_memory_budget_refused_before_writing(budget, tmp_path):
    from spinjax.errors import InputError
    from spinjax.run.baseline import run_baseline

    with pytest.raises(InputError, match=rf"--memory-budget must be positive, got {budget} bytes"):
        run_baseline(8, 2, store_path=tmp_path / "s.zarr", samples=4, memory_budget=budget)
    assert not (tmp_path / "s.zarr").exists()
