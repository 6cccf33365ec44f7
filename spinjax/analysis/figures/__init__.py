"""The study's figures from a store: one small function per figure, one registry.

Every figure function takes a :class:`Selection` (the model's finished steps and the chosen
step, layer, head, matrix, statistic and estimator) and returns a ``matplotlib.figure.Figure``
built without pyplot (no global state, no GUI backend; files are written by the Agg canvas).

>>> from spinjax import open_store
>>> from spinjax.analysis import figures
>>> reader = open_store("store/spinjax.zarr")                          # doctest: +SKIP
>>> fig = figures.make_figure("hist", reader, "tiny-pythia", layer=2)  # doctest: +SKIP
>>> figures.save(fig, "figures/tiny-pythia_hist")   # PNG and PDF       # doctest: +SKIP

:data:`FIGURES` maps each name to a :class:`FigureSpec` (function, one-line description, the
kind of data it needs, the choices it uses); ``spinjax plot --list`` prints it. A figure that
the store cannot support raises :class:`~spinjax.errors.InputError` saying why.

Families: ``one_step`` (one step of one model, or every model at one step), ``dynamics``
(a trajectory), ``geometry`` (heads as points), ``baseline`` (the random-matrix null).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.animation import PillowWriter
from matplotlib.figure import Figure

from ...errors import InputError, writing_to
from . import baseline, dynamics, geometry, measures, one_step
from .common import Selection, select


class FigureSpec(NamedTuple):
    """A registered figure: ``func(Selection) -> Figure``, its one-line description, its kind
    (``model``: one model at one step; ``models``: every model of the selection; ``dynamics``:
    one model's trajectory; ``baseline``: a null ensemble) and the choices it uses (which
    name its files, see :func:`file_stem`)."""

    func: Any
    description: str
    kind: str
    uses: tuple[str, ...]


_ONE = ("step", "layer", "matrix")
_TRAJ = ("layer", "matrix", "estimator")

FIGURES: dict[str, FigureSpec] = {
    "hist": FigureSpec(
        one_step.fig_hist,
        "per-head histograms of a layer (linear), Gaussian of same mean/std and core fit",
        "model",
        _ONE,
    ),
    "hist-log": FigureSpec(
        partial(one_step.fig_hist, log=True), "the same histograms on a log density scale", "model", _ONE
    ),
    "heatmap": FigureSpec(
        one_step.fig_heatmap,
        "z-distribution heatmap of W_Q and W_QK, rows = all heads by layer, log colour",
        "model",
        ("step",),
    ),
    "heatmap-raw": FigureSpec(
        one_step.fig_heatmap_raw,
        "raw-value (weight units) heatmap of W_Q, W_K, W_QK, rows = all heads by layer",
        "model",
        ("step",),
    ),
    "heads": FigureSpec(
        one_step.fig_heads,
        "std and entropy per head ordered by layer, with the null band at each head's scale",
        "model",
        ("step", "matrix", "estimator"),
    ),
    "entropy-std": FigureSpec(
        one_step.fig_entropy_std,
        "[models] entropy vs std, every head of every model, Gaussian and random-W_QK curves",
        "models",
        ("step", "matrix", "estimator"),
    ),
    "fit-kl-std": FigureSpec(
        one_step.fig_fit_kl,
        "[models] core-fit sigma vs std; KL from the Gaussian and from the core fit vs std",
        "models",
        ("step", "matrix", "estimator"),
    ),
    "corner": FigureSpec(
        one_step.fig_corner,
        "[models] corner plot of mean, std, skew, kurt per head, null band, skew-kurt bounds",
        "models",
        ("step", "matrix"),
    ),
    "depth": FigureSpec(
        one_step.fig_depth,
        "[models] a statistic (--stat) vs layer/(n_layers-1), one line per model, heads' range",
        "models",
        ("step", "stat", "estimator"),
    ),
    "core-fit": FigureSpec(
        one_step.fig_core_fit,
        "Gaussian core fit per layer: sigma_fit and std, KL, sigma_fit^2 - std^2",
        "model",
        ("step", "matrix", "estimator"),
    ),
    "spectrum": FigureSpec(
        one_step.fig_spectrum,
        "singular values vs index, each head's lambda, pooled P(lambda) of a layer, with the null",
        "model",
        _ONE,
    ),
    "eig-plane": FigureSpec(
        measures.fig_eig_plane,
        "eigenvalues of W_QK (--matrix W_OV: W_OV) in the complex plane per layer, heads coloured",
        "model",
        ("step", "matrix"),
    ),
    "eig-positivity": FigureSpec(
        measures.fig_eig_positivity,
        "eigenvalue positivity and symmetric fraction per head and layer",
        "model",
        ("step", "matrix"),
    ),
    "ks-normal": FigureSpec(
        measures.fig_ks_normal,
        "Kolmogorov-Smirnov distance from the normal per head and layer (--matrix)",
        "model",
        ("step", "matrix"),
    ),
    "head-pairs": FigureSpec(
        geometry.fig_head_pairs,
        "cosine of W_QK and JS of distributions between every two heads (per layer or model)",
        "model",
        ("step", "matrix"),
    ),
    "head-dendrogram": FigureSpec(
        geometry.fig_head_dendrogram,
        "Ward dendrogram of the model's heads from JS (and cosine with --pairs model)",
        "model",
        ("step", "matrix"),
    ),
    "dist-steps": FigureSpec(
        dynamics.fig_dist_steps,
        "[dynamics] one head's distribution vs step (2D), raw and standardized",
        "dynamics",
        ("step", "layer", "head", "matrix"),
    ),
    "dist-slices": FigureSpec(
        dynamics.fig_dist_slices,
        "[dynamics] one head's distribution at 5 steps on one axis, tails inset (log)",
        "dynamics",
        ("step", "layer", "head", "matrix"),
    ),
    "std-kl-steps": FigureSpec(
        partial(dynamics._trajectories, name="std-kl-steps", variables=("std", "kl_gauss")),
        "[dynamics] std and KL trajectories of every head of a layer, layer mean, null band",
        "dynamics",
        _TRAJ,
    ),
    "stat-steps": FigureSpec(
        dynamics.fig_stat_steps,
        "[dynamics] heatmap of a statistic (--stat) over all heads vs step",
        "dynamics",
        ("matrix", "stat", "estimator"),
    ),
    "sv-steps": FigureSpec(
        dynamics.fig_sv_steps,
        "[dynamics] lambda_k of one head vs index and step",
        "dynamics",
        ("layer", "head", "matrix"),
    ),
    "sv-map": FigureSpec(
        dynamics.fig_sv_map,
        "[dynamics] lambda_k of one head as a step x index map, beside its lines",
        "dynamics",
        ("layer", "head", "matrix"),
    ),
    "leading-eig": FigureSpec(
        dynamics.fig_leading,
        "[dynamics] s_1^2 (largest squared singular value) of every head vs step",
        "dynamics",
        ("matrix",),
    ),
    "rank-steps": FigureSpec(
        partial(dynamics._trajectories, name="rank-steps", variables=("stable_rank", "spectral_entropy")),
        "[dynamics] stable rank and spectral entropy of a layer's heads, layer mean, null band",
        "dynamics",
        _TRAJ,
    ),
    "mode-overlap": FigureSpec(
        dynamics.fig_mode_overlap,
        "[dynamics] singular-vector overlaps of one head between consecutive steps",
        "dynamics",
        ("step", "layer", "head"),
    ),
    "mode-events": FigureSpec(
        dynamics.fig_mode_events,
        "[dynamics] top singular values of one head with crossings and repulsions marked",
        "dynamics",
        ("layer", "head"),
    ),
    "divergence-steps": FigureSpec(
        dynamics.fig_divergence_steps,
        "[dynamics] kl_first, js_first, change_js vs step per layer",
        "dynamics",
        ("matrix",),
    ),
    "trajectory-map": FigureSpec(
        geometry.fig_trajectory_map,
        "[dynamics] UMAP of every head at every step, kNN graph, HDBSCAN clusters",
        "dynamics",
        ("estimator",),
    ),
    "animation": FigureSpec(
        dynamics.fig_animation,
        "[dynamics] GIF of a statistic (--stat) on the (layer, head) grid by step",
        "dynamics",
        ("matrix", "stat", "estimator"),
    ),
    "null-matrix": FigureSpec(
        baseline.fig_null_matrix,
        "[null] full-rank Gaussian vs low-rank W_Q^T W_K: entries, singular values, MP laws",
        "baseline",
        ("baseline",),
    ),
    "null-sweep": FigureSpec(
        baseline.fig_null_sweep,
        "[null] random W_QK's std, entropy, KL, kurtosis vs d_head, with analytic curves",
        "baseline",
        ("baseline", "estimator"),
    ),
}
"""name -> :class:`FigureSpec`."""


def make_figure(name: str, data: Any, model: str | None = None, **choices: Any) -> Figure:
    """Figure ``name`` (a key of :data:`FIGURES`) for ``model`` in ``data`` (a store path, a
    :class:`~spinjax.analysis.StoreReader`, a dict of datasets or a :class:`Selection`);
    ``choices`` as :func:`select`."""
    if name not in FIGURES:
        raise InputError(f"no figure {name!r}; choose from {', '.join(FIGURES)} (spinjax plot --list)")
    sel = data if isinstance(data, Selection) else select(data, model, **choices)
    return FIGURES[name].func(sel)


def file_stem(name: str, sel: Selection) -> str:
    """``MODEL_FIGURE[_stepS][_layerL][_headH][_MATRIX][_STAT][_plugin][_DxDH]``: the figure's
    subject (the model; ``models`` for a cross-model figure drawn without ``--model``;
    ``baseline`` for the null's figures), then the choices given explicitly that it uses."""
    spec = FIGURES[name]
    if spec.kind == "baseline":
        subject = "baseline"
    elif spec.kind == "models" and sel.key is None:
        subject = "models"
    else:
        subject = sel.key
    parts = [f"{subject}_{name}"]
    values = {"step": f"step{sel.step}", "layer": f"layer{sel.layer}", "head": f"head{sel.head}",
              "matrix": sel.matrix, "stat": sel.stat, "estimator": sel.estimator,
              "baseline": sel.baseline}  # fmt: skip
    for choice in ("step", "layer", "head", "matrix", "stat", "estimator", "baseline"):
        if choice in sel.given and choice in spec.uses:
            parts.append(str(values[choice]))
    return "_".join(parts)


# The most pixels one image may have (512 MB as RGBA): figures grow with the number of heads
# (the histogram grid of a 128-head layer is 84 inches tall), so --dpi alone does not bound them.
MAX_PIXELS = 1 << 27


def save(
    fig: Figure, stem: str | Path, *, formats: tuple[str, ...] = ("png", "pdf"), dpi: int = 100
) -> list[Path]:
    """Write ``stem.png``, ``stem.pdf`` (and ``stem.gif`` for an animated figure); return paths.

    An image of more than :data:`MAX_PIXELS`, or a destination that cannot be written, is an
    :class:`~spinjax.errors.InputError` naming it.
    """
    stem = Path(stem)
    width, height = fig.get_size_inches() * dpi
    if width * height > MAX_PIXELS:
        raise InputError(
            f"--dpi {dpi}: {stem.name} would be {width:.0f} x {height:.0f} pixels, more than "
            f"{MAX_PIXELS}; lower --dpi"
        )
    paths = []
    with writing_to(stem.parent, "the figure"):
        stem.parent.mkdir(parents=True, exist_ok=True)
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


__all__ = ["FIGURES", "FigureSpec", "Selection", "file_stem", "make_figure", "save", "select"]
