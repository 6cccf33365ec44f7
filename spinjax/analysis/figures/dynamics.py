"""Training-dynamics figures: distributions, statistics, spectra and singular directions over steps.

Each needs at least two finished steps; the mode and divergence figures also need the
variables that ``spinjax dynamics`` adds.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ...errors import InputError
from .. import study
from .common import (
    NULL_LABEL,
    Selection,
    band_y,
    cmap,
    colour_map,
    colour_norm,
    layer_colours,
    layer_legend,
    layer_separators,
    lognorm,
    mappable,
    need_steps,
    need_vars,
    new_figure,
    occupied,
    step_axis,
    step_ticks,
    z_density,
)


def fig_dist_steps(sel: Selection) -> Figure:
    """One head's distribution at every step: raw values (left) and standardized z (right)."""
    steps = need_steps(sel, "dist-steps")
    d = sel.model().sel(layer=sel.layer, head=sel.head, matrix=sel.matrix)
    dens = z_density(d).transpose("step", "zbin")
    img = dens.values
    sl = occupied(img)
    img, z = img[:, sl], dens["centre"].values[sl]
    zedges = np.append(dens["lower"].values[sl], dens["upper"].values[sl][-1])
    mean, std = d["mean"].values, d["std"].values
    fig = new_figure(12, 1.5 + min(10, 0.25 * len(steps) + 2))
    ax0, ax1 = fig.subplots(1, 2, sharey=True)
    norm = lognorm(img)
    masked = np.where(img > 0, img, np.nan)
    ok = np.isfinite(std) & (std > 0)
    raw_norm = LogNorm(norm.vmin / np.nanmax(std[ok]), norm.vmax / np.nanmin(std[ok])) if ok.any() else norm
    raw = None
    for i in range(len(steps)):
        if ok[i]:
            x = mean[i] + std[i] * zedges
            raw = ax0.pcolormesh(
                x, [i - 0.5, i + 0.5], masked[i : i + 1] / std[i], cmap="magma", norm=raw_norm
            )
    dz = z[1] - z[0] if len(z) > 1 else 1.0
    im = ax1.imshow(masked, aspect="auto", interpolation="nearest", cmap="magma", norm=norm,
                    extent=(z[0] - dz / 2, z[-1] + dz / 2, len(steps) - 0.5, -0.5))  # fmt: skip
    ax0.set_ylim(len(steps) - 0.5, -0.5)
    step_ticks(ax0, steps, "y")
    if "step" in sel.given:
        i = list(steps).index(sel.step)
        for ax in (ax0, ax1):
            ax.axhline(i - 0.5, color="c", lw=1)
            ax.axhline(i + 0.5, color="c", lw=1)
    ax0.set_ylabel("training step")
    ax0.set_xlabel(f"{sel.matrix} entry (weight units)")
    ax0.set_title("raw values")
    ax1.set_xlabel("z = (w - mean) / std")
    ax1.set_title("standardized")
    if raw is not None:
        fig.colorbar(raw, ax=ax0, label=f"density of {sel.matrix} entries (log)")
    fig.colorbar(im, ax=ax1, label="density of z (log)")
    fig.suptitle(f"{sel.key}, layer {sel.layer}, head {sel.head}: {sel.matrix} distribution vs step")
    return fig


def fig_dist_slices(sel: Selection) -> Figure:
    """One head's distribution at five steps as curves on one axis, with the tails (log) inset."""
    steps = need_steps(sel, "dist-slices")
    chosen = study.pick_steps(steps, 5, include=sel.step if "step" in sel.given else None)
    d = sel.model().sel(layer=sel.layer, head=sel.head, matrix=sel.matrix, step=chosen)
    z, dens, factor = _coarse_z_density(d)
    mean, std = d["mean"].values.astype(np.float64), d["std"].values.astype(np.float64)
    fig = new_figure(8.5, 5)
    ax = fig.subplots()
    inset = ax.inset_axes([0.64, 0.5, 0.34, 0.44])
    colours = [cmap("viridis")(0.9 * i / max(1, len(chosen) - 1)) for i in range(len(chosen))]
    peak = 0.0
    for i, s in enumerate(chosen):
        if not (np.isfinite(std[i]) and std[i] > 0):
            continue
        sl = occupied(dens[i])
        x, yy = mean[i] + std[i] * z[sl], dens[i][sl] / std[i]
        ax.plot(x, yy, lw=1.5, color=colours[i], label=f"step {s}")
        inset.plot(x, np.where(yy > 0, yy, np.nan), lw=1, color=colours[i])
        peak = max(peak, float(np.nanmax(yy)))
    width = float(np.nanmax(np.abs(mean) + 4 * std))
    ax.set_xlim(-width, width)
    ax.set_ylim(0, 1.1 * peak if peak > 0 else 1)
    ax.set_xlabel(f"{sel.matrix} entry (weight units)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small", loc="upper left")
    inset.set_yscale("log")
    inset.set_title("tails (log density)", fontsize="small")
    inset.tick_params(labelsize="x-small")
    bins = f"bins of {0.05 * factor:.2g} std"
    ax.set_title(f"{sel.key}, layer {sel.layer}, head {sel.head}: {sel.matrix} distribution at "
                 f"{len(chosen)} steps ({bins})")  # fmt: skip
    return fig


def _coarse_z_density(d) -> tuple[np.ndarray, np.ndarray, int]:
    """Bin centres, densities (step, bin) and the factor of z-histograms merged ``factor`` inner
    bins at a time, so that a small matrix's curves are not lost in counting noise (about 400
    entries per merged bin at the peak; 1 for matrices of 40 000 entries or more)."""
    counts = d["zhist"].transpose("step", "zbin").values.astype(np.float64)
    edges = d["zbin_edges"].values
    n = counts.sum(axis=1, keepdims=True)
    inner = counts[:, 1:-1]
    dz = float(edges[2] - edges[1])
    need = 400 / (0.4 * dz * max(float(n.min()), 1.0))
    factor = next((f for f in (1, 2, 4, 5, 8, 10) if f >= need and inner.shape[1] % f == 0), 10)
    merged = inner.reshape(inner.shape[0], -1, factor).sum(-1)
    lower = edges[1:-1][::factor]
    z = lower + factor * dz / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return z, merged / (n * factor * dz), factor


def _band_over_steps(sel: Selection, var: str):
    """The null band of ``var`` at every step for the layer (mean over its heads), or None."""
    band = sel.band(var, ds=sel.model())
    if band is None:
        return None
    return band.sel(layer=sel.layer, matrix=sel.matrix).mean("head").transpose("step", "band").values


def _trajectories(sel: Selection, name: str, variables: tuple[str, ...]) -> Figure:
    """Each variable vs step for every head of the layer (thin) and the layer mean (thick)."""
    steps = need_steps(sel, name)
    ds = sel.model()
    fig = new_figure(6 * len(variables), 4.5)
    axes = np.atleast_1d(fig.subplots(1, len(variables)))
    for ax, var in zip(axes, variables, strict=True):
        v = sel.stat_of(ds, var).sel(layer=sel.layer, matrix=sel.matrix).transpose("step", "head")
        y = v.values
        label = study.stat_label(var, sel.estimator)
        for h in range(y.shape[1]):
            ax.plot(steps, y[:, h], lw=1, alpha=0.6, label=f"head {h}")
        ax.plot(steps, np.nanmean(y, axis=1), "k-", lw=2.5, label="layer mean")
        band = _band_over_steps(sel, var)
        if band is not None:
            band_y(ax, steps, band, label=NULL_LABEL + " at the layer's scale")
        step_axis(ax, steps)
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} vs step")
    if ds.sizes["head"] <= 12:
        axes[0].legend(fontsize="x-small", ncols=2)
    fig.suptitle(f"{sel.key}, layer {sel.layer}: {sel.matrix}, every head")
    return fig


def fig_stat_steps(sel: Selection) -> Figure:
    """A statistic (``--stat``) of every head (rows, grouped by layer) vs step (columns)."""
    steps = need_steps(sel, "stat-steps")
    v = sel.stat_of(sel.model(), sel.stat).sel(matrix=sel.matrix).transpose("layer", "head", "step")
    n_layers, n_heads = v.sizes["layer"], v.sizes["head"]
    img = v.values.reshape(n_layers * n_heads, len(steps))
    fig = new_figure(min(14, 4 + 0.4 * len(steps)), 1.2 + min(12, 0.12 * n_layers * n_heads + 2))
    ax = fig.subplots()
    im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap=colour_map(sel.stat),
                   norm=colour_norm(img, sel.stat))  # fmt: skip
    layer_separators(ax, n_layers, n_heads, "y", colour="k" if sel.stat.endswith("_z") else None)
    step_ticks(ax, steps, "x")
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("training step")
    ax.set_ylabel("head, grouped by layer")
    ax.set_title(f"{sel.key}: {v.name} of {sel.matrix} per head vs step")
    fig.colorbar(im, ax=ax, label=v.attrs["label"])
    return fig


def fig_sv_steps(sel: Selection) -> Figure:
    """lambda_k = s_k^2 of one head vs index (one line per step) and vs step (one line per k)."""
    steps = need_steps(sel, "sv-steps")
    sv = sel.model()["singular_values"].sel(layer=sel.layer, head=sel.head, matrix=sel.matrix)
    lam = sv.transpose("step", "sv").values.astype(np.float64) ** 2
    k = np.arange(1, lam.shape[1] + 1)
    fig = new_figure(12, 4.5)
    ax0, ax1 = fig.subplots(1, 2)
    colours = cmap("viridis")
    for i in range(len(steps)):
        ax0.plot(k, lam[i], "-", lw=1, color=colours(i / max(1, len(steps) - 1)))
    kmap = cmap("plasma")
    for j in range(lam.shape[1]):
        ax1.plot(steps, lam[:, j], lw=1, color=kmap(j / max(1, lam.shape[1] - 1)))
    bar = fig.colorbar(mappable(colours, Normalize(0, len(steps) - 1)), ax=ax0, label="training step")
    idx = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    bar.set_ticks(idx, labels=[str(steps[i]) for i in idx])
    fig.colorbar(mappable(kmap, Normalize(1, lam.shape[1])), ax=ax1, label="index k")
    for ax in (ax0, ax1):
        ax.set_yscale("log")
        ax.set_ylabel("λ_k = s_k²")
    ax0.set_xlabel("index k")
    ax0.set_title("λ_k vs index, one line per step")
    step_axis(ax1, steps)
    ax1.set_title("λ_k vs step, one line per index")
    fig.suptitle(f"{sel.key}, layer {sel.layer}, head {sel.head}: {sel.matrix} spectrum vs step")
    return fig


def fig_sv_map(sel: Selection) -> Figure:
    """lambda_k = s_k^2 of one head as a map (step x index, colour = value), beside its lines."""
    steps = need_steps(sel, "sv-map")
    sv = sel.model()["singular_values"].sel(layer=sel.layer, head=sel.head, matrix=sel.matrix)
    lam = sv.transpose("step", "sv").values.astype(np.float64) ** 2
    n_k = lam.shape[1]
    fig = new_figure(13, 4.8)
    ax0, ax1 = fig.subplots(1, 2, sharex=True)
    im = ax0.imshow(lam.T, aspect="auto", interpolation="nearest", cmap="viridis", norm=lognorm(lam),
                    extent=(-0.5, len(steps) - 0.5, n_k + 0.5, 0.5))  # fmt: skip
    fig.colorbar(im, ax=ax0, label="λ_k = s_k² (log)")
    ax0.set_ylabel("index k (1 = largest)")
    ax0.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax0.set_title("λ_k map")
    kmap = cmap("plasma")
    x = np.arange(len(steps))
    for j in range(n_k):
        ax1.plot(x, lam[:, j], "-", lw=1, color=kmap(j / max(1, n_k - 1)))
    fig.colorbar(mappable(kmap, Normalize(1, n_k)), ax=ax1, label="index k")
    ax1.set_yscale("log")
    ax1.set_ylabel("λ_k = s_k²")
    ax1.set_title("λ_k vs step, one line per index")
    for ax in (ax0, ax1):
        step_ticks(ax, steps, "x")
        ax.tick_params(axis="x", labelrotation=45)
        ax.set_xlabel("training step (checkpoints, evenly spaced)")
    fig.suptitle(f"{sel.key}, layer {sel.layer}, head {sel.head}: {sel.matrix} spectrum over training")
    return fig


def fig_leading(sel: Selection) -> Figure:
    """The largest squared singular value s_1^2 of every head vs step, coloured by layer."""
    steps = need_steps(sel, "leading-eig")
    lam = sel.model()["spectral_norm"].sel(matrix=sel.matrix).transpose("step", "layer", "head")
    lam = lam.values.astype(np.float64) ** 2
    n_layers = lam.shape[1]
    fig = new_figure(8.5, 5)
    ax = fig.subplots()
    colours = layer_colours(n_layers)
    for layer in range(n_layers):
        for h in range(lam.shape[2]):
            ax.plot(steps, lam[:, layer, h], lw=1, alpha=0.7, color=colours[layer])
    layer_legend(ax, colours, loc="best")
    step_axis(ax, steps)
    ax.set_yscale("log")
    ax.set_ylabel("λ_1 = s_1²")
    ax.set_title(f"{sel.key}: largest squared singular value s_1² of {sel.matrix}, every head")
    return fig


def fig_animation(sel: Selection) -> Figure:
    """Animated (GIF): a statistic over the (layer, head) grid per step, with marginal means."""
    steps = need_steps(sel, "animation")
    var = sel.stat_of(sel.model(), sel.stat).sel(matrix=sel.matrix).transpose("step", "layer", "head")
    v = var.values
    n_layers, n_heads = v.shape[1:]
    fig = new_figure(7.5, 6.5)
    gs = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4))
    ax = fig.add_subplot(gs[1, 0])
    top, right = fig.add_subplot(gs[0, 0], sharex=ax), fig.add_subplot(gs[1, 1], sharey=ax)
    im = ax.imshow(v[-1], aspect="auto", interpolation="nearest", cmap=colour_map(sel.stat),
                   norm=colour_norm(v, sel.stat))  # fmt: skip
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
    fig.colorbar(im, ax=right, label=var.attrs["label"])

    def update(i: int) -> None:
        im.set_data(v[i])
        top_line.set_ydata(np.nanmean(v[i], axis=0))
        right_line.set_xdata(np.nanmean(v[i], axis=1))
        top.set_title(f"{sel.key}: {var.name} of {sel.matrix}, step {steps[i]}")

    update(len(steps) - 1)
    fig.spinjax_animation = (len(steps), update)  # save() writes the frames as a GIF
    return fig


_DYNAMICS = "`spinjax dynamics --model MODEL` on the store"


def _overlap_pairs(sel: Selection, steps: np.ndarray) -> list[int]:
    """The steps ending a stored pair (the first has no predecessor); just ``--step`` if given."""
    if "step" in sel.given:
        if sel.step == steps[0]:
            raise InputError(f"step {sel.step} is the first step: it has no previous step to compare with")
        return [sel.step]
    return [int(s) for s in steps[1:]]


def fig_mode_overlap(sel: Selection) -> Figure:
    """|u_i(previous) . u_j(step)| of one head's top singular vectors, left and right, as mode x
    mode matrices for every pair of consecutive steps (or the pair ending at ``--step``)."""
    steps = need_steps(sel, "mode-overlap")
    ds = need_vars(sel, "mode-overlap", ("overlap_left", "overlap_right"), _DYNAMICS)
    ends = _overlap_pairs(sel, steps)
    prev = {int(s): int(p) for p, s in zip(steps[:-1], steps[1:], strict=True)}
    cols = min(len(ends), 7)
    blocks = -(-len(ends) // cols)
    size = 1.6 if len(ends) > 1 else 3.4
    fig = new_figure(size * cols + 1.4, size * 2 * blocks + 0.9)
    axes = np.atleast_2d(fig.subplots(2 * blocks, cols, squeeze=False))
    k = ds.sizes["mode"]
    im = None
    for i, s in enumerate(ends):
        b, c = divmod(i, cols)
        for r, side in enumerate(("left", "right")):
            ax = axes[2 * b + r, c]
            o = ds[f"overlap_{side}"].sel(step=s, layer=sel.layer, head=sel.head).values
            im = ax.imshow(np.abs(o), vmin=0, vmax=1, cmap="viridis", interpolation="nearest",
                           extent=(0.5, k + 0.5, k + 0.5, 0.5))  # fmt: skip
            ax.set_title(f"{prev[s]} → {s}, {side}", fontsize="small")
            ax.tick_params(labelsize="x-small")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
            if c == 0:
                ax.set_ylabel("mode, previous step", fontsize="small")
            if 2 * b + r == 2 * blocks - 1 or i + cols >= len(ends) and r == 1:
                ax.set_xlabel("mode, this step", fontsize="small")
    for ax in axes.ravel()[2 * blocks * cols :]:
        ax.set_axis_off()
    for i in range(len(ends), blocks * cols):
        b, c = divmod(i, cols)
        axes[2 * b, c].set_axis_off()
        axes[2 * b + 1, c].set_axis_off()
    fig.colorbar(im, ax=axes, label="|overlap| of singular vectors", shrink=0.8)
    fig.suptitle(f"{sel.key}, layer {sel.layer}, head {sel.head}: {sel.matrix}'s top-{k} singular "
                 "directions between consecutive steps (diagonal = kept)")  # fmt: skip
    return fig


def fig_mode_events(sel: Selection) -> Figure:
    """One head's top singular values vs step with level crossings and repulsions marked, and
    the number of events per step over every head of the model."""
    steps = need_steps(sel, "mode-events")
    ds = need_vars(sel, "mode-events", ("mode_event",), _DYNAMICS)
    k = ds.sizes["mode"]
    sv = ds["singular_values"].sel(layer=sel.layer, head=sel.head, matrix="W_QK").transpose("step", "sv")
    s = sv.values[:, :k].astype(np.float64)
    events = ds["mode_event"].sel(layer=sel.layer, head=sel.head).transpose("step", "mode").values
    fig = new_figure(13, 4.8)
    ax0, ax1 = fig.subplots(1, 2, width_ratios=(3, 2))
    colours = [cmap("plasma")(0.85 * j / max(1, k - 1)) for j in range(k)]
    for j in range(k):
        ax0.plot(steps, s[:, j], "-", lw=1.2, color=colours[j], label=f"s_{j + 1}")
    for code, marker, name in ((1, "X", "crossing"), (2, "o", "repulsion")):
        i, j = np.nonzero(events[:, : k - 1] == code)
        y = np.sqrt(s[i, j] * s[i, np.minimum(j + 1, k - 1)])
        ax0.scatter(steps[i], y, marker=marker, s=60, facecolor="none" if code == 2 else "k",
                    edgecolor="k", zorder=3, clip_on=False, label=f"{name} of (k, k+1)")  # fmt: skip
    step_axis(ax0, steps)
    ax0.set_yscale("log")
    ax0.set_ylabel("singular value s_k of W_QK")
    ax0.set_title(f"layer {sel.layer}, head {sel.head}: top {k} singular values")
    ax0.legend(fontsize="x-small", ncols=2)
    every = ds["mode_event"].values
    x = np.arange(len(steps))
    crossings = (every == 1).sum(axis=(1, 2, 3))
    repulsions = (every == 2).sum(axis=(1, 2, 3))
    ax1.bar(x - 0.2, crossings, width=0.4, color="k", label="crossings")
    ax1.bar(x + 0.2, repulsions, width=0.4, color="0.6", label="repulsions")
    step_ticks(ax1, steps, "x")
    ax1.tick_params(axis="x", labelrotation=45)
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("training step (interval ending there)")
    ax1.set_ylabel("events, every head of the model")
    ax1.set_title("level events per step, whole model")
    ax1.legend(fontsize="x-small")
    gap = (ds.attrs.get("dynamics") or {}).get("gap_tol")
    note = f" (gap tolerance {gap})" if gap is not None else ""
    fig.suptitle(f"{sel.key}: level crossings and repulsions of W_QK's singular values{note}")
    return fig


def _spread(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min, mean and max over the last axis; NaN where a row has no finite value."""
    finite = np.isfinite(y)
    some = finite.any(axis=-1)
    safe = np.where(finite, y, 0.0)
    mean = np.where(some, safe.sum(-1) / np.maximum(finite.sum(-1), 1), np.nan)
    lo = np.where(some, np.where(finite, y, np.inf).min(-1), np.nan)
    hi = np.where(some, np.where(finite, y, -np.inf).max(-1), np.nan)
    return lo, mean, hi


_DIVERGENCES = (
    ("kl_first", "KL(P_step ‖ P_first) (nats)"),
    ("js_first", "JS(P_step, P_first) (nats)"),
    ("change_js", "JS(P_step, P_previous) (nats)"),
)


def fig_divergence_steps(sel: Selection) -> Figure:
    """Distance of each head's raw distribution from the first step and from the previous one,
    per layer (mean over heads, the heads' range as a band)."""
    steps = need_steps(sel, "divergence-steps")
    ds = need_vars(sel, "divergence-steps", tuple(v for v, _ in _DIVERGENCES), _DYNAMICS)
    n_layers = ds.sizes["layer"]
    colours = layer_colours(n_layers)
    fig = new_figure(15, 4.6)
    axes = fig.subplots(1, 3)
    for ax, (var, label) in zip(axes, _DIVERGENCES, strict=True):
        v = ds[var].sel(matrix=sel.matrix).transpose("step", "layer", "head").values.astype(np.float64)
        for layer in range(n_layers):
            lo, mean, hi = _spread(v[:, layer])
            ax.plot(steps, mean, "-", lw=1.5, color=colours[layer])
            ax.fill_between(steps, lo, hi, color=colours[layer], alpha=0.15, lw=0)
        step_axis(ax, steps)
        ax.set_ylabel(label)
        pos = v[np.isfinite(v) & (v > 0)]
        if pos.size:  # log above the smallest change, linear down to 0 (identical histograms)
            ax.set_yscale("symlog", linthresh=float(pos.min()), linscale=0.3)
            ax.set_ylim(0, float(pos.max()) * 1.5)
    axes[0].set_title("KL from the first step")
    axes[1].set_title("JS from the first step (at most ln 2)")
    axes[2].set_title("JS from the previous step")
    layer_legend(axes[0], colours, loc="upper left")
    axes[2].legend(handles=[Line2D([], [], color="k"), Line2D([], [], color="k", lw=6, alpha=0.15)],
                   labels=["mean over the layer's heads", "heads' range"], fontsize="x-small")  # fmt: skip
    fig.suptitle(f"{sel.key}: change of the {sel.matrix} element distributions over training, per layer")
    return fig
