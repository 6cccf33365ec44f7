"""Figures of heads as points: pairwise similarity, Ward trees, and the map of trajectories."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import CenteredNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.cluster.hierarchy import dendrogram

from .. import headmaps
from .common import (
    Selection,
    cmap,
    grid_shape,
    layer_colours,
    layer_legend,
    layer_separators,
    legend_below,
    mappable,
    need_steps,
    need_vars,
    new_figure,
)

_PAIRS = "`spinjax run --pairs layer` (the default) or `--pairs model`"


def _cosine_norm(values: np.ndarray) -> CenteredNorm:
    off = values[np.isfinite(values) & (np.abs(values) < 0.999999)]
    return CenteredNorm(0.0, halfrange=float(np.abs(off).max()) if off.size else 1.0)


def _off_diagonal(values: np.ndarray) -> np.ndarray:
    """The matrix with its diagonal (a head against itself) set to NaN, drawn blank."""
    out = np.array(values, dtype=np.float64)
    np.fill_diagonal(out, np.nan)
    return out


def fig_head_pairs(sel: Selection) -> Figure:
    """Cosine similarity of W_QK and JS divergence of the raw distributions between every two
    heads: per layer, or across the whole model when the store has ``--pairs model``."""
    ds = need_vars(sel, "head-pairs", ("qk_cosine", "js_head"), _PAIRS)
    at = ds.sel(step=sel.step)
    model = "qk_cosine_model" in at and bool(np.isfinite(at["qk_cosine_model"].values).any())
    if model:
        return _pairs_model(sel)
    n_layers = at.sizes["layer"]
    cos = headmaps.head_distances(ds, sel.step, kind="cosine").values
    js = headmaps.head_distances(ds, sel.step, kind="js", matrix=sel.matrix).values
    rows, cols = grid_shape(n_layers, 8)
    fig = new_figure(2.2 * cols + 1.6, 2.3 * 2 * rows + 0.8)
    axes = fig.subplots(2 * rows, cols, squeeze=False)
    cnorm = _cosine_norm(cos)
    jnorm = Normalize(0, float(np.nanmax(js)) if np.isfinite(js).any() else 1)
    for layer in range(rows * cols):
        r, c = divmod(layer, cols)
        for k, (values, colours, norm, what) in enumerate(((cos, "RdBu_r", cnorm, "cosine"),
                                                           (js, "viridis", jnorm, "JS"))):  # fmt: skip
            ax = axes[2 * r + k, c]
            if layer >= n_layers:
                ax.set_axis_off()
                continue
            im = ax.imshow(_off_diagonal(values[layer]), cmap=colours, norm=norm, interpolation="nearest")
            ax.set_title(f"L{layer}: {what}", fontsize="small")
            ax.tick_params(labelsize="x-small")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            if c == 0:
                ax.set_ylabel("head")
            if k == 1:
                ax.set_xlabel("head")
            if layer == 0:
                label = "cosine of W_QK (Frobenius)" if k == 0 else f"JS of {sel.matrix} distributions (nats)"
                fig.colorbar(im, ax=axes[k::2].ravel().tolist(), label=label, shrink=0.8)
    fig.suptitle(f"{sel.key}, step {sel.step}: every two heads of a layer (diagonal left blank)")
    return fig


def _pairs_model(sel: Selection) -> Figure:
    ds = sel.model()
    cos = headmaps.head_distances(ds, sel.step, kind="cosine", scope="model")
    js = headmaps.head_distances(ds, sel.step, kind="js", scope="model", matrix=sel.matrix)
    n_layers, n_heads = ds.sizes["layer"], ds.sizes["head"]
    fig = new_figure(13, 6)
    ax0, ax1 = fig.subplots(1, 2)
    im0 = ax0.imshow(_off_diagonal(cos.values), cmap="RdBu_r", norm=_cosine_norm(cos.values),
                     interpolation="nearest")  # fmt: skip
    im1 = ax1.imshow(_off_diagonal(js.values), cmap="viridis", interpolation="nearest")
    fig.colorbar(im0, ax=ax0, label="cosine of W_QK (Frobenius)")
    fig.colorbar(im1, ax=ax1, label=f"JS of {sel.matrix} distributions (nats)")
    for ax in (ax0, ax1):
        layer_separators(ax, n_layers, n_heads, "x", colour="k")
        layer_separators(ax, n_layers, n_heads, "y", colour="k")
        ax.set_xlabel("head, grouped by layer")
        ax.set_ylabel("head, grouped by layer")
    ax0.set_title("cosine similarity")
    ax1.set_title("Jensen-Shannon divergence")
    fig.suptitle(f"{sel.key}, step {sel.step}: every two heads of the model")
    return fig


def fig_head_dendrogram(sel: Selection) -> Figure:
    """Ward trees of the model's heads: from the JS divergence of their distributions, and
    from the cosine of their W_QK when the store has ``--pairs model``."""
    ds = sel.model()
    at = ds.sel(step=sel.step)
    kinds = ["js"]
    if "qk_cosine_model" in at and bool(np.isfinite(at["qk_cosine_model"].values).any()):
        kinds.append("cosine")
    n_layers = ds.sizes["layer"]
    n = n_layers * ds.sizes["head"]
    fig = new_figure(max(9, min(18, 4 + 0.22 * n)), 4.2 * len(kinds) + 0.6)
    axes = np.atleast_1d(fig.subplots(len(kinds), 1))
    colours = layer_colours(n_layers)
    for ax, kind in zip(axes, kinds, strict=True):
        tree, labels = headmaps.ward_tree(ds, sel.step, kind=kind, matrix=sel.matrix)
        out = dendrogram(tree, ax=ax, labels=labels, leaf_rotation=90, color_threshold=0,
                         above_threshold_color="0.3", no_labels=len(labels) > 80)  # fmt: skip
        if len(labels) <= 80:
            for tick in ax.get_xticklabels():
                tick.set_color(colours[int(tick.get_text()[1:].split("H")[0])])
                tick.set_fontsize("x-small")
        else:
            layers = [int(labels[i][1:].split("H")[0]) for i in out["leaves"]]
            ax.scatter(5 + 10 * np.arange(len(layers)), np.zeros(len(layers)), c=[colours[x] for x in layers],
                       marker="s", s=8, clip_on=False)  # fmt: skip
        what = (f"√JS of the {sel.matrix} distributions" if kind == "js"
                else "√(2(1 − cosine)) of W_QK (unit-norm Euclidean)")  # fmt: skip
        ax.set_ylabel("Ward linkage distance")
        heights = tree[:, 2]
        if heights.min() > 0.5 * heights.max():  # nearly equidistant heads: zoom on the merges
            ax.set_ylim(heights.min() - 0.3 * (heights.max() - heights.min()), None)
            ax.set_ylabel("Ward linkage distance (axis not from 0)")
        ax.set_title(f"from {what}")
    layer_legend(axes[0], colours, loc="upper right", ncols=2)
    fig.suptitle(f"{sel.key}, step {sel.step}: heads clustered (Ward), leaves coloured by layer")
    return fig


def _cluster_colours(n: int) -> list:
    """Distinct colours without grey (grey marks noise): tab10 then tab20 less their greys."""
    if n <= 9:
        return [cmap("tab10")(i) for i in range(10) if i != 7][:n]
    if n <= 18:
        return [cmap("tab20")(i) for i in range(20) if i not in (14, 15)][:n]
    return [cmap("turbo")(i / (n - 1)) for i in range(n)]


def fig_trajectory_map(sel: Selection) -> Figure:
    """Every head at every step in a UMAP map of its statistics: paths through training coloured
    by layer; the same points by step; the k-nearest-neighbour graph and HDBSCAN clusters."""
    steps = need_steps(sel, "trajectory-map")
    ds = sel.model()
    points = headmaps.trajectory_map(ds, estimator=sel.estimator)
    n_layers = ds.sizes["layer"]
    colours = layer_colours(n_layers)
    fig = new_figure(16, 5.4)
    ax0, ax1, ax2 = fig.subplots(1, 3, sharex=True, sharey=True)
    for (layer, _head), path in points.groupby(["layer", "head"]):
        path = path.sort_values("step")
        colour = colours[int(layer)]
        ax0.plot(path["x"], path["y"], "-", color=colour, lw=0.8, alpha=0.6)
        ax0.scatter(path["x"], path["y"], s=np.linspace(6, 30, len(path)), color=colour)
    layer_legend(ax0, colours, loc="best")
    ax0.set_title("each head's path through training (dot size grows with step)", fontsize="medium")
    order = {int(s): i for i, s in enumerate(steps)}
    idx = points["step"].map(order).values
    norm = Normalize(0, len(steps) - 1)
    ax1.scatter(points["x"], points["y"], c=idx, cmap="viridis", norm=norm, s=12)
    bar = fig.colorbar(mappable(cmap("viridis"), norm), ax=ax1, label="training step")
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
    bar.set_ticks(ticks, labels=[str(steps[i]) for i in ticks])
    ax1.set_title("coloured by training step", fontsize="medium")
    xy = points[["x", "y"]].values
    nb = points.attrs["neighbours"]
    segments = [(xy[i], xy[j]) for i in range(len(xy)) for j in nb[i]]
    ax2.add_collection(LineCollection(segments, colors="0.7", lw=0.5, zorder=1))
    clusters = sorted(set(points["cluster"]) - {-1})
    ccolours = _cluster_colours(len(clusters))
    noise = points["cluster"].values == -1
    ax2.scatter(xy[noise, 0], xy[noise, 1], s=10, marker="x", color="0.5", label="noise", zorder=2)
    for c, colour in zip(clusters, ccolours, strict=False):
        m = points["cluster"].values == c
        ax2.scatter(xy[m, 0], xy[m, 1], s=14, color=colour, label=f"cluster {c} ({m.sum()})", zorder=2)
    legend_below(ax2, ncols=4)
    ax2.set_title(f"{nb.shape[1]}-nearest-neighbour graph, HDBSCAN clusters", fontsize="medium")
    for ax in (ax0, ax1, ax2):
        ax.set_xlabel("UMAP 1")
    ax0.set_ylabel("UMAP 2")
    n_feat = len(points.attrs["features"])
    fig.suptitle(f"{sel.key}: every head at every step, UMAP of {n_feat} statistics of W_Q, W_K, W_QK "
                 f"({len(points)} points)")  # fmt: skip
    return fig
