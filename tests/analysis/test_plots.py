"""Every figure of `spinjax plot`, built from the embedded trajectory's store, checked for content:
files written, axes labels and titles, and plotted data equal to the store's values."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import spinjax
from spinjax.analysis import plots
from spinjax.cli import main
from spinjax.errors import InputError
from spinjax.sources.tinypythia import STEPS

TP, NEOX = "tiny-pythia", "gpt_neox"
LAYER, HEAD, STEP = 1, 2, 1280
DYNAMICS = [n for n, (_, desc) in plots.FIGURES.items() if desc.startswith("[dynamics]")]


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
    for name in plots.FIGURES:
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
    assert len(plots.FIGURES) >= 15
    for name, (func, desc) in plots.FIGURES.items():
        assert callable(func) and desc and "\n" not in desc, name
    assert set(DYNAMICS) == {"dist-steps", "std-kl-steps", "stat-steps", "sv-steps", "leading-eig",
                             "rank-steps", "animation"}  # fmt: skip
    out = CliRunner().invoke(main, ["plot", "--list"])
    assert out.exit_code == 0
    lines = out.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(plots.FIGURES)


@pytest.mark.parametrize("name", list(plots.FIGURES))
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
    assert (ax0.get_ylabel(), ax1.get_ylabel()) == ("std", "entropy S (nats)")
    assert ax1.get_xlabel() == "head (grouped by layer)"
    at = ds.sel(step=STEP, matrix="W_QK")
    np.testing.assert_array_equal(ax0.get_lines()[0].get_ydata(), at["std"].values.ravel())
    np.testing.assert_array_equal(ax1.get_lines()[0].get_ydata(), at["entropy"].values.ravel())
    separators = [ln.get_xdata()[0] for ln in ax0.get_lines()[1:]]
    assert separators == [3.5, 7.5, 11.5]


def test_entropy_std_all_models(made, reader, ds):
    fig = made["entropy-std"][0]
    ax0, ax1 = _axes(fig)
    assert ax0.get_xscale() == "log" and ax0.get_xlabel() == "std σ"
    assert "tiny-pythia (step 1280)" in _text(fig) and "gpt_neox (step -1)" in _text(fig)
    tp, neox, gauss = ax0.get_lines()[:3]
    at = ds.sel(step=STEP, matrix="W_QK")
    np.testing.assert_array_equal(tp.get_xdata(), at["std"].values.ravel())
    np.testing.assert_array_equal(tp.get_ydata(), at["entropy"].values.ravel())
    n_at = reader[NEOX].sel(step=-1, matrix="W_QK")
    np.testing.assert_array_equal(neox.get_ydata(), n_at["entropy"].values.ravel())
    s = gauss.get_xdata()
    np.testing.assert_allclose(gauss.get_ydata(), 0.5 * np.log(2 * np.pi * np.e * s**2))
    assert s.min() < at["std"].min() and s.max() > n_at["std"].max()
    np.testing.assert_array_equal(ax1.get_lines()[0].get_ydata(), at["entropy_residual"].values.ravel())
    assert ax1.get_ylabel() == "S − S_gauss (nats)"


def test_fit_kl_std(made, ds):
    fig = made["fit-kl-std"][0]
    ax0, ax1 = _axes(fig)
    at = ds.sel(step=STEP, matrix="W_QK")
    np.testing.assert_array_equal(ax0.get_lines()[0].get_ydata(), at["sigma_fit"].values.ravel())
    kl_lines = {ln.get_label(): ln for ln in ax1.get_lines()}
    np.testing.assert_array_equal(
        kl_lines["tiny-pythia (step 1280): KL(P‖N(mean,std))"].get_ydata(), at["kl_gauss"].values.ravel()
    )
    np.testing.assert_array_equal(
        kl_lines["tiny-pythia (step 1280): KL(P‖core fit)"].get_ydata(), at["kl_fit"].values.ravel()
    )
    assert ax1.get_ylabel() == "KL (nats)"


def test_corner(made, ds):
    fig = made["corner"][0]
    grid = np.array(_axes(fig)).reshape(4, 4)
    assert [grid[3, j].get_xlabel() for j in range(4)] == ["mean", "std", "skew", "kurt"]
    assert [grid[i, 0].get_ylabel() for i in range(4)] == ["count", "std", "skew", "kurt"]
    panel = grid[3, 2]  # kurt vs skew
    at = ds.sel(step=STEP, matrix="W_QK")
    offsets = panel.collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 0], at["skew"].values.ravel())
    np.testing.assert_allclose(offsets[:, 1], at["kurt"].values.ravel())
    bound = panel.get_lines()[0]
    assert bound.get_label() == "kurt + 3 = skew² + 1"
    np.testing.assert_allclose(bound.get_ydata(), bound.get_xdata() ** 2 - 2)
    assert np.all(offsets[:, 1] >= offsets[:, 0] ** 2 - 2)  # every head obeys the bound


def test_spectrum(made, ds):
    fig = made["spectrum"][0]
    ax0, ax1 = _axes(fig)
    assert (ax0.get_xlabel(), ax0.get_ylabel(), ax1.get_ylabel()) == ("index k", "singular value s_k", "P(λ)")
    sv = ds["singular_values"].sel(step=STEP, layer=LAYER, matrix="W_QK").values
    line = ax0.get_lines()[HEAD]
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 17))
    np.testing.assert_array_equal(line.get_ydata(), sv[HEAD])
    values, edges = ax1.patches[HEAD].get_data()[:2]
    lam = sv[HEAD].astype(float) ** 2
    assert np.sum(values * np.diff(edges)) == pytest.approx(1.0)
    counts, _ = np.histogram(lam, edges)
    np.testing.assert_allclose(values, counts / (16 * np.diff(edges)))


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
        y = ds[var].sel(layer=LAYER, matrix="W_QK").transpose("step", "head").values
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
    ax = _axes(made["leading-eig"][0])[0]
    assert ax.get_ylabel() == "λ_1 = s_1²"
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


def test_choices_are_checked(reader):
    with pytest.raises(InputError, match="several models"):
        plots.select(reader)
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
    assert names == [
        f"tiny-pythia_{f}_step64_layer3.{e}" for f in ("heads", "spectrum") for e in ("pdf", "png")
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
