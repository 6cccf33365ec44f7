"""The reading side of a run: claimed steps, their checkpoints, and one layer's factors at a time.

A :class:`Reader` thread extracts layer factors ahead of the compute, across step boundaries,
and opens the next checkpoint while the current one computes. Hub sources fetch ahead too: each
layer's rows are asked for :data:`AHEAD` layers before it is extracted (:func:`extract_layer`),
and opening a step asks for its first layers, so the connections stay busy across layers and
steps. The reader hands the compute loop typed items through a bounded queue:
:class:`LayerFactors`, then a :class:`StepRead` at the end of each step, :class:`StepSkipped` for
a step another process finished meanwhile, :class:`StepRestarted` when a hub file changed under a
step (its layers so far are dropped and it is read again from the start); errors travel as
exceptions and are raised in the consumer, in step order.

Several processes may run on one store: each step is claimed (:class:`Claims`, a lock file per
step) before it is read, so a step that another live process is computing is deferred, then
skipped once that process has finished it (or taken over if it died).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..sources import registry
from ..sources.base import Checkpoint, FetchOptions, Source, Tensor
from ..sources.fetch import FileChanged
from ..sources.layouts import Geometry, Layout, layout_for
from ..store import LockFile, claim_path, step_done, writing
from ..store.schema import META_DIR, check_group_key

AHEAD = 2  # layers whose rows are asked for beyond the one being extracted
RESTARTS = 2  # times a step is read again from the start when a hub file changes under it


@dataclass(frozen=True)
class OpenedStep:
    """A checkpoint opened for a run: its layout and geometry, every file it needs opened."""

    step: int
    checkpoint: Checkpoint
    layout: Layout
    geometry: Geometry
    where: str  # source and revision, for messages
    variant: str = "raw"
    ov: bool = False
    asked: set[int] = field(default_factory=set, compare=False)  # layers whose rows were asked for


@dataclass(frozen=True)
class LayerFactors:
    """One layer's float32 factors, as the kernels take them."""

    step: int
    layer: int
    wq: np.ndarray  # (n_heads, d_head, d)
    wk: np.ndarray  # (n_kv_heads, d_head, d)
    geometry: Geometry
    tensors: tuple[str, ...]  # where the factors come from, for messages
    ov: tuple[np.ndarray, np.ndarray] | None = None  # (wv, wo) with --ov


@dataclass(frozen=True)
class StepRead:
    """Every layer of ``opened`` has been handed out; ``dtype`` says how the tensors were stored."""

    opened: OpenedStep
    dtype: str
    variant: str


@dataclass(frozen=True)
class StepSkipped:
    step: int  # finished by another process meanwhile


@dataclass(frozen=True)
class StepRestarted:
    step: int  # a hub file changed under the step: drop its layers so far, they come again
    why: str


Item = LayerFactors | StepRead | StepSkipped | StepRestarted


def variant_source(model: str, variant: str = "raw", fetch: FetchOptions | None = None) -> Source:
    """``model``'s source, keyed by its store group: ``<key>@<variant>`` for a variant not raw
    (an InputError naming ``--model`` when that key cannot be a group of the store)."""
    source = registry.resolve(model, fetch)
    if variant != "raw":
        source = dataclasses.replace(source, key=f"{source.key}@{variant}")
    try:
        check_group_key(source.key)
    except InputError as exc:
        raise InputError(f"--model {model!r}: {exc}") from None
    return source


def open_step(
    source: Source, step: int, variant: str = "raw", ov: bool = False, revision: str | None = None
) -> OpenedStep:
    """Open one step with every tensor its layers will read (for hub sources: the files'
    headers read, or the files downloaded), so a missing tensor is reported before any compute;
    the first layers' rows are asked for. A hub file that changes meanwhile is opened again.
    ``revision``: the one a store recorded for the step (default: the source's for it now)."""
    for attempt in itertools.count():
        try:
            return _open_step(source, step, variant, ov, revision or source.revision(step))
        except FileChanged:
            if attempt >= RESTARTS:
                raise


def _open_step(source: Source, step: int, variant: str, ov: bool, revision: str) -> OpenedStep:
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
    opened = OpenedStep(step, checkpoint, layout, geometry, where, variant, ov)
    try:
        _ask_ahead(opened, 0)
    except BaseException:
        checkpoint.release()  # nothing asked for stays queued
        raise
    return opened


def _ask_ahead(opened: OpenedStep, layer: int) -> None:
    """Ask for the rows of layers ``layer`` .. ``layer + AHEAD`` not asked for yet."""
    for ahead in range(layer, min(opened.geometry.n_layers, layer + AHEAD + 1)):
        if ahead not in opened.asked:
            opened.asked.add(ahead)
            opened.checkpoint.prefetch(opened.layout.reads(ahead, opened.geometry, opened.variant, opened.ov))


def extract_layer(
    opened: OpenedStep, layer: int, lookup: Callable[[str], Tensor] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``wq``, ``wk`` (and ``(wv, wo)`` with ``ov``) of one layer, in the step's variant; the
    rows of the next layers are asked for first, so they are fetched while this one computes."""
    _ask_ahead(opened, layer)
    lookup = lookup or opened.checkpoint.tensor
    wq, wk = opened.layout.extract(lookup, layer, opened.geometry, opened.variant)
    ov = opened.layout.extract_ov(lookup, layer, opened.geometry) if opened.ov else None
    return wq, wk, ov


class Claims:
    """Per-step lock files inside the store: who computes which step (see the module docstring)."""

    def __init__(self, store_path: Path, key: str, recompute: bool):
        self.store_path, self.key, self.recompute = store_path, key, recompute
        self._held: dict[int, LockFile] = {}
        self._mutex = threading.Lock()
        # folders that claims may create, removed again when empty: a run that wrote nothing
        # leaves the store's tree (or the absence of a store) exactly as it was
        folder = claim_path(store_path, key, 0).parent
        self._missing = [p for p in (folder, *folder.parents) if not p.exists()]

    def claim(self, step: int) -> bool:
        """Take ``step`` unless another live process holds it (True also if held already)."""
        with self._mutex:
            if step in self._held:
                return True
            lock = LockFile(claim_path(self.store_path, self.key, step))
            with writing(self.store_path):
                if not lock.try_acquire():
                    return False
            self._held[step] = lock
            return True

    def done_elsewhere(self, step: int) -> bool:
        return not self.recompute and step_done(self.store_path, self.key, step)

    def release(self, step: int) -> None:
        with self._mutex:
            lock = self._held.pop(step, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for step in list(self._held):
            self.release(step)
        if not (self.store_path / "zarr.json").exists():  # nothing written: leave no trace
            meta = self.store_path / META_DIR
            for folder in sorted((p for p in meta.rglob("*") if p.is_dir()), reverse=True) + [meta]:
                _rmdir(folder)
        for folder in self._missing:  # deepest first; a folder in use is not empty and stays
            _rmdir(folder)


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another process uses it) or gone
        pass


_FINISHED = object()


class Reader(threading.Thread):
    """Reads layer factors ahead of the compute, across step boundaries.

    The queue holds at most ``depth`` items, so memory stays bounded; the next checkpoint is
    opened while the current one computes (see the module docstring).
    """

    def __init__(
        self, source: Source, todo: list[int], claims: Claims, variant: str, ov: bool, depth: int = 2
    ):
        super().__init__(daemon=True, name="spinjax-reader")
        self.source, self.todo, self.claims = source, todo, claims
        self.variant, self.ov = variant, ov
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

    def items(self, poll_s: float = 0.2) -> Iterator[Item | None]:
        """The items in order, ``None`` every ``poll_s`` seconds of waiting (so that the caller
        notices Ctrl-C); raises what the reader raised; ends when the reader is done."""
        while True:
            try:
                item = self.queue.get(timeout=poll_s)
            except queue.Empty:
                yield None
                continue
            if item is _FINISHED:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _claimed_steps(self) -> Iterator[int]:
        """The steps this process computes, in order, each claimed before it is read.

        Steps claimed by another live process are deferred to the end and then waited for:
        skipped when that process finishes them, computed here when it dies.
        """
        claims, deferred = self.claims, []

        def take(step: int) -> bool:
            if claims.done_elsewhere(step):
                claims.release(step)
                self._put(StepSkipped(step))
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

    def _open_next(self, steps: Iterator[int]) -> OpenedStep | None:
        step = next(steps, None)
        return None if step is None else open_step(self.source, step, self.variant, self.ov)

    def run(self) -> None:
        try:
            steps = self._claimed_steps()
            with ThreadPoolExecutor(1) as pool:  # claims (and waits) and opens one step ahead
                opening = pool.submit(self._open_next, steps)
                first = None
                while (opened := opening.result()) is not None:
                    opening = pool.submit(self._open_next, steps)
                    first = first or (opened.layout.architecture, opened.geometry)
                    if (opened.layout.architecture, opened.geometry) != first:
                        raise InputError(
                            f"{opened.where}: architecture or geometry differs from the run's first step"
                        )
                    for attempt in range(RESTARTS + 1):
                        try:
                            if not self._read_layers(opened):
                                return
                            break
                        except FileChanged as exc:  # read the step again, from the start
                            if attempt == RESTARTS:
                                raise
                            opened.checkpoint.release()
                            if not self._put(StepRestarted(opened.step, str(exc))):
                                return
                            opened = open_step(self.source, opened.step, self.variant, self.ov)
            self._put(_FINISHED)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)

    def _read_layers(self, opened: OpenedStep) -> bool:
        """Hand out every layer of ``opened``, then its :class:`StepRead`; False if stopped."""
        layout, geometry, dtypes = opened.layout, opened.geometry, set()

        def lookup(name: str):
            tensor = opened.checkpoint.tensor(name)
            dtypes.add(str(tensor.dtype))
            return tensor

        for layer in range(geometry.n_layers):
            wq, wk, ov = extract_layer(opened, layer, lookup)
            tensors = tuple(layout.tensor_names(layer, self.variant, self.ov))
            if not self._put(LayerFactors(opened.step, layer, wq, wk, geometry, tensors, ov)):
                return False
        return self._put(StepRead(opened, ",".join(sorted(dtypes)), self.variant))
