"""The eigen measures and ks_normal through ``spinjax run`` and the store, against float64
numpy/scipy on the explicit matrices of the committed fixtures; and stores made before these
variables existed (schema 1 without them) resuming."""

from __future__ import annotations

import json
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
import xarray as xr
import zarr
from conftest import FIXTURES, NEOX
from reference import eigen_distance, head_eigen
from scipy import stats

from spinjax.run.options import Progress, RunOptions
from spinjax.run.pipeline import run
from spinjax.sources.hf import HFCheckpoint
from spinjax.sources.layouts import layout_for
from spinjax.store import consolidate, locked
from spinjax.store.schema import eigen_variables

ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "bert")


def _ks(w: np.ndarray) -> float:
    w = w.ravel()
    return float(stats.kstest(w, "norm", args=(w.mean(), w.std())).statistic)


def _circuits(path, ov: bool):
    """(circuit, matrices' indices, per layer: per head (A, B) with the product A^T B) of a fixture,
    from the layout's float32 factors taken to float64."""
    checkpoint = HFCheckpoint(path)
    layout = layout_for(checkpoint.config, str(path))
    g = layout.geometry(checkpoint.config, str(path))
    group = g.n_heads // g.n_kv_heads
    for layer in range(g.n_layers):
        wq, wk = (np.asarray(a, np.float64) for a in layout.extract(checkpoint.tensor, layer, g))
        yield "qk", (0, 1, 2), layer, [(wq[h], wk[h // group]) for h in range(g.n_heads)]
        if ov:
            wv, wo = (np.asarray(a, np.float64) for a in layout.extract_ov(checkpoint.tensor, layer, g))
            yield "ov", (3, 4, 5), layer, [(wv[h // group], wo[h]) for h in range(g.n_heads)]


def _check_store(store, key, path, ov: bool) -> None:
    ds = xr.open_zarr(store, group=key).isel(step=0).load()
    for circuit, matrices, layer, heads in _circuits(path, ov):
        d = ds.sel(layer=layer)
        for h, (a, b) in enumerate(heads):
            where = f"{key} {circuit} layer {layer} head {h}"
            ref = head_eigen(a, b)  # eig of the explicit d_model x d_model A^T B
            got = d[f"{circuit}_eig_re"].values[h] + 1j * d[f"{circuit}_eig_im"].values[h]
            top = np.abs(ref["eig"]).max()
            assert eigen_distance(got, ref["eig"]) <= 1e-4 * top, where
            sym, positivity = (float(d[f"{circuit}_{n}"][h]) for n in ("sym_fraction", "eig_positivity"))
            assert sym == pytest.approx(ref["sym_fraction"], abs=1e-5), where
            assert positivity == pytest.approx(ref["eig_positivity"], abs=1e-4), where
            for m, w in zip(matrices, (a, b, a.T @ b), strict=True):
                assert float(d["ks_normal"][h, m]) == pytest.approx(_ks(w), abs=5e-4 + 1e-6), (where, m)
    assert ds["qk_eig_re"].dtype == np.float32 and ds["ks_normal"].dtype == np.float32


def test_the_fixture_store_holds_the_float64_measures(neox_store):
    _check_store(neox_store, "gpt_neox", NEOX, ov=False)
    ds = xr.open_zarr(neox_store, group="gpt_neox")
    assert ds["qk_eig_re"].dims == ("step", "layer", "head", "eig") and ds.sizes["eig"] == 16
    assert ds["qk_sym_fraction"].dims == ("step", "layer", "head")
    assert "ov_eig_re" not in ds


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_with_ov(arch, tmp_path):
    path = tmp_path / "store.zarr"
    run(str(FIXTURES / arch), RunOptions(steps="all", store=path, ov=True, pairs="none"))
    _check_store(path, arch, FIXTURES / arch, ov=True)


# ---- stores made before these variables existed -------------------------------------------

NEW = ["ks_normal", *eigen_variables("qk")]
D, HEADS, D_HEAD = 96, 6, 16


def _trajectory(root, steps) -> None:
    """An orbax trajectory of random GPT-NeoX attention weights (fused qkv kernels, 2 layers)."""
    rng = np.random.default_rng(0)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=None)
    with ocp.CheckpointManager(root, options=options) as manager:
        for step in steps:
            layers = {str(i): {"attention": {"query_key_value": {
                "kernel": (rng.standard_normal((D, 3 * D)) * 0.02).astype(np.float16)}}} for i in range(2)}
            manager.save(step, args=ocp.args.StandardSave({"gpt_neox": {"layers": layers}}))
    config = {"model_type": "gpt_neox", "hidden_size": D, "num_attention_heads": HEADS,
              "num_hidden_layers": 2}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))


def _make_old(store, key: str) -> None:
    """Remove what this spinjax adds to schema 1, as a store written before it would be."""
    with locked(store) as root:
        group = zarr.open_group(str(store), path=key, mode="r+", use_consolidated=False)
        for name in [*NEW, "eig"]:
            del group[name]
        consolidate(root, key)


@pytest.mark.slow
def test_an_old_store_resumes_and_gains_the_new_variables(tmp_path):
    traj = tmp_path / "traj"
    _trajectory(traj, [0, 100])
    store = tmp_path / "store.zarr"
    run(str(traj), RunOptions(steps="0", store=store, pairs="none"))
    _make_old(store, "traj")
    old = xr.open_zarr(store, group="traj").load()
    assert not set(NEW) & set(old.data_vars)  # an old store opens and reads
    assert "ks_normal" not in old
    warnings = []
    result = run(str(traj), RunOptions(steps="all", store=store, pairs="none"),
                 Progress(on_warning=warnings.append))  # fmt: skip
    assert result.computed == [100] and result.skipped == [0]
    (warning,) = warnings
    assert "finished steps lack" in warning and "ks_normal" in warning and "qk_eig_re" in warning
    ds = xr.open_zarr(store, group="traj").load()
    assert ds["step"].values.tolist() == [0, 100] and ds["done"].values.all()
    for name in NEW:  # NaN for the step finished before, computed for the new one
        assert np.isnan(ds[name].sel(step=0)).all(), name
        assert np.isfinite(ds[name].sel(step=100)).all(), name
    assert ds.sizes["eig"] == D_HEAD
    xr.testing.assert_equal(ds.sel(step=0)[list(old.data_vars)], old.sel(step=0))  # kept as it was
    # --recompute fills the old step
    run(str(traj), RunOptions(steps="0", store=store, pairs="none", recompute=True))
    assert np.isfinite(xr.open_zarr(store, group="traj")["ks_normal"].sel(step=0)).all()


def test_an_old_store_unfinished_step_is_computed_without_warning(neox_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(neox_store, store)
    _make_old(store, "gpt_neox")
    group = zarr.open_group(str(store), path="gpt_neox", mode="r+", use_consolidated=False)
    group["done"][0] = False  # as a run killed mid-step leaves it
    warnings = []
    assert run(str(NEOX), RunOptions(steps="all", store=store), Progress(on_warning=warnings.append)).computed
    assert warnings == []
    _check_store(store, "gpt_neox", NEOX, ov=False)
