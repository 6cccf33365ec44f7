"""Every figure of `spinjax plot` that the embedded trajectory's store allows (no null ensemble, no
`spinjax dynamics`), checked for content: files written, axes labels and titles, and plotted data
equal to the store's values. The null, dynamics and geometry figures: tests/test_figures.py."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import spinjax
from spinjax.analysis import figures as plots
from spinjax.cli import main
from spinjax.errors import InputError
from spinjax.sources.tinypythia import STEPS

TP, NEOX = "tiny-pythia", "gpt_neox"
LAYER, HEAD, STEP = 1, 2, 1280
DYNAMICS = [n for n, spec in plots.FIGURES.items() if spec.description.startswith("[dynamics]")]
# need what this store lacks (`spinjax dynamics`, a null ensemble) or umap (tests/test_figures.py)
ELSEWHERE = ("mode-overlap", "mode-events", "divergence-steps", "null-matrix", "null-sweep", "trajectory-map")
MADE = [n for n in plots.FIGURES if n not in ELSEWHERE]


@pytest.fixture(scope="module")
def reader(trajectory_store):
    return spinjax.open_store(trajectory_store)


@pytest.fixture(scope="module")
def ds(reader):
    return reader[TP]


@pytest.fixture(scope="module")
def sel(reader):
    return plots.select(reader, TP, layer=LAYER, head=HEAD)


@pytest.fixture(scope="module")
def made(sel, tmp_path_factory):
    """Every figure built once and written (PNG, PDF, GIF for the animation): name -> (fig, paths)."""
    out = tmp_path_factory.mktemp("figures")
    made = {}
    for name in MADE:
        fig = plots.make_figure(name, sel)
        made[name] = (fig, plots.save(fig, out / name, dpi=60))
    return made


def _axes(fig):
    """The plotting axes of a figure (colour bars left out)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _text(fig) -> str:
    """Every title, label and legend entry of a figure, in one string."""
    parts = [fig.get_suptitle()]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        if ax.get_legend():
            parts += [t.get_text() for t in ax.get_legend().get_texts()]
    return " | ".join(parts)


def test_registry_and_list():
    assert len(plots.FIGURES) == 31
    for name, spec in plots.FIGURES.items():
        assert callable(spec.func) and spec.description and "\n" not in spec.description, name
        assert spec.kind in ("model", "models", "dynamics", "baseline"), name
        assert set(spec.uses) <= {"step", "layer", "head", "matrix", "stat", "estimator", "baseline"}, name
        assert spec.description.startswith("[dynamics]") == (spec.kind == "dynamics"), name
    assert set(DYNAMICS) == {"dist-steps", "dist-slices", "std-kl-steps", "stat-steps", "sv-steps", "sv-map",
                             "leading-eig", "rank-steps", "mode-overlap", "mode-events", "divergence-steps",
                             "trajectory-map", "animation"}  # fmt: skip
    out = CliRunner().invoke(main, ["plot", "--list"])
    assert out.exit_code == 0
    lines = out.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(plots.FIGURES)


@pytest.mark.parametrize("name", MADE)
def test_files_written(made, name):
    fig, paths = made[name]
    suffixes = [p.suffix for p in paths]
    assert suffixes == ([".png", ".pdf", ".gif"] if name == "animation" else [".png", ".pdf"])
    for p in paths:
        assert p.stat().st_size > 5000, p
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    with Image.open(paths[0]) as im:
        assert np.allclose(im.size, fig.get_size_inches() * 60, atol=1)
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10  # not blank
    assert len(_axes(fig)) >= 1 and all(ax.has_data() for ax in _axes(fig) if ax.axison)


def test_hist(made, ds):
    for name in ("hist", "hist-log"):
        fig = made[name][0]
        axes = _axes(fig)
        assert len([a for a in axes if a.axison]) == 4
        ax = axes[HEAD]
        assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("head 2", "W_QK entry", "density")
        assert f"step {STEP}, layer {LAYER}" in fig.get_suptitle()
        assert ax.get_yscale() == ("log" if name == "hist-log" else "linear")
        d = ds.sel(step=STEP, layer=LAYER, head=HEAD, matrix="W_QK")
        mean, std = d["mean"].item(), d["std"].item()
        counts = d["zhist"].values.astype(float)
        line, gauss, core = ax.get_lines()[:3]
        x, y = line.get_xdata(), line.get_ydata()
        centres = (ds["zbin_edges"].values[:-1] + ds["zbin_edges"].values[1:]) / 2
        first = int(np.argmin(np.abs(mean + std * centres - x[0])))
        np.testing.assert_allclose(x, mean + std * centres[first : first + len(x)], rtol=1e-9)
        # the density times (n * bin width in weight units) gives back the stored counts
        np.testing.assert_allclose(y * counts.sum() * 0.05 * std, counts[first : first + len(x)], rtol=1e-6)
        assert counts[first] > 0 and counts[first + len(x) - 1] > 0
        pdf = np.exp(-0.5 * ((gauss.get_xdata() - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
        np.testing.assert_allclose(gauss.get_ydata(), pdf, rtol=1e-9)
        mu, s = d["mu_fit"].item(), d["sigma_fit"].item()
        fit = np.exp(-0.5 * ((core.get_xdata() - mu) / s) ** 2) / (s * np.sqrt(2 * np.pi))
        np.testing.assert_allclose(core.get_ydata(), fit, rtol=1e-6)
        labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
        assert labels == ["store histogram", "Gaussian, same mean/std", "Gaussian core fit"]


def test_heatmap(made, ds):
    fig = made["heatmap"][0]
    axes = _axes(fig)
    assert [a.get_title() for a in axes] == ["W_Q", "W_QK"]
    assert all(a.get_xlabel().startswith("z =") and "layer" in a.get_ylabel() for a in axes)
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["L0", "L1", "L2", "L3"]
    for ax, m in zip(axes, ("W_Q", "W_QK"), strict=True):
        img = np.asarray(ax.get_images()[0].get_array().filled(np.nan))
        assert img.shape[0] == 16
        counts = ds["zhist"].sel(step=STEP, layer=LAYER, head=HEAD, matrix=m).values.astype(float)
        row = img[LAYER * 4 + HEAD]
        x0, x1 = ax.get_images()[0].get_extent()[:2]
        first = int(round((x0 + 10) / 0.05)) + 1  # zbin index of the first column
        expected = counts[first : first + len(row)] / (counts.sum() * 0.05)
        np.testing.assert_allclose(row, np.where(expected > 0, expected, np.nan), rtol=1e-6)


def test_heads(made, ds):
    fig = made["heads"][0]
    ax0, ax1 = _axes(fig)
    assert (ax0.get_ylabel(), ax1.get_ylabel()) == ("std", "entropy S (nats) (Miller-Madow)")
    assert ax1.get_xlabel() == "head (grouped by layer)"
    assert fig.get_suptitle() == "tiny-pythia, step 1280: W_QK per head, grouped by layer"
    at = ds.sel(step=STEP, matrix="W_QK")
    np.testing.assert_array_equal(ax0.get_lines()[0].get_ydata(), at["std"].values.ravel())
    np.testing.assert_array_equal(ax1.get_lines()[0].get_ydata(), at["entropy_mm"].values.ravel())
    plugin = plots.make_figure("heads", plots.select({TP: ds}, TP, estimator="plugin"))
    ax = _axes(plugin)[1]
    assert ax.get_ylabel() == "entropy S (nats) (plug-in)"
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), at["entropy"].values.ravel())
    separators = [ln.get_xdata()[0] for ln in ax0.get_lines()[1:]]
    assert separators == [3.5, 7.5, 11.5]


def test_entropy_std_all_models(made, reader, ds):
    fig = made["entropy-std"][0]
    ax0, ax1 = _axes(fig)
    assert ax0.get_xscale() == "linear" and ax0.get_xlabel() == "std σ"  # the heads span < 3x: linear
    assert "tiny-pythia (step 1280)" in _text(fig) and "gpt_neox (step -1)" in _text(fig)
    tp, neox, gauss = ax0.get_lines()[:3]
    at = ds.sel(step=STEP, matrix="W_QK")
    np.testing.assert_array_equal(tp.get_xdata(), at["std"].values.ravel())
    np.testing.assert_array_equal(tp.get_ydata(), at["entropy_mm"].values.ravel())
    n_at = reader[NEOX].sel(step=-1, matrix="W_QK")
    np.testing.assert_array_equal(neox.get_ydata(), n_at["entropy_mm"].values.ravel())
    s = gauss.get_xdata()
    np.testing.assert_allclose(gauss.get_ydata(), 0.5 * np.log(2 * np.pi * np.e * s**2))
    assert s.min() < at["std"].min() and s.max() > n_at["std"].max()
    residual_mm = at["entropy_mm"].values - 0.5 * np.log(
        2 * np.pi * np.e * at["std"].values.astype(float) ** 2
    )
    np.testing.assert_allclose(ax1.get_lines()[0].get_ydata(), residual_mm.ravel(), rtol=1e-6)
    assert (ax0.get_ylabel(), ax1.get_ylabel()) == (
        "entropy S (nats) (Miller-Madow)",
        "S − S_gauss (nats) (Miller-Madow)",
    )


def test_fit_kl_std(made, ds):
    fig = made["fit-kl-std"][0]
    ax0, ax1 = _axes(fig)
    at = ds.sel(step=STEP, matrix="W_QK")
    np.testing.assert_array_equal(ax0.get_lines()[0].get_ydata(), at["sigma_fit"].values.ravel())
    kl_lines = {ln.get_label(): ln for ln in ax1.get_lines()}
    np.testing.assert_array_equal(
        kl_lines["tiny-pythia (step 1280): KL(P‖N(mean,std))"].get_ydata(), at["kl_gauss_mm"].values.ravel()
    )
    # Miller-Madow's correction is the histogram entropy's, the same for any reference law
    kl_fit_mm = at["kl_fit"].values - (at["kl_gauss"].values - at["kl_gauss_mm"].values)
    np.testing.assert_allclose(
        kl_lines["tiny-pythia (step 1280): KL(P‖core fit)"].get_ydata(), kl_fit_mm.ravel(), rtol=1e-6
    )
    assert ax1.get_ylabel() == "KL (nats) (Miller-Madow)"


def _corner_grid(fig):
    """The corner's lower-triangle panels by (row, column), then the skew-kurt overview."""
    axes = _axes(fig)
    grid, k = {}, 0
    for i in range(4):
        for j in range(i + 1):
            grid[i, j] = axes[k]
            k += 1
    return grid, axes[k]


def test_corner(reader, ds):
    fig = plots.make_figure("corner", plots.select(reader, TP, others=[TP]))  # one model: layers coloured
    grid, overview = _corner_grid(fig)
    assert [grid[3, j].get_xlabel() for j in range(4)] == ["mean", "std", "skew", "kurt"]
    assert [grid[i, 0].get_ylabel() for i in range(4)] == ["count", "std", "skew", "kurt"]
    panel = grid[3, 2]  # kurt vs skew: one series per layer, the heads in order
    at = ds.sel(step=STEP, matrix="W_QK").transpose("layer", "head", ...)
    offsets = np.concatenate([c.get_offsets() for c in panel.collections if c.get_offsets().shape[0] == 4])
    np.testing.assert_allclose(offsets[:, 0], at["skew"].values.ravel())
    np.testing.assert_allclose(offsets[:, 1], at["kurt"].values.ravel())
    # shared axes: a column shares x with its histogram, a row shares y; limits follow the data
    assert panel.get_shared_x_axes().joined(panel, grid[2, 2]) and panel.get_shared_y_axes().joined(
        panel, grid[3, 0]
    )
    lo, hi = panel.get_ylim()
    kurt = at["kurt"].values
    assert lo <= kurt.min() and hi >= kurt.max() and hi - lo < 1.3 * (kurt.max() - kurt.min())
    labels = (
        [t.get_text() for t in fig.legends[0].get_texts()]
        if fig.legends
        else [
            t.get_text()
            for ax in fig.axes
            if ax.get_legend() and not ax.axison
            for t in ax.get_legend().get_texts()
        ]
    )
    assert labels == ["L0", "L1", "L2", "L3"]  # discrete layers, no colour bar
    assert not [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    pearson, unimodal = overview.get_lines()[:2]
    assert pearson.get_label().startswith("any law") and unimodal.get_label().startswith("unimodal")
    np.testing.assert_allclose(pearson.get_ydata(), pearson.get_xdata() ** 2 - 2)
    np.testing.assert_allclose(unimodal.get_ydata(), unimodal.get_xdata() ** 2 - 186 / 125)
    assert np.all(offsets[:, 1] >= offsets[:, 0] ** 2 - 2)  # every head obeys the bound


def test_corner_overlays_every_model(reader, ds):
    fig = plots.make_figure("corner", plots.select(reader, TP))  # cross-model: every model of the store
    grid, _ = _corner_grid(fig)
    series = [c for c in grid[3, 2].collections if c.get_offsets().shape[0] in (16, 12)]
    np.testing.assert_allclose(
        series[0].get_offsets()[:, 1], ds["kurt"].sel(step=STEP, matrix="W_QK").values.ravel()
    )
    np.testing.assert_allclose(
        series[1].get_offsets()[:, 1], reader[NEOX]["kurt"].sel(step=-1, matrix="W_QK").values.ravel()
    )
    labels = [
        t.get_text()
        for ax in fig.axes
        if ax.get_legend() and not ax.axison
        for t in ax.get_legend().get_texts()
    ]
    assert labels == ["tiny-pythia (step 1280)", "gpt_neox (step -1)"]
    assert "tiny-pythia, gpt_neox" in fig.get_suptitle()


def test_spectrum(made, ds):
    fig = made["spectrum"][0]
    ax0, ax1, ax2 = _axes(fig)
    assert (ax0.get_xlabel(), ax0.get_ylabel(), ax2.get_ylabel()) == ("index k", "singular value s_k", "P(λ)")
    sv = ds["singular_values"].sel(step=STEP, layer=LAYER, matrix="W_QK").values
    line = ax0.get_lines()[HEAD]
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 17))
    np.testing.assert_array_equal(line.get_ydata(), sv[HEAD])
    # each head's 16 values, every one drawn (no binning): one event row per head
    rows = ax1.collections
    assert len(rows) == 4
    np.testing.assert_allclose(
        np.sort(rows[HEAD].get_positions()), np.sort(sv[HEAD].astype(float) ** 2), rtol=1e-6
    )
    values, edges = ax2.patches[0].get_data()[:2]
    lam = sv.astype(float).ravel() ** 2
    assert np.sum(values * np.diff(edges)) == pytest.approx(1.0)
    counts, _ = np.histogram(lam, edges)
    np.testing.assert_allclose(values, counts / (lam.size * np.diff(edges)))


def test_heatmap_raw(made, ds):
    fig = made["heatmap-raw"][0]
    axes = _axes(fig)
    assert [a.get_title() for a in axes] == ["W_Q", "W_K", "W_QK"]
    assert axes[2].get_xlabel() == "W_QK entry (weight units)"
    at = ds.sel(step=STEP)
    for ax, m in zip(axes, ("W_Q", "W_K", "W_QK"), strict=True):
        image = ax.get_images()[0]
        img = np.asarray(image.get_array().filled(np.nan))
        n_bins = {"W_Q": 48, "W_K": 48, "W_QK": 96}[m]  # ~1.5 sqrt(entries): 1024 and 4096 entries
        assert img.shape == (16, n_bins)
        x0, x1 = image.get_extent()[:2]
        d = at.sel(matrix=m)
        assert x1 == pytest.approx(-x0) and x1 == pytest.approx(float((abs(d["mean"]) + 4 * d["std"]).max()))
        # the raw histogram moved onto the linear grid: each row integrates to the share inside it
        row = np.nan_to_num(img[LAYER * 4 + HEAD])
        counts = d["hist"].sel(layer=LAYER, head=HEAD).values.astype(float)
        edges = d["bin_edges"].values
        inside = counts[(edges[:-1] >= x0) & (edges[1:] <= x1)].sum() / counts.sum()
        assert row.sum() * (x1 - x0) / n_bins == pytest.approx(inside, abs=0.02)
        # ±std marks: the narrowing with depth is read off them
        marks = ax.get_lines()[1].get_xdata()  # [0]: mean - std
        np.testing.assert_allclose(marks, (d["mean"] + d["std"]).values.ravel(), rtol=1e-6)


def test_core_fit(made, ds):
    fig = made["core-fit"][0]
    ax0, ax1, ax2 = _axes(fig)
    at = ds.sel(step=STEP, matrix="W_QK").transpose("layer", "head", ...)
    np.testing.assert_array_equal(ax0.get_lines()[0].get_ydata(), at["sigma_fit"].values.ravel())
    np.testing.assert_array_equal(ax0.get_lines()[2].get_ydata(), at["std"].values.ravel())
    np.testing.assert_allclose(ax0.get_lines()[1].get_ydata(), at["sigma_fit"].values.mean(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(ax1.get_lines()[0].get_ydata(), at["kl_gauss_mm"].values.ravel())
    excess = at["sigma_fit"].values.astype(float) ** 2 - at["std"].values.astype(float) ** 2
    np.testing.assert_allclose(ax2.get_lines()[0].get_ydata(), excess.ravel(), rtol=1e-9)
    x = ax0.get_lines()[0].get_xdata()
    assert np.all(np.abs(x - np.repeat(np.arange(4), 4)) < 0.3)  # heads beside their layer
    assert ax1.get_ylabel() == "KL (nats) (Miller-Madow)" and ax2.get_ylabel() == "σ_fit² − std²"


def test_depth_every_model(reader, ds):
    fig = plots.make_figure("depth", plots.select(reader))  # no model chosen: every model
    axes = _axes(fig)
    assert [a.get_title() for a in axes] == ["W_Q", "W_K", "W_QK"]
    assert all(a.get_xlabel() == "depth: layer / (n_layers − 1)" for a in axes)
    lines = {ln.get_label(): ln for ln in axes[0].get_lines()}
    tp, neox = lines["tiny-pythia (step 1280)"], lines["gpt_neox (step -1)"]
    assert list(lines)[:2] == ["gpt_neox (step -1)", "tiny-pythia (step 1280)"]  # the store's order
    np.testing.assert_allclose(tp.get_xdata(), [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(
        tp.get_ydata(), ds["std"].sel(step=STEP, matrix="W_Q").mean("head").values, rtol=1e-6
    )
    np.testing.assert_allclose(neox.get_xdata(), [0, 1])
    band = axes[0].collections[1].get_paths()[0].vertices  # tiny-pythia's heads' range
    std = ds["std"].sel(step=STEP, matrix="W_Q").values
    assert band[:, 1].min() == pytest.approx(std.min()) and band[:, 1].max() == pytest.approx(std.max())
    assert axes[0].get_yscale() == "log" and axes[0].get_ylabel() == "std"


def test_dist_steps(made, ds):
    fig = made["dist-steps"][0]
    ax0, ax1 = _axes(fig)
    assert ax0.get_ylabel() == "training step" and ax1.get_xlabel().startswith("z =")
    assert f"layer {LAYER}, head {HEAD}" in fig.get_suptitle()
    img = np.asarray(ax1.get_images()[0].get_array().filled(np.nan))
    assert img.shape[0] == len(STEPS)
    counts = ds["zhist"].sel(layer=LAYER, head=HEAD, matrix="W_QK").values.astype(float)
    first = int(round((ax1.get_images()[0].get_extent()[0] + 10) / 0.05)) + 1
    i = list(STEPS).index(512)
    expected = counts[i, first : first + img.shape[1]] / (counts[i].sum() * 0.05)
    np.testing.assert_allclose(img[i], np.where(expected > 0, expected, np.nan), rtol=1e-6)
    assert len(ax0.collections) == len(STEPS)  # one row of raw values per step


@pytest.mark.parametrize(
    ("name", "variables"),
    [("std-kl-steps", ("std", "kl_gauss")), ("rank-steps", ("stable_rank", "spectral_entropy"))],
)
def test_trajectories(made, ds, name, variables):
    fig = made[name][0]
    axes = _axes(fig)
    for ax, var in zip(axes, variables, strict=True):
        assert ax.get_xlabel() == "training step" and ax.get_xscale() == "symlog"
        lines = ax.get_lines()
        assert len(lines) == 4 + 1 and lines[-1].get_label() == "layer mean"
        y = ds[var if var != "kl_gauss" else "kl_gauss_mm"].sel(layer=LAYER, matrix="W_QK")
        y = y.transpose("step", "head").values
        np.testing.assert_array_equal(lines[HEAD].get_xdata(), STEPS)
        np.testing.assert_array_equal(lines[HEAD].get_ydata(), y[:, HEAD])
        np.testing.assert_allclose(lines[-1].get_ydata(), y.mean(axis=1), rtol=1e-6)


def test_stat_steps(made, ds):
    fig = made["stat-steps"][0]
    ax = _axes(fig)[0]
    assert ax.get_xlabel() == "training step" and "std of W_QK" in ax.get_title()
    img = np.asarray(ax.get_images()[0].get_array())
    expected = ds["std"].sel(matrix="W_QK").transpose("layer", "head", "step").values.reshape(16, 14)
    np.testing.assert_array_equal(img, expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(s) for s in STEPS[::2]]


def test_sv_steps(made, ds):
    fig = made["sv-steps"][0]
    ax0, ax1 = _axes(fig)
    assert ax0.get_ylabel() == "λ_k = s_k²" and ax0.get_yscale() == "log"
    lam = ds["singular_values"].sel(layer=LAYER, head=HEAD, matrix="W_QK").values.astype(float) ** 2
    assert len(ax0.get_lines()) == len(STEPS) and len(ax1.get_lines()) == 16
    np.testing.assert_allclose(ax0.get_lines()[5].get_ydata(), lam[5])
    np.testing.assert_allclose(ax1.get_lines()[0].get_ydata(), lam[:, 0])


def test_leading_eig(made, ds):
    fig = made["leading-eig"][0]
    ax = _axes(fig)[0]
    assert ax.get_ylabel() == "λ_1 = s_1²" and "largest squared singular value s_1² of W_QK" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["L0", "L1", "L2", "L3"]
    assert not [a for a in fig.axes if a.get_label() == "<colorbar>"]
    lines = ax.get_lines()
    assert len(lines) == 16
    s1 = ds["spectral_norm"].sel(layer=LAYER, head=HEAD, matrix="W_QK").values.astype(float)
    np.testing.assert_allclose(lines[LAYER * 4 + HEAD].get_ydata(), s1**2)


def test_animation(made, ds):
    fig, paths = made["animation"]
    with Image.open(paths[-1]) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(STEPS)
    ax = _axes(fig)[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("head", "layer")
    values = ds["std"].sel(matrix="W_QK").transpose("step", "layer", "head").values
    image = ax.get_images()[0]
    np.testing.assert_array_equal(np.asarray(image.get_array()), values[-1])  # left at the last frame
    n_frames, update = fig.spinjax_animation
    update(3)
    np.testing.assert_array_equal(np.asarray(image.get_array()), values[3])
    top, right = _axes(fig)[1:3]
    np.testing.assert_allclose(top.get_lines()[0].get_ydata(), values[3].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(right.get_lines()[0].get_xdata(), values[3].mean(axis=1), rtol=1e-6)
    assert top.get_title().endswith(f"step {STEPS[3]}")
    update(n_frames - 1)


@pytest.mark.parametrize("name", DYNAMICS)
def test_dynamics_need_several_steps(reader, name):
    with pytest.raises(InputError, match=f"figure '{name}'.*at least 2 finished steps.*gpt_neox"):
        plots.make_figure(name, reader, NEOX)


def test_sv_map(made, ds):
    fig = made["sv-map"][0]
    ax0, ax1 = _axes(fig)
    lam = ds["singular_values"].sel(layer=LAYER, head=HEAD, matrix="W_QK").values.astype(float) ** 2
    np.testing.assert_allclose(np.asarray(ax0.get_images()[0].get_array()), lam.T)  # index x step
    assert ax0.get_ylabel() == "index k (1 = largest)"
    np.testing.assert_allclose(ax1.get_lines()[3].get_ydata(), lam[:, 3])
    assert [t.get_text() for t in ax0.get_xticklabels()] == [str(s) for s in STEPS[::2]]


def test_dist_slices(made, ds):
    fig = made["dist-slices"][0]
    ax = _axes(fig)[0]
    inset = ax.child_axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == [f"step {s}" for s in (0, 4, 32, 512, 1280)]
    assert inset.get_yscale() == "log" and "tails" in inset.get_title()
    # 4096 entries: z bins merged 5 at a time (0.25 std), the densities from the stored counts
    assert "bins of 0.25 std" in ax.get_title()
    d = ds.sel(step=512, layer=LAYER, head=HEAD, matrix="W_QK")
    counts = d["zhist"].values[1:-1].astype(float).reshape(-1, 5).sum(1)
    n, std, mean = d["zhist"].values.sum(), float(d["std"]), float(d["mean"])
    line = ax.get_lines()[3]
    dens = counts / (n * 0.25) / std
    first = int(np.argmin(np.abs(mean + std * (-10 + 0.125 + 0.25 * np.arange(80)) - line.get_xdata()[0])))
    np.testing.assert_allclose(line.get_ydata(), dens[first : first + len(line.get_ydata())], rtol=1e-6)


def test_choices_are_checked(reader):
    with pytest.raises(InputError, match="several models, choose one with --model: gpt_neox, tiny-pythia"):
        plots.make_figure("hist", reader)
    with pytest.raises(InputError, match=r"no finished step 3; nearest: \[1, 2, 4\]"):
        plots.select(reader, TP, step=3)
    with pytest.raises(InputError, match="layers 0..3, not 4"):
        plots.select(reader, TP, layer=4)
    with pytest.raises(InputError, match="no matrix 'W_V'"):
        plots.select(reader, TP, matrix="W_V")
    with pytest.raises(InputError, match="not a per-head statistic"):
        plots.select(reader, TP, stat="zhist")
    with pytest.raises(InputError, match="no figure 'nope'"):
        plots.make_figure("nope", reader, TP)
    sel = plots.select(reader, TP, step=256, others=[TP])
    assert (sel.step, sel.layer, sel.head, list(sel.models)) == (256, 0, 0, [TP])


def test_plot_command(trajectory_store, tmp_path):
    runner = CliRunner()
    args = ["plot", str(trajectory_store), "--model", TP, "--out", str(tmp_path), "--dpi", "40"]
    done = runner.invoke(
        main, [*args, "--figure", "heads", "--figure", "spectrum", "--layer", "3", "--step", "64"]
    )
    assert done.exit_code == 0, done.output
    names = sorted(p.name for p in tmp_path.iterdir())
    # each file names the choices its figure uses: heads shows one step of every layer
    assert names == [f"tiny-pythia_heads_step64.{e}" for e in ("pdf", "png")] + [
        f"tiny-pythia_spectrum_step64_layer3.{e}" for e in ("pdf", "png")
    ]
    assert done.output.split() == [str(tmp_path / n) for n in (names[1], names[0], names[3], names[2])]
    bad = [
        (["--figure", "nope"], "no figure nope"),
        (["--figure", "hist", "--layer", "7"], "layers 0..3, not 7"),
        (["--figure", "hist", "--model", "other"], "no model 'other'"),
    ]
    for extra, message in bad:
        done = runner.invoke(main, [*args, *extra])
        assert done.exit_code == 2 and message in done.output, (extra, done.output)
    done = runner.invoke(main, ["plot", str(trajectory_store), "--model", NEOX, "--figure", "sv-steps"])
    assert done.exit_code == 2 and "at least 2 finished steps" in done.output
    assert "Traceback" not in done.output
    done = runner.invoke(main, ["plot", str(tmp_path / "none.zarr"), "--figure", "hist"])
    assert done.exit_code == 2 and "not a Zarr store" in done.output
    assert runner.invoke(main, ["plot", str(trajectory_store)]).exit_code == 2  # no --figure


def test_plot_without_model_draws_the_cross_model_figures(trajectory_store, tmp_path):
    runner = CliRunner()
    base = ["plot", str(trajectory_store), "--out", str(tmp_path), "--dpi", "30"]
    done = runner.invoke(main, [*base, "--figure", "hist"])
    assert done.exit_code == 2 and "several models, choose one with --model" in done.output
    done = runner.invoke(main, [*base, "--figure", "depth", "--step", "16"])
    assert done.exit_code == 2 and "--step, --layer and --head choose within one model" in done.output
    done = runner.invoke(main, [*base, "--figure", "depth", "--figure", "corner"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"models_{f}.{e}" for f in ("corner", "depth") for e in ("pdf", "png")
    ]
    done = runner.invoke(main, [*base, "--figure", "all", "--stat", "kurt", "--estimator", "plugin"])
    assert done.exit_code == 0, done.output
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "models_depth_kurt_plugin.png" in made and "models_entropy-std_plugin.png" in made
    assert "skipped hist, hist-log, heatmap, heatmap-raw, heads, core-fit, spectrum," in done.output
    assert done.output.count("the store holds several models") == 1  # one line per reason
    assert "skipped null-sweep: figure 'null-sweep' needs a null ensemble" in done.output
