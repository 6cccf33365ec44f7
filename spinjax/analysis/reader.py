"""Reading a store in analysis scripts: one line to a labelled dataset, and the usual reshapes.

>>> import spinjax
>>> reader = spinjax.open_store("store/spinjax.zarr")   # doctest: +SKIP
>>> reader.models                                       # doctest: +SKIP
['tiny-pythia']
>>> ds = reader["tiny-pythia"]             # finished steps only   # doctest: +SKIP
>>> table = spinjax.tidy(ds, variables=["std", "kurt"])         # doctest: +SKIP
>>> dens = spinjax.density(ds.sel(step=1280, layer=0), kind="z")  # doctest: +SKIP

Only numpy, pandas, xarray and zarr are imported here (no JAX), so opening a store is quick.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .. import store
from ..errors import InputError
from ..kernels import bins
from ..store import BASE_DIMS

_HIST = {"z": ("zhist", "zbin", "zbin_edges"), "raw": ("hist", "bin", "bin_edges")}


class UnknownModelError(InputError, KeyError):
    """A model key that the store does not hold (a ``KeyError`` for ``reader[key]`` too)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Completeness:
    """How far a model's requested steps got: ``done`` of ``requested``."""

    steps_done: list[int] = field(default_factory=list)
    steps_pending: list[int] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.steps_done)

    @property
    def requested(self) -> int:
        return len(self.steps_done) + len(self.steps_pending)

    @property
    def complete(self) -> bool:
        return not self.steps_pending


class StoreReader:
    """A spinjax store opened for reading (see :func:`open_store`).

    ``reader.models`` lists the model keys, ``reader.completeness[key]`` says which steps are
    done, ``reader[key]`` (or ``reader.dataset(key)``) gives the model's ``xarray.Dataset``
    holding only finished steps; ``reader.dataset(key, include_unfinished=True)`` gives all
    requested steps (values of unfinished ones are not to be trusted, ``done`` says which).
    Datasets are lazy: values are read from disk when indexed or ``.load()``-ed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.root = store.open_store(self.path)

    @property
    def models(self) -> list[str]:
        """Model keys (group names), sorted."""
        return store.model_keys(self.root)

    @property
    def completeness(self) -> dict[str, Completeness]:
        """Per model key, the finished and the pending (requested, not done) steps."""
        out = {}
        for key in self.models:
            group = self.root[key]
            steps = [int(s) for s in group["step"][:]]
            done = np.asarray(group["done"][:], dtype=bool)
            out[key] = Completeness(
                [s for s, d in zip(steps, done, strict=True) if d],
                [s for s, d in zip(steps, done, strict=True) if not d],
            )
        return out

    def attrs(self, key: str) -> dict[str, Any]:
        """The model group's attributes (source, architecture, geometry, runs)."""
        self._check(key)
        return dict(self.root[key].attrs)

    def dataset(self, key: str, *, include_unfinished: bool = False) -> xr.Dataset:
        """The model's Dataset: dims (step, layer, head, matrix[, zbin | bin | sv]).

        Only steps whose ``done`` is true unless ``include_unfinished``. The key is kept in
        ``ds.attrs["model"]`` and as the scalar coordinate ``model``.

        >>> ds = spinjax.open_store("store/spinjax.zarr").dataset("tiny-pythia")  # doctest: +SKIP
        >>> ds["std"].sel(matrix="W_QK", layer=0).to_pandas()   # (step x head)  # doctest: +SKIP
        """
        self._check(key)
        ds = xr.open_zarr(self.path, group=key, chunks=None)
        for name in ("matrix", "revision"):  # numpy StringDType -> plain unicode for pandas
            if name in ds.coords:
                ds = ds.assign_coords({name: (ds[name].dims, _str(ds[name].values))})
        if not include_unfinished:
            ds = ds.isel(step=np.flatnonzero(ds["done"].values))
        ds.attrs["model"] = key
        return ds.assign_coords(model=key)

    def datasets(self, *, include_unfinished: bool = False) -> dict[str, xr.Dataset]:
        """Every model's Dataset, keyed by model."""
        return {k: self.dataset(k, include_unfinished=include_unfinished) for k in self.models}

    def __getitem__(self, key: str) -> xr.Dataset:
        return self.dataset(key)

    def __contains__(self, key: object) -> bool:
        return key in self.models

    def __iter__(self):
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def __repr__(self) -> str:
        lines = [f"<spinjax store {self.path}>"]
        for key, c in self.completeness.items():
            lines.append(f"  {key}: steps done {c.done} / requested {c.requested}")
        return "\n".join(lines)

    def _check(self, key: str) -> None:
        if key not in self.models:
            raise UnknownModelError(
                f"{self.path}: no model {key!r} in the store; it holds {', '.join(self.models) or 'none'}"
            )


def open_store(path: str | Path) -> StoreReader:
    """Open a spinjax store for reading (refusing another schema), without importing JAX.

    >>> reader = spinjax.open_store("store/spinjax.zarr")   # doctest: +SKIP
    >>> {k: (c.done, c.requested) for k, c in reader.completeness.items()}   # doctest: +SKIP
    {'tiny-pythia': (14, 14)}
    >>> ds = reader["tiny-pythia"]                          # doctest: +SKIP
    """
    return StoreReader(path)


def _str(values: np.ndarray) -> np.ndarray:
    """Plain fixed-width unicode (zarr gives numpy's variable-width StringDType)."""
    return np.array([str(v) for v in np.ravel(values).tolist()], dtype=str).reshape(np.shape(values))


# ---- helpers on datasets ----------------------------------------------------------------


def _model_of(ds: xr.Dataset, default: str = "") -> str:
    if "model" in ds.coords and ds["model"].ndim == 0:
        return str(ds["model"].values)
    return str(ds.attrs.get("model", default))


def _as_mapping(data: Any) -> dict[str, xr.Dataset]:
    """Dataset | Mapping[key, Dataset] | StoreReader | iterable of Datasets -> {key: ds}."""
    if isinstance(data, xr.Dataset):
        return {_model_of(data): data}
    if isinstance(data, StoreReader):
        return data.datasets()
    if isinstance(data, Mapping):
        return dict(data)
    out = {}
    for i, ds in enumerate(data):
        out[_model_of(ds, f"model{i}")] = ds
    return out


def scalar_variables(ds: xr.Dataset) -> list[str]:
    """Names of the variables with dims exactly (step, layer, head, matrix)."""
    return [n for n, v in ds.data_vars.items() if tuple(v.dims) == BASE_DIMS]


def tidy(data: Any, variables: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (model, step, layer, head, matrix), the scalar statistics as columns.

    ``data``: a Dataset (from :meth:`StoreReader.dataset`), a mapping key -> Dataset, a list of
    Datasets or a :class:`StoreReader` (all models, finished steps). ``variables`` defaults to
    every (step, layer, head, matrix) variable. Columns: ``model, step, revision, layer,
    layer_fraction, head, matrix`` and the variables; ``layer_fraction = layer / (n_layers - 1)``.

    >>> df = spinjax.tidy(ds, variables=["std", "entropy"])   # doctest: +SKIP
    >>> df.groupby(["layer", "matrix"])["std"].mean()         # doctest: +SKIP
    """
    frames = []
    for key, ds in _as_mapping(data).items():
        names = list(variables) if variables is not None else scalar_variables(ds)
        bad = [n for n in names if n not in ds.data_vars or tuple(ds[n].dims) != BASE_DIMS]
        if bad:
            raise InputError(f"tidy: not (step, layer, head, matrix) variables: {bad}")
        shape = tuple(ds.sizes[d] for d in BASE_DIMS)
        idx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
        layers = ds["layer"].values
        n_layers = int(ds.attrs.get("n_layers", len(layers)))
        cols: dict[str, Any] = {"model": np.full(idx[0].size, key, dtype=object)}
        cols["step"] = ds["step"].values[idx[0]].ravel()
        if "revision" in ds.coords:
            cols["revision"] = _str(ds["revision"].values)[idx[0]].ravel()
        cols["layer"] = layers[idx[1]].ravel()
        cols["layer_fraction"] = cols["layer"] / max(n_layers - 1, 1)
        cols["head"] = ds["head"].values[idx[2]].ravel()
        cols["matrix"] = _str(ds["matrix"].values)[idx[3]].ravel()
        for n in names:
            cols[n] = np.asarray(ds[n].transpose(*BASE_DIMS).values).ravel()
        frames.append(pd.DataFrame(cols))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def density(ds: xr.Dataset | xr.DataArray, kind: str = "z", *, tails: str = "exclude") -> xr.DataArray:
    """Histogram densities count / (n * bin width), with bin centres as the coordinate ``centre``.

    ``kind="z"`` uses ``zhist`` on ``zbin_edges`` (density of z = (w - mean) / std),
    ``kind="raw"`` uses ``hist`` on the shared raw grid ``bin_edges`` (density of w).
    ``ds`` is a Dataset holding the counts and edges (any selection of it), or the counts
    DataArray itself (edges then from the standard grids). n is the total count including the
    two unbounded tail bins, so the densities integrate to ``1 - tail_fraction`` (a coordinate;
    for ``kind="z"`` it equals the stored ``tail_mass``). The tail bins have infinite width:
    ``tails="exclude"`` (default) drops them; ``tails="keep"`` keeps them with density NaN
    and centre -inf / +inf. Bin centres are arithmetic midpoints (also of the log-spaced raw
    bins); coordinates ``lower``, ``upper``, ``width`` give the bins. With n = 0 (no finite
    entry, or std = 0 for z) every density is NaN.

    >>> d = spinjax.density(ds.sel(step=1280, layer=0, head=1, matrix="W_QK"))  # doctest: +SKIP
    >>> (d * d.width).sum().item() + d.tail_fraction.item()    # 1.0        # doctest: +SKIP
    >>> d.plot(x="centre")                                     # doctest: +SKIP
    """
    if kind not in _HIST:
        raise InputError(f"density: kind must be 'z' or 'raw', not {kind!r}")
    if tails not in ("exclude", "keep"):
        raise InputError(f"density: tails must be 'exclude' or 'keep', not {tails!r}")
    var, dim, edges_name = _HIST[kind]
    if isinstance(ds, xr.DataArray):
        counts = ds
        edges = _standard_edges(kind)
    else:
        if var not in ds:
            raise InputError(f"density: the dataset has no {var!r} variable")
        counts = ds[var]
        edges = ds[edges_name].values if edges_name in ds else _standard_edges(kind)
    counts = counts.astype(np.float64)
    n = counts.sum(dim)
    lower, upper = edges[:-1], edges[1:]
    width = upper - lower
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = counts / (n * xr.DataArray(width, dims=dim))
        tail = (counts.isel({dim: 0}) + counts.isel({dim: -1})) / n
    centre = np.where(np.isfinite(width), (lower + upper) / 2, np.where(lower < 0, -np.inf, np.inf))
    dens = dens.where(np.isfinite(xr.DataArray(width, dims=dim)))
    dens = dens.assign_coords(
        centre=(dim, centre), lower=(dim, lower), upper=(dim, upper), width=(dim, width),
        tail_fraction=tail.where(n > 0),
    )  # fmt: skip
    if tails == "exclude":
        dens = dens.isel({dim: slice(1, -1)})
    dens.name = "density"
    dens.attrs.update(kind=kind, unit="1/z" if kind == "z" else "1/weight")
    return dens


def _standard_edges(kind: str) -> np.ndarray:
    return bins.zbin_edges() if kind == "z" else bins.bin_edges()


def layer_fraction(ds: xr.Dataset) -> xr.DataArray:
    """``layer / (n_layers - 1)`` along ``layer`` (0 for a one-layer model)."""
    n_layers = int(ds.attrs.get("n_layers", ds.sizes["layer"]))
    return ds["layer"].astype(np.float64) / max(n_layers - 1, 1)


def align_layers(
    datasets: Any,
    variables: Sequence[str] | None = None,
    *,
    grid: int | Sequence[float] | None = None,
    step: int | str | None = "last",
) -> xr.Dataset:
    """Put several models on one depth axis, ``layer_fraction = layer / (n_layers - 1)``.

    Returns one Dataset with dims ``(model, layer_fraction, ...)``. Without ``grid`` the
    fractions are the union of every model's exact fractions (NaN where a model has no layer
    there); with ``grid`` (a number of points on [0, 1], or the fractions themselves) each
    model is linearly interpolated between its two nearest layers. ``step="last"`` takes each
    model's last step (then ``step`` becomes a per-model coordinate), an int selects that
    step in every model, ``None`` keeps the step dimension (outer join across models). Other
    dims (head, matrix, ...) are outer-joined too: models with fewer heads get NaN.
    ``variables`` defaults to the scalar statistics.

    >>> a = spinjax.align_layers(reader, ["std", "kurt"], grid=11)     # doctest: +SKIP
    >>> a["std"].sel(matrix="W_QK").mean("head").to_pandas()   # model x fraction  # doctest: +SKIP
    """
    mapping = _as_mapping(datasets)
    if not mapping:
        raise InputError("align_layers: no datasets")
    aligned = []
    for key, ds in mapping.items():
        names = list(variables) if variables is not None else scalar_variables(ds)
        d = ds[names]
        if step == "last":
            if not ds.sizes.get("step"):
                raise InputError(f"align_layers: model {key!r} has no finished step")
            d = d.isel(step=-1)
        elif step is not None:
            if int(step) not in ds["step"].values:
                raise InputError(f"align_layers: model {key!r} has no step {step}")
            d = d.sel(step=int(step))
        frac = layer_fraction(ds).values
        d = d.drop_vars([c for c in ("model",) if c in d.coords])
        if grid is None:
            d = d.assign_coords(layer_fraction=("layer", frac)).swap_dims(layer="layer_fraction")
            d = d.drop_vars("layer")
        else:
            d = _interp_layers(d, frac, _grid(grid))
        aligned.append(d)
    out = xr.concat(
        aligned, dim=pd.Index(list(mapping), name="model"), join="outer",
        coords="different", compat="equals", combine_attrs="drop",
    )  # fmt: skip
    out = out.assign_coords(model=_str(np.array(list(mapping))))
    return out.sortby("layer_fraction")


def _grid(grid: int | Sequence[float]) -> np.ndarray:
    if isinstance(grid, int | np.integer):
        if grid < 2:
            raise InputError("align_layers: grid needs at least 2 points")
        return np.linspace(0.0, 1.0, int(grid))
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or np.any((g < 0) | (g > 1)):
        raise InputError("align_layers: grid fractions must lie in [0, 1]")
    return g


def _interp_layers(d: xr.Dataset, frac: np.ndarray, grid: np.ndarray) -> xr.Dataset:
    """Linear interpolation along ``layer`` (fractions ``frac``, ascending) onto ``grid``."""
    if len(frac) == 1:
        lo = hi = np.zeros(len(grid), dtype=int)
        w = np.zeros(len(grid))
    else:
        hi = np.clip(np.searchsorted(frac, grid, side="right"), 1, len(frac) - 1)
        lo = hi - 1
        w = (grid - frac[lo]) / (frac[hi] - frac[lo])
    dim = "layer_fraction"
    a = d.isel(layer=xr.DataArray(lo, dims=dim)).astype(np.float64)
    b = d.isel(layer=xr.DataArray(hi, dims=dim)).astype(np.float64)
    w = xr.DataArray(w, dims=dim)
    out = a * (1 - w) + b * w
    return out.drop_vars("layer", errors="ignore").assign_coords(layer_fraction=(dim, grid))
