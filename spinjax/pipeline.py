"""One run: source -> per-layer Q/K factors -> kernels -> store, one step at a time.

A reader thread extracts layer factors ahead of the compute (and opens, for hub sources
downloads, the next checkpoint while the current one computes); the main thread runs the
kernels and writes each finished step. Hub files of a finished step are evicted from the cache
unless ``keep_downloads``, so a trajectory needs disk for about two checkpoints.

The first step to compute is computed before the store is touched, so that bad input (a
missing tensor, a wrong shape, an unknown architecture) leaves the store exactly as it was.
Later steps are written as they finish; a failure leaves earlier steps done and the failed
step's ``done`` false, to be redone by a rerun.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import DEFAULT_STORE, models, store
from .errors import InputError
from .kernels import block_entries_cap, block_rows_for_budget, layer_statistics
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
    io_wait_s: float = 0.0  # time the compute waited for reads (and downloads)
    compute_s: float = 0.0


@dataclass
class _Layer:
    step: int
    layer: int
    wq: np.ndarray
    wk: np.ndarray
    geometry: Geometry


@dataclass
class _StepEnd:
    step: int
    checkpoint: object
    layout: Layout
    dtype: str


_FINISHED = object()


class _Reader(threading.Thread):
    """Reads layer factors ahead of the compute, across step boundaries.

    The queue holds at most ``depth`` layers, so memory stays bounded; the next checkpoint
    is opened (and its Q/K files fetched, for hub sources) while the current one computes.
    Errors travel through the queue and are raised in the consumer, in step order.
    """

    def __init__(self, source: models.Source, todo: list[int], depth: int = 2):
        super().__init__(daemon=True, name="spinjax-reader")
        self.source, self.todo = source, todo
        self.revision_of = dict(source.offered)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _open(self, step: int):
        revision = self.revision_of[step]
        checkpoint = self.source.open(step, revision)
        where = f"{self.source.source} ({revision})"
        layout = layout_for(checkpoint.config, where)
        geometry = layout.geometry(checkpoint.config, where)
        for layer in range(geometry.n_layers):  # resolve names, open (download) their files
            for name in layout.tensor_names(layer):
                checkpoint.tensor(name)
        return checkpoint, layout, geometry, where

    def run(self) -> None:
        try:
            with ThreadPoolExecutor(1) as pool:
                opening = pool.submit(self._open, self.todo[0])
                first = None
                for i, step in enumerate(self.todo):
                    checkpoint, layout, geometry, where = opening.result()
                    if i + 1 < len(self.todo):
                        opening = pool.submit(self._open, self.todo[i + 1])
                    first = first or (layout.architecture, geometry)
                    if (layout.architecture, geometry) != first:
                        raise InputError(
                            f"{where}: architecture or geometry differs from the run's first step"
                        )
                    dtypes: set[str] = set()

                    def lookup(name: str, checkpoint=checkpoint, dtypes=dtypes):
                        tensor = checkpoint.tensor(name)
                        dtypes.add(str(tensor.dtype))
                        return tensor

                    for layer in range(geometry.n_layers):
                        wq, wk = layout.extract(lookup, layer, geometry)
                        if not self._put(_Layer(step, layer, wq, wk, geometry)):
                            return
                    if not self._put(_StepEnd(step, checkpoint, layout, ",".join(sorted(dtypes)))):
                        return
            self._put(_FINISHED)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)


def _existing_group(store_path: Path, key: str) -> store.ModelGroup | None:
    """The model group ``key`` of an existing store (its schema checked), or None."""
    if not store_path.exists() or (store_path.is_dir() and not any(store_path.iterdir())):
        return None
    root = store.open_store(store_path, create=False)
    return store.ModelGroup(root, key) if key in root else None


def run(
    model: str,
    *,
    steps: str = "last",
    store_path: str | Path = DEFAULT_STORE,
    memory_budget: int | None = None,
    recompute: bool = False,
    keep_downloads: bool = False,
    progress: Progress | None = None,
) -> RunResult:
    """Compute every requested step of ``model`` into the store; skip finished steps."""
    progress = progress or Progress()
    store_path = Path(store_path)
    source = models.resolve(model)
    revision_of = dict(source.offered)
    chosen = select_steps(steps, list(revision_of))
    existing = _existing_group(store_path, source.key)
    finished = set()
    if existing is not None:
        existing.check_source(source.source)  # never call another model's results "done"
        if not recompute:
            finished = {s for s, d in zip(existing.steps, existing.done, strict=True) if d}
    todo = [s for s in chosen if s not in finished]
    result = RunResult(source.key, store_path, skipped=[s for s in chosen if s in finished])
    if not todo:
        return result

    budget = memory_budget or default_memory_budget()
    reader = _Reader(source, todo)
    reader.start()
    group, per_layer, block_rows = None, [], None
    try:
        while True:
            waited = time.perf_counter()
            item = reader.queue.get()
            result.io_wait_s += time.perf_counter() - waited
            if item is _FINISHED:
                break
            if isinstance(item, BaseException):
                raise item
            computing = time.perf_counter()
            if isinstance(item, _Layer):
                if block_rows is None:
                    block_rows = block_rows_for_budget(
                        item.geometry.n_heads, item.geometry.d_model, budget, max_entries=block_entries_cap()
                    )
                    progress.on_plan(len(todo), item.geometry.n_layers)
                per_layer.append(layer_statistics(item.wq, item.wk, block_rows=block_rows))
                progress.on_layer(item.step, item.layer)
            else:
                results = {name: np.stack([r[name] for r in per_layer]) for name in per_layer[0]}
                per_layer = []
                if group is None:  # first step computed: the input is good, now touch the store
                    group, slots = _open_group(store_path, source, item, todo, recompute)
                group.write_step(slots[item.step], results)
                if not keep_downloads:
                    source.evict(item.checkpoint)
                result.computed.append(item.step)
                progress.on_step(item.step)
            result.compute_s += time.perf_counter() - computing
    finally:
        reader.stop.set()
        reader.join()
    group.finish_run()
    store.consolidate(group.root)
    return result


def _open_group(store_path: Path, source: models.Source, end: _StepEnd, todo: list[int], recompute: bool):
    """Create or check the model group and plan the step slots; the store is written here first."""
    geometry = end.layout.geometry(end.checkpoint.config, source.source)
    root = store.open_store(store_path, create=True)
    group = store.ModelGroup.create_or_check(
        root, source.key, geometry=geometry, architecture=end.layout.architecture, n_sv=geometry.d_head,
        attrs={"source": source.source, "dtype": end.dtype},
    )  # fmt: skip
    revision_of = dict(source.offered)
    planned = group.plan([(s, revision_of[s]) for s in todo], recompute=recompute)
    group.start_run(todo)
    store.consolidate(root)
    return group, {s: i for i, s, _ in planned}
