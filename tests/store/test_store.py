"""The Zarr store of schema 1 (SPEC section 3), read with plain zarr and xarray.

One pipeline run of the tiny gpt_neox fixture (2 layers, 6 heads, d_model 96, float16) is
shared (``neox_store`` in conftest); tests that change a store work on a copy.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import FIXTURES_ROOT
from safetensors.numpy import load_file

import spinjax
from spinjax import store as store_mod
from spinjax.errors import InputError
from spinjax.kernels import block_entries_cap, block_rows_for_budget, layer_statistics
from spinjax.run.options import RunOptions, default_memory_budget
from spinjax.run.pipeline import run
from spinjax.sources.hf import HFCheckpoint as Checkpoint
from spinjax.sources.layouts import Geometry, layout_for

KEY = "gpt_neox"
NEOX = FIXTURES_ROOT / "extraction" / KEY  # also in conftest
N_LAYERS, N_HEADS, D_HEAD, D_MODEL = 2, 6, 16, 96
NZ = 402  # SPEC section 4 default: 400 inner z-bins plus two tails

SCALARS = [
    "mean", "std", "skew", "kurt", "min", "max",
    "entropy", "entropy_residual", "entropy_mm", "kl_gauss", "kl_gauss_mm",
    "mu_fit", "sigma_fit", "kl_fit", "tail_mass", "ks_normal",
    "spectral_norm", "frobenius_norm", "stable_rank", "spectral_entropy",
    "effective_rank", "participation_ratio", "condition_number",
]  # fmt: skip
BASE = ["step", "layer", "head", "matrix"]
# name -> (dimension names, dtype), straight from the SPEC section 3 tables
DATA = {
    **{name: (BASE, "float32") for name in SCALARS},
    "n_nonfinite": (BASE, "int64"),
    "zhist": ([*BASE, "zbin"], "uint32"),
    "hist": ([*BASE, "bin"], "uint32"),
    "singular_values": ([*BASE, "sv"], "float32"),
    "qk_eig_re": (["step", "layer", "head", "eig"], "float32"),
    "qk_eig_im": (["step", "layer", "head", "eig"], "float32"),
    "qk_sym_fraction": (["step", "layer", "head"], "float32"),
    "qk_eig_positivity": (["step", "layer", "head"], "float32"),
    "done": (["step"], "bool"),
}
COORDS = {"step": "int64", "layer": "int32", "head": "int32", "sv": "int32", "zbin": "int32", "bin": "int32",
          "eig": "int32"}  # fmt: skip


def _group(path: Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r", zarr_format=3)[KEY]


def _values(path: Path) -> dict[str, np.ndarray]:
    g = _group(path)
    return {name: g[name][:] for name in DATA}


def _assert_same_values(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---- layout of a finished store ----------------------------------------------------------


def test_root_is_a_schema_1_zarr_v3_group(neox_store):
    meta = json.loads((neox_store / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    root = zarr.open_group(str(neox_store), mode="r", zarr_format=3)
    assert dict(root.attrs)["spinjax"] == {"version": spinjax.__version__, "schema": 1}
    assert sorted(root.group_keys()) == [KEY]


def test_model_group_attributes(neox_store):
    attrs = dict(_group(neox_store).attrs)
    expected = {
        "source": str(NEOX.resolve()),
        "architecture": "gpt_neox",
        "d_model": D_MODEL,
        "n_layers": N_LAYERS,
        "n_heads": N_HEADS,
        "n_kv_heads": N_HEADS,
        "d_head": D_HEAD,
        "dtype": "float16",
        "spinjax_version": spinjax.__version__,
    }
    assert {k: attrs[k] for k in expected} == expected
    (record,) = attrs["runs"]
    assert set(record) == {"started", "finished", "host", "version", "steps"}
    assert record["host"] == socket.gethostname()
    assert record["version"] == spinjax.__version__
    assert record["steps"] == [-1]
    started = dt.datetime.fromisoformat(record["started"])
    finished = dt.datetime.fromisoformat(record["finished"])
    assert started.tzinfo is not None and started <= finished
    assert abs(dt.datetime.now(dt.timezone.utc) - finished) < dt.timedelta(hours=1)


def test_every_variable_has_spec_dims_dtype_chunks_and_compression(neox_store):
    g = _group(neox_store)
    sizes = {"step": 1, "layer": N_LAYERS, "head": N_HEADS, "matrix": 3, "sv": D_HEAD, "eig": D_HEAD,
             "zbin": NZ, "bin": g["bin"].shape[0]}  # fmt: skip
    for name, (dims, dtype) in DATA.items():
        arr = g[name]
        assert arr.metadata.zarr_format == 3, name
        assert list(arr.metadata.dimension_names) == dims, name
        assert arr.dtype == np.dtype(dtype), name
        assert arr.shape == tuple(sizes[d] for d in dims), name
        assert arr.chunks == (1, *arr.shape[1:]), name  # one step per chunk, whole extent else
        if name != "done":
            assert len(arr.compressors) >= 1, name


def test_coordinates(neox_store):
    g = _group(neox_store)
    for name, dtype in COORDS.items():
        arr = g[name]
        assert list(arr.metadata.dimension_names) == [name]
        assert arr.dtype == np.dtype(dtype), name
    assert g["step"][:].tolist() == [-1]
    assert g["layer"][:].tolist() == list(range(N_LAYERS))
    assert g["head"][:].tolist() == list(range(N_HEADS))
    assert g["sv"][:].tolist() == list(range(D_HEAD))
    assert g["eig"][:].tolist() == list(range(D_HEAD))
    assert g["zbin"][:].tolist() == list(range(NZ))
    assert g["bin"][:].tolist() == list(range(g["bin"].shape[0]))
    assert [str(m) for m in g["matrix"][:]] == ["W_Q", "W_K", "W_QK"]
    assert list(g["matrix"].metadata.dimension_names) == ["matrix"]
    assert list(g["revision"].metadata.dimension_names) == ["step"]
    assert [str(r) for r in g["revision"][:]] == [str(NEOX.resolve())]
    for name in ("layer", "head", "matrix", "sv", "zbin", "bin"):
        assert g[name].chunks == g[name].shape, name


def test_histogram_edges(neox_store):
    g = _group(neox_store)
    z, b = g["zbin_edges"], g["bin_edges"]
    assert z.dtype == np.float64 and b.dtype == np.float64
    assert z.ndim == 1 and b.ndim == 1 and z.metadata.dimension_names and b.metadata.dimension_names
    assert z.shape == (NZ + 1,)
    assert b.shape == (g["bin"].shape[0] + 1,)
    ze, be = z[:], b[:]
    for edges in (ze, be):
        assert edges[0] == -np.inf and edges[-1] == np.inf
        assert np.all(np.isfinite(edges[1:-1])) and np.all(np.diff(edges) > 0)
    np.testing.assert_allclose(ze[1:-1], np.linspace(-10, 10, NZ - 1), rtol=0, atol=1e-12)
    # one raw grid for every scale 1e-6 .. 1e3, relative bin width <= 5% for |w| >= 1e-5
    inner = be[1:-1]
    assert inner[0] <= -1e3 and inner[-1] >= 1e3
    for sign in (1, -1):
        e = np.sort(sign * inner[sign * inner > 0])
        lo = e[:-1]
        width = np.diff(e)
        sel = (lo >= 1e-5) & (lo < 1e3)
        assert sel.sum() > 100 and np.all(width[sel] / lo[sel] <= 0.05 + 1e-12)


def test_done_and_data_of_finished_step(neox_store):
    g = _group(neox_store)
    assert g["done"][:].tolist() == [True]
    assert np.all(np.isfinite(g["std"][:])) and np.all(g["std"][:] > 0)
    assert g["n_nonfinite"][:].sum() == 0
    # every entry lands in exactly one bin: W_Q/W_K have d_head*d_model, W_QK d_model^2
    n = np.array([D_HEAD * D_MODEL, D_HEAD * D_MODEL, D_MODEL * D_MODEL])
    assert np.all(g["zhist"][:].sum(-1) == n)
    assert np.all(g["hist"][:].sum(-1) == n)


def test_xarray_opens_the_model_group(neox_store):
    ds = xr.open_zarr(str(neox_store), group=KEY)
    expected = {"step": 1, "layer": N_LAYERS, "head": N_HEADS, "matrix": 3, "sv": D_HEAD, "zbin": NZ}
    assert {d: ds.sizes[d] for d in expected} == expected
    for name in ("step", "revision", "layer", "head", "matrix", "sv", "zbin", "bin"):
        assert name in ds.coords, name
    assert ds["revision"].dims == ("step",)
    assert ds["step"].values.tolist() == [-1]
    assert [str(m) for m in ds["matrix"].values] == ["W_Q", "W_K", "W_QK"]
    for name, (dims, dtype) in DATA.items():
        assert ds[name].dims == tuple(dims), name
        assert ds[name].dtype == np.dtype(dtype), name
    g = _group(neox_store)
    picked = ds["std"].sel(matrix="W_QK", layer=0, head=1)
    assert picked.dims == ("step",)
    assert picked.values.tolist() == [g["std"][0, 0, 1, 2]]
    sv = ds["singular_values"].sel(step=-1, matrix="W_K", layer=1, head=5).values
    np.testing.assert_array_equal(sv, g["singular_values"][0, 1, 5, 1])


def test_store_values_are_the_kernel_values(neox_store):
    """The store holds exactly what layer_statistics computes on the layout's factors, with the
    run's blocks and its default ``--pairs layer`` (float32 sums follow the block shape)."""
    checkpoint = Checkpoint(NEOX)
    layout = layout_for(checkpoint.config, str(NEOX))
    geometry = layout.geometry(checkpoint.config, str(NEOX))
    assert geometry == Geometry(D_MODEL, N_LAYERS, N_HEADS, N_HEADS, D_HEAD)
    block_rows = block_rows_for_budget(
        N_HEADS, D_MODEL, default_memory_budget(), max_entries=block_entries_cap(), inner=True
    )
    g = _group(neox_store)
    for layer in range(N_LAYERS):
        wq, wk = layout.extract(checkpoint.tensor, layer, geometry)
        expected = layer_statistics(wq, wk, block_rows=block_rows, inner=True)
        expected.pop("qk_inner")
        expected.update({f"qk_{name}": expected.pop(name) for name in store_mod.schema.EIGEN_STATS})
        assert set(expected) == set(DATA) - {"done"}
        for name, value in expected.items():
            np.testing.assert_allclose(
                g[name][0, layer], np.asarray(value), rtol=1e-6, atol=0, err_msg=f"{name} layer {layer}"
            )


def test_store_values_match_a_float64_reference(neox_store):
    """Independent of the package: NeoX split by hand, statistics in float64 numpy."""
    qkv = load_file(str(NEOX / "model.safetensors"))["gpt_neox.layers.0.attention.query_key_value.weight"]
    per_head = qkv.astype(np.float64).reshape(N_HEADS, 3, D_HEAD, D_MODEL)
    g = _group(neox_store)
    for head in (0, 1, 5):
        wq, wk = per_head[head, 0], per_head[head, 1]
        wqk = wq.T @ wk
        for m, w in enumerate((wq, wk, wqk)):
            assert g["mean"][0, 0, head, m] == pytest.approx(w.mean(), rel=1e-4, abs=1e-7)
            assert g["std"][0, 0, head, m] == pytest.approx(w.std(), rel=1e-4)
            assert g["min"][0, 0, head, m] == pytest.approx(w.min(), rel=1e-5)
            assert g["max"][0, 0, head, m] == pytest.approx(w.max(), rel=1e-5)
            s = np.linalg.svd(w, compute_uv=False)[:D_HEAD]
            np.testing.assert_allclose(g["singular_values"][0, 0, head, m], s, rtol=0, atol=1e-4 * s[0])


# ---- resume, recompute, interrupted writes ------------------------------------------------


def test_second_run_computes_nothing_and_changes_nothing(store_copy, snapshot):
    before = snapshot(store_copy)
    result = run(str(NEOX), RunOptions(steps="all", store=store_copy))
    assert result.key == KEY
    assert result.computed == [] and result.skipped == [-1]
    assert snapshot(store_copy) == before


def test_recompute_recomputes(store_copy, neox_store):
    result = run(str(NEOX), RunOptions(steps="all", store=store_copy, recompute=True))
    assert result.computed == [-1] and result.skipped == []
    _assert_same_values(_values(store_copy), _values(neox_store))
    g = _group(store_copy)
    assert g["step"][:].tolist() == [-1]  # recomputed in place, not appended
    runs = g.attrs["runs"]
    assert len(runs) == 2 and all(r["finished"] for r in runs)


@pytest.mark.slow
def test_interrupted_write_leaves_step_not_done_and_rerun_completes(tmp_path, neox_store, monkeypatch):
    path = tmp_path / "crash.zarr"
    real_setitem = zarr.Array.__setitem__
    written = []

    def failing_setitem(self, selection, value):
        name = self.path.rsplit("/", 1)[-1]
        if name == "kurt":  # after mean, std, skew were written
            raise OSError("disk full (simulated)")
        written.append(name)
        return real_setitem(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_setitem)
    with pytest.raises(OSError, match="simulated"):
        run(str(NEOX), RunOptions(steps="all", store=path))
    monkeypatch.setattr(zarr.Array, "__setitem__", real_setitem)
    assert {"mean", "std"} <= set(written)

    g = _group(path)
    assert g["step"][:].tolist() == [-1]
    assert g["done"][:].tolist() == [False]
    assert np.all(np.isfinite(g["mean"][:]))  # some arrays were written ...
    assert np.all(np.isnan(g["kurt"][:]))  # ... this one not
    info = store_mod.summary(path)["models"][KEY]
    assert (info["steps_done"], info["steps_requested"], info["steps"]) == (0, 1, [])

    result = run(str(NEOX), RunOptions(steps="all", store=path))
    assert result.computed == [-1] and result.skipped == []
    _assert_same_values(_values(path), _values(neox_store))
    runs = _group(path).attrs["runs"]
    assert len(runs) == 2 and runs[0]["finished"] is None and runs[1]["finished"]


def test_plan_appends_new_steps_in_request_order_and_skips_done(tmp_path):
    """ModelGroup without the kernels: slots, order, revisions, done, never rewriting."""
    root = store_mod.open_store(tmp_path / "plan.zarr", create=True)
    geometry = Geometry(d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_head=4)
    group = store_mod.ModelGroup.create_or_check(
        root, "m", shape=geometry.attrs(), architecture="llama", attrs={"source": "x", "dtype": "float32"},
        n_sv=4,
    )  # fmt: skip
    assert group.plan([(3, "step3"), (1, "step1")], recompute=False) == [(0, 3, "step3"), (1, 1, "step1")]
    # writes go in the SPEC's order whatever order the file system lists the arrays in
    assert group.data_variables()[: len(store_mod.VARIABLES)] == list(store_mod.VARIABLES)
    results = {name: np.full(group.group[name].shape[1:], 7) for name in store_mod.VARIABLES}
    group.write_step(0, results)
    assert group.done.tolist() == [True, False]
    planned = group.plan([(1, "step1"), (7, "step7"), (3, "step3")], recompute=False)
    assert planned == [(1, 1, "step1"), (2, 7, "step7")]
    assert group.steps == [3, 1, 7]
    assert [str(r) for r in group.group["revision"][:]] == ["step3", "step1", "step7"]
    assert group.done.tolist() == [True, False, False]
    assert np.all(group.group["std"][0] == 7) and np.all(np.isnan(group.group["std"][1:]))
    assert np.all(group.group["zhist"][0] == 7) and group.group["zhist"].dtype == np.uint32
    assert group.plan([(3, "step3")], recompute=True) == [(0, 3, "step3")]
    # reopening checks the geometry
    same = store_mod.ModelGroup.create_or_check(
        root, "m", shape=geometry.attrs(), architecture="llama", attrs={}, n_sv=4
    )
    assert same.steps == [3, 1, 7]
    with pytest.raises(InputError, match="geometry"):
        store_mod.ModelGroup.create_or_check(
            root, "m", shape=Geometry(8, 2, 2, 1, 4).attrs(), architecture="llama", attrs={}, n_sv=4
        )


# ---- refusals -----------------------------------------------------------------------------


def test_store_of_another_schema_is_refused(store_copy, snapshot):
    root = zarr.open_group(str(store_copy), mode="r+", zarr_format=3)
    root.attrs["spinjax"] = {"version": "9.9.9", "schema": 2}
    before = snapshot(store_copy)
    with pytest.raises(InputError, match="schema 2"):
        run(str(NEOX), RunOptions(steps="all", store=store_copy))
    with pytest.raises(InputError, match="schema"):
        store_mod.summary(store_copy)
    with pytest.raises(InputError, match="schema"):
        store_mod.open_store(store_copy, create=True)
    assert snapshot(store_copy) == before


def test_zarr_group_not_written_by_spinjax_is_refused(tmp_path, snapshot):
    path = tmp_path / "other.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3).attrs["hello"] = 1
    before = snapshot(path)
    with pytest.raises(InputError, match="not written by spinjax"):
        run(str(NEOX), RunOptions(steps="all", store=path))
    assert snapshot(path) == before


def test_non_store_directory_with_files_is_refused(tmp_path, snapshot):
    path = tmp_path / "notes"
    path.mkdir()
    (path / "todo.txt").write_text("keep me")
    before = snapshot(path)
    with pytest.raises(InputError, match=str(path)):
        run(str(NEOX), RunOptions(steps="all", store=path))
    assert snapshot(path) == before
    with pytest.raises(InputError, match="not empty"):
        store_mod.open_store(path, create=True)
    assert snapshot(path) == before


def test_store_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file.zarr"
    path.write_text("x")
    with pytest.raises(InputError, match="not a Zarr store"):
        run(str(NEOX), RunOptions(steps="all", store=path))
    assert path.read_text() == "x"


@pytest.mark.slow
def test_empty_directory_becomes_a_store(tmp_path):
    path = tmp_path / "empty.zarr"
    path.mkdir()
    result = run(str(NEOX), RunOptions(steps="all", store=path))
    assert result.computed == [-1]
    assert _group(path)["done"][:].tolist() == [True]


@pytest.fixture
def other_geometry(tmp_path) -> Path:
    """A checkpoint dir named like the fixture (same group key) whose config says 1 layer, not 2."""
    other = tmp_path / "other" / KEY
    shutil.copytree(NEOX, other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (other / "config.json").write_text(json.dumps(config))
    return other


def test_group_key_of_another_source_is_refused(store_copy, other_geometry, snapshot):
    before = snapshot(store_copy)
    with pytest.raises(InputError, match="holds results of") as info:
        run(str(other_geometry), RunOptions(steps="all", store=store_copy, recompute=True))
    assert repr(KEY) in str(info.value) and str(other_geometry.resolve()) in str(info.value)
    assert snapshot(store_copy) == before


def test_group_key_of_another_source_is_refused_even_when_its_steps_are_done(
    store_copy, other_geometry, snapshot
):
    before = snapshot(store_copy)
    try:
        with pytest.raises(InputError, match="holds results of .*use another --store"):
            run(str(other_geometry), RunOptions(steps="all", store=store_copy))
    finally:
        assert snapshot(store_copy) == before


# ---- summary ------------------------------------------------------------------------------


def test_summary(neox_store):
    info = store_mod.summary(neox_store)
    assert info["schema"] == 1 and info["version"] == spinjax.__version__
    assert list(info["models"]) == [KEY]
    m = info["models"][KEY]
    assert m["steps_done"] == 1 and m["steps_requested"] == 1 and m["steps"] == [-1]
    assert (m["architecture"], m["dtype"], m["source"]) == ("gpt_neox", "float16", str(NEOX.resolve()))
    assert (m["d_model"], m["n_layers"], m["n_heads"], m["n_kv_heads"], m["d_head"]) == (96, 2, 6, 6, 16)
    assert set(m["variables"]) >= set(DATA) - {"done"}
    on_disk = sum(p.stat().st_size for p in (neox_store / KEY).rglob("*") if p.is_file())
    assert 0 < m["bytes"] == on_disk
    assert len(m["runs"]) == 1


def test_summary_of_missing_store_is_refused(tmp_path):
    with pytest.raises(InputError, match="not a Zarr store"):
        store_mod.summary(tmp_path / "nothing.zarr")
    assert not (tmp_path / "nothing.zarr").exists()
