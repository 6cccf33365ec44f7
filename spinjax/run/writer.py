"""The writing side of a run: the model group opened at the first finished step, one step written
at a time, the run recorded.

The first step to compute is computed before the store is touched (:meth:`StepWriter.write`
opens the group), so that bad input (a missing tensor, a wrong shape, an unknown architecture)
leaves the store exactly as it was. Metadata changes go through the store's lock; step data
are written without it (each step is its own chunks).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..sources.base import Source
from ..store import ModelGroup, consolidate, locked, open_store, writing
from ..store.schema import NULL_VARIABLES, run_variables
from . import features
from .options import Progress, RunOptions, stored_features
from .reader import Claims, StepRead


class StepWriter:
    """Writes a run's finished steps into the group of ``source``.

    ``pending`` are every requested unfinished step of the run (of every process), in the
    requested order: the group plans them all, whoever comes first.
    """

    def __init__(
        self, source: Source, options: RunOptions, pending: list[int], claims: Claims, progress: Progress
    ):
        self.source, self.options, self.pending = source, options, pending
        self.claims, self.progress = claims, progress
        self.group: ModelGroup | None = None
        self.scorer: features.NullScorer | None = None
        self.slots: dict[int, int] = {}  # step -> index along the group's step dimension
        self.record: dict | None = None  # this run's provenance record, kept by process 0

    def _writing(self):
        """Store writes that fail (full disk, no permission) exit as bad input."""
        return writing(self.options.store, self._has_finished_steps)

    def _has_finished_steps(self) -> bool:
        try:
            root = open_store(self.options.store)
            return self.source.key in root and bool(ModelGroup(root, self.source.key).done.any())
        except (InputError, OSError):
            return False

    @property
    def _records(self) -> bool:
        return self.options.process_index == 0

    def write(self, end: StepRead, results: dict[str, np.ndarray]) -> None:
        """Write one (claimed) step, then give up its claim."""
        step = end.opened.step
        with self._writing():
            if self.group is None:  # first step computed: the input is good, now touch the store
                self._open(end)
            if self.scorer is not None:
                results.update(self.scorer.scores(results))
            self.group.write_step(self.slots[step], results)
        self.claims.release(step)

    def _open(self, end: StepRead) -> None:
        """Create or check the model group, plan the step slots, record the run: under the lock."""
        source, opened = self.source, end.opened
        self._prepare_null(opened.geometry.d_model, opened.geometry.d_head)
        with locked(self.options.store) as root:
            group = ModelGroup.create_or_check(
                root, source.key, shape=opened.geometry.attrs(), architecture=opened.layout.architecture,
                n_sv=opened.geometry.d_head, matrices=self.options.matrices,
                attrs={"source": source.source, "dtype": end.dtype, "variant": end.variant},
            )  # fmt: skip
            group.check_source(source.source)  # another process may have created it meanwhile
            planned = group.plan([(s, source.revision(s)) for s in self.pending],
                                 recompute=self.options.recompute)  # fmt: skip
            self._add_features(group)
            if self._records:
                self.record = group.start_run(self.pending)
            consolidate(root, source.key)
        self.slots = {s: i for i, s, _ in planned}
        # reopened, with the shapes just planned: the step chunks are written without the lock
        self.group = ModelGroup(open_store(self.options.store, create=True, consolidated=False), source.key)

    def _prepare_null(self, d_model: int, d_head: int) -> None:
        if self.options.null:  # before the lock: it may compute and store the null first
            d = d_model + (self.options.variant == "bias")  # the bias form is (d + 1) x (d + 1)
            self.scorer = features.NullScorer(
                self.options.store, d, d_head,
                samples=self.options.null_samples, on_info=self.progress.on_info,
                on_warning=self.progress.on_warning,
            )  # fmt: skip

    def add_features(self) -> list[str]:
        """Add this run's optional variables to a group whose steps are all finished; returns
        their names (the null's are filled in from the stored statistics)."""
        key = self.source.key
        with self._writing():
            shape = ModelGroup(open_store(self.options.store), key).shape
            self._prepare_null(shape["d_model"], shape["d_head"])
            with locked(self.options.store) as root:
                created = self._add_features(ModelGroup(root, key))
                consolidate(root, key)
        return created

    def _add_features(self, group: ModelGroup) -> list[str]:
        """Create the optional variables this run writes; score finished steps from the store
        when the null is new to the group (under the lock). Returns the names created."""
        pairs = self.options.pairs
        # a group made by an older spinjax gains the variables every run now writes
        specs = run_variables(group.matrices)
        specs.update(features.variables(null=self.scorer is not None, pairs=pairs))
        shape = group.shape
        coords = {**features.pair_coordinates(shape["n_layers"], shape["n_heads"]),
                  "eig": np.arange(shape["d_head"], dtype=np.int32)}  # fmt: skip
        created = group.add_variables(specs, coords)
        stored = dict(stored_features(group))
        if self.scorer is not None:
            stored["null"] = self.scorer.attrs()
        if pairs != "none":
            stored["pairs"] = pairs
        group.group.attrs["features"] = stored
        if self.scorer is not None and set(created) & set(NULL_VARIABLES):
            self.scorer.rescore(group)
        missing = [n for n in created if n not in NULL_VARIABLES]
        if missing and group.done.any():
            self.progress.on_warning(
                f"store group {group.key!r}: finished steps lack {', '.join(missing)} (NaN); "
                "rerun with --recompute to fill them"
            )
        return created

    def finish(self, *, interrupted: bool) -> None:
        """Mark the run record finished (or interrupted) and consolidate, under the lock."""
        distributed = self.options.process_count > 1
        if not self._records or (self.group is None and not distributed):
            return  # (a process that wrote nothing records nothing, unless it speaks for all)
        if not (self.options.store / "zarr.json").exists():
            return
        with self._writing(), locked(self.options.store) as root:
            if self.source.key not in root:
                return  # nothing was written
            group = ModelGroup(root, self.source.key)
            if self.record is None:  # a distributed run's process 0 without steps of its own
                self.record = group.start_run(self.pending)
            group.finish_run(self.record, interrupted=interrupted)
            consolidate(root, self.source.key)
