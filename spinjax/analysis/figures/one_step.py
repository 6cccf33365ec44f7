"""Figures of one step: distributions, per-head statistics, moments, spectra, depth profiles."""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .. import study
from .common import (
    NULL_COLOUR,
    NULL_LABEL,
    Selection,
    band_y,
    discrete_colours,
    gauss,
    grid_shape,
    hband,
    layer_colours,
    layer_separators,
    legend_below,
    lognorm,
    new_figure,
    occupied,
    z_density,
)


def fig_hist(sel: Selection, *, log: bool = False) -> Figure:
    """Per-head distributions of one layer, with N(mean, std) and the core fit overlaid."""
    d = sel.at.sel(layer=sel.layer, matrix=sel.matrix)
    dens = z_density(d).transpose("head", "zbin")
    z = dens["centre"].values
    mean, std, mu_fit, sigma_fit = (d[v].values for v in ("mean", "std", "mu_fit", "sigma_fit"))
    n = d.sizes["head"]
    rows, cols = grid_shape(n, 4)
    fig = new_figure(3.2 * cols, 2.6 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for h, ax in enumerate(axes):
        if h >= n:
            ax.set_axis_off()
            continue
        y = dens.values[h]
        sl = occupied(y)
        ax.set_title(f"head {h}")
        ax.set_xlabel(f"{sel.matrix} entry")
        ax.set_ylabel("density")
        if not (np.isfinite(std[h]) and std[h] > 0):
            ax.text(0.5, 0.5, "no spread", ha="center", transform=ax.transAxes)
            continue
        x, yy = mean[h] + std[h] * z[sl], y[sl] / std[h]
        ax.plot(x, yy, drawstyle="steps-mid", lw=1, label="store histogram")
        xs = np.linspace(x[0], x[-1], 400)
        ax.plot(xs, gauss(xs, mean[h], std[h]), "--", lw=1, label="Gaussian, same mean/std")
        if np.isfinite(sigma_fit[h]) and sigma_fit[h] > 0:
            ax.plot(xs, gauss(xs, mu_fit[h], sigma_fit[h]), ":", lw=1.5, label="Gaussian core fit")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.3 * yy[yy > 0].min())
    axes[0].legend(fontsize="x-small")
    scale = "log" if log else "linear"
    fig.suptitle(f"{sel.key}, step {sel.step}, layer {sel.layer}: {sel.matrix} entries per head ({scale})")
    return fig


def fig_heatmap(sel: Selection) -> Figure:
    """Rows = heads grouped by layer, columns = z bins, colour = density (log), W_Q and W_QK."""
    at = sel.at
    matrices = [m for m in ("W_Q", "W_QK") if m in at["matrix"].values]
    n_layers, n_heads = at.sizes["layer"], at.sizes["head"]
    fig = new_figure(6 * len(matrices), 1.2 + min(12, 0.12 * n_layers * n_heads + 2))
    axes = np.atleast_1d(fig.subplots(1, len(matrices)))
    for ax, m in zip(axes, matrices, strict=True):
        dens = z_density(at.sel(matrix=m)).transpose("layer", "head", "zbin")
        img = dens.values.reshape(n_layers * n_heads, -1)
        sl = occupied(img)
        img, z = img[:, sl], dens["centre"].values[sl]
        dz = z[1] - z[0] if len(z) > 1 else 1.0
        im = ax.imshow(
            np.where(img > 0, img, np.nan), aspect="auto", interpolation="nearest", cmap="magma",
            norm=lognorm(img), extent=(z[0] - dz / 2, z[-1] + dz / 2, len(img) - 0.5, -0.5),
        )  # fmt: skip
        layer_separators(ax, n_layers, n_heads, "y")
        ax.set_xlabel("z = (w - mean) / std")
        ax.set_ylabel("head, grouped by layer")
        ax.set_title(f"{m}")
        fig.colorbar(im, ax=ax, label="density of z (log)")
    fig.suptitle(f"{sel.key}, step {sel.step}: standardized distribution of every head")
    return fig


def _raw_bins(entries: int) -> int:
    """Linear bins of a heatmap row: ~1.5 sqrt(entries), 40 to 120 (a W_Q of 16 x 64 gets 48)."""
    return int(np.clip(1.5 * np.sqrt(entries), 40, 120))


def fig_heatmap_raw(sel: Selection) -> Figure:
    """Rows = heads grouped by layer, columns = raw values (weight units), colour = density (log)."""
    at = sel.at
    matrices = [m for m in ("W_Q", "W_K", "W_QK") if m in at["matrix"].values]
    n_layers, n_heads = at.sizes["layer"], at.sizes["head"]
    fig = new_figure(4.6 * len(matrices) + 0.8, 1.4 + min(12, 0.12 * n_layers * n_heads + 2))
    axes = np.atleast_1d(fig.subplots(1, len(matrices)))
    rows = np.arange(n_layers * n_heads)
    for ax, m in zip(axes, matrices, strict=True):
        d = at.sel(matrix=m).transpose("layer", "head", ...)
        mean, std = d["mean"].values.ravel(), d["std"].values.ravel()
        lim = float(np.nanmax(np.abs(mean) + 4 * std))
        edges = np.linspace(-lim, lim, _raw_bins(int(d["hist"].isel(layer=0, head=0).sum())) + 1)
        img = study.raw_density(d, edges).values.reshape(n_layers * n_heads, -1)
        im = ax.imshow(
            np.where(img > 0, img, np.nan), aspect="auto", interpolation="nearest", cmap="magma",
            norm=lognorm(img), extent=(-lim, lim, len(img) - 0.5, -0.5),
        )  # fmt: skip
        ax.plot(mean - std, rows, "|", color="c", ms=5, mew=1.5)
        ax.plot(mean + std, rows, "|", color="c", ms=5, mew=1.5)
        layer_separators(ax, n_layers, n_heads, "y")
        ax.set_xlabel(f"{m} entry (weight units)")
        ax.set_ylabel("head, grouped by layer")
        ax.set_title(m)
        fig.colorbar(im, ax=ax, label="density (log)")
    title = f"{sel.key}, step {sel.step}: raw values of every head, rows grouped by layer (cyan: mean ± std)"
    fig.suptitle(title)
    return fig


def fig_heads(sel: Selection) -> Figure:
    """Std and entropy of every head, ordered by layer, with the null band per head."""
    d = sel.at.sel(matrix=sel.matrix).transpose("layer", "head", ...)
    n_layers, n_heads = d.sizes["layer"], d.sizes["head"]
    fig = new_figure(min(16, max(8, 4 + 0.08 * n_layers * n_heads)), 5.5)
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(n_layers * n_heads)
    for ax, var in zip(axes, ("std", "entropy"), strict=True):
        v = sel.stat_of(sel.at, var).sel(matrix=sel.matrix).transpose("layer", "head")
        ax.plot(x, v.values.ravel(), "o", ms=3, label=f"{sel.key} heads")
        band = sel.band(var)
        if band is not None:
            b = band.sel(matrix=sel.matrix).transpose("layer", "head", "band").values.reshape(-1, 3)
            ax.vlines(
                x,
                b[:, 0],
                b[:, 2],
                color=NULL_COLOUR,
                lw=4,
                alpha=0.45,
                label=NULL_LABEL + " at each head's scale",
            )
            ax.scatter(x, b[:, 1], marker="_", color="k", s=30, lw=1, label="null mean")
        layer_separators(ax, n_layers, n_heads, "x")
        ax.set_ylabel("std" if var == "std" else study.stat_label("entropy", sel.estimator))
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{sel.key}, step {sel.step}: {sel.matrix} per head, grouped by layer")
    axes[1].set_xlabel("head (grouped by layer)")
    return fig


def _scatter_models(sel: Selection, ax, xvar: str, yvar: str, **kw) -> np.ndarray:
    """One series per model (``sel.models``), all heads; returns all x values."""
    xs = []
    for key, d in sel.cross().items():
        x = sel.stat_of(d, xvar).sel(matrix=sel.matrix).values.ravel()
        y = sel.stat_of(d, yvar).sel(matrix=sel.matrix).values.ravel()
        step = int(d["step"].values)
        ax.plot(x, y, kw.get("marker", "o"), ms=3, alpha=0.8, label=f"{key} (step {step}){kw.get('tag', '')}")
        xs.append(x)
    return np.concatenate(xs)


def _std_grid(std: np.ndarray) -> np.ndarray:
    pos = std[np.isfinite(std) & (std > 0)]
    if not pos.size:
        return np.array([1.0])
    return np.geomspace(pos.min() / 1.15, pos.max() * 1.15, 200)


def _std_axis(ax, std: np.ndarray) -> None:
    """Log std axis when the heads span more than 3x (else linear: no crowded minor labels)."""
    pos = std[np.isfinite(std) & (std > 0)]
    if pos.size and pos.max() / pos.min() > 3:
        ax.set_xscale("log")
    ax.set_xlabel("std σ")


def _null_of(sel: Selection, key: str) -> xr.Dataset | None:
    """Model ``key``'s null, reduced to the matrix matching ``sel.matrix`` (by triple position)."""
    null = sel.null(key)
    if null is None:
        return None
    pos = [str(m) for m in sel.models[key]["matrix"].values].index(sel.matrix) % null.sizes["matrix"]
    return null.isel(matrix=pos)


def _model_colours(sel: Selection) -> dict[str, object]:
    return dict(zip(sel.models, discrete_colours(len(sel.models)), strict=True))


def fig_entropy_std(sel: Selection) -> Figure:
    """Entropy vs std, with the Gaussian S = ln(2 pi e sigma^2)/2 and the random-W_QK curve;
    the residual vs std with the null's band."""
    fig = new_figure(11, 4.5)
    ax0, ax1 = fig.subplots(1, 2)
    std = _scatter_models(sel, ax0, "std", "entropy")
    s = _std_grid(std)
    ax0.plot(s, 0.5 * np.log(2 * np.pi * np.e * s**2), "k-", lw=1, label="Gaussian: ln(2πeσ²)/2")
    _scatter_models(sel, ax1, "std", "entropy_residual")
    ax1.axhline(0, color="k", lw=1)
    colours = _model_colours(sel)
    for key in sel.models:
        null = _null_of(sel, key)
        if null is None:
            continue
        # a null at scale c has (std, S) = (c std0, S0 + ln c): S - ln std is scale-free
        offset = (sel.stat_of(null, "entropy") - np.log(null["std"].astype(np.float64))).values
        q = np.nanquantile(offset, [0.025, 0.975])
        curve = np.stack([np.log(s) + q[0], np.log(s) + np.nanmean(offset), np.log(s) + q[1]], axis=-1)
        colour = colours[key] if len(sel.models) > 1 else NULL_COLOUR
        band_y(ax0, s, curve, colour=colour, label=f"random heads of {key}'s geometry, 95%")
        resid = sel.stat_of(null, "entropy_residual").values
        hband(ax1, [np.nanquantile(resid, 0.025), np.nanmean(resid), np.nanquantile(resid, 0.975)],
              colour=colour, label=f"random heads of {key}'s geometry, 95%")  # fmt: skip
    for ax, var in ((ax0, "entropy"), (ax1, "entropy_residual")):
        _std_axis(ax, std)
        ax.set_ylabel(study.stat_label(var, sel.estimator))
    ax0.legend(fontsize="x-small")
    if len(ax1.get_legend_handles_labels()[0]) > len(sel.models):
        ax1.legend(fontsize="x-small")
    ax0.set_title("entropy vs std")
    ax1.set_title("entropy residual vs std")
    fig.suptitle(f"{sel.matrix}, every head of every layer")
    return fig


def fig_fit_kl(sel: Selection) -> Figure:
    """Core-fit sigma vs std (diagonal = Gaussian), and KL from the Gaussians vs std, with the null."""
    fig = new_figure(11, 4.5)
    ax0, ax1 = fig.subplots(1, 2)
    std = _scatter_models(sel, ax0, "std", "sigma_fit")
    s = _std_grid(std)
    ax0.plot(s, s, "k-", lw=1, label="σ_fit = σ")
    _scatter_models(sel, ax1, "std", "kl_gauss", tag=": KL(P‖N(mean,std))")
    _scatter_models(sel, ax1, "std", "kl_fit", marker="x", tag=": KL(P‖core fit)")
    colours = _model_colours(sel)
    for key in sel.models:
        null = _null_of(sel, key)
        if null is None:
            continue
        colour = colours[key] if len(sel.models) > 1 else NULL_COLOUR
        ratio = (null["sigma_fit"] / null["std"]).values.astype(np.float64)
        r = [np.nanquantile(ratio, 0.025), np.nanmean(ratio), np.nanquantile(ratio, 0.975)]
        band_y(ax0, s, np.outer(s, r), colour=colour, label=f"random heads of {key}'s geometry, 95%")
        kl = sel.stat_of(null, "kl_gauss").values
        hband(ax1, [np.nanquantile(kl, 0.025), np.nanmean(kl), np.nanquantile(kl, 0.975)], colour=colour,
              label=f"KL(P‖N) of random heads ({key}), 95%")  # fmt: skip
    ax0.set_ylabel("σ_fit of the Gaussian core")
    ax1.set_ylabel("KL (nats)" + (" (Miller-Madow)" if sel.estimator == "mm" else " (plug-in)"))
    for ax in (ax0, ax1):
        _std_axis(ax, std)
        ax.legend(fontsize="x-small")
    ax0.set_yscale(ax0.get_xscale())  # the diagonal stays straight
    ax0.set_title("core fit width vs std")
    ax1.set_title("KL divergence vs std")
    fig.suptitle(f"{sel.matrix}, every head of every layer")
    return fig


CORNER = ("mean", "std", "skew", "kurt")
UNIMODAL = 186 / 125  # Klaassen, Mokveld & van Es (2000): skew^2 - kurt <= 186/125 if unimodal


def _corner_groups(sel: Selection) -> list[tuple[str, dict[str, np.ndarray], object]]:
    """(label, values, colour) per group: the layers of one model, or one group per model."""
    groups = []
    if len(sel.cross()) == 1:
        key, d = next(iter(sel.models.items()))
        d = d.sel(matrix=sel.matrix).transpose("layer", "head", ...)
        colours = layer_colours(d.sizes["layer"])
        for i in range(d.sizes["layer"]):
            groups.append((f"L{i}", {v: d[v].values[i].astype(np.float64) for v in CORNER}, colours[i]))
        return groups
    for (key, d), colour in zip(sel.models.items(), discrete_colours(len(sel.models)), strict=True):
        d = d.sel(matrix=sel.matrix)
        step = int(d["step"].values)
        groups.append(
            (f"{key} (step {step})", {v: d[v].values.ravel().astype(np.float64) for v in CORNER}, colour)
        )
    return groups


def _limits(values: list[np.ndarray], extra: list[float] | None = None) -> tuple[float, float]:
    v = np.concatenate([np.ravel(x) for x in values] + [np.asarray(extra or [], np.float64)])
    v = v[np.isfinite(v)]
    if not v.size:
        return -1.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    pad = 0.08 * (hi - lo) if hi > lo else max(abs(lo) * 0.1, 1e-6)
    return lo - pad, hi + pad


def fig_corner(sel: Selection) -> Figure:
    """Pairwise mean, std, skew, kurt of every head (every model of the selection), shared
    axes, the null's band for skew and kurt, and the skew-kurt plane with its bounds."""
    groups = _corner_groups(sel)
    key = sel.key or next(iter(sel.models))
    null = _null_of(sel, key) if key in sel.models else None
    null_q = {}
    if null is not None:
        for v in ("skew", "kurt"):
            x = null[v].values.astype(np.float64)
            null_q[v] = [np.nanquantile(x, 0.025), np.nanmean(x), np.nanquantile(x, 0.975)]
    lims = {v: _limits([g[1][v] for g in groups], null_q.get(v, [None])[::2] if v in null_q else None)
            for v in CORNER}  # fmt: skip
    fig = new_figure(10, 9.5)
    gs = fig.add_gridspec(4, 4)
    axes = np.empty((4, 4), dtype=object)
    for i, yv in enumerate(CORNER):
        for j, xv in enumerate(CORNER[: i + 1]):
            sharex = axes[j, j] if i > j else None
            sharey = axes[i, 0] if 0 < j < i else None
            ax = axes[i, j] = fig.add_subplot(gs[i, j], sharex=sharex, sharey=sharey)
            if i == j:
                data = [g[1][xv][np.isfinite(g[1][xv])] for g in groups]
                ax.hist(data, bins=20, range=lims[xv], stacked=True, color=[g[2] for g in groups])
            else:
                for label, values, colour in groups:
                    ax.scatter(values[xv], values[yv], s=12, color=colour, label=label)
            spans = ((xv, ax.axvspan),) if i == j else ((xv, ax.axvspan), (yv, ax.axhspan))
            for v, span in spans:
                if v in null_q:
                    span(null_q[v][0], null_q[v][2], color=NULL_COLOUR, alpha=0.25, lw=0)
            if i == 3:
                ax.set_xlabel(xv)
            else:
                ax.tick_params(labelbottom=False)
            if j == 0:
                ax.set_ylabel(yv if i else "count")
            elif i != j:
                ax.tick_params(labelleft=False)
        axes[i, i].set_xlim(lims[yv])
        if i:
            axes[i, 0].set_ylim(lims[yv])
    overview = fig.add_subplot(gs[0:2, 2:4])
    _skew_kurt_plane(overview, groups, null)
    legend = fig.add_subplot(gs[0, 1])
    legend.set_axis_off()
    handles = [Line2D([], [], marker="o", ls="", color=c, label=lab) for lab, _, c in groups]
    if null_q:
        label = NULL_LABEL if len(sel.models) == 1 else f"random heads of {key}'s geometry, 95%"
        handles.append(Line2D([], [], color=NULL_COLOUR, lw=6, alpha=0.4, label=label))
    legend.legend(
        handles=handles, loc="center", fontsize="x-small", title="layer" if len(sel.models) == 1 else None
    )
    step = f", step {sel.step}" if len(sel.models) == 1 else ""
    fig.suptitle(f"{', '.join(sel.models)}{step}: {sel.matrix} moments per head")
    return fig


def _skew_kurt_plane(ax, groups: list, null: xr.Dataset | None) -> None:
    """Every head in the (skew, kurt) plane with the bounds on any, unimodal and scale-mixture laws."""
    skew = np.concatenate([g[1]["skew"] for g in groups])
    kurt = np.concatenate([g[1]["kurt"] for g in groups])
    finite = np.isfinite(skew) & np.isfinite(kurt)
    span = max(1.5, float(np.abs(skew[finite]).max()) * 1.2) if finite.any() else 1.5
    top = max(float(kurt[finite].max()) * 1.1 + 0.5, 2.0) if finite.any() else 2.0
    s = np.linspace(-span, span, 300)
    ax.fill_between(s, -2.5, s**2 - 2, color="r", alpha=0.1, lw=0)
    ax.plot(s, s**2 - 2, "r-", lw=1, label="any law: kurt ≥ skew² − 2 (Pearson)")
    ax.plot(s, s**2 - UNIMODAL, "m--", lw=1, label="unimodal: kurt ≥ skew² − 186/125")
    ax.plot([0, 0], [0, top], "b-", lw=2, alpha=0.5, label="Gaussian scale mixtures: skew 0, kurt ≥ 0")
    if null is not None:
        ax.scatter(null["skew"].values, null["kurt"].values, s=3, color=NULL_COLOUR, alpha=0.4,
                   label="random heads (null samples)")  # fmt: skip
    for _, values, colour in groups:
        ax.scatter(values["skew"], values["kurt"], s=14, color=colour)
    ax.set_xlim(-span, span)
    ax.set_ylim(-2.5, top)
    ax.set_xlabel("skew")
    ax.set_ylabel("kurt (excess)")
    ax.set_title("skew–kurt plane and its bounds", fontsize="medium")
    ax.legend(fontsize="xx-small", loc="upper center")


def fig_spectrum(sel: Selection) -> Figure:
    """Singular values vs index, each head's lambda = s^2, and the layer's pooled P(lambda),
    with the null (at the layer's mean scale) where the store has it."""
    at = sel.at
    sv = at["singular_values"].sel(layer=sel.layer, matrix=sel.matrix).values.astype(np.float64)  # head, sv
    n_heads, k = sv.shape
    fig = new_figure(13, 5.2)
    ax0, ax1, ax2 = fig.subplots(1, 3)
    idx = np.arange(1, k + 1)
    colours = discrete_colours(n_heads)
    for h in range(n_heads):
        ax0.plot(idx, sv[h], "o-", ms=3, lw=1, color=colours[h], label=f"head {h}")
    lam = sv**2
    ax1.eventplot([lam[h][np.isfinite(lam[h])] for h in range(n_heads)], lineoffsets=np.arange(n_heads),
                  linelengths=0.7, colors=colours)  # fmt: skip
    null_lam = _null_lambda(sel)
    labels = [f"head {h}" for h in range(n_heads)]
    if null_lam is not None:
        band = sel.band("singular_values").sel(layer=sel.layer, matrix=sel.matrix).mean("head")
        band_y(ax0, idx, band.transpose("sv", "band").values, label=NULL_LABEL + " (layer's mean scale)")
        mean_lam = band.sel(band="mean").values ** 2
        ax1.eventplot([mean_lam], lineoffsets=[n_heads], linelengths=0.7, colors=[NULL_COLOUR])
        ax1.axvspan(np.nanquantile(null_lam, 0.025), np.nanquantile(null_lam, 0.975), color=NULL_COLOUR,
                    alpha=0.2, lw=0)  # fmt: skip
        labels.append("null (mean)")
    ax1.set_yticks(np.arange(len(labels)), labels)
    ax1.set_ylim(len(labels) - 0.5, -0.5)
    pooled = lam[np.isfinite(lam) & (lam > 0)]
    if pooled.size:
        lo, hi = pooled.min(), pooled.max()
        if null_lam is not None:
            lo, hi = min(lo, np.nanquantile(null_lam, 0.001)), max(hi, np.nanquantile(null_lam, 0.999))
        edges = np.geomspace(lo * 0.999, hi * 1.001, int(np.clip(np.sqrt(pooled.size), 6, 40)) + 1)
        counts, _ = np.histogram(pooled, edges)
        ax2.stairs(
            counts / (pooled.size * np.diff(edges)), edges, lw=1.5, label=f"layer {sel.layer}, all heads"
        )
        if null_lam is not None:
            nc, _ = np.histogram(null_lam, edges)
            ax2.stairs(nc / (null_lam.size * np.diff(edges)), edges, color=NULL_COLOUR, ls="--",
                       label="random heads (null)")  # fmt: skip
        legend_below(ax2)
    ax0.set_yscale("log")
    ax0.set_xlabel("index k")
    ax0.set_ylabel("singular value s_k")
    ax0.set_title("singular values (descending)")
    ax1.set_xscale("log")
    ax1.set_xlabel("λ = s²")
    ax1.set_title("each head's λ_k" + (" (grey: null's 95% range)" if null_lam is not None else ""))
    for ax in (ax2,):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("λ = s²")
        ax.set_ylabel("P(λ)")
        ax.set_title("spectral density, heads pooled")
    ax0.xaxis.set_major_locator(MaxNLocator(integer=True))
    if n_heads <= 12:
        legend_below(ax0, ncols=2)
    fig.suptitle(f"{sel.key}, step {sel.step}, layer {sel.layer}: {sel.matrix} spectrum")
    return fig


def _null_lambda(sel: Selection) -> np.ndarray | None:
    """The null's squared singular values (all samples, pooled) at the layer's mean scale."""
    null = sel.null()
    if null is None:
        return None
    pos = [str(m) for m in sel.at["matrix"].values].index(sel.matrix)
    scale = study.matched_scale(sel.at, null).sel(layer=sel.layer).isel(matrix=pos)
    s = null["singular_values"].isel(matrix=pos % null.sizes["matrix"]).values.astype(np.float64)
    return (s * float(scale.mean())).ravel() ** 2


def fig_core_fit(sel: Selection) -> Figure:
    """Gaussian core fit per layer: sigma_fit and std, the KL divergences, sigma_fit^2 - std^2."""
    n_layers, n_heads = sel.at.sizes["layer"], sel.at.sizes["head"]
    offsets = (np.arange(n_heads) - (n_heads - 1) / 2) * (0.5 / max(n_heads, 1))
    x = np.arange(n_layers)[:, None] + offsets[None, :]
    fig = new_figure(13, 5.4)
    ax0, ax1, ax2 = fig.subplots(1, 3, sharex=True)
    panels = (
        (ax0, (("sigma_fit", "o", "σ_fit (core fit)"), ("std", "x", "std"))),
        (ax1, (("kl_gauss", "o", "KL(P‖N(mean, std))"), ("kl_fit", "x", "KL(P‖core fit)"))),
        (ax2, (("fit_excess", "o", "σ_fit² − std²"),)),
    )
    layers = np.arange(n_layers)
    for ax, series in panels:
        for var, marker, label in series:
            v = sel.stat_of(sel.at, var).sel(matrix=sel.matrix).transpose("layer", "head").values
            ax.plot(x.ravel(), v.ravel(), marker, ms=4, ls="", label=f"{label}, each head")
            ax.plot(layers, np.nanmean(v, axis=1), "-", lw=1, color=ax.get_lines()[-1].get_color())
            band = sel.band(var)
            if band is not None and var in ("std", "kl_gauss", "fit_excess"):  # one reference per panel
                b = band.sel(matrix=sel.matrix).mean("head").transpose("layer", "band").values
                band_y(ax, layers, b, label=f"{label}: " + NULL_LABEL)
        ax.set_xlabel("layer")
        legend_below(ax)
    ax2.axhline(0, color="k", lw=0.8)
    ax0.set_ylabel(f"{sel.matrix} width (weight units)")
    ax1.set_ylabel("KL (nats)" + (" (Miller-Madow)" if sel.estimator == "mm" else " (plug-in)"))
    ax2.set_ylabel("σ_fit² − std²")
    ax0.set_title("core width and std")
    ax1.set_title("divergence from the Gaussians")
    ax2.set_title("core variance minus variance")
    ax0.set_xticks(layers)
    fig.suptitle(
        f"{sel.key}, step {sel.step}: Gaussian core fit of {sel.matrix} per layer (lines: layer mean)"
    )
    return fig


def fig_depth(sel: Selection) -> Figure:
    """A statistic (``--stat``, default std) against layer / (n_layers - 1): one line per model
    (mean over heads), the heads' range as a band, the null's band dashed."""
    nulls = {k: n for k in sel.cross() if (n := sel.null(k)) is not None}
    profiles = study.depth_profile(sel.models, sel.stat, estimator=sel.estimator, nulls=nulls)
    first = next(iter(sel.models.values()))
    matrices = [str(m) for m in first["matrix"].values][:3]
    fig = new_figure(4.6 * len(matrices) + 0.5, 4.6)
    axes = np.atleast_1d(fig.subplots(1, len(matrices), sharey=study.SCALE_POWER.get(sel.stat) is not None))
    colours = _model_colours(sel)
    for ax, m in zip(axes, matrices, strict=True):
        for key, prof in profiles.items():
            if m not in prof["matrix"].values:
                continue
            p = prof.sel(matrix=m)
            f = p["layer_fraction"].values
            v = p["value"].values
            step = int(sel.models[key]["step"].values)
            ax.plot(f, v[:, 1], "o-", ms=3, color=colours[key], label=f"{key} (step {step})")
            ax.fill_between(f, v[:, 0], v[:, 2], color=colours[key], alpha=0.2, lw=0)
            if "null" in p:
                b = p["null"].values
                ax.plot(f, b[:, 0], ":", color=colours[key], lw=1)
                ax.plot(f, b[:, 2], ":", color=colours[key], lw=1)
        values = np.concatenate([p["value"].values.ravel() for p in profiles.values()])
        if study.SCALE_POWER.get(sel.stat) and np.all(values[np.isfinite(values)] > 0):
            ax.set_yscale("log")
        if sel.stat.endswith("_z"):  # a z-score: 0 is the null's mean
            ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("depth: layer / (n_layers − 1)")
        ax.set_title(m)
    axes[0].set_ylabel(study.stat_label(sel.stat, sel.estimator))
    handles, labels = axes[-1].get_legend_handles_labels()
    handles += [Line2D([], [], color="0.5", lw=6, alpha=0.3), Line2D([], [], color="0.3", ls=":")]
    labels += ["heads' range (min to max)", "random heads at the heads' scale, 95%"]
    axes[-1].legend(handles, labels, fontsize="x-small")
    fig.suptitle(
        f"{study.stat_label(sel.stat, sel.estimator)} against depth, every model (line: mean over heads)"
    )
    return fig
