"""`spinjax run --null / --pairs`: z-scores and cross-head geometry written into the store,
checked against float64 computations from the checkpoint's own factors and the stored null."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr
from conftest import NEOX
from reference import js_divergence as js_reference

from spinjax import store as store_mod
from spinjax.kernels.null import SCALE_LOG, SCALE_MUL
from spinjax.run.features import model_pairs
from spinjax.run.options import RunOptions
from spinjax.run.pipeline import run
from spinjax.sources.hf import HFCheckpoint as Checkpoint
from spinjax.sources.layouts import layout_for

SAMPLES = 40


def _factors64():
    ckpt = Checkpoint(NEOX)
    layout = layout_for(ckpt.config, "neox")
    g = layout.geometry(ckpt.config, "neox")
    layers = range(g.n_layers)
    return [tuple(np.float64(w) for w in layout.extract(ckpt.tensor, layer, g)) for layer in layers]


def _qk64(wq, wk):
    """Every head's d x d W_QK in float64 (the explicit computation the kernels avoid)."""
    return np.einsum("had,hae->hde", wq, wk)


@pytest.fixture(scope="module")
def derived_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("derived") / "store.zarr"
    run(str(NEOX), RunOptions(steps="all", store=path, null=True, null_samples=SAMPLES, pairs="model"))
    return path


def test_layer_pairs_equal_explicit_float64(derived_store):
    ds = xr.open_zarr(derived_store, group="gpt_neox")
    for layer, (wq, wk) in enumerate(_factors64()):
        m = _qk64(wq, wk)
        flat = m.reshape(m.shape[0], -1)
        dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
        norms = np.linalg.norm(flat, axis=-1)
        cos = flat @ flat.T / np.outer(norms, norms)
        got = ds.qk_distance.isel(step=0, layer=layer).values
        np.testing.assert_allclose(got, dist, rtol=2e-3, atol=1e-4 * norms.max())
        np.testing.assert_allclose(ds.qk_cosine.isel(step=0, layer=layer).values, cos, atol=1e-4)
        assert np.array_equal(got, got.T) and np.all(np.diag(got) == 0)
        assert np.all(np.diag(ds.qk_cosine.isel(step=0, layer=layer).values) == 1)
        assert dist[~np.eye(len(dist), dtype=bool)].min() > 0.1 * norms.min()  # distinct heads


def test_model_pairs_equal_explicit_float64_and_contain_the_layer_pairs(derived_store):
    ds = xr.open_zarr(derived_store, group="gpt_neox")
    flat = np.concatenate([_qk64(wq, wk).reshape(wq.shape[0], -1) for wq, wk in _factors64()])
    n_layers, n_heads = ds.sizes["layer"], ds.sizes["head"]
    dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1).reshape(n_layers, n_heads, n_layers, n_heads)
    got = ds.qk_distance_model.isel(step=0).values
    np.testing.assert_allclose(got, dist, rtol=2e-3, atol=1e-4 * np.linalg.norm(flat, axis=1).max())
    for layer in range(n_layers):
        np.testing.assert_allclose(got[layer, :, layer], ds.qk_distance.isel(step=0, layer=layer), rtol=1e-5)
    assert np.abs(ds.qk_cosine_model.isel(step=0).values[0, :, 1]).max() < 0.9  # layers differ


def test_model_pairs_in_blocks_equal_one_block():
    factors = [(wq.astype(np.float32), wk.astype(np.float32)) for wq, wk in _factors64()] * 3  # 6 layers
    one = model_pairs(lambda layer: factors[layer], len(factors), 1 << 30)
    per_layer = 2 * factors[0][0].nbytes
    blocks = model_pairs(lambda layer: factors[layer], len(factors), 2 * per_layer)  # a layer per block
    for name in one:
        np.testing.assert_allclose(blocks[name], one[name], rtol=1e-6, atol=1e-6)
    same = np.diag(one["qk_distance_model"][0, :, 2])  # layer 2 is a copy of layer 0
    assert np.allclose(same, 0, atol=1e-3 * one["qk_distance_model"].max())


def test_js_head_from_stored_histograms(derived_store):
    ds = xr.open_zarr(derived_store, group="gpt_neox")
    hist = ds.hist.isel(step=0).sel(matrix="W_QK").values.astype(np.float64)
    js = ds.js_head.isel(step=0).values
    for layer in range(ds.sizes["layer"]):
        for i in range(ds.sizes["head"]):
            for j in range(ds.sizes["head"]):
                assert js[layer, i, j] == pytest.approx(
                    js_reference(hist[layer, i], hist[layer, j]), abs=1e-5
                )
    assert js.max() > 0.01


def test_null_scores_equal_numpy_from_the_stored_null(derived_store):
    ds = xr.open_zarr(derived_store, group="gpt_neox")
    null = xr.open_zarr(derived_store, group="baseline/96x16")
    assert null.sizes["sample"] == SAMPLES and ds.attrs["features"]["null"]["baseline"] == "baseline/96x16"
    frob = ds.frobenius_norm.isel(step=0).values.astype(np.float64)
    rms = frob[..., :2] / np.sqrt(16 * 96)
    scale = np.stack([rms[..., 0], rms[..., 1], rms[..., 0] * rms[..., 1]], axis=-1)
    names = ("std", "kurt", "entropy", "kl_gauss", "ks_normal", "stable_rank", "spectral_norm",
             "singular_values")  # fmt: skip
    for name in names:
        value = ds[name].isel(step=0).values.astype(np.float64)
        s = scale[..., None] if name == "singular_values" else scale
        if name in SCALE_MUL:
            value = value / s
        elif name in SCALE_LOG:
            value = value - np.log(s)
        samples = null[name].values.astype(np.float64)
        expected = (value - samples.mean(0)) / samples.std(0, ddof=1)
        np.testing.assert_allclose(ds[f"{name}_z"].isel(step=0).values, expected, rtol=1e-3, atol=1e-3)
    # the fixture's weights are random Gaussian draws: its heads score like draws of the null
    assert np.abs(ds.std_z.isel(step=0).sel(matrix="W_Q").values).max() < 1
    kurt_z = ds.kurt_z.isel(step=0).values
    assert np.abs(kurt_z).max() < 5 and 0.3 < np.abs(kurt_z).mean() < 2


def test_null_added_later_scores_finished_steps_and_sticks(neox_store, derived_store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(neox_store, path)
    shutil.copytree(derived_store / "baseline", path / "baseline")  # the same null, not recomputed
    store_mod.consolidate(store_mod.open_store(path, create=True, consolidated=False))
    result = run(str(NEOX), RunOptions(steps="all", store=path, null=True, null_samples=SAMPLES))
    assert result.computed == [] and result.skipped == [-1]
    later = xr.open_zarr(path, group="gpt_neox")
    fresh = xr.open_zarr(derived_store, group="gpt_neox")
    for name in ("kurt_z", "entropy_z", "singular_values_z"):
        np.testing.assert_allclose(later[name].values, fresh[name].values, rtol=1e-5, atol=1e-6)
    # sticky: a recompute without --null still writes them
    run(str(NEOX), RunOptions(steps="all", store=path, recompute=True))
    again = xr.open_zarr(path, group="gpt_neox")
    np.testing.assert_allclose(again.kurt_z.values, fresh.kurt_z.values, rtol=1e-5, atol=1e-6)


def test_a_null_without_ks_normal_leaves_its_z_score_nan_and_says_so(neox_store, derived_store, tmp_path):
    from spinjax.run.options import Progress

    path = tmp_path / "s.zarr"
    shutil.copytree(neox_store, path)
    shutil.copytree(derived_store / "baseline", path / "baseline")
    shutil.rmtree(path / "baseline" / "96x16" / "ks_normal")  # as an older spinjax made it
    store_mod.consolidate(store_mod.open_store(path, create=True, consolidated=False))
    warnings = []
    run(str(NEOX), RunOptions(steps="all", store=path, null=True, recompute=True),
        Progress(on_warning=warnings.append))  # fmt: skip
    assert any("lacks ks_normal" in w and "--recompute" in w for w in warnings), warnings
    ds = xr.open_zarr(path, group="gpt_neox")
    assert np.isnan(ds.ks_normal_z.values).all() and np.isfinite(ds.kurt_z.values).all()


@pytest.mark.slow
def test_pairs_none_writes_no_geometry(tmp_path):
    path = tmp_path / "s.zarr"
    run(str(NEOX), RunOptions(steps="all", store=path, pairs="none"))
    ds = xr.open_zarr(path, group="gpt_neox")
    assert "qk_distance" not in ds and "std_z" not in ds and "std" in ds


VARIANTS = NEOX.parent.parent / "variants"


def _extracted(arch: str, variant: str = "raw"):
    ckpt = Checkpoint(VARIANTS / arch)
    layout = layout_for(ckpt.config, arch)
    g = layout.geometry(ckpt.config, arch)
    return ckpt, layout, g


@pytest.mark.slow
def test_ov_matrices_equal_explicit_float64_with_gqa(tmp_path):
    path = tmp_path / "s.zarr"
    run(str(VARIANTS / "llama"), RunOptions(steps="all", store=path, ov=True, pairs="none"))
    ds = xr.open_zarr(path, group="llama")
    assert list(ds.matrix.values) == ["W_Q", "W_K", "W_QK", "W_V", "W_O", "W_OV"]
    ckpt, layout, g = _extracted("llama")
    assert g.n_kv_heads < g.n_heads
    for layer in range(g.n_layers):
        wv, wo = (np.float64(w) for w in layout.extract_ov(ckpt.tensor, layer, g))
        for h in range(g.n_heads):
            v = wv[h // (g.n_heads // g.n_kv_heads)]
            ov = v.T @ wo[h]  # the explicit d x d W_OV
            got = ds.isel(step=0, layer=layer, head=h)
            for name, m in (("W_V", v), ("W_O", wo[h]), ("W_OV", ov)):
                s = np.linalg.svd(m, compute_uv=False)[: g.d_head]
                np.testing.assert_allclose(
                    got.singular_values.sel(matrix=name), s, rtol=1e-4, atol=1e-4 * s[0]
                )
                assert float(got["std"].sel(matrix=name)) == pytest.approx(m.std(), rel=1e-4)
                assert float(got["kurt"].sel(matrix=name)) == pytest.approx(
                    ((m - m.mean()) ** 4).mean() / m.var() ** 2 - 3, abs=1e-3
                )


@pytest.mark.slow
def test_bias_variant_is_the_augmented_form_in_its_own_group(tmp_path):
    path = tmp_path / "s.zarr"
    run(str(VARIANTS / "gpt2"), RunOptions(steps="all", store=path, pairs="none"))
    run(str(VARIANTS / "gpt2"), RunOptions(steps="all", store=path, variant="bias", pairs="none"))
    raw, aug = xr.open_zarr(path, group="gpt2"), xr.open_zarr(path, group="gpt2@bias")
    assert aug.attrs["variant"] == "bias" and raw.attrs["variant"] == "raw"
    ckpt, layout, g = _extracted("gpt2")
    wq, wk = (np.float64(w) for w in layout.extract(ckpt.tensor, 1, g, "bias"))
    m = wq[2].T @ wk[2]  # (d + 1) x (d + 1): [[W_Q^T W_K, W_Q^T b_K], [b_Q^T W_K, b_Q.b_K]]
    assert m.shape == (g.d_model + 1,) * 2
    got = aug.isel(step=0, layer=1, head=2).sel(matrix="W_QK")
    np.testing.assert_allclose(got.singular_values, np.linalg.svd(m, compute_uv=False)[: g.d_head], rtol=1e-4)
    assert float(got["mean"]) == pytest.approx(m.mean(), rel=1e-4, abs=1e-6 * m.std())
    assert float(got["std"]) == pytest.approx(m.std(), rel=1e-4)
    assert float(raw.isel(step=0, layer=1, head=2).sel(matrix="W_QK")["std"]) != pytest.approx(
        m.std(), rel=1e-3
    )


@pytest.mark.slow
def test_variant_and_ov_errors_leave_the_store_unchanged(tmp_path, snapshot):
    from spinjax.errors import InputError

    path = tmp_path / "s.zarr"
    run(str(VARIANTS / "llama"), RunOptions(steps="all", store=path, pairs="none"))
    before = snapshot(path)
    with pytest.raises(InputError, match=r"q_proj\.bias.*--variant bias needs it"):
        run(str(VARIANTS / "llama"), RunOptions(steps="all", store=path, variant="bias"))
    with pytest.raises(InputError, match="holds the matrices W_Q, W_K, W_QK.*--ov"):
        run(str(VARIANTS / "llama"), RunOptions(steps="all", store=path, ov=True, recompute=True))
    assert snapshot(path) == before


@pytest.mark.slow
def test_cli_options_reach_the_store_and_bad_variant_exits_2(tmp_path, snapshot):
    from click.testing import CliRunner

    from spinjax.cli import main

    path = tmp_path / "s.zarr"
    model = str(VARIANTS / "qwen2")
    args = ["run", "--model", model, "--store", str(path), "--quiet"]
    done = CliRunner().invoke(main, [*args, "--variant", "bias", "--ov", "--pairs", "none"])
    assert done.exit_code == 0, done.output
    shown = CliRunner().invoke(main, ["show", str(path)])
    assert (
        "[qwen2@bias]" in shown.output
        and "matrices W_Q, W_K, W_QK, W_V, W_O, W_OV; variant bias" in shown.output
    )
    before = snapshot(path)
    bad = CliRunner().invoke(main, [*args[:2], str(VARIANTS / "llama"), *args[3:], "--variant", "bias"])
    assert bad.exit_code == 2 and "q_proj.bias" in bad.output and "--variant bias needs it" in bad.output
    wrong = CliRunner().invoke(main, [*args, "--pairs", "all"])
    assert wrong.exit_code == 2 and "--pairs" in wrong.output
    assert snapshot(path) == before


@pytest.mark.slow
def test_replacing_a_null_scores_the_groups_that_used_it_again(neox_store, tmp_path):
    from click.testing import CliRunner

    from spinjax.cli import main

    path = tmp_path / "s.zarr"
    shutil.copytree(neox_store, path)
    run(str(NEOX), RunOptions(steps="all", store=path, null=True, null_samples=8))
    args = ["baseline", "--d", "96", "--d-head", "16", "--samples", "12", "--seed", "3", "--store", str(path)]
    refused = CliRunner().invoke(main, args)  # another ensemble than the stored one: refused
    assert refused.exit_code == 2 and "--recompute" in refused.stderr
    replaced = CliRunner().invoke(main, [*args, "--recompute"])
    assert replaced.exit_code == 0, replaced.output
    assert "gpt_neox: z-scores of 1 finished step(s) scored against it again" in replaced.stdout
    ds, null = xr.open_zarr(path, group="gpt_neox"), xr.open_zarr(path, group="baseline/96x16")
    assert null.sizes["sample"] == 12 and ds.attrs["features"]["null"]["samples"] == 12
    samples = null["kurt"].values.astype(np.float64)  # kurt is scale-free: no rescaling
    expected = (ds["kurt"].values - samples.mean(0)) / samples.std(0, ddof=1)
    np.testing.assert_allclose(ds["kurt_z"].values, expected, rtol=1e-4, atol=1e-4)
