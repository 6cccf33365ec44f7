"""One run: source -> per-layer Q/K factors -> kernels -> store, one step at a time.

A reader thread extracts layer factors ahead of the compute (and opens, for hub sources
downloads, the next checkpoint while the current one computes); the main thread runs the
kernels and writes each finished step. Hub files of a finished step are evicted from the cache
unless ``keep_downloads``, so a trajectory needs disk for about two checkpoints.

The first step to compute is computed before the store is touched, so that bad input (a
missing tensor, a wrong shape, an unknown architecture) leaves the store exactly as it was.
Later steps are written as they finish; a failure leaves earlier steps done and the failed
step's ``done`` false, to be redone by a rerun.

Several processes may run on one store: metadata changes go through the store's lock
(``store.locked``), and each step is claimed (a lock file per step) before it is read, so a
step that another live process is computing is deferred, then skipped once that process has
finished it (or taken over if it died). Ctrl-C finishes the current step, records the run as
interrupted and raises :class:`Interrupted`; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import DEFAULT_STORE, RESERVED_GROUPS, derived, models, store
from .errors import InputError
from .kernels import block_entries_cap, block_rows_for_budget, layer_statistics
from .layouts import VARIANTS, Geometry, Layout, layout_for
from .locking import LockFile
from .steps import select_steps


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: the run stopped cleanly after a finished step (the message says where)."""


def default_memory_budget() -> int:
    """A quarter of the memory available now (at least 256 MiB): of the host's, and of the
    accelerator's where the W_QK blocks live on one (its free bytes, as JAX reports them)."""
    import jax

    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    stats = jax.devices()[0].memory_stats() or {}  # None on CPUs
    if "bytes_limit" in stats:
        available = min(available, stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return max(256 << 20, available // 4)


@dataclass
class Progress:
    """Callbacks a front end may set to follow a run (all optional)."""

    on_plan: Callable[[int, int], None] = lambda n_steps, n_layers: None
    on_layer: Callable[[int, int], None] = lambda step, layer: None
    on_step: Callable[[int], None] = lambda step: None
    on_warning: Callable[[str], None] = lambda text: print(f"warning: {text}", file=sys.stderr, flush=True)


@dataclass
class RunResult:
    key: str
    store: Path
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    io_wait_s: float = 0.0  # time the compute waited for reads (and downloads)
    compute_s: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Layer:
    step: int
    layer: int
    wq: np.ndarray
    wk: np.ndarray
    geometry: Geometry
    tensors: list[str]  # where the factors come from, for messages
    ov: tuple[np.ndarray, np.ndarray] | None = None  # (wv, wo) with --ov


@dataclass
class _StepEnd:
    step: int
    checkpoint: object
    layout: Layout
    dtype: str
    variant: str = "raw"


@dataclass
class _Skip:
    step: int  # finished by another process meanwhile


_FINISHED = object()


class _Claims:
    """Per-step lock files inside the store: who computes which step (see module docstring)."""

    def __init__(self, store_path: Path, key: str, recompute: bool):
        self.store_path, self.key, self.recompute = store_path, key, recompute
        self._held: dict[int, LockFile] = {}
        self._mutex = threading.Lock()
        # folders that claims may create before the store exists, removed again if it never does
        self._missing = [p for p in (store_path, *store_path.parents) if not p.exists()]

    def claim(self, step: int) -> bool:
        """Take ``step`` unless another live process holds it (True also if held already)."""
        with self._mutex:
            if step in self._held:
                return True
            lock = LockFile(store.claim_path(self.store_path, self.key, step))
            with _writing(self.store_path):
                if not lock.try_acquire():
                    return False
            self._held[step] = lock
            return True

    def done_elsewhere(self, step: int) -> bool:
        return not self.recompute and store.step_done(self.store_path, self.key, step)

    def release(self, step: int) -> None:
        with self._mutex:
            lock = self._held.pop(step, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for step in list(self._held):
            self.release(step)
        if not (self.store_path / "zarr.json").exists():  # nothing written: leave no trace
            meta = self.store_path / store.META_DIR
            for folder in sorted((p for p in meta.rglob("*") if p.is_dir()), reverse=True) + [meta]:
                _rmdir(folder)
            for folder in self._missing:
                _rmdir(folder)


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another process uses it) or gone
        pass


def resolve_source(model: str, variant: str = "raw") -> models.Source:
    """``model``'s source, keyed by its store group: ``<key>@<variant>`` for a variant not raw."""
    if variant not in VARIANTS:
        raise InputError(f"--variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    source = models.resolve(model)
    return source if variant == "raw" else dataclasses.replace(source, key=f"{source.key}@{variant}")


def open_checkpoint(source: models.Source, step: int, revision: str, variant: str = "raw", ov: bool = False):
    """(checkpoint, layout, geometry, where) of one step, with every file its layers will read
    opened (for hub sources: downloaded), so a missing tensor is reported before any compute."""
    checkpoint = source.open(step, revision)
    where = f"{source.source} ({revision})"
    layout = layout_for(checkpoint.config, where)
    geometry = layout.geometry(checkpoint.config, where)
    for layer in range(geometry.n_layers):
        raw, of_variant = layout.tensor_names(layer), layout.tensor_names(layer, variant)
        for name in layout.tensor_names(layer, variant, ov):
            try:
                checkpoint.tensor(name)
            except InputError as exc:
                if name in raw:
                    raise
                asked = f"--variant {variant}" if name in of_variant else "--ov"
                raise InputError(f"{exc}; {asked} needs it") from exc
    return checkpoint, layout, geometry, where


class _Reader(threading.Thread):
    """Reads layer factors ahead of the compute, across step boundaries.

    The queue holds at most ``depth`` layers, so memory stays bounded; the next checkpoint
    is opened (and its Q/K files fetched, for hub sources) while the current one computes.
    Errors travel through the queue and are raised in the consumer, in step order.
    """

    def __init__(
        self, source: models.Source, todo: list[int], claims: _Claims, variant: str, ov: bool, depth: int = 2
    ):
        super().__init__(daemon=True, name="spinjax-reader")
        self.source, self.todo, self.claims = source, todo, claims
        self.variant, self.ov = variant, ov
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

    def _claimed_steps(self):
        """The steps this process computes, in order, each claimed before it is read.

        Steps claimed by another live process are deferred to the end and then waited for:
        skipped when that process finishes them, computed here when it dies.
        """
        claims, deferred = self.claims, []

        def take(step: int) -> bool:
            if claims.done_elsewhere(step):
                claims.release(step)
                self._put(_Skip(step))
                return False
            return True

        for step in self.todo:
            if not claims.claim(step):
                deferred.append(step)
            elif take(step):
                yield step
        while deferred:
            for step in deferred:
                if claims.claim(step):
                    deferred.remove(step)
                    if take(step):
                        yield step
                    break
            else:
                if self.stop.wait(0.25):
                    return

    def _next(self, steps):
        step = next(steps, None)
        return None if step is None else (step, *self._open(step))

    def _open(self, step: int):
        return open_checkpoint(self.source, step, self.revision_of[step], self.variant, self.ov)

    def run(self) -> None:
        try:
            steps = self._claimed_steps()
            with ThreadPoolExecutor(1) as pool:  # claims (and waits) and opens one step ahead
                opening = pool.submit(self._next, steps)
                first = None
                while (opened := opening.result()) is not None:
                    step, checkpoint, layout, geometry, where = opened
                    opening = pool.submit(self._next, steps)
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
                        wq, wk = layout.extract(lookup, layer, geometry, self.variant)
                        ov = layout.extract_ov(lookup, layer, geometry) if self.ov else None
                        tensors = layout.tensor_names(layer, self.variant, self.ov)
                        if not self._put(_Layer(step, layer, wq, wk, geometry, tensors, ov)):
                            return
                    end = _StepEnd(step, checkpoint, layout, ",".join(sorted(dtypes)), self.variant)
                    if not self._put(end):
                        return
            self._put(_FINISHED)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)


def _existing_group(store_path: Path, key: str) -> store.ModelGroup | None:
    """The model group ``key`` of an existing store (its schema checked), or None."""
    if not (store_path / "zarr.json").exists():
        store.check_can_hold(store_path)  # a file or a foreign folder is refused before any work
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
    process_index: int = 0,
    process_count: int = 1,
    null: bool = False,
    null_samples: int = derived.DEFAULT_NULL_SAMPLES,
    pairs: str = "layer",
    variant: str = "raw",
    ov: bool = False,
) -> RunResult:
    """Compute every requested step of ``model`` into the store; skip finished steps.

    With ``process_count`` > 1 (see :func:`init_distributed`) this process computes the
    requested steps at positions ``process_index``, ``process_index + process_count``, ...;
    every process plans all of them (the store's step order is the requested one whoever
    comes first), and process 0 records the run once all processes have written their steps.

    ``null`` adds z-scores against the random-matrix null, ``pairs`` ("none", "layer",
    "model") the cross-head geometry (see :mod:`spinjax.derived`). Both are sticky: a group
    that has them gets them for every later step too. ``variant`` ("raw", "ln-folded",
    "bias", see :mod:`spinjax.layouts`) selects the factors; other than raw, results go to the
    group ``<key>@<variant>``. ``ov`` adds the matrices W_V, W_O, W_OV (a group's matrices are
    fixed when it is created; a group holding them gets them for every step).
    """
    if pairs not in derived.PAIRS:
        raise InputError(f"--pairs {pairs!r}: expected one of {', '.join(derived.PAIRS)}")
    progress = progress or Progress()
    store_path = Path(store_path)
    source = resolve_source(model, variant)
    if source.key in RESERVED_GROUPS:
        raise InputError(f"--model {model!r}: its store key {source.key!r} is reserved; rename the directory")
    revision_of = dict(source.offered)
    chosen = select_steps(steps, list(revision_of))
    existing = _existing_group(store_path, source.key)
    finished = set()
    new_features = False
    if existing is not None:
        existing.check_source(source.source)  # never call another model's results "done"
        features = existing.group.attrs.get("features", {})
        null = null or "null" in features
        pairs = max(pairs, features.get("pairs", "none"), key=derived.PAIRS.index)
        new_features = (null and "null" not in features) or pairs != features.get("pairs", "none")
        if ov:
            existing.check_matrices(store.OV_MATRICES)  # refuses, naming the group and its matrices
        ov = "W_OV" in existing.matrices
        if not recompute:
            finished = {s for s, d in zip(existing.steps, existing.done, strict=True) if d}
    mine = set(chosen[process_index::process_count])  # step i of the list goes to process i % N
    pending = [s for s in chosen if s not in finished]
    todo = [s for s in pending if s in mine]
    result = RunResult(source.key, store_path, skipped=[s for s in chosen if s in finished and s in mine])
    already = len(result.skipped)
    claims = _Claims(store_path, source.key, recompute)
    writer = _Writer(store_path, source, pending, recompute, claims, records=process_index == 0,
                     distributed=process_count > 1, null_samples=null_samples if null else 0,
                     pairs=pairs, progress=progress, variant=variant,
                     matrices=store.OV_MATRICES if ov else store.MATRICES)  # fmt: skip
    if not pending:
        if new_features and process_index == 0:  # e.g. --null on finished steps: scored from the store
            writer.add_features()
        return result
    interrupted = False
    if todo:
        budget = memory_budget or default_memory_budget()
        reader = _Reader(source, todo, claims, variant, ov)
        interrupted = _compute(source, reader, budget, writer, result, progress, keep_downloads, pairs)
    if process_count > 1:
        _barrier("spinjax-run-end")  # every process has written its steps
    writer.finish(interrupted=interrupted)
    if interrupted:
        left = len(todo) - len(result.computed) - (len(result.skipped) - already)
        raise Interrupted(
            f"stopped after {len(result.computed)} computed step(s)"
            + (f" (last: step {result.computed[-1]})" if result.computed else "")
            + f"; {left} step(s) left, rerun the same command to continue"
        )
    return result


def _compute(source, reader, budget, writer, result, progress, keep_downloads, pairs) -> bool:
    """Read, compute and write the reader's steps; True if stopped early by Ctrl-C."""
    per_layer, planned = [], False
    with _StopAfterStep() as interrupt:
        reader.start()
        try:
            while True:
                waited = time.perf_counter()
                try:
                    item = reader.queue.get(timeout=0.2)  # a timeout, to notice Ctrl-C while waiting
                except queue.Empty:
                    item = None
                result.io_wait_s += time.perf_counter() - waited
                if item is None:
                    if interrupt.requested and not per_layer:
                        break  # Ctrl-C while waiting for reads or for another process
                    continue
                if item is _FINISHED:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Skip):
                    result.skipped.append(item.step)
                    progress.on_step(item.step)
                    continue
                computing = time.perf_counter()
                if isinstance(item, _Layer):
                    if not planned:
                        planned = True
                        progress.on_plan(len(reader.todo), item.geometry.n_layers)
                    stats = _layer_results(item, budget, pairs)
                    per_layer.append(stats)
                    _warn_nonfinite(item, stats, source.source, result, progress)
                    progress.on_layer(item.step, item.layer)
                else:
                    results = {name: np.stack([r[name] for r in per_layer]) for name in per_layer[0]}
                    per_layer = []
                    if pairs == "model":
                        results.update(_model_pairs(item, budget))
                    writer.write(item, results)
                    result.computed.append(item.step)
                    if not keep_downloads:
                        source.evict(item.checkpoint)
                    progress.on_step(item.step)
                result.compute_s += time.perf_counter() - computing
                if interrupt.requested and not per_layer:
                    break
        finally:
            reader.stop.set()
            reader.join()
            reader.claims.release_all()
    return interrupt.requested


def _layer_results(item: _Layer, budget: int, pairs: str) -> dict[str, np.ndarray]:
    """Every statistic of one layer's heads, (head, matrix, ...), and its head pairs."""

    def statistics(wq, wk, inner=False):
        cap = block_entries_cap()
        rows = block_rows_for_budget(wq.shape[0], wq.shape[-1], budget, max_entries=cap, inner=inner)
        return layer_statistics(wq, wk, block_rows=rows, inner=inner)

    stats = statistics(item.wq, item.wk, inner=pairs != "none")
    inner = stats.pop("qk_inner", None)
    if item.ov is not None:
        wv, wo = item.ov
        # (W_O, W_V, W_O^T W_V = W_OV^T): a transpose has the same element and spectral statistics
        ov = statistics(wo, wv)
        stats = {name: np.concatenate([v, ov[name][:, [1, 0, 2]]], axis=1) for name, v in stats.items()}
    if inner is not None:
        stats.update(derived.layer_pairs(inner, stats["hist"]))
    return stats


def init_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> tuple[int, int]:
    """Join JAX's multi-process runtime (explicit, or auto-detected on SLURM, TPU, clouds).

    Returns (process index, process count) for :func:`run`.
    """
    import jax

    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"--distributed: cannot start or join the JAX distributed runtime: {exc}") from exc
    return jax.process_index(), jax.process_count()


def _barrier(name: str) -> None:
    """Wait until every process of the distributed run gets here."""
    from jax._src import distributed

    client = getattr(distributed.global_state, "client", None)
    if client is not None and hasattr(client, "wait_at_barrier"):
        # the coordination service's own barrier: no devices, no compilation; fails when a
        # process died (missed heartbeats) instead of waiting for ever
        client.wait_at_barrier(name, 7 * 24 * 3600 * 1000)
    else:  # public API, a tiny collective over every device
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _model_pairs(end: _StepEnd, budget: int) -> dict[str, np.ndarray]:
    """Geometry between every two heads of the step's model: its layers are read again."""
    geometry = end.layout.geometry(end.checkpoint.config, str(end.step))
    return derived.model_pairs(
        lambda layer: end.layout.extract(end.checkpoint.tensor, layer, geometry, end.variant),
        geometry.n_layers,
        budget,
    )


@dataclass
class _Writer:
    """Writes finished steps; opens (creates, plans) the model group at the first one."""

    store_path: Path
    source: models.Source
    pending: list[int]  # every requested unfinished step (of every process), in order
    recompute: bool
    claims: _Claims
    records: bool = True  # keeps the `runs` record (process 0 of a distributed run)
    distributed: bool = False
    null_samples: int = 0  # > 0: write null z-scores (an ensemble of this size if none is stored)
    pairs: str = "none"
    progress: Progress = field(default_factory=Progress)
    variant: str = "raw"
    matrices: tuple[str, ...] = store.MATRICES
    group: store.ModelGroup | None = None
    scorer: derived.NullScorer | None = None
    slots: dict[int, int] = field(default_factory=dict)
    record: dict | None = None

    def write(self, end: _StepEnd, results: dict[str, np.ndarray]) -> None:
        """Write one (claimed) step, then give up its claim."""
        step = end.step
        with _writing(self.store_path):
            if self.group is None:  # first step computed: the input is good, now touch the store
                self._open(end)
            if self.scorer is not None:
                results.update(self.scorer.scores(results))
            self.group.write_step(self.slots[step], results)
        self.claims.release(step)

    def _open(self, end: _StepEnd) -> None:
        """Create or check the model group, plan the step slots, record the run: under the lock."""
        source = self.source
        geometry = end.layout.geometry(end.checkpoint.config, source.source)
        self._prepare_null(geometry)
        with store.locked(self.store_path) as root:
            group = store.ModelGroup.create_or_check(
                root, source.key, geometry=geometry, architecture=end.layout.architecture,
                n_sv=geometry.d_head, matrices=self.matrices,
                attrs={"source": source.source, "dtype": end.dtype, "variant": self.variant},
            )  # fmt: skip
            group.check_source(source.source)  # another process may have created it meanwhile
            revision_of = dict(source.offered)
            planned = group.plan([(s, revision_of[s]) for s in self.pending], recompute=self.recompute)
            self._add_features(group)
            if self.records:
                self.record = group.start_run(self.pending)
            store.consolidate(root, source.key)
        self.slots = {s: i for i, s, _ in planned}
        # reopened, with the shapes just planned: the step chunks are written without the lock
        self.group = store.ModelGroup(store.open_store(self.store_path, create=True, consolidated=False),
                                      source.key)  # fmt: skip

    def _prepare_null(self, geometry: Geometry) -> None:
        if self.null_samples:  # before the lock: it may compute and store the null first
            d = geometry.d_model + (self.variant == "bias")  # the bias form is (d + 1) x (d + 1)
            self.scorer = derived.NullScorer(
                self.store_path, d, geometry.d_head,
                samples=self.null_samples, on_message=self.progress.on_warning,
            )  # fmt: skip

    def add_features(self) -> None:
        """Add this run's optional variables to a group whose steps are all finished."""
        with _writing(self.store_path):
            root = store.open_store(self.store_path, create=False)
            self._prepare_null(store.ModelGroup(root, self.source.key).geometry)
            with store.locked(self.store_path) as root:
                self._add_features(store.ModelGroup(root, self.source.key))
                store.consolidate(root, self.source.key)

    def _add_features(self, group: store.ModelGroup) -> None:
        """Create the optional variables this run writes; score finished steps from the store
        when the null is new to the group (under the lock)."""
        specs = derived.variables(null=self.scorer is not None, pairs=self.pairs)
        attrs = group.group.attrs
        created = group.add_variables(specs, derived.pair_coordinates(attrs["n_layers"], attrs["n_heads"]))
        features = dict(group.group.attrs.get("features", {}))
        if self.scorer is not None:
            features["null"] = self.scorer.attrs()
        if self.pairs != "none":
            features["pairs"] = self.pairs
        group.group.attrs["features"] = features
        if self.scorer is not None and set(created) & set(store.NULL_VARIABLES):
            for index in np.flatnonzero(group.done):
                stored = {name: group.group[name][index] for name in store.VARIABLES}
                group.write_variables(int(index), self.scorer.scores(stored))
        missing = [n for n in created if n not in store.NULL_VARIABLES]
        if missing and group.done.any():
            self.progress.on_warning(
                f"store group {group.key!r}: finished steps lack {', '.join(missing)} (NaN); "
                "rerun with --recompute to fill them"
            )

    def finish(self, *, interrupted: bool) -> None:
        """Mark the run record finished (or interrupted) and consolidate, under the lock."""
        if not self.records or (self.group is None and not self.distributed):
            return  # (a process that wrote nothing records nothing, unless it speaks for all)
        if not (self.store_path / "zarr.json").exists():
            return
        with _writing(self.store_path), store.locked(self.store_path) as root:
            if self.source.key not in root:
                return  # nothing was written
            group = store.ModelGroup(root, self.source.key)
            if self.record is None:  # a distributed run's process 0 without steps of its own
                self.record = group.start_run(self.pending)
            group.finish_run(self.record, interrupted=interrupted)
            store.consolidate(root, self.source.key)


class _StopAfterStep:
    """Ctrl-C (SIGINT) sets ``requested`` instead of raising; a second one raises at once."""

    def __enter__(self):
        self.requested, self._previous = False, None
        if threading.current_thread() is threading.main_thread():  # signals go to the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        message = "\ninterrupt: stopping after the current step (Ctrl-C again to stop now)"
        print(message, file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextmanager
def _writing(store_path: Path):
    """An OSError while writing the store (full disk, no permission) is bad input, not a bug."""
    try:
        yield
    except (InputError, Interrupted):
        raise
    except OSError as exc:
        raise store.StoreWriteError(
            f"{store_path}: cannot write the store ({exc}); finished steps are kept, "
            "rerun the same command when it is writable again"
        ) from exc


def _warn_nonfinite(item: _Layer, stats: dict, where: str, result: RunResult, progress: Progress) -> None:
    """NaN/Inf weights are counted and left out of the statistics; say so, naming the tensor."""
    bad = np.asarray(stats["n_nonfinite"])  # (heads, matrix): factors, then their products
    if not bad.any():
        return
    names = store.OV_MATRICES[: bad.shape[1]]
    factors = [i for i in range(bad.shape[1]) if i % 3 != 2 and bad[:, i].any()]
    if factors:
        heads = [int(h) for h in np.flatnonzero(bad[:, factors].any(axis=1))]
        counts = " and ".join(f"{int(bad[:, i].sum())} in {names[i]}" for i in factors)
        what = f"NaN/Inf entries ({counts}) of heads {heads}, from {', '.join(item.tensors)}"
    else:
        products = [i for i in range(bad.shape[1]) if bad[:, i].any()]
        heads = [int(h) for h in np.flatnonzero(bad.any(axis=1))]
        what = (
            f"{' and '.join(names[i] for i in products)} of heads {heads} overflow float32 "
            f"({int(bad.sum())} entries)"
        )
    text = (
        f"{where} step {item.step} layer {item.layer}: {what}; statistics use the finite entries, "
        "counts are in n_nonfinite"
    )
    result.warnings.append(text)
    progress.on_warning(text)
