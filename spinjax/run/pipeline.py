"""One run: source -> per-layer Q/K factors -> kernels -> store, one step at a time.

A reader thread (:mod:`spinjax.run.reader`) extracts layer factors ahead of the compute; the
main thread runs the kernels on each layer and hands each finished step to the writer
(:mod:`spinjax.run.writer`). A finished step's checkpoint is released: what it holds in memory,
and with ``--download whole`` the hub files it downloaded (evicted from the cache) unless
``--keep-downloads``, so such a trajectory needs disk for about two checkpoints.

Later steps are written as they finish; a failure leaves earlier steps done and the failed
step's ``done`` false, to be redone by a rerun. Ctrl-C finishes the current step, records the
run as interrupted and raises :class:`Interrupted`; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..errors import check_writable
from ..kernels.heads import block_entries_cap, block_rows_for_budget, layer_statistics
from ..sources.steps import select_steps
from ..store import ModelGroup, break_stale_locks, check_can_hold, open_store
from ..store.schema import EIGEN_STATS, OV_MATRICES
from . import features
from .distributed import barrier
from .interrupt import StopAfterStep, requested
from .options import Progress, RunOptions, RunResult, default_memory_budget
from .reader import (
    Claims,
    LayerFactors,
    Reader,
    StepRead,
    StepRestarted,
    StepSkipped,
    extract_layer,
    variant_source,
)
from .threads import one_blas_thread_under_lapack
from .writer import StepWriter


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: the run stopped cleanly after a finished step (the message says where)."""


def _existing_group(options: RunOptions, key: str) -> ModelGroup | None:
    """The model group ``key`` of an existing store (its schema checked), or None."""
    if not (options.store / "zarr.json").exists():
        return None
    root = open_store(options.store)
    return ModelGroup(root, key) if key in root else None


def run(model: str, options: RunOptions | None = None, progress: Progress | None = None) -> RunResult:
    """Compute every requested step of ``model`` into the store; skip finished steps.

    With ``options.process_count`` > 1 (see :func:`~spinjax.run.distributed.init_distributed`)
    this process computes the requested steps at positions ``process_index``,
    ``process_index + process_count``, ...; every process plans all of them (the store's step
    order is the requested one whoever comes first), and process 0 records the run once all
    processes have written their steps. A group's optional features (null, pairs, OV) are
    sticky (:meth:`RunOptions.with_stored_features`); a weight variant other than raw writes
    to the group ``<key>@<variant>``.
    """
    options = options or RunOptions()
    progress = progress or Progress()
    check_can_hold(options.store)  # a file or a foreign folder is not a store
    check_writable(options.store, "the store")  # before any compute
    one_blas_thread_under_lapack()
    source = variant_source(model, options.variant, options.fetch)
    chosen = select_steps(options.steps, [s for s, _ in source.offered])
    existing = _existing_group(options, source.key)
    finished = set()
    if existing is not None:
        existing.check_source(source.source)  # never call another model's results "done"
        options = options.with_stored_features(existing)
        if not options.recompute:
            finished = {s for s, d in zip(existing.steps, existing.done, strict=True) if d}
    index, count = options.process_index, options.process_count
    mine = set(chosen[index::count])  # step i of the list goes to process i % N
    pending = [s for s in chosen if s not in finished]
    todo = [s for s in pending if s in mine]
    result = RunResult(source.key, options.store, skipped=[s for s in chosen if s in finished and s in mine])
    already = len(result.skipped)
    claims = Claims(options.store, source.key, options.recompute)
    writer = StepWriter(source, options, pending, claims, progress)
    if not pending:
        if options.adds_features_to(existing) and index == 0:  # e.g. --null on finished steps
            result.added = writer.add_features()
        break_stale_locks(options.store)  # e.g. of a predecessor killed in its last commit
        return result
    interrupted = False
    if todo:
        reader = Reader(source, todo, claims, options.variant, options.ov)
        interrupted = _compute(reader, writer, result, progress)
    if count > 1:
        barrier("spinjax-run-end")  # every process has written its steps
    writer.finish(interrupted=interrupted)
    if (options.store / "zarr.json").exists():
        break_stale_locks(options.store)
    if interrupted:
        left = len(todo) - len(result.computed) - (len(result.skipped) - already)
        raise Interrupted(
            f"stopped after {len(result.computed)} computed step(s)"
            + (f" (last: step {result.computed[-1]})" if result.computed else "")
            + f"; {left} step(s) left, rerun the same command to continue"
        )
    return result


_END = object()


def _compute(reader: Reader, writer: StepWriter, result: RunResult, progress: Progress) -> bool:
    """Read, compute and write the reader's steps; True if stopped early by Ctrl-C."""
    if requested():  # pressed while starting (its KeyboardInterrupt may have been swallowed)
        return True
    options, source = writer.options, writer.source
    budget = options.memory_budget or default_memory_budget()
    layers: list[dict[str, np.ndarray]] = []  # results of the step's layers so far
    planned = False
    with StopAfterStep() as interrupt:
        reader.start()
        try:
            items = reader.items()
            while True:
                waited = time.perf_counter()
                item = next(items, _END)
                result.io_wait_s += time.perf_counter() - waited
                if item is _END:
                    break
                computing = time.perf_counter()
                match item:
                    case None:  # still waiting for reads or for another process's step
                        if interrupt.requested and not layers:
                            break
                        continue
                    case StepSkipped(step=step):
                        result.skipped.append(step)
                        progress.on_step(step)
                        continue
                    case StepRestarted(step=step, why=why):
                        layers = []  # what was read of the step may mix two versions of a file
                        progress.on_warning(f"{source.source} step {step}: {why}; reading the step again")
                        continue
                    case LayerFactors():
                        if not planned:
                            planned = True
                            progress.on_plan(len(reader.todo), item.geometry.n_layers)
                        stats = layer_results(item, budget, options.pairs)
                        layers.append(stats)
                        _warn_nonfinite(item, stats, source.source, result, progress)
                        progress.on_layer(item.step, item.layer)
                    case StepRead(opened=opened):
                        results = {name: np.stack([r[name] for r in layers]) for name in layers[0]}
                        layers = []
                        if options.pairs == "model":
                            results.update(_model_pairs(item, budget))
                        writer.write(item, results)
                        result.computed.append(opened.step)
                        opened.checkpoint.release()
                        progress.on_step(opened.step)
                result.compute_s += time.perf_counter() - computing
                if interrupt.requested and not layers:
                    break
        finally:
            reader.stop.set()
            reader.join()
            reader.claims.release_all()
    return interrupt.requested


def layer_results(item: LayerFactors, budget: int, pairs: str) -> dict[str, np.ndarray]:
    """Every statistic of one layer's heads, (head, matrix, ...), the eigen measures of its
    circuits (``qk_*``, ``ov_*``: (head, ...)), and its head pairs."""

    def statistics(wq, wk, inner=False):
        cap = block_entries_cap()
        rows = block_rows_for_budget(wq.shape[0], wq.shape[-1], budget, max_entries=cap, inner=inner)
        return layer_statistics(wq, wk, block_rows=rows, inner=inner)

    stats = statistics(item.wq, item.wk, inner=pairs != "none")
    inner = stats.pop("qk_inner", None)
    stats.update({f"qk_{name}": stats.pop(name) for name in EIGEN_STATS})
    if item.ov is not None:
        wv, wo = item.ov
        # (W_O, W_V, W_O^T W_V = W_OV^T): a transpose has the same element and spectral statistics,
        # and the same eigenvalues (those of W_V W_O^T's transpose W_O W_V^T)
        ov = statistics(wo, wv)
        eigen = {f"ov_{name}": ov.pop(name) for name in EIGEN_STATS}
        stats = {name: np.concatenate([v, ov[name][:, [1, 0, 2]]], axis=1) if name in ov else v
                 for name, v in stats.items()}  # fmt: skip
        stats.update(eigen)
    if inner is not None:
        stats.update(features.layer_pairs(inner, stats["hist"]))
    return stats


def _model_pairs(end: StepRead, budget: int) -> dict[str, np.ndarray]:
    """Geometry between every two heads of the step's model: its layers are read again."""
    opened = dataclasses.replace(end.opened, ov=False, asked=set())  # its rows are asked for again
    return features.model_pairs(
        lambda layer: extract_layer(opened, layer)[:2], opened.geometry.n_layers, budget
    )


def _warn_nonfinite(
    item: LayerFactors, stats: dict, where: str, result: RunResult, progress: Progress
) -> None:
    """NaN/Inf weights are counted and left out of the statistics; say so, naming the tensor."""
    bad = np.asarray(stats["n_nonfinite"])  # (heads, matrix): factors, then their products
    if not bad.any():
        return
    names = OV_MATRICES[: bad.shape[1]]
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
