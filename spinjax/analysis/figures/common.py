"""What every figure shares: the :class:`Selection` of data and choices, and drawing helpers.

Figures are built without pyplot (no global state, no GUI backend): each function takes a
:class:`Selection` and returns a ``matplotlib.figure.Figure``. A figure that the store cannot
support raises :class:`~spinjax.errors.InputError` saying why (``report`` lists the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.cm import ScalarMappable
from matplotlib.colors import CenteredNorm, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...errors import InputError, nearest
from .. import study
from ..reader import StoreReader, density, open_store, scalar_variables

CHOICES = ("step", "layer", "head", "matrix", "stat", "estimator", "baseline")
NULL_COLOUR = "0.55"
NULL_LABEL = "random heads (null), 95% band"


@dataclass
class Selection:
    """What a figure shows: model ``key`` (dataset ``ds``, finished steps) and the choices.

    ``key`` is None when no model was chosen (a store with several models, or none): then
    only the cross-model and the null-ensemble figures can be drawn. ``models`` holds the
    models of the cross-model figures, ``key`` first, each at one step. ``given`` names the
    choices made explicitly (the others are defaults). ``store`` is the store's path (None
    for datasets handed in directly: no null ensembles then).
    """

    key: str | None
    ds: xr.Dataset | None
    step: int
    layer: int
    head: int
    matrix: str
    stat: str
    models: dict[str, xr.Dataset]
    estimator: str = "mm"
    store: Path | None = None
    baseline: str | None = None
    given: frozenset[str] = frozenset()
    all_models: list[str] = field(default_factory=list)
    _nulls: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def at(self) -> xr.Dataset:
        """The dataset at the chosen step."""
        return self.model().sel(step=self.step)

    def model(self) -> xr.Dataset:
        """The chosen model's dataset; InputError when no model was chosen."""
        if self.ds is None:
            if self.all_models:
                raise InputError(
                    f"the store holds several models, choose one with --model: {', '.join(self.all_models)}"
                )
            raise InputError("the store holds no model (only null ensembles)")
        return self.ds

    def cross(self) -> dict[str, xr.Dataset]:
        """The models of a cross-model figure; InputError when the store has none finished."""
        if not self.models:
            raise InputError("the store holds no model with a finished step (only null ensembles)")
        return self.models

    def null(self, key: str | None = None) -> xr.Dataset | None:
        """The null ensemble of model ``key``'s geometry (default the chosen model), if stored."""
        key = key or self.key
        if self.store is None or key is None:
            return None
        if key not in self._nulls:
            ds = self.ds if key == self.key else self.models[key]
            found = study.model_baseline(self.store, ds)
            self._nulls[key] = found[1] if found else None
        return self._nulls[key]

    def band(self, name: str, ds: xr.Dataset | None = None, key: str | None = None) -> xr.DataArray | None:
        """:func:`~spinjax.analysis.study.null_band` of ``name`` for ``ds`` (default: this step), or None."""
        null = self.null(key)
        if null is None:
            return None
        return study.null_band(self.at if ds is None else ds, null, name, estimator=self.estimator)

    def stat_of(self, ds: xr.Dataset, name: str) -> xr.DataArray:
        """:func:`spinjax.analysis.study.statistic` with this selection's estimator."""
        return study.statistic(ds, name, self.estimator)


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
    estimator: str = "mm",
    baseline: str | None = None,
) -> Selection:
    """Validate the choices (InputError naming what is available) and fill in defaults.

    Defaults: the store's only model (none when it holds several: then only cross-model and
    null-ensemble figures can be drawn), its last finished step, layer 0, head 0. ``others``:
    the models of the cross-model figures (each at its last finished step); ``None`` means
    every model in the store. ``estimator``: ``"mm"`` (Miller-Madow, default) or
    ``"plugin"`` for the entropies and divergences. ``baseline``: the null ensemble
    ``"<d>x<dh>"`` of the null figures (default: the model's geometry).
    """
    chosen = {"step": step, "layer": layer, "head": head, "baseline": baseline}
    given = frozenset(k for k, v in chosen.items() if v is not None)
    defaults = (("matrix", matrix, "W_QK"), ("stat", stat, "std"), ("estimator", estimator, "mm"))
    given |= {k for k, v, d in defaults if v != d}
    if estimator not in study.ESTIMATORS:
        raise InputError(f"--estimator must be one of {', '.join(study.ESTIMATORS)}, not {estimator!r}")
    store = _store_path(data)
    datasets = _datasets(data)
    if model is None and len(datasets) == 1:
        model = next(iter(datasets))
    if model is not None and model not in datasets:
        raise InputError(f"no model {model!r} in the store; it holds {', '.join(datasets) or 'none'}")
    keys = [k for k in (others if others is not None else datasets) if k != model]
    keys = ([model] if model else []) + keys
    for k in keys:
        if k not in datasets:
            raise InputError(f"no model {k!r} in the store; it holds {', '.join(datasets)}")
    if model is None and given & {"step", "layer", "head"}:
        raise InputError("--step, --layer and --head choose within one model: give --model too")
    ds = datasets[model] if model else None
    reference = ds if ds is not None else next(iter(datasets.values()), None)
    if model:
        steps = [int(s) for s in ds["step"].values]
        if not steps:
            raise InputError(f"model {model!r} has no finished step yet")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise InputError(f"model {model!r} has no finished step {step}; nearest: {nearest(step, steps)}")
        layer = _index(ds, "layer", 0 if layer is None else layer, model)
        head = _index(ds, "head", 0 if head is None else head, model)
    if reference is not None:
        matrices = [str(m) for m in reference["matrix"].values]
        if matrix not in matrices:
            raise InputError(f"no matrix {matrix!r}; the store has {', '.join(matrices)}")
        if stat not in scalar_variables(reference) and stat not in study.DERIVED:
            raise InputError(
                f"--stat {stat!r} is not a per-head statistic; choose from {scalar_variables(reference)}"
            )
    if baseline is not None and store is not None and baseline not in study.open_baselines(store):
        held = ", ".join(study.open_baselines(store)) or "none"
        raise InputError(f"no null ensemble baseline/{baseline} in the store; it holds {held}")
    models = {model: ds.sel(step=step)} if model else {}
    models.update({k: datasets[k].isel(step=-1) for k in keys if k != model and datasets[k].sizes["step"]})
    return Selection(model, ds, step if step is not None else -1, layer or 0, head or 0, matrix, stat, models,
                     estimator, store, baseline, given, list(datasets))  # fmt: skip


def _store_path(data: Any) -> Path | None:
    if isinstance(data, str | Path):
        return Path(data)
    if isinstance(data, StoreReader):
        return data.path
    return None


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


# ---- drawing helpers ---------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def grid_shape(n: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(n, max_cols)
    return -(-n // cols), cols


def gauss(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))


def occupied(values: np.ndarray) -> slice:
    """The columns (last axis) holding any positive value, as one slice."""
    cols = np.flatnonzero(np.nansum(np.where(values > 0, values, 0), axis=tuple(range(values.ndim - 1))))
    return slice(cols[0], cols[-1] + 1) if cols.size else slice(0, values.shape[-1])


def lognorm(values: np.ndarray) -> LogNorm:
    pos = values[np.isfinite(values) & (values > 0)]
    return LogNorm(pos.min(), pos.max()) if pos.size else LogNorm(1e-3, 1)


def colour_norm(values: np.ndarray, name: str = "") -> Normalize:
    """Centred on 0 for z-scores (``*_z``), log when positive over > 30x, else linear."""
    finite = values[np.isfinite(values)]
    if name.endswith("_z"):
        return CenteredNorm(0.0, halfrange=float(np.abs(finite).max()) if finite.size else 1.0)
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 30:
        return LogNorm(finite.min(), finite.max())
    return Normalize(*(finite.min(), finite.max()) if finite.size else (0, 1))


def colour_map(name: str) -> str:
    """A diverging map for z-scores (centred on 0 by :func:`colour_norm`), else viridis."""
    return "RdBu_r" if name.endswith("_z") else "viridis"


def layer_separators(ax, n_layers: int, n_heads: int, axis: str = "y", colour: str | None = None) -> None:
    """Lines between layers and one tick per layer, for an axis of heads grouped by layer."""
    line = ax.axhline if axis == "y" else ax.axvline
    for layer in range(1, n_layers):
        line(layer * n_heads - 0.5, color=colour or ("w" if axis == "y" else "0.6"), lw=0.8)
    step = max(1, n_layers // 16)
    ticks = [layer * n_heads + (n_heads - 1) / 2 for layer in range(0, n_layers, step)]
    labels = [f"L{layer}" for layer in range(0, n_layers, step)]
    (ax.set_yticks if axis == "y" else ax.set_xticks)(ticks, labels)


def step_axis(ax, steps: np.ndarray) -> None:
    """Log-like x axis for Pythia-style log-spaced steps (symlog keeps step 0)."""
    pos = steps[steps > 0]
    if steps.min() >= 0 and pos.size and pos.max() / pos.min() > 50:
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(steps.min(), steps.max())
    ax.set_xlabel("training step")


def step_ticks(ax, steps: np.ndarray, axis: str = "x", most: int = 12) -> None:
    """Label image columns (or rows) by step, at most about ``most`` labels."""
    every = max(1, -(-len(steps) // most))
    idx = np.arange(0, len(steps), every)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(idx, [str(s) for s in steps[idx]])


def need_steps(sel: Selection, name: str) -> np.ndarray:
    steps = sel.model()["step"].values
    if len(steps) < 2:
        raise InputError(
            f"figure {name!r} shows training dynamics and needs at least 2 finished steps; "
            f"model {sel.key!r} has {len(steps)} ({', '.join(map(str, steps))})"
        )
    return steps


def need_vars(sel: Selection, name: str, variables: tuple[str, ...], how: str) -> xr.Dataset:
    """The model's dataset, or InputError saying which command writes the missing variables."""
    ds = sel.model()
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise InputError(f"figure {name!r} needs {', '.join(missing)} in model {sel.key!r}: run {how}")
    return ds


def z_density(d: xr.Dataset) -> xr.DataArray:
    return density(d[["zhist", "zbin_edges"]], "z")


def cmap(name: str):
    return matplotlib.colormaps[name]


def mappable(colours, norm):
    return ScalarMappable(norm=norm, cmap=colours)


def discrete_colours(n: int) -> list:
    """``n`` distinct colours: tab10 up to 10, else evenly from viridis (ordered: depth)."""
    if n <= 10:
        return [cmap("tab10")(i) for i in range(n)]
    return [cmap("viridis")(i / max(1, n - 1)) for i in range(n)]


def layer_colours(n_layers: int) -> list:
    """Colours for layers, ordered by depth (a discrete legend, not a colour bar)."""
    return [cmap("viridis")(0.82 * i / max(1, n_layers - 1)) for i in range(n_layers)]  # no pale yellow


def layer_legend(ax_or_fig, colours: list, *, title: str = "layer", most: int = 12, **kw) -> None:
    """A legend with one entry per layer (at most ``most``, evenly thinned)."""
    n = len(colours)
    shown = np.unique(np.linspace(0, n - 1, min(n, most)).round().astype(int))
    handles = [Line2D([], [], marker="o", ls="", color=colours[i], label=f"L{i}") for i in shown]
    ax_or_fig.legend(handles=handles, title=title, fontsize="x-small", title_fontsize="small", **kw)


def legend_below(ax, **kw) -> None:
    """A legend under the axes (constrained layout makes room), where it hides no data."""
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.14), **kw)


def band_y(
    ax,
    x: np.ndarray,
    band: xr.DataArray | np.ndarray,
    *,
    colour: str = NULL_COLOUR,
    label: str | None = NULL_LABEL,
    mean: bool = True,
    alpha: float = 0.25,
) -> None:
    """Shade a null band (last axis: lower, mean, upper) along x, with its mean dashed."""
    b = np.asarray(band, np.float64)
    ax.fill_between(x, b[..., 0], b[..., 2], color=colour, alpha=alpha, lw=0, label=label)
    if mean:
        ax.plot(x, b[..., 1], "--", color=colour, lw=1)


def hband(
    ax,
    band: np.ndarray,
    *,
    colour: str = NULL_COLOUR,
    label: str | None = NULL_LABEL,
    alpha: float = 0.25,
    vertical: bool = False,
) -> None:
    """A constant null band (lower, mean, upper) across the whole axis."""
    lo, mid, hi = (float(v) for v in np.asarray(band, np.float64))
    if not np.isfinite([lo, hi]).all():
        return
    span, line = (ax.axvspan, ax.axvline) if vertical else (ax.axhspan, ax.axhline)
    span(lo, hi, color=colour, alpha=alpha, lw=0, label=label)
    line(mid, color=colour, ls="--", lw=1)


def need_baseline(sel: Selection, name: str) -> tuple[str, xr.Dataset]:
    """The null ensemble a null figure shows: ``--baseline``, else the model's geometry, else
    the store's first; InputError when the store has none."""
    found = study.open_baselines(sel.store) if sel.store is not None else {}
    if not found:
        raise InputError(
            f"figure {name!r} needs a null ensemble in the store: run `spinjax baseline --d D --d-head DH` "
            "or `spinjax run --null`"
        )
    if sel.baseline:
        return sel.baseline, found[sel.baseline]
    if sel.ds is not None:
        own = f"{sel.ds.attrs.get('d_model')}x{sel.ds.attrs.get('d_head')}"
        if own in found:
            return own, found[own]
    key = next(iter(found))
    return key, found[key]
