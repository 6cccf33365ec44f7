"""What the study's figures compute from a store, as xarray objects (numpy/xarray only, no JAX).

- :func:`statistic`: a stored statistic or one derived from stored ones, with the estimator
  of the entropies and divergences chosen (Miller-Madow by default) and a label saying which;
- :func:`open_baselines`, :func:`model_baseline`: the random-matrix null ensembles of a store
  (groups ``baseline/<d>x<dh>`` written by ``spinjax baseline`` or ``run --null``);
- :func:`matched_scale`, :func:`null_band`: the null's mean and 95% band of a statistic at
  every head's own scale;
- :func:`baseline_sweep`: W_QK's element statistics across the ``d_head`` of one ``d``, in
  the study's scaling (see :mod:`spinjax.analysis.rmt`);
- :func:`depth_profile`: a statistic against ``layer / (n_layers - 1)`` for several models;
- :func:`rebin`, :func:`raw_density`: histograms moved onto another grid (e.g. the shared
  log-spaced raw grid onto a linear one);
- :func:`pick_steps`: a few steps spread over a trajectory.

>>> import spinjax
>>> from spinjax import study
>>> reader = spinjax.open_store("store/spinjax.zarr")              # doctest: +SKIP
>>> ds = reader["tiny-pythia"]                                     # doctest: +SKIP
>>> key, null = study.model_baseline(reader.path, ds)              # doctest: +SKIP
>>> band = study.null_band(ds, null, "kl_gauss")    # Miller-Madow  # doctest: +SKIP
>>> band.sel(band="upper", matrix="W_QK", step=1280, layer=0)       # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ..errors import InputError
from ..store.schema import BASELINE_GROUP
from .rmt import study_scale

DERIVED = ("entropy_residual_mm", "kl_fit_mm", "fit_excess", "lambda_1")
"""Statistics :func:`statistic` derives from stored ones (besides the stored variables)."""
ESTIMATORS = ("mm", "plugin")
BAND = ("lower", "mean", "upper")
"""Coordinate of the ``band`` dimension: 2.5% quantile, mean, 97.5% quantile (or min, mean, max)."""

# how a statistic changes when the matrix is multiplied by s > 0: times s^power, or + ln(s);
# the same split as spinjax.kernels.null (SCALE_MUL, SCALE_LOG), kept here without JAX
SCALE_POWER = {
    **dict.fromkeys(("mean", "std", "min", "max", "mu_fit", "sigma_fit", "spectral_norm",
                     "frobenius_norm", "singular_values"), 1),  # fmt: skip
    "fit_excess": 2, "lambda_1": 2,
}  # fmt: skip
SCALE_LOG = ("entropy", "entropy_mm")

_MM = {"entropy": "entropy_mm", "kl_gauss": "kl_gauss_mm", "entropy_residual": "entropy_residual_mm",
       "kl_fit": "kl_fit_mm"}  # fmt: skip
_LABELS = {
    "entropy": "entropy S (nats)", "entropy_residual": "S − S_gauss (nats)",
    "kl_gauss": "KL(P‖N(mean, std)) (nats)", "kl_fit": "KL(P‖core fit) (nats)",
    "fit_excess": "σ_fit² − std²", "lambda_1": "λ_1 = s_1²", "std": "std", "kurt": "excess kurtosis",
    "skew": "skewness", "sigma_fit": "σ_fit", "stable_rank": "stable rank",
    "spectral_entropy": "spectral entropy (nats)",
}  # fmt: skip


def statistic(ds: xr.Dataset, name: str, estimator: str = "mm") -> xr.DataArray:
    """Statistic ``name`` of a model dataset or a null ensemble, stored or derived.

    With ``estimator="mm"`` (default) the histogram-based ``entropy``, ``kl_gauss``,
    ``entropy_residual`` and ``kl_fit`` are their Miller-Madow companions: the stored
    ``entropy_mm``, ``kl_gauss_mm``, and ``entropy_residual_mm = entropy_mm - 0.5 ln(2 pi e
    std^2)``, ``kl_fit_mm = kl_fit - (kl_gauss - kl_gauss_mm)`` (the correction is that of the
    histogram's entropy, the same for any reference law); ``"plugin"`` gives the plug-in ones.
    Also derived: ``fit_excess = sigma_fit^2 - std^2`` and ``lambda_1 = spectral_norm^2``.
    Any other name is returned as stored. ``attrs["label"]`` says what it is (and which
    estimator); the name is the variable's (e.g. ``entropy_mm``).
    """
    if estimator not in ESTIMATORS:
        raise InputError(f"--estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")
    base = name.removesuffix("_mm")
    if base in _MM and (estimator == "mm" or name.endswith("_mm")):
        out = _mm(ds, base)
        note = " (Miller-Madow)"
    elif name == "fit_excess":
        out, note = ds["sigma_fit"].astype(np.float64) ** 2 - ds["std"].astype(np.float64) ** 2, ""
    elif name == "lambda_1":
        out, note = ds["spectral_norm"].astype(np.float64) ** 2, ""
    elif name in ds.data_vars:
        out = ds[name]
        note = " (plug-in)" if base in _MM else ""
    else:
        raise InputError(f"no statistic {name!r} in the dataset")
    label = _LABELS.get(base, name)
    if name.endswith("_z"):
        label = f"{name.removesuffix('_z')}: z-score against the random-matrix null"
    out = out.rename(_MM[base] if note == " (Miller-Madow)" else name)
    out.attrs = {"label": label + note, "estimator": estimator}
    return out


def _mm(ds: xr.Dataset, base: str) -> xr.DataArray:
    if base in ("entropy", "kl_gauss"):
        return ds[f"{base}_mm"]
    if base == "entropy_residual":
        std = ds["std"].astype(np.float64)
        return ds["entropy_mm"] - 0.5 * np.log(2 * np.pi * np.e * std**2)
    return ds["kl_fit"] - (ds["kl_gauss"] - ds["kl_gauss_mm"])


def stat_label(name: str, estimator: str = "mm") -> str:
    """The axis label of :func:`statistic` without computing it."""
    base = name.removesuffix("_mm")
    if name.endswith("_z"):
        return f"{name.removesuffix('_z')}: z-score against the random-matrix null"
    if base in _MM:
        return _LABELS[base] + (
            " (Miller-Madow)" if estimator == "mm" or name.endswith("_mm") else " (plug-in)"
        )
    return _LABELS.get(name, name)


# ---- null ensembles in a store ----------------------------------------------------------


def open_baselines(store: str | Path) -> dict[str, xr.Dataset]:
    """Every ``baseline/<d>x<dh>`` group of a store, keyed ``"<d>x<dh>"``, by (d, d_head).

    Opened once while the groups stay the same (a figure, a report and their checks ask many
    times; opening them costs ~0.2 s): a null written or recomputed since is a new group, with
    a new ``zarr.json``, and is opened afresh."""
    path = Path(store)
    if not (path / "zarr.json").is_file():
        raise InputError(f"{path}: not a Zarr store (no zarr.json)")
    try:
        groups = [(m.parent.name, (st := m.stat()).st_ino, st.st_mtime_ns)
                  for m in (path / BASELINE_GROUP).glob("*/zarr.json")]  # fmt: skip
    except OSError:
        groups = None  # changing under us: no reuse
    if groups is None:
        return _open_baselines(path)
    return dict(_open_baselines_at(str(path.resolve()), tuple(sorted(groups))))


@functools.lru_cache(maxsize=8)
def _open_baselines_at(path: str, groups: tuple) -> dict[str, xr.Dataset]:
    return _open_baselines(Path(path))


def _open_baselines(path: Path) -> dict[str, xr.Dataset]:
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    if BASELINE_GROUP not in root:
        return {}
    names = [k for k in root[BASELINE_GROUP].group_keys() if "x" in k]
    out = {}
    for name in sorted(names, key=_geometry):
        ds = xr.open_zarr(path, group=f"{BASELINE_GROUP}/{name}", chunks=None)
        if "matrix" in ds.coords:
            ds = ds.assign_coords(matrix=[str(m) for m in ds["matrix"].values])
        out[name] = ds
    return out


def _geometry(name: str) -> tuple[int, int]:
    d, dh = name.split("x", 1)
    return int(d), int(dh)


def model_baseline(store: str | Path, ds: xr.Dataset) -> tuple[str, xr.Dataset] | None:
    """The null of a model's geometry, ``(key, dataset)``: the group its ``run --null``
    used (attribute ``features``), else ``baseline/<d_model>x<d_head>`` if present, else None."""
    features = ds.attrs.get("features") or {}
    key = (features.get("null") or {}).get("baseline")
    name = key.split("/", 1)[1] if key else f"{ds.attrs.get('d_model')}x{ds.attrs.get('d_head')}"
    found = open_baselines(store)
    return (name, found[name]) if name in found else None


def matched_scale(ds: xr.Dataset, null: xr.Dataset) -> xr.DataArray:
    """Each matrix's scale relative to the null, from its factors' RMS entries.

    Matrices come in triples (A, B, A^T B): (W_Q, W_K, W_QK) and, with ``--ov``, (W_V, W_O,
    W_OV); with r_A = ||A||_F / sqrt(d_head d) the triple's scales are (r_A, r_B, r_A r_B) /
    (sigma, sigma, sigma^2), ``d``, ``d_head``, ``sigma`` those of the null. The same
    estimate as ``spinjax.kernels.matched_scale``, which ``run --null`` uses.
    """
    d, dh, sigma = int(null.attrs["d"]), int(null.attrs["d_head"]), float(null.attrs["sigma"])
    frob = ds["frobenius_norm"].astype(np.float64)
    rms = (frob / math.sqrt(dh * d) / sigma).transpose(..., "matrix")
    r = rms.values
    scale = np.empty_like(r)
    for first in range(0, r.shape[-1], 3):
        a, b = r[..., first], r[..., first + 1]
        scale[..., first], scale[..., first + 1], scale[..., first + 2] = a, b, a * b
    return rms.copy(data=scale).transpose(*frob.dims).rename("scale")


def null_band(
    ds: xr.Dataset,
    null: xr.Dataset,
    name: str,
    *,
    estimator: str = "mm",
    quantiles: tuple[float, float] = (0.025, 0.975),
) -> xr.DataArray:
    """The null's quantiles and mean of statistic ``name`` at every head's own scale.

    Returns ``ds``'s dims of ``name`` plus ``band`` = (lower, mean, upper): the null's
    ``quantiles`` (default the 95% band) and mean over its samples, per matrix (and singular
    value index), brought to each matrix's :func:`matched_scale`: scale-carrying statistics
    multiplied by scale^power (``SCALE_POWER``), entropies shifted by ln(scale), the others
    (skew, kurt, divergences, spectral ratios) unchanged. ``name`` and ``estimator`` as in
    :func:`statistic`. The model's matrices map onto the null's by position in their triple.
    """
    values = statistic(null, name, estimator).astype(np.float64)
    q = values.quantile(list(quantiles), dim="sample", skipna=True).drop_vars("quantile")
    q = q.rename(quantile="band")
    mean = values.mean("sample", skipna=True).expand_dims(band=1)
    band = xr.concat([q.isel(band=[0]), mean, q.isel(band=[1])], dim="band").assign_coords(band=list(BAND))
    n_null = null.sizes["matrix"]
    index = [i % n_null for i in range(ds.sizes["matrix"])]
    band = band.isel(matrix=index).assign_coords(matrix=ds["matrix"].values)
    base = name.removesuffix("_mm")
    power = SCALE_POWER.get(base, 0)
    if power or base in SCALE_LOG:
        scale = matched_scale(ds, null)
        band = band * scale**power if power else band + np.log(scale)
    target = statistic(ds, name, estimator)
    band = band.broadcast_like(target).transpose(*target.dims, "band")
    band.name = values.name
    band.attrs = {"label": values.attrs["label"], "null": f"{null.attrs['d']}x{null.attrs['d_head']}",
                  "quantiles": list(quantiles)}  # fmt: skip
    return band


def baseline_sweep(
    store: str | Path, d: int | None = None, *, estimator: str = "mm", matrix: str = "W_QK"
) -> xr.Dataset:
    """Element statistics of the null against ``d_head`` at one ``d``, in the study's scaling.

    Every ``baseline/<d>x<dh>`` group of the store with this ``d`` (default: the ``d`` with
    the most groups) gives one ``d_head``. Variables ``std``, ``entropy``, ``kl_gauss``,
    ``kurt`` (entropy and KL per ``estimator``), dims (d_head, band) with band = (lower, mean,
    upper), the 95% band and the mean over the samples. Values are brought to the study's
    scaling (N(0, 1) factors, W_QK / sqrt(d); :func:`spinjax.analysis.rmt.study_scale`), where the
    analytic curves are :func:`spinjax.analysis.rmt.null_curves`. Attributes ``d``, ``sigma`` (per
    d_head: ``sigmas``), ``samples``.
    """
    found = open_baselines(store)
    by_d: dict[int, list[str]] = {}
    for name in found:
        by_d.setdefault(_geometry(name)[0], []).append(name)
    if not by_d:
        raise InputError(f"{store}: no baseline/<d>x<dh> group; run `spinjax baseline --d D --d-head A,B,C`")
    if d is None:
        d = max(by_d, key=lambda k: (len(by_d[k]), k))
    if d not in by_d:
        raise InputError(f"{store}: no baseline group with d = {d}; it has d = {', '.join(map(str, by_d))}")
    names = sorted(by_d[d], key=_geometry)
    rows, sigmas, samples = [], [], []
    for name in names:
        null = found[name].sel(matrix=matrix)
        sigma = float(null.attrs["sigma"])
        scale = study_scale(d, sigma)[matrix]
        row = {}
        for stat in ("std", "entropy", "kl_gauss", "kurt"):
            v = statistic(null, stat, estimator).astype(np.float64)
            v = v * scale if stat == "std" else v + math.log(scale) if stat == "entropy" else v
            q = np.nanquantile(v.values, [0.025, 0.975])
            row[stat] = [q[0], float(np.nanmean(v.values)), q[1]]
        rows.append(row)
        sigmas.append(sigma)
        samples.append(int(null.sizes["sample"]))
    d_heads = [_geometry(n)[1] for n in names]
    out = xr.Dataset(
        {s: (("d_head", "band"), np.array([r[s] for r in rows])) for s in rows[0]},
        coords={"d_head": d_heads, "band": list(BAND), "samples": ("d_head", samples)},
        attrs={"d": d, "sigmas": sigmas, "estimator": estimator, "matrix": matrix},
    )
    for s in out.data_vars:
        out[s].attrs["label"] = stat_label(s, estimator)
    return out


def depth_profile(
    datasets: dict[str, xr.Dataset],
    name: str = "std",
    *,
    estimator: str = "mm",
    nulls: dict[str, xr.Dataset] | None = None,
) -> dict[str, xr.Dataset]:
    """Statistic ``name`` against depth, one Dataset per model (each at one step).

    ``datasets``: model key -> Dataset at one step (dims layer, head, matrix). Returns key ->
    Dataset with dims (layer, matrix, band) and coordinate ``layer_fraction = layer /
    (n_layers - 1)``: ``value`` = the heads' (min, mean, max) per layer, and, where
    ``nulls[key]`` (that model's null ensemble) is given, ``null`` = the null's 95% band
    and mean at the heads' own scale, averaged over the layer's heads.
    """
    out = {}
    for key, ds in datasets.items():
        if "step" in ds.dims:
            raise InputError("depth_profile: give each model at one step (ds.sel(step=...))")
        v = statistic(ds, name, estimator).astype(np.float64)
        value = xr.concat([v.min("head"), v.mean("head"), v.max("head")], dim="band")
        frac = ds["layer"].astype(np.float64) / max(int(ds.attrs.get("n_layers", ds.sizes["layer"])) - 1, 1)
        prof = xr.Dataset({"value": value.assign_coords(band=list(BAND))})
        if nulls and key in nulls:
            prof["null"] = null_band(ds, nulls[key], name, estimator=estimator).mean("head")
        prof = prof.assign_coords(layer_fraction=("layer", frac.values))
        prof.attrs = {"model": key, "statistic": v.name, "label": v.attrs["label"]}
        out[key] = prof.transpose("layer", "matrix", "band")
    return out


# ---- histograms on other grids -----------------------------------------------------------


def rebin(counts: np.ndarray, edges: np.ndarray, new_edges: np.ndarray) -> np.ndarray:
    """Counts on ``edges`` (last axis) moved onto ``new_edges``, each bin's count spread
    uniformly over its width (so a bin split by a new edge is shared by width). Unbounded
    bins (infinite edges) and counts outside ``new_edges`` are dropped."""
    counts = np.asarray(counts, np.float64)
    edges = np.asarray(edges, np.float64)
    finite = np.isfinite(edges[:-1]) & np.isfinite(edges[1:])
    first, last = np.flatnonzero(finite)[[0, -1]]
    e = edges[first : last + 2]
    c = counts[..., first : last + 1]
    cum = np.concatenate([np.zeros(c.shape[:-1] + (1,)), np.cumsum(c, axis=-1)], axis=-1)
    x = np.clip(np.asarray(new_edges, np.float64), e[0], e[-1])
    i = np.clip(np.searchsorted(e, x, side="right") - 1, 0, len(e) - 2)
    frac = (x - e[i]) / (e[i + 1] - e[i])
    at = cum[..., i] + frac * (cum[..., i + 1] - cum[..., i])
    return np.diff(at, axis=-1)


def raw_density(ds: xr.Dataset, edges: np.ndarray) -> xr.DataArray:
    """Density of the raw values (``hist`` on ``bin_edges``) on the grid ``edges`` (weight
    units): rebinned counts / (n * width), n every finite entry (tails included), dim ``value``
    with bin centres as its coordinate."""
    counts = ds["hist"]
    n = counts.sum("bin").astype(np.float64)
    moved = rebin(counts.values, ds["bin_edges"].values, edges)
    width = np.diff(edges)
    dims = counts.dims[:-1] + ("value",)
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = moved / (n.values[..., None] * width)
    coords = {k: v for k, v in counts.coords.items() if "bin" not in v.dims}
    out = xr.DataArray(dens, dims=dims, coords=coords).assign_coords(value=(edges[:-1] + edges[1:]) / 2)
    out.name = "density"
    return out


def pick_steps(steps: Sequence[int], n: int = 5, include: int | None = None) -> list[int]:
    """``n`` steps spread evenly by position over ``steps`` (first and last included; for
    log-spaced checkpoints that is about log-even), with ``include`` replacing the nearest."""
    steps = list(steps)
    if len(steps) <= n:
        return steps
    idx = sorted(set(np.linspace(0, len(steps) - 1, n).round().astype(int).tolist()))
    if include is not None and include in steps:
        j = steps.index(include)
        if j not in idx:
            idx[int(np.argmin([abs(i - j) for i in idx]))] = j
    return [steps[i] for i in sorted(set(idx))]
