"""One run: source -> per-layer Q/K factors -> kernels -> store, one step at a time.

The first step to compute is computed before the store is touched, so that bad input (a
missing tensor, a wrong shape, an unknown architecture) leaves the store exactly as it was.
Later steps are written as they finish; a failure leaves earlier steps done and the failed
step's ``done`` false, to be redone by a rerun.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import DEFAULT_STORE, models, store
from .errors import InputError
from .kernels import block_rows_for_budget, layer_statistics
from .layouts import Geometry, Layout, layout_for
from .steps import select_steps


def default_memory_budget() -> int:
    """A quarter of the memory available now (at least 256 MiB)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    return max(256 << 20, available // 4)


@dataclass
class Progress:
    """Callbacks a front end may set to follow a run (all optional)."""

    on_plan: Callable[[int, int], None] = lambda n_steps, n_layers: None
    on_layer: Callable[[int, int], None] = lambda step, layer: None
    on_step: Callable[[int], None] = lambda step: None


@dataclass
class RunResult:
    key: str
    store: Path
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def compute_step(
    checkpoint,
    layout: Layout,
    geometry: Geometry,
    *,
    block_rows: int,
    on_layer: Callable[[int], None] = lambda layer: None,
) -> tuple[dict[str, np.ndarray], str]:
    """Every statistic of one checkpoint, (layer, head, matrix, ...) arrays; and its dtype."""
    dtypes: set[str] = set()

    def lookup(name: str):
        tensor = checkpoint.tensor(name)
        dtypes.add(str(tensor.dtype))
        return tensor

    per_layer = []
    for layer in range(geometry.n_layers):
        wq, wk = layout.extract(lookup, layer, geometry)
        per_layer.append(layer_statistics(wq, wk, block_rows=block_rows))
        on_layer(layer)
    results = {name: np.stack([r[name] for r in per_layer]) for name in per_layer[0]}
    return results, ",".join(sorted(dtypes))


def _done_steps(store_path: Path, key: str) -> set[int]:
    """Finished steps of ``key`` in an existing store (checks the schema); empty if none."""
    if not store_path.exists():
        return set()
    root = store.open_store(store_path, create=False)
    if key not in root:
        return set()
    group = store.ModelGroup(root, key)
    return {s for s, d in zip(group.steps, group.done, strict=True) if d}


def run(
    model: str,
    *,
    steps: str = "last",
    store_path: str | Path = DEFAULT_STORE,
    memory_budget: int | None = None,
    recompute: bool = False,
    progress: Progress | None = None,
) -> RunResult:
    """Compute every requested step of ``model`` into the store; skip finished steps."""
    progress = progress or Progress()
    store_path = Path(store_path)
    source = models.resolve(model)
    revision_of = dict(source.offered)
    chosen = select_steps(steps, list(revision_of))
    finished = set() if recompute else _done_steps(store_path, source.key)
    todo = [s for s in chosen if s not in finished]
    result = RunResult(source.key, store_path, skipped=[s for s in chosen if s in finished])
    if not todo:
        return result

    budget = memory_budget or default_memory_budget()
    group = None
    geometry = layout = None
    for step in todo:
        checkpoint = source.open(step, revision_of[step])
        where = f"{source.source} ({revision_of[step]})"
        this_layout = layout_for(checkpoint.config, where)
        this_geometry = this_layout.geometry(checkpoint.config, where)
        if geometry is None:
            layout, geometry = this_layout, this_geometry
            block_rows = block_rows_for_budget(geometry.n_heads, geometry.d_model, budget)
            progress.on_plan(len(todo), geometry.n_layers)
        elif (this_layout.architecture, this_geometry) != (layout.architecture, geometry):
            raise InputError(f"{where}: architecture or geometry differs from the run's first step")
        results, dtype = compute_step(
            checkpoint, layout, geometry, block_rows=block_rows,
            on_layer=lambda layer, step=step: progress.on_layer(step, layer),
        )  # fmt: skip
        if group is None:  # first step computed: the input is good, now touch the store
            root = store.open_store(store_path, create=True)
            group = store.ModelGroup.create_or_check(
                root, source.key, geometry=geometry, n_sv=geometry.d_head,
                attrs={"source": source.source, "architecture": layout.architecture, "dtype": dtype},
            )  # fmt: skip
            slots = {s: i for i, s, _ in group.plan([(s, revision_of[s]) for s in todo], recompute=recompute)}
            group.start_run(todo)
            store.consolidate(root)
        group.write_step(slots[step], results)
        result.computed.append(step)
        progress.on_step(step)
    group.finish_run()
    store.consolidate(group.root)
    return result
