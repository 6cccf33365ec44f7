"""The reader API (spinjax.open_store, tidy, density, align_layers) against the raw zarr arrays."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import zarr

import spinjax
from spinjax.analysis import UnknownModelError
from spinjax.errors import InputError
from spinjax.sources.tinypythia import STEPS

TP = "tiny-pythia"
NEOX = "gpt_neox"


@pytest.fixture(scope="module")
def reader(trajectory_store):
    return spinjax.open_store(trajectory_store)


@pytest.fixture(scope="module")
def raw(trajectory_store):
    return zarr.open_group(str(trajectory_store), mode="r")


def test_import_spinjax_stays_light():
    code = (
        "import sys, spinjax; heavy = {'jax', 'zarr', 'xarray', 'pandas', 'matplotlib'} & set(sys.modules);"
        "assert not heavy, heavy; f = spinjax.open_store; assert f.__module__ == 'spinjax.analysis.reader';"
        "assert 'jax' not in sys.modules, 'open_store imported jax'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError):
        spinjax.no_such_thing  # noqa: B018


def test_models_and_completeness(reader, trajectory_store):
    assert reader.models == [NEOX, TP] and len(reader) == 2 and TP in reader
    comp = reader.completeness
    assert comp[TP].steps_done == list(STEPS) and comp[TP].steps_pending == []
    assert (comp[TP].done, comp[TP].requested, comp[TP].complete) == (14, 14, True)
    assert (comp[NEOX].steps_done, comp[NEOX].requested) == ([-1], 1)
    assert "tiny-pythia: steps done 14 / requested 14" in repr(reader)
    assert reader.attrs(TP)["n_layers"] == 4


def test_values_equal_raw_zarr_arrays(reader, raw):
    for key in (TP, NEOX):
        ds = reader[key]
        group = raw[key]
        assert ds.attrs["model"] == key and str(ds["model"].values) == key
        assert list(ds["step"].values) == list(group["step"][:])
        assert list(ds["matrix"].values) == ["W_Q", "W_K", "W_QK"]
        assert list(ds["revision"].values) == [str(r) for r in group["revision"][:]]
        for name in ("std", "kurt", "kl_gauss", "n_nonfinite", "zhist", "hist", "singular_values"):
            arr = group[name]
            assert ds[name].dims == tuple(arr.metadata.dimension_names), name
            assert ds[name].dtype == arr.dtype, name
            np.testing.assert_array_equal(ds[name].values, arr[:], err_msg=name)
        np.testing.assert_array_equal(ds["zbin_edges"].values, group["zbin_edges"][:])
    # a labelled selection picks the same number as positional indexing of the raw array
    i = list(STEPS).index(512)
    value = reader[TP]["std"].sel(step=512, layer=2, head=3, matrix="W_QK").item()
    assert value == raw[TP]["std"][i, 2, 3, 2]


def test_unfinished_steps_are_hidden_unless_asked(trajectory_store, tmp_path):
    path = tmp_path / "partial.zarr"
    shutil.copytree(trajectory_store, path)
    zarr.open_group(str(path), mode="r+")[TP]["done"][3] = False  # step 4
    reader = spinjax.open_store(path)
    ds = reader[TP]
    assert 4 not in ds["step"].values and ds.sizes["step"] == 13
    assert bool(ds["done"].all())
    assert reader.completeness[TP].steps_pending == [4]
    assert reader.completeness[TP].requested == 14 and not reader.completeness[TP].complete
    full = reader.dataset(TP, include_unfinished=True)
    assert full.sizes["step"] == 14 and not bool(full["done"].sel(step=4))
    np.testing.assert_array_equal(ds["std"].values, full["std"].drop_sel(step=4).values)
    assert set(spinjax.tidy(ds)["step"]) == set(STEPS) - {4}


def test_unknown_model_and_bad_stores(reader, trajectory_store, tmp_path):
    with pytest.raises(KeyError, match="no model 'nope'.*gpt_neox, tiny-pythia"):
        reader["nope"]
    with pytest.raises(UnknownModelError):
        reader.dataset("nope")
    with pytest.raises(InputError, match="not a Zarr store"):
        spinjax.open_store(tmp_path / "missing.zarr")
    other = tmp_path / "schema2.zarr"
    shutil.copytree(trajectory_store, other)
    meta = json.loads((other / "zarr.json").read_text())
    meta["attributes"]["spinjax"]["schema"] = 2
    (other / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="schema 2"):
        spinjax.open_store(other)


def test_tidy_table(reader):
    ds = reader[TP]
    df = spinjax.tidy(ds)
    n_rows = 14 * 4 * 4 * 3
    assert df.shape[0] == n_rows
    index = ["model", "step", "revision", "layer", "layer_fraction", "head", "matrix"]
    assert list(df.columns[:7]) == index
    stats = set(df.columns[7:])
    assert {"mean", "std", "skew", "kurt", "entropy", "kl_gauss", "stable_rank", "n_nonfinite"} <= stats
    assert not stats & {"zhist", "hist", "singular_values", "done"}
    assert not df.duplicated(["model", "step", "layer", "head", "matrix"]).any()
    row = df[(df["step"] == 256) & (df["layer"] == 3) & (df["head"] == 1) & (df["matrix"] == "W_K")].iloc[0]
    point = ds.sel(step=256, layer=3, head=1, matrix="W_K")
    assert row["std"] == point["std"].item() and row["kurt"] == point["kurt"].item()
    assert row["revision"] == "step256" and row["layer_fraction"] == 1.0
    # chosen variables, and several models at once (a reader means all its models)
    small = spinjax.tidy(ds, variables=["std", "kurt"])
    assert list(small.columns) == [*index, "std", "kurt"]
    both = spinjax.tidy(reader, variables=["std"])
    assert len(both) == n_rows + 1 * 2 * 6 * 3
    assert set(both["model"]) == {TP, NEOX}
    assert sorted(both[both.model == NEOX]["layer_fraction"].unique()) == [0.0, 1.0]
    with pytest.raises(InputError, match="zhist"):
        spinjax.tidy(ds, variables=["zhist"])


def test_density_integrates_to_one_minus_tail_mass(reader):
    ds = reader[TP]
    for kind, dim, var in (("z", "zbin", "zhist"), ("raw", "bin", "hist")):
        d = spinjax.density(ds, kind)
        assert d.sizes[dim] == ds.sizes[dim] - 2  # the two unbounded tail bins are excluded
        assert np.all(np.isfinite(d["centre"].values)) and np.all(d["width"].values > 0)
        edges = ds["zbin_edges" if kind == "z" else "bin_edges"].values
        np.testing.assert_allclose(d["centre"].values, (edges[1:-2] + edges[2:-1]) / 2)
        integral = (d * d["width"]).sum(dim)
        np.testing.assert_allclose(integral + d["tail_fraction"], 1.0, atol=1e-9)
        # densities are count / (n * width) of the stored counts
        counts = ds[var].sel(step=1280, layer=1, head=2, matrix="W_QK").values.astype(float)
        got = d.sel(step=1280, layer=1, head=2, matrix="W_QK").values
        np.testing.assert_allclose(got, counts[1:-1] / (counts.sum() * d["width"].values), rtol=1e-12)
    z = spinjax.density(ds, "z")
    np.testing.assert_allclose(z["tail_fraction"].values, ds["tail_mass"].values, atol=1e-6)
    np.testing.assert_allclose(z["width"].values, 0.05, rtol=1e-9)


def test_density_with_tail_mass_and_kept_tails():
    edges = np.array([-np.inf, -1.0, 0.0, 0.5, 1.0, np.inf])
    counts = xr.DataArray(
        np.array([[3, 1, 2, 4, 0], [0, 0, 0, 0, 0]], dtype=np.uint32), dims=("head", "zbin")
    )
    ds = xr.Dataset({"zhist": counts, "zbin_edges": ("zbin_edge", edges)})
    d = spinjax.density(ds, "z")
    np.testing.assert_allclose(d.values[0], [1 / 10, 2 / 5, 4 / 5])  # n = 10 includes the tail
    np.testing.assert_allclose(d["centre"].values, [-0.5, 0.25, 0.75])
    assert d["tail_fraction"].values[0] == pytest.approx(0.3)
    assert float((d * d.width).sum("zbin")[0]) == pytest.approx(0.7)
    assert np.all(np.isnan(d.values[1])) and np.isnan(d["tail_fraction"].values[1])  # n = 0
    kept = spinjax.density(ds, "z", tails="keep")
    assert kept.sizes["zbin"] == 5 and np.isnan(kept.values[0, [0, -1]]).all()
    assert list(kept["centre"].values[[0, -1]]) == [-np.inf, np.inf]
    with pytest.raises(InputError, match="kind"):
        spinjax.density(ds, "log")


def test_align_layers_by_layer_fraction(reader):
    tp, neox = reader[TP], reader[NEOX]
    a = spinjax.align_layers(reader, ["std", "kurt"])
    assert list(a["model"].values) == [NEOX, TP]
    np.testing.assert_allclose(a["layer_fraction"].values, [0, 1 / 3, 2 / 3, 1])
    assert a.sizes["head"] == 6  # outer join: tiny-pythia has 4 heads, gpt_neox 6
    assert list(a["step"].values) == [-1, 1280]  # each model's last step
    at = a["std"].sel(matrix="W_QK", head=1)
    assert at.sel(model=NEOX, layer_fraction=1.0).item() == neox["std"].isel(step=-1).sel(
        layer=1, head=1, matrix="W_QK").item()  # fmt: skip
    assert np.isnan(at.sel(model=NEOX).isel(layer_fraction=1).item())  # no layer at 1/3
    assert at.sel(model=TP).isel(layer_fraction=2).item() == tp["std"].isel(step=-1).sel(
        layer=2, head=1, matrix="W_QK").item()  # fmt: skip
    assert np.isnan(a["std"].sel(model=TP, head=5)).all()
    # on a grid: linear interpolation between the two nearest layers
    g = spinjax.align_layers({TP: tp, NEOX: neox}, ["std"], grid=3)
    np.testing.assert_allclose(g["layer_fraction"].values, [0, 0.5, 1])
    last = tp["std"].isel(step=-1)
    mid = 0.5 * (last.sel(layer=1) + last.sel(layer=2))
    np.testing.assert_allclose(
        g["std"].sel(model=TP, layer_fraction=0.5).sel(head=[0, 1, 2, 3]), mid, rtol=1e-6
    )
    nl = neox["std"].isel(step=-1)
    np.testing.assert_allclose(
        g["std"].sel(model=NEOX, layer_fraction=0.5), 0.5 * (nl.sel(layer=0) + nl.sel(layer=1)), rtol=1e-6
    )
    # step=None keeps the step dimension (outer join across models)
    s = spinjax.align_layers([tp], ["std"], step=None)
    assert s.sizes["step"] == 14 and s.sizes["model"] == 1
    with pytest.raises(InputError, match="no step 3"):
        spinjax.align_layers([tp], ["std"], step=3)
