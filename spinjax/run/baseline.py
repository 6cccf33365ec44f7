"""Monte Carlo null ensembles of random heads (``spinjax baseline``), into ``baseline/<d>x<dh>``.

Each draw is a head of geometry (d_model, d_head) with i.i.d. N(0, sigma^2) factors (see
``kernels/null.py``); a batch of draws goes through ``layer_statistics`` as the heads of one
layer, so the null has exactly the statistics of real heads, computed by the same code. The
store group is written and read by :mod:`spinjax.store.baseline`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from ..errors import InputError, check_writable
from ..kernels.heads import block_entries_cap, block_rows_for_budget, layer_statistics
from ..kernels.null import gaussian_factors
from ..store import writing
from ..store.baseline import baseline_key, ensemble_attrs, holds_same, stored_attrs, write_baseline
from .options import check_memory_budget, default_memory_budget
from .threads import one_blas_thread_under_lapack


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
    check_args(d_model, d_head, sigma, samples, seed)
    one_blas_thread_under_lapack()
    batch = batch or default_batch(d_model, samples)
    block_rows = block_rows_for_budget(
        batch, d_model, memory_budget or default_memory_budget(), max_entries=block_entries_cap()
    )
    key = jax.random.PRNGKey(seed)
    parts: list[dict[str, np.ndarray]] = []
    for first in range(0, samples, batch):
        wq, wk = gaussian_factors(key, first, sigma, n=batch, d_model=d_model, d_head=d_head)
        stats = layer_statistics(wq, wk, block_rows=block_rows, eigenvalues=False)  # not stored for nulls
        parts.append({name: v[: samples - first] for name, v in stats.items()})
        if on_batch:
            on_batch(min(first + batch, samples), samples)
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


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
    check_memory_budget(memory_budget)
    key = baseline_key(d_model, d_head)
    store = Path(store_path)
    t0 = time.perf_counter()
    want = ensemble_attrs(d_model, d_head, sigma, samples, seed)
    check_writable(store, "the store")  # before minutes of compute
    if holds_same(stored_attrs(store, d_model, d_head), want, key, recompute):
        return BaselineResult(key, store, samples, False, 0.0)
    stats = compute_baseline(
        d_model, d_head, sigma=sigma, samples=samples, seed=seed,
        memory_budget=memory_budget, on_batch=on_batch,
    )  # fmt: skip
    with writing(store):
        written = write_baseline(store, stats, d_model=d_model, d_head=d_head, sigma=sigma, seed=seed,
                                 recompute=recompute)  # fmt: skip
    return BaselineResult(key, store, samples, written, time.perf_counter() - t0)
