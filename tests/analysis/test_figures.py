"""Figures of a store that holds everything (`run --null --pairs layer`, `spinjax dynamics`, a null
sweep): the null's bands and curves drawn against the baseline groups, the dynamics and geometry
figures against the stored variables, the null figures' analytic curves against their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import STUDY_STEPS
from matplotlib.colors import CenteredNorm

from spinjax.analysis import figures, rmt, study
from spinjax.cli import main
from spinjax.errors import InputError

TP = "tiny-pythia"
LAYER, HEAD = 2, 1
LAST = STUDY_STEPS[-1]


@pytest.fixture(scope="module")
def sel(study_store):
    return figures.select(study_store, TP, layer=LAYER, head=HEAD)


def _axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _band(ds, null, name, **where):
    return study.null_band(ds, null, name).sel(**where)


# ---- the null on the one-step figures ----------------------------------------------------


def test_heads_draw_the_null_band_at_each_heads_scale(sel, study_ds, study_null):
    fig = figures.make_figure("heads", sel)
    for ax, name in zip(_axes(fig), ("std", "entropy"), strict=True):
        segments = ax.collections[0].get_segments()  # one bar per head, layer-major
        band = (
            _band(study_ds, study_null, name, step=LAST, matrix="W_QK")
            .transpose("layer", "head", "band")
            .values
        )
        band = band.reshape(16, 3)
        np.testing.assert_allclose([s[0][1] for s in segments], band[:, 0], rtol=1e-6)
        np.testing.assert_allclose([s[1][1] for s in segments], band[:, 2], rtol=1e-6)
        np.testing.assert_allclose(ax.collections[1].get_offsets()[:, 1], band[:, 1], rtol=1e-6)
    labels = [t.get_text() for t in _axes(fig)[0].get_legend().get_texts()]
    assert "random heads (null), 95% band at each head's scale" in labels


def test_entropy_std_draws_the_random_wqk_curve(sel, study_null):
    fig = figures.make_figure("entropy-std", sel)
    ax0, ax1 = _axes(fig)
    data, gauss, curve = ax0.get_lines()[:3]
    s = gauss.get_xdata()
    g = study_null.sel(matrix="W_QK")
    offset = g["entropy_mm"].values.astype(np.float64) - np.log(g["std"].values.astype(np.float64))
    np.testing.assert_allclose(curve.get_ydata(), np.log(s) + offset.mean(), rtol=1e-6)
    assert "random heads of tiny-pythia's geometry, 95%" in [
        t.get_text() for t in ax0.get_legend().get_texts()
    ]
    # a random W_QK sits a negentropy below the Gaussian: the curve is below it everywhere
    assert np.all(curve.get_ydata() < gauss.get_ydata())
    resid = g["entropy_mm"].values.astype(np.float64) - 0.5 * np.log(
        2 * np.pi * np.e * g["std"].values.astype(np.float64) ** 2
    )
    mean_line = [ln for ln in ax1.get_lines() if ln.get_linestyle() == "--"][0]
    assert mean_line.get_ydata()[0] == pytest.approx(resid.mean(), rel=1e-5)


def test_fit_kl_draws_the_null_kl(sel, study_null):
    fig = figures.make_figure("fit-kl-std", sel)
    ax1 = _axes(fig)[1]
    mean_line = [ln for ln in ax1.get_lines() if ln.get_linestyle() == "--"][0]
    kl = study_null["kl_gauss_mm"].sel(matrix="W_QK").values.astype(np.float64)
    assert mean_line.get_ydata()[0] == pytest.approx(kl.mean(), rel=1e-5)
    plugin = figures.make_figure("fit-kl-std", figures.select(sel.store, TP, estimator="plugin"))
    line = [ln for ln in _axes(plugin)[1].get_lines() if ln.get_linestyle() == "--"][0]
    assert line.get_ydata()[0] == pytest.approx(
        study_null["kl_gauss"].sel(matrix="W_QK").values.mean(), rel=1e-5
    )


def test_corner_shades_the_null_skew_and_kurt(sel, study_null):
    fig = figures.make_figure("corner", sel)
    panel = _axes(fig)[8]  # kurt (row 3) vs skew (column 2)
    spans = [p.get_extents() for p in panel.patches]
    assert len(spans) == 2  # the skew band (vertical) and the kurt band (horizontal)
    kurt = study_null["kurt"].sel(matrix="W_QK").values.astype(np.float64)
    ys = sorted(panel.transData.inverted().transform(spans[1])[:, 1])
    np.testing.assert_allclose(ys, np.quantile(kurt, [0.025, 0.975]), rtol=1e-4)
    overview = _axes(fig)[10]
    cloud = [c for c in overview.collections if c.get_offsets().shape[0] == study_null.sizes["sample"]][0]
    np.testing.assert_allclose(cloud.get_offsets()[:, 1], kurt, rtol=1e-6)


def test_spectrum_draws_the_null_at_the_layers_scale(sel, study_ds, study_null):
    fig = figures.make_figure("spectrum", sel)
    ax0, ax1, ax2 = _axes(fig)
    band = _band(study_ds, study_null, "singular_values", step=LAST, layer=LAYER, matrix="W_QK").mean("head")
    mean = [ln for ln in ax0.get_lines() if ln.get_linestyle() == "--"][0]
    np.testing.assert_allclose(mean.get_ydata(), band.sel(band="mean").values, rtol=1e-6)
    assert [t.get_text() for t in ax1.get_yticklabels()][-1] == "null (mean)"
    null_row = np.sort(ax1.collections[-1].get_positions())
    np.testing.assert_allclose(null_row, np.sort(band.sel(band="mean").values ** 2), rtol=1e-6)
    assert len(ax2.patches) == 2  # the layer's pooled density and the null's


def test_depth_draws_the_null(sel, study_ds, study_null):
    fig = figures.make_figure("depth", sel)
    ax = _axes(fig)[2]  # W_QK
    dotted = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    band = study.null_band(study_ds.sel(step=LAST), study_null, "std").mean("head").sel(matrix="W_QK")
    np.testing.assert_allclose(dotted[0].get_ydata(), band.sel(band="lower").values, rtol=1e-6)
    np.testing.assert_allclose(dotted[1].get_ydata(), band.sel(band="upper").values, rtol=1e-6)


def test_core_fit_and_trajectories_draw_the_null(sel, study_ds, study_null):
    fig = figures.make_figure("core-fit", sel)
    ax1 = _axes(fig)[1]
    kl = (
        _band(study_ds, study_null, "kl_gauss", step=LAST, matrix="W_QK")
        .mean("head")
        .transpose("layer", "band")
    )
    mean = [ln for ln in ax1.get_lines() if ln.get_linestyle() == "--"][0]
    np.testing.assert_allclose(mean.get_ydata(), kl.sel(band="mean").values, rtol=1e-6)
    fig = figures.make_figure("std-kl-steps", sel)
    ax0 = _axes(fig)[0]
    std = (
        _band(study_ds, study_null, "std", layer=LAYER, matrix="W_QK").mean("head").transpose("step", "band")
    )
    mean = [ln for ln in ax0.get_lines() if ln.get_linestyle() == "--"][0]
    np.testing.assert_array_equal(mean.get_xdata(), STUDY_STEPS)
    np.testing.assert_allclose(mean.get_ydata(), std.sel(band="mean").values, rtol=1e-6)


def test_z_scores_use_a_diverging_map_centred_on_zero(study_store, study_ds):
    sel = figures.select(study_store, TP, stat="kurt_z")
    for name in ("stat-steps", "animation"):
        image = _axes(figures.make_figure(name, sel))[0].get_images()[0]
        assert image.get_cmap().name == "RdBu_r" and isinstance(image.norm, CenteredNorm)
        assert image.norm.vcenter == 0
    img = np.asarray(_axes(figures.make_figure("stat-steps", sel))[0].get_images()[0].get_array())
    kurt_z = study_ds["kurt_z"].sel(matrix="W_QK").transpose("layer", "head", "step").values
    np.testing.assert_array_equal(img, kurt_z.reshape(16, -1))


# ---- dynamics ----------------------------------------------------------------------------


def test_mode_overlap(sel, study_ds, study_store):
    fig = figures.make_figure("mode-overlap", sel)
    axes = [ax for ax in _axes(fig) if ax.axison]
    assert len(axes) == 2 * (len(STUDY_STEPS) - 1)
    titles = [ax.get_title() for ax in axes]
    assert "16 → 128, left" in titles and "512 → 1280, right" in titles
    ax = axes[titles.index("128 → 512, right")]
    o = study_ds["overlap_right"].sel(step=512, layer=LAYER, head=HEAD).values
    np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()), np.abs(o))
    one = figures.make_figure(
        "mode-overlap", figures.select(study_store, TP, step=512, layer=LAYER, head=HEAD)
    )
    assert [ax.get_title() for ax in _axes(one) if ax.axison] == ["128 → 512, left", "128 → 512, right"]
    with pytest.raises(InputError, match="first step: it has no previous step"):
        figures.make_figure("mode-overlap", figures.select(study_store, TP, step=0))


def test_mode_events(sel, study_ds):
    fig = figures.make_figure("mode-events", sel)
    ax0, ax1 = _axes(fig)
    k = study_ds.sizes["mode"]
    s = (
        study_ds["singular_values"]
        .sel(layer=LAYER, head=HEAD, matrix="W_QK")
        .values[:, :k]
        .astype(np.float64)
    )
    for j in (0, k - 1):
        np.testing.assert_allclose(ax0.get_lines()[j].get_ydata(), s[:, j])
    events = study_ds["mode_event"].sel(layer=LAYER, head=HEAD).values
    for collection, code in zip(ax0.collections, (1, 2), strict=True):
        i, j = np.nonzero(events[:, : k - 1] == code)
        np.testing.assert_allclose(collection.get_offsets()[:, 0], np.asarray(STUDY_STEPS)[i])
        np.testing.assert_allclose(collection.get_offsets()[:, 1], np.sqrt(s[i, j] * s[i, j + 1]), rtol=1e-6)
    every = study_ds["mode_event"].values
    heights = [p.get_height() for p in ax1.patches]
    n = len(STUDY_STEPS)
    np.testing.assert_array_equal(heights[:n], (every == 1).sum(axis=(1, 2, 3)))
    np.testing.assert_array_equal(heights[n:], (every == 2).sum(axis=(1, 2, 3)))


def test_divergence_steps(sel, study_ds):
    fig = figures.make_figure("divergence-steps", sel)
    for ax, var in zip(_axes(fig), ("kl_first", "js_first", "change_js"), strict=True):
        v = study_ds[var].sel(matrix="W_QK").transpose("step", "layer", "head").values.astype(np.float64)
        line = ax.get_lines()[LAYER]
        np.testing.assert_array_equal(line.get_xdata(), STUDY_STEPS)
        want = v[:, LAYER].mean(axis=1)
        np.testing.assert_allclose(line.get_ydata()[1:], want[1:], rtol=1e-6)
        assert ax.get_ylim()[0] == 0
    assert _axes(fig)[0].get_ylabel() == "KL(P_step ‖ P_first) (nats)"


def test_dynamics_figures_use_step_only_where_they_show_it(study_store, study_ds):
    plain = figures.select(study_store, TP, layer=LAYER, head=HEAD)
    at512 = figures.select(study_store, TP, step=512, layer=LAYER, head=HEAD)
    assert figures.file_stem("std-kl-steps", at512) == "tiny-pythia_std-kl-steps_layer2"
    assert figures.file_stem("dist-steps", at512) == "tiny-pythia_dist-steps_step512_layer2_head1"
    assert figures.file_stem("null-sweep", at512) == "baseline_null-sweep"
    assert figures.file_stem("heads", plain) == "tiny-pythia_heads"
    # dist-steps marks the chosen step's row; dist-slices includes it
    marked = _axes(figures.make_figure("dist-steps", at512))[0]
    i = list(STUDY_STEPS).index(512)
    assert sorted(ln.get_ydata()[0] for ln in marked.get_lines()) == [i - 0.5, i + 0.5]
    assert not _axes(figures.make_figure("dist-steps", plain))[0].get_lines()
    slices = _axes(figures.make_figure("dist-slices", at512))[0]
    assert "step 512" in [ln.get_label() for ln in slices.get_lines()]


# ---- heads as points ---------------------------------------------------------------------


def test_head_pairs(sel, study_ds):
    fig = figures.make_figure("head-pairs", sel)
    axes = [ax for ax in _axes(fig) if ax.axison]
    titles = [ax.get_title() for ax in axes]
    cos = np.asarray(axes[titles.index("L2: cosine")].get_images()[0].get_array().filled(np.nan))
    want = study_ds["qk_cosine"].sel(step=LAST, layer=LAYER).values.astype(np.float64)
    np.fill_diagonal(want, np.nan)
    np.testing.assert_allclose(cos, want, rtol=1e-6)
    js = np.asarray(axes[titles.index("L2: JS")].get_images()[0].get_array().filled(np.nan))
    assert np.isnan(np.diag(js)).all()
    np.testing.assert_allclose(
        js[0, 1:], study_ds["js_head"].sel(step=LAST, layer=LAYER).values[0, 1:], rtol=1e-6
    )
    image = axes[0].get_images()[0]
    assert image.get_cmap().name == "RdBu_r" and image.norm.vcenter == 0


def test_head_dendrogram(sel, study_ds):
    fig = figures.make_figure("head-dendrogram", sel)
    ax = _axes(fig)[0]
    leaves = [t.get_text() for t in ax.get_xticklabels()]
    assert sorted(leaves) == sorted(f"L{i}H{h}" for i in range(4) for h in range(4))
    assert ax.get_ylabel().startswith("Ward linkage distance") and "√JS" in ax.get_title()
    colours = {t.get_text(): t.get_color() for t in ax.get_xticklabels()}
    assert colours["L0H0"] == colours["L0H3"] != colours["L3H0"]


@pytest.mark.slow
def test_trajectory_map_figure(sel, study_ds):
    from spinjax.analysis import headmaps

    fig = figures.make_figure("trajectory-map", sel)
    ax0, ax1, ax2 = _axes(fig)
    points = headmaps.trajectory_map(study_ds)
    path = ax0.get_lines()[LAYER * 4 + HEAD]  # one path per head, layer-major
    mine = points[(points["layer"] == LAYER) & (points["head"] == HEAD)].sort_values("step")
    np.testing.assert_allclose(path.get_xdata(), mine["x"].values)
    np.testing.assert_allclose(ax1.collections[0].get_offsets(), points[["x", "y"]].values)
    segments = ax2.collections[0].get_segments()
    assert len(segments) == len(points) * 5
    labels = [t.get_text() for t in ax2.get_legend().get_texts()]
    n_clusters = len(set(points["cluster"]) - {-1})
    assert len(labels) == n_clusters + 1 and labels[0] == "noise"


# ---- the null figures --------------------------------------------------------------------


def test_null_matrix_curves_are_the_formulas(sel, study_null):
    fig = figures.make_figure("null-matrix", sel)
    ax0, ax1, ax2 = _axes(fig)
    d, dh = 64, 16
    lines = {ln.get_label(): ln for ln in ax0.get_lines()}
    g = lines["Gaussian N(0, d_head/d), std 0.5"]
    x = g.get_xdata()
    np.testing.assert_allclose(g.get_ydata(), np.exp(-0.5 * x**2 / 0.25) / (0.5 * math.sqrt(2 * math.pi)))
    vg = lines["exact law of W_QK entries (kurt 6/d_head = 0.375)"]
    np.testing.assert_allclose(np.trapezoid(vg.get_ydata() * x**2, x), dh / d, rtol=1e-3)  # variance d_head/d
    # pooled raw histogram of the 200 draws, in the study's scaling (W_QK / sqrt(d))
    values, edges = ax0.patches[0].get_data()[:2]
    assert np.sum(values * np.diff(edges)) == pytest.approx(1.0, abs=1e-3)
    lines = {ln.get_label(): ln for ln in ax1.get_lines()}
    mp = lines["full-rank: Marchenko-Pastur (ratio 1) quantiles"]
    np.testing.assert_allclose(mp.get_ydata(), math.sqrt(dh) * rmt.singular_value_quantiles(d))
    nonzero = lines[f"W_QK: {dh} non-zero (null mean, 95%)"]
    s = study_null["singular_values"].sel(matrix="W_QK").values.astype(np.float64) / math.sqrt(d)
    np.testing.assert_allclose(nonzero.get_ydata(), s.mean(axis=0), rtol=1e-6)
    assert len(lines[f"W_QK: {d - dh} singular values exactly 0 (drawn at the floor)"].get_xdata()) == d - dh
    lines = {ln.get_label(): ln for ln in ax2.get_lines()}
    mp = lines["Marchenko-Pastur, ratio d_head/d = 0.25 (a factor)"]
    np.testing.assert_allclose(mp.get_ydata(), rmt.marchenko_pastur_pdf(mp.get_xdata(), 0.25))
    prod = lines["free product of two factors' laws"]
    np.testing.assert_allclose(prod.get_ydata(), rmt.free_mp_product_pdf(prod.get_xdata(), 0.25))


def test_null_sweep_curves_are_the_formulas(sel, study_store):
    fig = figures.make_figure("null-sweep", sel)
    axes = dict(zip(("std", "entropy", "kl_gauss", "kurt"), _axes(fig), strict=True))
    d = 64
    lines = {ln.get_label(): ln for ln in axes["std"].get_lines()}
    x = lines["std = √(d_head/d)"].get_xdata()
    assert x.min() == 4 and x.max() == 32
    np.testing.assert_allclose(lines["std = √(d_head/d)"].get_ydata(), np.sqrt(x / d))
    lines = {ln.get_label(): ln for ln in axes["entropy"].get_lines()}
    np.testing.assert_allclose(
        lines["Gaussian: ½ ln(2πe d_head/d)"].get_ydata(), 0.5 * np.log(2 * np.pi * np.e * x / d)
    )
    j = np.array([rmt.negentropy(int(v)) for v in x])
    np.testing.assert_allclose(
        lines["exact law: Gaussian − negentropy"].get_ydata(), 0.5 * np.log(2 * np.pi * np.e * x / d) - j
    )
    lines = {ln.get_label(): ln for ln in axes["kl_gauss"].get_lines()}
    np.testing.assert_allclose(lines["true KL = negentropy of the exact law"].get_ydata(), j)
    lines = {ln.get_label(): ln for ln in axes["kurt"].get_lines()}
    np.testing.assert_allclose(lines["6 / d_head"].get_ydata(), 6 / x)
    # the points: the sweep's means (null groups 64x4, 64x16, 64x32 in the study's scaling)
    sweep = study.baseline_sweep(study_store, 64)
    points = axes["kurt"].containers[0].lines[0]
    np.testing.assert_allclose(points.get_ydata(), sweep["kurt"].sel(band="mean").values)
    assert "Miller-Madow" in axes["kl_gauss"].get_ylabel()


def test_null_figures_without_a_null(trajectory_store):
    sel = figures.select(trajectory_store, TP)
    for name in ("null-matrix", "null-sweep"):
        with pytest.raises(InputError, match="needs a null ensemble in the store: run `spinjax baseline"):
            figures.make_figure(name, sel)
    with pytest.raises(InputError, match="no null ensemble baseline/8x2 in the store; it holds none"):
        figures.select(trajectory_store, TP, baseline="8x2")


@pytest.mark.slow
def test_baseline_sweep_command(tmp_path):
    store = tmp_path / "s.zarr"
    args = ["baseline", "--d", "16", "--d-head", "2,4", "--samples", "8", "--store", str(store)]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[0].startswith("baseline/16x2: 8 draws")
    assert done.output.splitlines()[1].startswith("baseline/16x4: 8 draws")
    assert list(study.open_baselines(store)) == ["16x2", "16x4"]
    again = CliRunner().invoke(main, [*args[:4], "4,2,4", *args[5:]])  # each value once, in the order given
    assert again.output.splitlines() == [f"baseline/16x{dh}: already there; store {store}" for dh in (4, 2)]
    bad = CliRunner().invoke(main, [*args[:4], "4,32", *args[5:]])
    assert bad.exit_code == 2 and "d_head=32" in bad.output and "16x4" not in bad.output
    bad = CliRunner().invoke(main, [*args[:4], "4,x", *args[5:]])
    assert bad.exit_code == 2 and "comma list" in bad.output
    # a store of null ensembles only: the null figures, named after the ensemble chosen
    done = CliRunner().invoke(main, ["plot", str(store), "--figure", "all", "--out", str(tmp_path / "f"),
                                     "--dpi", "30", "--baseline", "16x4"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "f").glob("*.png")) == [
        "baseline_null-matrix_16x4.png", "baseline_null-sweep_16x4.png"
    ]  # fmt: skip
    assert "skipped hist, hist-log, heatmap, heatmap-raw, heads, core-fit, spectrum," in done.output
    assert "the store holds no model (only null ensembles)" in done.output


@pytest.mark.slow
def test_plot_all_writes_every_figure(study_store, tmp_path):
    """`plot --figure all` on the study's store: every registered figure, no skip."""
    done = CliRunner().invoke(
        main, ["plot", str(study_store), "--figure", "all", "--out", str(tmp_path), "--dpi", "30"]
    )
    assert done.exit_code == 0, done.output
    assert "skipped" not in done.output
    stems = {p.name.removesuffix(".png") for p in tmp_path.glob("*.png")}
    assert stems == {f"baseline_{n}" for n in ("null-matrix", "null-sweep")} | {
        f"{TP}_{n}" for n in figures.FIGURES if n not in ("null-matrix", "null-sweep")
    }
    assert (tmp_path / f"{TP}_animation.gif").is_file()
