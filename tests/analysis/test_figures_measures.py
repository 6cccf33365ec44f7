"""The figures of the eigen measures and ks_normal: registered, drawn from the store's values,
and refused with a reason for stores made before those variables existed."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import spinjax
from spinjax.analysis import figures as plots
from spinjax.analysis.report import build_report
from spinjax.cli import main
from spinjax.errors import InputError
from spinjax.store import consolidate, locked

KEY = "gpt_neox"
MEASURE_FIGURES = ("eig-plane", "eig-positivity", "ks-normal")


@pytest.fixture(scope="module")
def sel(neox_store):
    return plots.select(spinjax.open_store(neox_store), KEY)


def _axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_registered_in_plot_list():
    assert set(MEASURE_FIGURES) <= set(plots.FIGURES)
    out = CliRunner().invoke(main, ["plot", "--list"])
    assert all(f"{name} " in out.output for name in MEASURE_FIGURES)


def test_eig_plane_draws_every_heads_eigenvalues(sel):
    fig = plots.make_figure("eig-plane", sel)
    axes = _axes(fig)[: sel.ds.sizes["layer"]]
    at = sel.at
    for layer, ax in enumerate(axes):
        assert ax.get_title() == f"layer {layer}" and ax.get_xlabel() in ("Re λ", "")
        points = [c.get_offsets() for c in ax.collections]
        assert len(points) == sel.ds.sizes["head"]
        for h, xy in enumerate(points):
            np.testing.assert_array_equal(xy[:, 0], at["qk_eig_re"].values[layer, h])
            np.testing.assert_array_equal(xy[:, 1], at["qk_eig_im"].values[layer, h])
    assert "eigenvalues of W_QK" in fig.get_suptitle()
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [f"head {h}" for h in range(sel.ds.sizes["head"])]


def test_positivity_and_ks_heatmaps_hold_the_stored_values(sel, neox_store):
    fig = plots.make_figure("eig-positivity", sel)
    left, right = _axes(fig)
    np.testing.assert_array_equal(left.images[0].get_array(), sel.at["qk_eig_positivity"].values)
    np.testing.assert_array_equal(right.images[0].get_array(), sel.at["qk_sym_fraction"].values)
    assert left.images[0].norm.vmin == -1 and left.images[0].norm.vmax == 1
    for matrix in ("W_QK", "W_Q"):
        choice = plots.select(spinjax.open_store(neox_store), KEY, matrix=matrix)
        fig = plots.make_figure("ks-normal", choice)
        (ax,) = _axes(fig)
        values = choice.at["ks_normal"].sel(matrix=matrix).values
        np.testing.assert_array_equal(ax.images[0].get_array(), values)
        assert f"{matrix}'s KS distance" in fig.get_suptitle()
        assert len(ax.texts) == values.size  # a small grid carries its numbers


def test_ov_eigenvalues_need_an_ov_run(sel):
    with pytest.raises(InputError, match="has no ov_eig_re, ov_eig_im.*without --ov"):
        plots.make_figure("eig-plane", dataclasses.replace(sel, matrix="W_OV"))


def test_an_old_store_gets_the_reason_instead_of_the_figures(neox_store, tmp_path):
    store = tmp_path / "old.zarr"
    shutil.copytree(neox_store, store)
    with locked(store) as root:  # as a spinjax before these variables wrote it
        group = zarr.open_group(str(store), path=KEY, mode="r+", use_consolidated=False)
        for name in ("ks_normal", "qk_eig_re", "qk_eig_im", "qk_sym_fraction", "qk_eig_positivity", "eig"):
            del group[name]
        consolidate(root, KEY)
    result = build_report(store, KEY, tmp_path / "report", figures=list(MEASURE_FIGURES), dpi=50)
    assert result.figures == {} and set(result.skipped) == set(MEASURE_FIGURES)
    assert all("--recompute" in why for why in result.skipped.values())
    out = CliRunner().invoke(main, ["plot", str(store), "--figure", "ks-normal", "--out", str(tmp_path)])
    assert out.exit_code == 2 and "has no ks_normal" in out.output
