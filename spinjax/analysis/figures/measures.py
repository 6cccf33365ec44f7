"""Figures of the eigen measures and the normality distance of one step (``eig-plane``,
``eig-positivity``, ``ks-normal``): each takes a :class:`~spinjax.analysis.figures.Selection`
and returns a ``matplotlib.figure.Figure`` built without pyplot.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ...errors import InputError
from .common import cmap, mappable, new_figure


def _need(ds: xr.Dataset, names: tuple[str, ...], key: str) -> None:
    missing = [n for n in names if n not in ds]
    if missing:
        ov = ", or without --ov" if any(n.startswith("ov_") for n in missing) else ""
        raise InputError(
            f"model {key!r} has no {', '.join(missing)}: its steps were computed by a spinjax without "
            f"them (rerun with --recompute){ov}"
        )


def _circuit(sel: Any) -> str:
    """``ov`` for the OV circuit's matrices (``--matrix W_OV``), else ``qk``."""
    return "ov" if sel.matrix in ("W_V", "W_O", "W_OV") else "qk"


def _head_colours(n_heads: int):
    colours = cmap("tab10" if n_heads <= 10 else "tab20" if n_heads <= 20 else "viridis")
    if n_heads <= 20:
        return [colours(h % colours.N) for h in range(n_heads)], None
    norm = Normalize(0, n_heads - 1)
    return [colours(norm(h)) for h in range(n_heads)], (colours, norm)


def fig_eig_plane(sel: Any) -> Figure:
    """Every head's eigenvalues in the complex plane, one panel per layer, heads coloured."""
    circuit = _circuit(sel)
    _need(sel.model(), (f"{circuit}_eig_re", f"{circuit}_eig_im"), sel.key)
    d = sel.at.transpose("layer", "head", ...)
    re, im = d[f"{circuit}_eig_re"].values, d[f"{circuit}_eig_im"].values  # (layer, head, eig)
    n_layers, n_heads = re.shape[:2]
    cols = min(n_layers, 6)
    rows = -(-n_layers // cols)
    fig = new_figure(2.9 * cols + 1.2, 3.0 * rows + 1.0)  # room for the titles above square panels
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colours, scale = _head_colours(n_heads)
    for layer, ax in enumerate(axes):
        if layer >= n_layers:
            ax.set_axis_off()
            continue
        ax.axhline(0, color="0.8", lw=0.8, zorder=0)
        ax.axvline(0, color="0.8", lw=0.8, zorder=0)
        for h in range(n_heads):
            ax.scatter(re[layer, h], im[layer, h], s=9, color=colours[h], alpha=0.8, lw=0,
                       label=f"head {h}" if layer == 0 else None)  # fmt: skip
        finite = np.abs(np.concatenate([re[layer], im[layer]]))
        finite = finite[np.isfinite(finite)]
        bound = 1.08 * finite.max() if finite.size and finite.max() > 0 else 1.0
        ax.set_xlim(-bound, bound)
        ax.set_ylim(-bound, bound)
        ax.set_aspect("equal")
        ax.set_title(f"layer {layer}", fontsize="medium")
        ax.tick_params(labelsize="x-small")
        if layer % cols == 0:
            ax.set_ylabel("Im λ")
        if layer >= (rows - 1) * cols:
            ax.set_xlabel("Re λ")
    if scale is None:
        fig.legend(loc="outside right center", fontsize="x-small", markerscale=1.5)
    else:
        fig.colorbar(mappable(scale[0], scale[1]), ax=axes.tolist(), label="head", shrink=0.6)
    matrix = "W_OV" if circuit == "ov" else "W_QK"
    fig.suptitle(f"{sel.key}, step {sel.step}: eigenvalues of {matrix}")
    caption = "Re λ > 0: a direction matched with itself; Im λ ≠ 0: a rotation in a plane"
    fig.supxlabel(caption, fontsize="small")
    return fig


def _heatmap(ax, values: np.ndarray, *, scale: str, norm, label: str, fig: Figure, annotate: str) -> None:
    n_layers, n_heads = values.shape
    colours = cmap(scale)
    im = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=colours, norm=norm)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(np.arange(n_heads) if n_heads <= 24 else np.arange(0, n_heads, max(1, n_heads // 12)))
    ax.set_yticks(np.arange(n_layers) if n_layers <= 24 else np.arange(0, n_layers, max(1, n_layers // 12)))
    if n_layers * n_heads <= 24 * 24:  # small grids carry their numbers
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                r, g, b, _ = colours(norm(v))
                colour = "w" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.45 else "k"  # on dark cells
                ax.text(j, i, format(v, annotate), ha="center", va="center", fontsize="xx-small",
                        color=colour)  # fmt: skip
    fig.colorbar(im, ax=ax, label=label)


def fig_eig_positivity(sel: Any) -> Figure:
    """Per head and layer: how far the eigenvalues are positive, and W's symmetric share."""
    circuit = _circuit(sel)
    names = (f"{circuit}_eig_positivity", f"{circuit}_sym_fraction")
    _need(sel.model(), names, sel.key)
    d = sel.at.transpose("layer", "head", ...)
    n_layers, n_heads = d.sizes["layer"], d.sizes["head"]
    fig = new_figure(min(18, 2 * (3 + 0.45 * n_heads)), min(12, 2.2 + 0.35 * n_layers))
    ax0, ax1 = fig.subplots(1, 2)
    _heatmap(ax0, d[names[0]].values, scale="RdBu_r", norm=Normalize(-1, 1),
             label="sum Re λ / sum |λ|", fig=fig, annotate=".2f")  # fmt: skip
    _heatmap(ax1, d[names[1]].values, scale="magma", norm=Normalize(0, 1),
             label="‖(W + Wᵀ)/2‖² / ‖W‖²", fig=fig, annotate=".2f")  # fmt: skip
    matrix = "W_OV" if circuit == "ov" else "W_QK"
    ax0.set_title(f"eigenvalue positivity of {matrix}")
    ax1.set_title(f"symmetric fraction of {matrix}")
    fig.suptitle(f"{sel.key}, step {sel.step}")
    return fig


def fig_ks_normal(sel: Any) -> Figure:
    """Kolmogorov-Smirnov distance from the normal of one matrix, per head and layer."""
    _need(sel.model(), ("ks_normal",), sel.key)
    values = sel.at["ks_normal"].sel(matrix=sel.matrix).transpose("layer", "head").values
    n_layers, n_heads = values.shape
    fig = new_figure(min(14, max(6.5, 3 + 0.45 * n_heads)), min(12, 2.6 + 0.35 * n_layers))  # the title fits
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    _heatmap(ax, values, scale="viridis", norm=Normalize(0, top), label="sup |F_n − Φ|", fig=fig,
             annotate=".3f")  # fmt: skip
    title = f"{sel.key}, step {sel.step}: {sel.matrix}'s KS distance from the normal"
    fig.suptitle(f"{title}\n(exact within 5e-4)")
    return fig
