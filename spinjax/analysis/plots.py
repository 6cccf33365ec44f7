"""The study's figures from a store: one small function per figure, one registry.

Every figure function takes a :class:`Selection` (the model's finished steps and the chosen
step, layer, head, matrix and statistic) and returns a ``matplotlib.figure.Figure`` built
without pyplot (no global state, no GUI backend; files are written by the Agg canvas).

>>> from spinjax import open_store
>>> from spinjax.analysis import plots
>>> reader = open_store("store/spinjax.zarr")                        # doctest: +SKIP
>>> fig = plots.make_figure("hist", reader, "tiny-pythia", layer=2)  # doctest: +SKIP
>>> plots.save(fig, "figures/tiny-pythia_hist")   # PNG and PDF       # doctest: +SKIP

``FIGURES`` maps each name to ``(function, one-line description)``; ``spinjax plot --list``
prints it. Training-dynamics figures need at least two finished steps and raise
:class:`~spinjax.errors.InputError` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.animation import PillowWriter
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import InputError, nearest
from .reader import StoreReader, density, open_store, scalar_variables


@dataclass
class Selection:
    """What a figure shows: model ``key`` (dataset ``ds``, finished steps) and the choices."""

    key: str
    ds: xr.Dataset
    step: int
    layer: int
    head: int
    matrix: str
    stat: str
    models: dict[str, xr.Dataset]  # for cross-model figures, ``key`` first; each at one step

    @property
    def at(self) -> xr.Dataset:
        """The dataset at the chosen step."""
        return self.ds.sel(step=self.step)


def select(
    data: StoreReader | str | Path | dict[str, xr.Dataset],
    model: str | None = None,
    *,
    step: int | None = None,
    layer: int | None = None,
    head: int | None = None,
    matrix: str = "W_QK",
    stat: str = "std",
    others: list[str] | None = None,
) -> Selection:
    """Validate the choices (InputError naming what is available) and fill in defaults.

    Defaults: the store's only model, its last finished step, layer 0, head 0. ``others``:
    more model keys for the cross-model figures (each at its last finished step);
    ``others=None`` means every model in the store.
    """
    datasets = _datasets(data)
    if model is None:
        if len(datasets) != 1:
            raise InputError(f"the store holds several models, choose one: {', '.join(datasets)}")
        model = next(iter(datasets))
    if model not in datasets:
        raise InputError(f"no model {model!r} in the store; it holds {', '.join(datasets) or 'none'}")
    ds = datasets[model]
    steps = [int(s) for s in ds["step"].values]
    if not steps:
        raise InputError(f"model {model!r} has no finished step yet")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise InputError(f"model {model!r} has no finished step {step}; nearest: {nearest(step, steps)}")
    layer = _index(ds, "layer", 0 if layer is None else layer, model)
    head = _index(ds, "head", 0 if head is None else head, model)
    matrices = [str(m) for m in ds["matrix"].values]
    if matrix not in matrices:
        raise InputError(f"no matrix {matrix!r}; the store has {', '.join(matrices)}")
    if stat not in scalar_variables(ds):
        raise InputError(f"--stat {stat!r} is not a per-head statistic; choose from {scalar_variables(ds)}")
    keys = [model, *[k for k in (others if others is not None else datasets) if k != model]]
    for k in keys:
        if k not in datasets:
            raise InputError(f"no model {k!r} in the store; it holds {', '.join(datasets)}")
    models = {model: ds.sel(step=step)}
    models.update({k: datasets[k].isel(step=-1) for k in keys[1:] if datasets[k].sizes["step"]})
    return Selection(model, ds, step, layer, head, matrix, stat, models)


def _datasets(data: Any) -> dict[str, xr.Dataset]:
    if isinstance(data, str | Path):
        data = open_store(data)
    if isinstance(data, StoreReader):
        return data.datasets()
    return dict(data)


def _index(ds: xr.Dataset, dim: str, value: int, model: str) -> int:
    n = ds.sizes[dim]
    if not 0 <= value < n:
        raise InputError(f"model {model!r} has {dim}s 0..{n - 1}, not {value}")
    return int(value)


# ---- shared pieces -----------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _grid(n: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(n, max_cols)
    return -(-n // cols), cols


def _gauss(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))


def _occupied(values: np.ndarray) -> slice:
    """The columns (last axis) holding any positive value, as one slice."""
    cols = np.flatnonzero(np.nansum(np.where(values > 0, values, 0), axis=tuple(range(values.ndim - 1))))
    return slice(cols[0], cols[-1] + 1) if cols.size else slice(0, values.shape[-1])


def _lognorm(values: np.ndarray) -> LogNorm:
    pos = values[np.isfinite(values) & (values > 0)]
    return LogNorm(pos.min(), pos.max()) if pos.size else LogNorm(1e-3, 1)


def _colour_norm(values: np.ndarray) -> Normalize:
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 30:
        return LogNorm(finite.min(), finite.max())
    return Normalize(*(finite.min(), finite.max()) if finite.size else (0, 1))


def _layer_separators(ax, n_layers: int, n_heads: int, axis: str = "y") -> None:
    """Lines between layers and one tick per layer, for an axis of heads grouped by layer."""
    line = ax.axhline if axis == "y" else ax.axvline
    for layer in range(1, n_layers):
        line(layer * n_heads - 0.5, color="w" if axis == "y" else "0.6", lw=0.8)
    step = max(1, n_layers // 16)
    ticks = [layer * n_heads + (n_heads - 1) / 2 for layer in range(0, n_layers, step)]
    labels = [f"L{layer}" for layer in range(0, n_layers, step)]
    (ax.set_yticks if axis == "y" else ax.set_xticks)(ticks, labels)


def _step_axis(ax, steps: np.ndarray) -> None:
    """Log-like x axis for Pythia-style log-spaced steps (symlog keeps step 0)."""
    pos = steps[steps > 0]
    if steps.min() >= 0 and pos.size and pos.max() / pos.min() > 50:
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(steps.min(), steps.max())
    ax.set_xlabel("training step")


def _step_ticks(ax, steps: np.ndarray, axis: str = "x") -> None:
    """Label image columns (or rows) by step, at most about 12 labels."""
    every = max(1, -(-len(steps) // 12))
    idx = np.arange(0, len(steps), every)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(idx, [str(s) for s in steps[idx]])


def _need_steps(sel: Selection, name: str) -> np.ndarray:
    steps = sel.ds["step"].values
    if len(steps) < 2:
        raise InputError(
            f"figure {name!r} shows training dynamics and needs at least 2 finished steps; "
            f"model {sel.key!r} has {len(steps)} ({', '.join(map(str, steps))})"
        )
    return steps


def _z_density(d: xr.Dataset) -> xr.DataArray:
    return density(d[["zhist", "zbin_edges"]], "z")


# ---- figures of one step -----------------------------------------------------------------


def fig_hist(sel: Selection, *, log: bool = False) -> Figure:
    """Per-head distributions of one layer, with N(mean, std) and the core fit overlaid."""
    d = sel.at.sel(layer=sel.layer, matrix=sel.matrix)
    dens = _z_density(d).transpose("head", "zbin")
    z = dens["centre"].values
    mean, std, mu_fit, sigma_fit = (d[v].values for v in ("mean", "std", "mu_fit", "sigma_fit"))
    n = d.sizes["head"]
    rows, cols = _grid(n, 4)
    fig = _figure(3.2 * cols, 2.6 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for h, ax in enumerate(axes):
        if h >= n:
            ax.set_axis_off()
            continue
        y = dens.values[h]
        sl = _occupied(y)
        ax.set_title(f"head {h}")
        ax.set_xlabel(f"{sel.matrix} entry")
        ax.set_ylabel("density")
        if not (np.isfinite(std[h]) and std[h] > 0):
            ax.text(0.5, 0.5, "no spread", ha="center", transform=ax.transAxes)
            continue
        x, yy = mean[h] + std[h] * z[sl], y[sl] / std[h]
        ax.plot(x, yy, drawstyle="steps-mid", lw=1, label="store histogram")
        xs = np.linspace(x[0], x[-1], 400)
        ax.plot(xs, _gauss(xs, mean[h], std[h]), "--", lw=1, label="Gaussian, same mean/std")
        if np.isfinite(sigma_fit[h]) and sigma_fit[h] > 0:
            ax.plot(xs, _gauss(xs, mu_fit[h], sigma_fit[h]), ":", lw=1.5, label="Gaussian core fit")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.3 * yy[yy > 0].min())
    axes[0].legend(fontsize="x-small")
    scale = "log" if log else "linear"
    fig.suptitle(f"{sel.key}, step {sel.step}, layer {sel.layer}: {sel.matrix} entries per head ({scale})")
    return fig


def fig_heatmap(sel: Selection) -> Figure:
    """Rows = heads grouped by layer, columns = z bins, colour = density (log), W_Q and W_QK."""
    matrices = [m for m in ("W_Q", "W_QK") if m in sel.ds["matrix"].values]
    n_layers, n_heads = sel.ds.sizes["layer"], sel.ds.sizes["head"]
    fig = _figure(6 * len(matrices), 1.2 + min(12, 0.12 * n_layers * n_heads + 2))
    axes = np.atleast_1d(fig.subplots(1, len(matrices)))
    for ax, m in zip(axes, matrices, strict=True):
        dens = _z_density(sel.at.sel(matrix=m)).transpose("layer", "head", "zbin")
        img = dens.values.reshape(n_layers * n_heads, -1)
        sl = _occupied(img)
        img, z = img[:, sl], dens["centre"].values[sl]
        dz = z[1] - z[0] if len(z) > 1 else 1.0
        im = ax.imshow(
            np.where(img > 0, img, np.nan), aspect="auto", interpolation="nearest", cmap="magma",
            norm=_lognorm(img), extent=(z[0] - dz / 2, z[-1] + dz / 2, len(img) - 0.5, -0.5),
        )  # fmt: skip
        _layer_separators(ax, n_layers, n_heads, "y")
        ax.set_xlabel("z = (w - mean) / std")
        ax.set_ylabel("head, grouped by layer")
        ax.set_title(f"{m}")
        fig.colorbar(im, ax=ax, label="density of z (log)")
    fig.suptitle(f"{sel.key}, step {sel.step}: standardized distribution of every head")
    return fig


def fig_heads(sel: Selection) -> Figure:
    """Std and entropy of every head, ordered by layer, with separators between layers."""
    d = sel.at.sel(matrix=sel.matrix).transpose("layer", "head", ...)
    n_layers, n_heads = d.sizes["layer"], d.sizes["head"]
    fig = _figure(min(16, 4 + 0.08 * n_layers * n_heads), 5.5)
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(n_layers * n_heads)
    for ax, var, label in zip(axes, ("std", "entropy"), ("std", "entropy S (nats)"), strict=True):
        ax.plot(x, d[var].values.ravel(), "o", ms=3)
        _layer_separators(ax, n_layers, n_heads, "x")
        ax.set_ylabel(label)
    axes[0].set_title(f"{sel.key}, step {sel.step}: {sel.matrix} per head, ordered by layer")
    axes[1].set_xlabel("head (grouped by layer)")
    return fig


def _scatter_models(sel: Selection, ax, xvar: str, yvar: str, **kw) -> np.ndarray:
    """One series per model (``sel.models``), all heads; returns all x values."""
    xs = []
    for key, d in sel.models.items():
        d = d.sel(matrix=sel.matrix)
        x, y = d[xvar].values.ravel(), d[yvar].values.ravel()
        step = int(d["step"].values)
        ax.plot(x, y, kw.get("marker", "o"), ms=3, alpha=0.8, label=f"{key} (step {step}){kw.get('tag', '')}")
        xs.append(x)
    return np.concatenate(xs)


def _std_grid(std: np.ndarray) -> np.ndarray:
    pos = std[np.isfinite(std) & (std > 0)]
    if not pos.size:
        return np.array([1.0])
    return np.geomspace(pos.min() / 1.5, pos.max() * 1.5, 200)


def fig_entropy_std(sel: Selection) -> Figure:
    """Entropy vs std (with the Gaussian S = ln(2 pi e sigma^2)/2), and the residual vs std."""
    fig = _figure(11, 4.5)
    ax0, ax1 = fig.subplots(1, 2)
    std = _scatter_models(sel, ax0, "std", "entropy")
    s = _std_grid(std)
    ax0.plot(s, 0.5 * np.log(2 * np.pi * np.e * s**2), "k-", lw=1, label="Gaussian: ln(2πeσ²)/2")
    _scatter_models(sel, ax1, "std", "entropy_residual")
    ax1.axhline(0, color="k", lw=1)
    for ax, label in ((ax0, "entropy S (nats)"), (ax1, "S − S_gauss (nats)")):
        ax.set_xscale("log")
        ax.set_xlabel("std σ")
        ax.set_ylabel(label)
    ax0.legend(fontsize="x-small")
    ax0.set_title("entropy vs std")
    ax1.set_title("entropy residual vs std")
    fig.suptitle(f"{sel.matrix}, every head of every layer")
    return fig


def fig_fit_kl(sel: Selection) -> Figure:
    """Core-fit sigma vs std (diagonal = Gaussian), and KL from the Gaussians vs std."""
    fig = _figure(11, 4.5)
    ax0, ax1 = fig.subplots(1, 2)
    std = _scatter_models(sel, ax0, "std", "sigma_fit")
    s = _std_grid(std)
    ax0.plot(s, s, "k-", lw=1, label="σ_fit = σ")
    _scatter_models(sel, ax1, "std", "kl_gauss", tag=": KL(P‖N(mean,std))")
    _scatter_models(sel, ax1, "std", "kl_fit", marker="x", tag=": KL(P‖core fit)")
    ax0.set_ylabel("σ_fit of the Gaussian core")
    ax1.set_ylabel("KL (nats)")
    for ax in (ax0, ax1):
        ax.set_xscale("log")
        ax.set_xlabel("std σ")
        ax.legend(fontsize="x-small")
    ax0.set_yscale("log")
    ax0.set_title("core fit width vs std")
    ax1.set_title("KL divergence vs std")
    fig.suptitle(f"{sel.matrix}, every head of every layer")
    return fig


CORNER = ("mean", "std", "skew", "kurt")


def fig_corner(sel: Selection) -> Figure:
    """Pairwise mean, std, skew, kurt of every head, with the Pearson bound kurt + 3 >= skew^2 + 1."""
    d = sel.at.sel(matrix=sel.matrix).transpose("layer", "head", ...)
    values = {v: d[v].values.ravel() for v in CORNER}
    layer = np.repeat(d["layer"].values, d.sizes["head"])
    fig = _figure(9, 8.5)
    axes = fig.subplots(4, 4, squeeze=False)
    for i, yv in enumerate(CORNER):
        for j, xv in enumerate(CORNER):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            if i == j:
                ax.hist(values[xv][np.isfinite(values[xv])], bins=20, color="0.4")
            else:
                sc = ax.scatter(values[xv], values[yv], c=layer, s=10, cmap="viridis")
            if (xv, yv) == ("skew", "kurt"):
                _pearson_bound(ax, values["skew"], values["kurt"])
            if i == 3:
                ax.set_xlabel(xv)
            if j == 0:
                ax.set_ylabel(yv if i else "count")
    fig.colorbar(sc, ax=axes[:, -1], label="layer", shrink=0.6)
    fig.suptitle(f"{sel.key}, step {sel.step}: {sel.matrix} moments per head")
    return fig


def _pearson_bound(ax, skew: np.ndarray, kurt: np.ndarray) -> None:
    finite = np.isfinite(skew) & np.isfinite(kurt)
    span = max(1.0, np.abs(skew[finite]).max() * 1.2) if finite.any() else 1.0
    s = np.linspace(-span, span, 200)
    low = min(-2.0, kurt[finite].min() - 0.5) if finite.any() else -2.0
    ax.plot(s, s**2 - 2, "r-", lw=1, label="kurt + 3 = skew² + 1")
    ax.fill_between(s, low, s**2 - 2, color="r", alpha=0.1, lw=0)
    top = max(kurt[finite].max() * 1.1 + 0.5, 0.0) if finite.any() else 1.0
    ax.set_ylim(low, top)
    ax.legend(fontsize="xx-small", loc="upper center")


def fig_spectrum(sel: Selection) -> Figure:
    """Singular values vs index and the density P(lambda) of lambda = s^2, per head of a layer."""
    sv = sel.at["singular_values"].sel(layer=sel.layer, matrix=sel.matrix).values  # head, sv
    fig = _figure(11, 4.5)
    ax0, ax1 = fig.subplots(1, 2)
    k = np.arange(1, sv.shape[1] + 1)
    lam = sv.astype(np.float64) ** 2
    pos = lam[np.isfinite(lam) & (lam > 0)]
    edges = np.geomspace(pos.min(), pos.max() * 1.0001, max(6, sv.shape[1] // 2) + 1) if pos.size else None
    for h in range(sv.shape[0]):
        ax0.plot(k, sv[h], "o-", ms=3, lw=1, label=f"head {h}")
        if edges is not None:
            counts, _ = np.histogram(lam[h][np.isfinite(lam[h])], edges)
            ax1.stairs(counts / (len(k) * np.diff(edges)), edges, label=f"head {h}")
    ax0.set_yscale("log")
    ax0.set_xlabel("index k")
    ax0.set_ylabel("singular value s_k")
    ax0.set_title("singular values (descending)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("λ = s²")
    ax1.set_ylabel("P(λ)")
    ax1.set_title("spectral density per head")
    if sv.shape[0] <= 12:
        ax0.legend(fontsize="x-small", ncols=2)
    fig.suptitle(f"{sel.key}, step {sel.step}, layer {sel.layer}: {sel.matrix} spectrum")
    return fig


# ---- training dynamics -------------------------------------------------------------------


def fig_dist_steps(sel: Selection) -> Figure:
    """One head's distribution at every step: raw values (left) and standardized z (right)."""
    steps = _need_steps(sel, "dist-steps")
    d = sel.ds.sel(layer=sel.layer, head=sel.head, matrix=sel.matrix)
    dens = _z_density(d).transpose("step", "zbin")
    img = dens.values
    sl = _occupied(img)
    img, z = img[:, sl], dens["centre"].values[sl]
    zedges = np.append(dens["lower"].values[sl], dens["upper"].values[sl][-1])
    mean, std = d["mean"].values, d["std"].values
    fig = _figure(12, 1.5 + min(10, 0.25 * len(steps) + 2))
    ax0, ax1 = fig.subplots(1, 2, sharey=True)
    norm = _lognorm(img)
    masked = np.where(img > 0, img, np.nan)
    for i in range(len(steps)):
        if np.isfinite(std[i]) and std[i] > 0:
            x = mean[i] + std[i] * zedges
            ax0.pcolormesh(x, [i - 0.5, i + 0.5], masked[i : i + 1] / std[i], cmap="magma",
                           norm=LogNorm(norm.vmin / std.max(), norm.vmax / std.min()))  # fmt: skip
    dz = z[1] - z[0] if len(z) > 1 else 1.0
    im = ax1.imshow(masked, aspect="auto", interpolation="nearest", cmap="magma", norm=norm,
                    extent=(z[0] - dz / 2, z[-1] + dz / 2, len(steps) - 0.5, -0.5))  # fmt: skip
    ax0.set_ylim(len(steps) - 0.5, -0.5)
    _step_ticks(ax0, steps, "y")
    ax0.set_ylabel("training step")
    ax0.set_xlabel(f"{sel.matrix} entry")
    ax0.set_title("raw values (colour: density, log)")
    ax1.set_xlabel("z = (w - mean) / std")
    ax1.set_title("standardized")
    fig.colorbar(im, ax=ax1, label="density of z (log)")
    fig.suptitle(f"{sel.key}, layer {sel.layer}, head {sel.head}: {sel.matrix} distribution vs step")
    return fig


def _trajectories(sel: Selection, name: str, variables: tuple[tuple[str, str], ...]) -> Figure:
    """Each variable vs step for every head of the layer (thin) and the layer mean (thick)."""
    steps = _need_steps(sel, name)
    d = sel.ds.sel(layer=sel.layer, matrix=sel.matrix).transpose("step", "head", ...)
    fig = _figure(6 * len(variables), 4.5)
    axes = np.atleast_1d(fig.subplots(1, len(variables)))
    for ax, (var, label) in zip(axes, variables, strict=True):
        y = d[var].values
        for h in range(y.shape[1]):
            ax.plot(steps, y[:, h], lw=1, alpha=0.6, label=f"head {h}")
        ax.plot(steps, np.nanmean(y, axis=1), "k-", lw=2.5, label="layer mean")
        _step_axis(ax, steps)
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs step")
    if d.sizes["head"] <= 12:
        axes[0].legend(fontsize="x-small", ncols=2)
    fig.suptitle(f"{sel.key}, layer {sel.layer}: {sel.matrix}, every head")
    return fig


def fig_stat_steps(sel: Selection) -> Figure:
    """A statistic (``--stat``) of every head (rows, grouped by layer) vs step (columns)."""
    steps = _need_steps(sel, "stat-steps")
    v = sel.ds[sel.stat].sel(matrix=sel.matrix).transpose("layer", "head", "step")
    n_layers, n_heads = v.sizes["layer"], v.sizes["head"]
    img = v.values.reshape(n_layers * n_heads, len(steps))
    fig = _figure(min(14, 4 + 0.4 * len(steps)), 1.2 + min(12, 0.12 * n_layers * n_heads + 2))
    ax = fig.subplots()
    im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap="viridis", norm=_colour_norm(img))
    _layer_separators(ax, n_layers, n_heads, "y")
    _step_ticks(ax, steps, "x")
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("training step")
    ax.set_ylabel("head, grouped by layer")
    ax.set_title(f"{sel.key}: {sel.stat} of {sel.matrix} per head vs step")
    fig.colorbar(im, ax=ax, label=sel.stat)
    return fig


def fig_sv_steps(sel: Selection) -> Figure:
    """lambda_k = s_k^2 of one head vs index (one line per step) and vs step (one line per k)."""
    steps = _need_steps(sel, "sv-steps")
    sv = sel.ds["singular_values"].sel(layer=sel.layer, head=sel.head, matrix=sel.matrix)
    lam = sv.transpose("step", "sv").values.astype(np.float64) ** 2
    k = np.arange(1, lam.shape[1] + 1)
    fig = _figure(12, 4.5)
    ax0, ax1 = fig.subplots(1, 2)
    cmap = _cmap("viridis")
    for i in range(len(steps)):
        ax0.plot(k, lam[i], "-", lw=1, color=cmap(i / max(1, len(steps) - 1)))
    kmap = _cmap("plasma")
    for j in range(lam.shape[1]):
        ax1.plot(steps, lam[:, j], lw=1, color=kmap(j / max(1, lam.shape[1] - 1)))
    sm = _mappable(cmap, Normalize(0, len(steps) - 1))
    bar = fig.colorbar(sm, ax=ax0, label="training step")
    idx = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    bar.set_ticks(idx, labels=[str(steps[i]) for i in idx])
    fig.colorbar(_mappable(kmap, Normalize(1, lam.shape[1])), ax=ax1, label="index k")
    for ax in (ax0, ax1):
        ax.set_yscale("log")
        ax.set_ylabel("λ_k = s_k²")
    ax0.set_xlabel("index k")
    ax0.set_title("eigenvalues vs index, one line per step")
    _step_axis(ax1, steps)
    ax1.set_title("eigenvalues vs step, one line per index")
    fig.suptitle(f"{sel.key}, layer {sel.layer}, head {sel.head}: {sel.matrix} spectrum vs step")
    return fig


def fig_leading(sel: Selection) -> Figure:
    """The leading eigenvalue lambda_1 = s_1^2 of every head vs step, coloured by layer."""
    steps = _need_steps(sel, "leading-eig")
    lam = sel.ds["spectral_norm"].sel(matrix=sel.matrix).transpose("step", "layer", "head")
    lam = lam.values.astype(np.float64) ** 2
    n_layers = lam.shape[1]
    fig = _figure(8, 5)
    ax = fig.subplots()
    cmap = _cmap("viridis")
    for layer in range(n_layers):
        for h in range(lam.shape[2]):
            ax.plot(steps, lam[:, layer, h], lw=1, alpha=0.7, color=cmap(layer / max(1, n_layers - 1)))
    fig.colorbar(_mappable(cmap, Normalize(0, n_layers - 1)), ax=ax, label="layer")
    _step_axis(ax, steps)
    ax.set_yscale("log")
    ax.set_ylabel("λ_1 = s_1²")
    ax.set_title(f"{sel.key}: leading eigenvalue of {sel.matrix}, every head")
    return fig


def fig_animation(sel: Selection) -> Figure:
    """Animated (GIF): a statistic over the (layer, head) grid per step, with marginal means."""
    steps = _need_steps(sel, "animation")
    v = sel.ds[sel.stat].sel(matrix=sel.matrix).transpose("step", "layer", "head").values
    n_layers, n_heads = v.shape[1:]
    fig = _figure(7.5, 6.5)
    gs = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4))
    ax = fig.add_subplot(gs[1, 0])
    top, right = fig.add_subplot(gs[0, 0], sharex=ax), fig.add_subplot(gs[1, 1], sharey=ax)
    norm = _colour_norm(v)
    im = ax.imshow(v[-1], aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    heads, layers = np.arange(n_heads), np.arange(n_layers)
    (top_line,) = top.plot(heads, np.nanmean(v[-1], axis=0), "o-", ms=3)
    (right_line,) = right.plot(np.nanmean(v[-1], axis=1), layers, "o-", ms=3)
    lo, hi = np.nanmin(v), np.nanmax(v)
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    top.set_ylim(lo - pad, hi + pad)
    right.set_xlim(lo - pad, hi + pad)
    top.set_ylabel("mean over layers")
    right.set_xlabel("mean over heads")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=right, label=sel.stat)

    def update(i: int) -> None:
        im.set_data(v[i])
        top_line.set_ydata(np.nanmean(v[i], axis=0))
        right_line.set_xdata(np.nanmean(v[i], axis=1))
        top.set_title(f"{sel.key}: {sel.stat} of {sel.matrix}, step {steps[i]}")

    update(len(steps) - 1)
    fig.spinjax_animation = (len(steps), update)  # save() writes the frames as a GIF
    return fig


def _cmap(name: str):
    return matplotlib.colormaps[name]


def _mappable(cmap, norm):
    return ScalarMappable(norm=norm, cmap=cmap)


# ---- registry, saving --------------------------------------------------------------------

FIGURES: dict[str, tuple[Callable[[Selection], Figure], str]] = {
    "hist": (fig_hist, "per-head histograms of a layer (linear), Gaussian of same mean/std and core fit"),
    "hist-log": (partial(fig_hist, log=True), "the same histograms on a log density scale"),
    "heatmap": (fig_heatmap, "distribution heatmap of W_Q and W_QK, rows = all heads by layer, log colour"),
    "heads": (fig_heads, "std and entropy per head ordered by layer, with layer separators"),
    "entropy-std": (
        fig_entropy_std, "entropy vs std, all heads and models, with the Gaussian curve; residual vs std"
    ),
    "fit-kl-std": (fig_fit_kl, "core-fit sigma vs std; KL from the Gaussian and from the core fit vs std"),
    "corner": (fig_corner, "corner plot of mean, std, skew, kurt per head with the Pearson bound"),
    "spectrum": (fig_spectrum, "singular values vs index and spectral density P(lambda) per head of a layer"),
    "dist-steps": (fig_dist_steps, "[dynamics] one head's distribution vs step (2D), raw and standardized"),
    "std-kl-steps": (
        partial(_trajectories, name="std-kl-steps", variables=(("std", "std"), ("kl_gauss", "KL(P‖Gauss)"))),
        "[dynamics] std and KL trajectories of every head of a layer, with the layer mean",
    ),
    "stat-steps": (fig_stat_steps, "[dynamics] heatmap of a statistic (--stat) over all heads vs step"),
    "sv-steps": (fig_sv_steps, "[dynamics] lambda_k of one head vs index and step"),
    "leading-eig": (fig_leading, "[dynamics] leading eigenvalue trajectories of every head"),
    "rank-steps": (
        partial(_trajectories, name="rank-steps",
                variables=(("stable_rank", "stable rank"), ("spectral_entropy", "spectral entropy"))),
        "[dynamics] stable rank and spectral entropy trajectories of a layer, with the layer mean",
    ),
    "animation": (fig_animation, "[dynamics] GIF of a statistic (--stat) on the (layer, head) grid by step"),
}  # fmt: skip
"""name -> (function(Selection) -> Figure, one-line description)."""


def make_figure(name: str, data: Any, model: str | None = None, **choices: Any) -> Figure:
    """Figure ``name`` (a key of :data:`FIGURES`) for ``model`` in ``data`` (a store path, a
    :class:`~spinjax.analysis.StoreReader` or a dict of datasets); ``choices`` as :func:`select`."""
    if name not in FIGURES:
        raise InputError(f"no figure {name!r}; choose from {', '.join(FIGURES)} (spinjax plot --list)")
    sel = data if isinstance(data, Selection) else select(data, model, **choices)
    return FIGURES[name][0](sel)


# The most pixels one image may have (512 MB as RGBA): figures grow with the number of heads
# (the histogram grid of a 128-head layer is 84 inches tall), so --dpi alone does not bound them.
MAX_PIXELS = 1 << 27


def save(
    fig: Figure, stem: str | Path, *, formats: tuple[str, ...] = ("png", "pdf"), dpi: int = 100
) -> list[Path]:
    """Write ``stem.png``, ``stem.pdf`` (and ``stem.gif`` for an animated figure); return paths."""
    stem = Path(stem)
    width, height = fig.get_size_inches() * dpi
    if width * height > MAX_PIXELS:
        raise InputError(
            f"--dpi {dpi}: {stem.name} would be {width:.0f} x {height:.0f} pixels, more than "
            f"{MAX_PIXELS}; lower --dpi"
        )
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    anim = getattr(fig, "spinjax_animation", None)
    if anim is not None:
        n_frames, update = anim
        path = stem.with_name(f"{stem.name}.gif")
        writer = PillowWriter(fps=2)
        with writer.saving(fig, str(path), dpi=dpi):
            for i in range(n_frames):
                update(i)
                writer.grab_frame()
        paths.append(path)
    return paths
