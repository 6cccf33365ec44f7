"""The null ensembles' groups ``baseline/<d>x<dh>``: writing one, reading one back.

A group holds the statistics of ``samples`` random heads (see ``spinjax.run.baseline``) as a
self-contained xarray dataset: dims ``sample``, ``matrix`` (and ``zbin``, ``bin``, ``sv``), the
model groups' variable names and dtypes minus step/layer/head; attributes ``d``, ``d_head``,
``sigma``, ``samples``, ``seed``, ``spinjax_version``, ``null``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..errors import InputError
from ..version import __version__
from .group import write_coordinates
from .root import COMPRESSORS, build_aside, commit_group, locked, open_store
from .schema import BASELINE_GROUP, VARIABLES

_CHUNK_SAMPLES = 256
_SAME = ("d", "d_head", "sigma", "samples", "seed")  # what makes two ensembles the same


def baseline_key(d_model: int, d_head: int) -> str:
    """The group of a geometry's null: ``baseline/<d_model>x<d_head>``."""
    return f"{BASELINE_GROUP}/{d_model}x{d_head}"


def ensemble_attrs(d_model: int, d_head: int, sigma: float, samples: int, seed: int) -> dict[str, Any]:
    """The attributes of an ensemble's group."""
    return {
        "d": d_model,
        "d_head": d_head,
        "sigma": float(sigma),
        "samples": samples,
        "seed": seed,
        "spinjax_version": __version__,
        "null": "W_QK = W_Q^T W_K, W_Q and W_K (d_head, d) with i.i.d. N(0, sigma^2) entries; "
        "draw i from jax.random.fold_in(PRNGKey(seed), i)",
    }


def stored_attrs(store_path: str | Path, d_model: int, d_head: int) -> dict[str, Any] | None:
    """The attributes of the committed ensemble of this geometry, or None if there is none."""
    path = Path(store_path)
    if not (path / "zarr.json").exists():
        return None
    root = open_store(path)
    try:
        return dict(root[baseline_key(d_model, d_head)].attrs)
    except KeyError:
        return None


def holds_same(existing: dict[str, Any] | None, want: dict[str, Any], key: str, recompute: bool) -> bool:
    """True when the store already holds exactly the ensemble ``want`` (nothing to do); an
    InputError when it holds another one and ``recompute`` was not asked for."""
    if existing is None or recompute:
        return False
    if all(existing.get(k) == want[k] for k in _SAME):
        return True
    held = ", ".join(f"{k}={existing.get(k)}" for k in _SAME)
    raise InputError(f"store group {key!r} holds another ensemble ({held}); pass --recompute to replace it")


def write_baseline(
    store_path: str | Path,
    stats: dict[str, np.ndarray],
    *,
    d_model: int,
    d_head: int,
    sigma: float,
    seed: int,
    recompute: bool = False,
) -> bool:
    """Write an ensemble's statistics (name -> (samples, 3[, extra])) as ``baseline/<d>x<dh>``.

    Under the store's lock: the group is built aside and renamed into place (replacing an
    older one only with ``recompute``), then committed by consolidation. Returns False when
    the store already held this exact ensemble (nothing written).
    """
    samples = int(next(iter(stats.values())).shape[0])
    key = baseline_key(d_model, d_head)
    want = ensemble_attrs(d_model, d_head, sigma, samples, seed)
    n_sv = stats["singular_values"].shape[-1]
    with locked(store_path) as root:
        if BASELINE_GROUP in root and "step" in root[BASELINE_GROUP]:
            raise InputError(
                f"{store_path}: group {BASELINE_GROUP!r} is a model's, not a baseline store group"
            )
        existing = dict(root[key].attrs) if key in root else None
        if holds_same(existing, want, key, recompute):
            return False
        group = build_aside(root, key, want)
        write_coordinates(group, {"sample": np.arange(samples, dtype=np.int64)}, n_sv)
        for name, (extra, dtype, fill) in VARIABLES.items():
            values = np.asarray(stats[name]).astype(dtype)
            dims = ("sample", "matrix") + ((extra,) if extra else ())
            chunks = (min(samples, _CHUNK_SAMPLES),) + values.shape[1:]
            arr = group.create_array(
                name, shape=values.shape, chunks=chunks, dtype=dtype, fill_value=fill,
                compressors=COMPRESSORS, dimension_names=list(dims),
            )  # fmt: skip
            arr[:] = values
        commit_group(root, group, key)
    return True


def read_baseline(store_path: str | Path, d_model: int, d_head: int) -> xr.Dataset:
    """The committed ensemble of this geometry as an ``xarray.Dataset`` (dims sample, matrix, ...)."""
    key = baseline_key(d_model, d_head)
    if stored_attrs(store_path, d_model, d_head) is None:
        raise InputError(f"{store_path}: no {key}; run `spinjax baseline --d {d_model} --d-head {d_head}`")
    return xr.open_zarr(store_path, group=key, chunks=None)
