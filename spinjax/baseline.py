"""Monte Carlo null ensembles of random heads, stored as ``baseline/<d>x<dh>`` in a store.

Each draw is a head of geometry (d_model, d_head) with i.i.d. N(0, sigma^2) factors (see
``kernels/null.py``); a batch of draws goes through ``layer_statistics`` as the heads of one
layer, so the null has exactly the statistics of SPEC section 4, computed by the same code
as real heads. The group is a self-contained xarray dataset: dims ``sample``, ``matrix``
(and ``zbin``, ``bin``, ``sv``), the model groups' variable names and dtypes minus
step/layer/head; attributes ``d``, ``d_head``, ``sigma``, ``samples``, ``seed``,
``spinjax_version``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import InputError

GROUP = "baseline"  # listed in spinjax.RESERVED_GROUPS
_CHUNK_SAMPLES = 256


def baseline_key(d_model: int, d_head: int) -> str:
    """The group of a geometry's null: ``baseline/<d_model>x<d_head>``."""
    return f"{GROUP}/{d_model}x{d_head}"


@dataclass
class BaselineResult:
    key: str
    store: Path
    samples: int
    computed: bool  # False: the store already held this ensemble
    seconds: float


def check_args(d_model: int, d_head: int, sigma: float, samples: int, seed: int) -> None:
    if not 1 <= d_head <= d_model:
        raise InputError(f"need 1 <= d_head <= d, got d={d_model}, d_head={d_head}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"--sigma must be a positive finite number, got {sigma}")
    if samples < 2:
        raise InputError(f"--samples must be at least 2 (a standard deviation), got {samples}")
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")


def default_batch(d_model: int, samples: int) -> int:
    """Draws per call of the kernels: about 4M W_QK entries, between 16 and 256 draws."""
    return int(min(samples, max(16, min(256, (1 << 22) // (d_model * d_model)))))


def compute_baseline(
    d_model: int,
    d_head: int,
    *,
    sigma: float = 1.0,
    samples: int = 1000,
    seed: int = 0,
    batch: int | None = None,
    memory_budget: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """The statistics of ``samples`` random heads: name -> (samples, 3[, extra]) numpy arrays.

    Batches are ``batch`` draws (the last one drawn full and cut, so every call has one
    shape); ``on_batch(done, samples)`` is called after each.
    """
    import jax

    from .kernels import block_entries_cap, block_rows_for_budget, layer_statistics
    from .kernels.null import gaussian_factors
    from .pipeline import default_memory_budget

    check_args(d_model, d_head, sigma, samples, seed)
    batch = batch or default_batch(d_model, samples)
    block_rows = block_rows_for_budget(
        batch, d_model, memory_budget or default_memory_budget(), max_entries=block_entries_cap()
    )
    key = jax.random.PRNGKey(seed)
    parts: list[dict[str, np.ndarray]] = []
    for first in range(0, samples, batch):
        wq, wk = gaussian_factors(key, first, sigma, n=batch, d_model=d_model, d_head=d_head)
        stats = layer_statistics(wq, wk, block_rows=block_rows)
        parts.append({name: v[: samples - first] for name, v in stats.items()})
        if on_batch:
            on_batch(min(first + batch, samples), samples)
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _attrs(d_model: int, d_head: int, sigma: float, samples: int, seed: int) -> dict[str, Any]:
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


_SAME = ("d", "d_head", "sigma", "samples", "seed")


def stored_attrs(store_path: str | Path, d_model: int, d_head: int) -> dict[str, Any] | None:
    """The attributes of the committed ensemble of this geometry, or None if there is none."""
    from .store import open_store

    path = Path(store_path)
    if not (path / "zarr.json").exists():
        return None
    root = open_store(path, create=False)
    key = baseline_key(d_model, d_head)
    try:
        return dict(root[key].attrs)
    except KeyError:
        return None


def _check_existing(existing: dict[str, Any] | None, want: dict[str, Any], key: str, recompute: bool) -> bool:
    """True when the store already holds exactly this ensemble (nothing to do)."""
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
    """Write the ensemble ``stats`` (from :func:`compute_baseline`) as ``baseline/<d>x<dh>``.

    Under the store's lock: the group is built aside and renamed into place (replacing an
    older one only with ``recompute``), then committed by consolidation. Returns False when
    the store already held this exact ensemble (nothing written).
    """
    import zarr
    import zarr.codecs

    from .store import META_DIR, VARIABLES, consolidate, locked, write_coordinates

    samples = int(next(iter(stats.values())).shape[0])
    key = baseline_key(d_model, d_head)
    want = _attrs(d_model, d_head, sigma, samples, seed)
    n_sv = stats["singular_values"].shape[-1]
    with locked(store_path) as root:
        path = Path(str(root.store.root))
        if GROUP in root and "step" in root[GROUP]:
            raise InputError(f"{path}: group {GROUP!r} is a model's, not a baseline store group")
        existing = dict(root[key].attrs) if key in root else None
        if _check_existing(existing, want, key, recompute):
            return False
        building = path / META_DIR / "new" / f"{GROUP}.{uuid.uuid4().hex}"
        building.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.create_group(store=str(building), zarr_format=3, attributes=want)
        write_coordinates(group, {"sample": np.arange(samples, dtype=np.int64)}, n_sv)
        compressors = (zarr.codecs.ZstdCodec(level=3),)
        for name, (extra, dtype, fill) in VARIABLES.items():
            values = np.asarray(stats[name]).astype(dtype)
            dims = ("sample", "matrix") + ((extra,) if extra else ())
            chunks = (min(samples, _CHUNK_SAMPLES),) + values.shape[1:]
            arr = group.create_array(
                name, shape=values.shape, chunks=chunks, dtype=dtype, fill_value=fill,
                compressors=compressors, dimension_names=list(dims),
            )  # fmt: skip
            arr[:] = values
        root.require_group(GROUP)
        target = path / key
        old = path / META_DIR / "new" / f"old.{uuid.uuid4().hex}"
        if target.exists():
            os.rename(target, old)
        os.rename(building, target)
        shutil.rmtree(old, ignore_errors=True)
        consolidate(root, key)
    return True


def read_baseline(store_path: str | Path, d_model: int, d_head: int):
    """The committed ensemble of this geometry as an ``xarray.Dataset`` (dims sample, matrix, ...)."""
    import xarray as xr

    key = baseline_key(d_model, d_head)
    if stored_attrs(store_path, d_model, d_head) is None:
        raise InputError(f"{store_path}: no {key}; run `spinjax baseline --d {d_model} --d-head {d_head}`")
    return xr.open_zarr(store_path, group=key, chunks=None)


def run_baseline(
    d_model: int,
    d_head: int,
    *,
    store_path: str | Path,
    sigma: float = 1.0,
    samples: int = 1000,
    seed: int = 0,
    recompute: bool = False,
    memory_budget: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> BaselineResult:
    """What ``spinjax baseline`` does: compute the ensemble unless the store holds it, write it."""
    check_args(d_model, d_head, sigma, samples, seed)
    key = baseline_key(d_model, d_head)
    store = Path(store_path)
    t0 = time.perf_counter()
    want = _attrs(d_model, d_head, sigma, samples, seed)
    if _check_existing(stored_attrs(store, d_model, d_head), want, key, recompute):
        return BaselineResult(key, store, samples, False, 0.0)
    stats = compute_baseline(
        d_model, d_head, sigma=sigma, samples=samples, seed=seed,
        memory_budget=memory_budget, on_batch=on_batch,
    )  # fmt: skip
    written = write_baseline(store, stats, d_model=d_model, d_head=d_head, sigma=sigma, seed=seed,
                             recompute=recompute)  # fmt: skip
    return BaselineResult(key, store, samples, written, time.perf_counter() - t0)
