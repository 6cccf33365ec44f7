"""Training dynamics of a model group: a post-pass over the finished steps of a trajectory.

``compute_dynamics`` adds to the group that ``spinjax run --model MODEL`` wrote (definitions of
the codes, gaps and the KL smoothing: kernels/dynamics.py):

- ``kl_first``, ``js_first`` (step, layer, head, matrix): KL (smoothed, always finite) and
  Jensen-Shannon divergence of ``hist`` at each step against the same head and matrix at the
  earliest finished step (0 there); ``change_js``: JS against the previous finished step (NaN
  at the first); ``largest_change_step`` (layer, head, matrix, int64): the step whose
  ``change_js`` is largest (the step ending the checkpoint interval of largest change; not
  divided by the interval's length; -1 if undefined).
- ``overlap_left``, ``overlap_right`` (step, layer, head, mode, mode2): overlaps |u_i . u_j| of
  W_QK's top-k left / right singular vectors at the previous finished step (i, ``mode``) and
  this step (j, ``mode2``); NaN at the first finished step. k = min(top_k, d_head).
- ``mode_event`` (step, layer, head, mode, int8): -1 first step, 0 none, 1 crossing,
  2 repulsion of the modes (mode, mode + 1) (from the stored W_QK ``singular_values`` and the
  overlaps); the last mode is 0.
- group attribute ``dynamics`` = {"top_k", "gap_tol", "first_step", "pairs": [[prev, step]...]},
  the consecutive pairs whose overlaps are stored.

Steps are the group's finished ones in ascending order; steps not finished keep fill values.
The histogram-based variables and the codes are cheap and recomputed on every pass; the
overlaps need the checkpoints, so a pass reads only the steps of pairs not recorded yet (new
steps, a step inserted between two others) or whose overlaps were reset to NaN (a step redone
by ``spinjax run --recompute``, which resets derived variables). Each checkpoint is read at
most once, in step order, keeping only the previous step's vectors in memory. A different
``top_k`` than the stored one recomputes all overlaps. Run it when no ``spinjax run`` is
writing the same steps of the model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import store
from ..errors import InputError
from ..kernels import dynamics as kd
from ..kernels.geometry import js_divergence
from ..kernels.heads import pow2_normalized
from ..sources.base import FetchOptions
from ..sources.fetch import FileChanged
from ..store.schema import (
    DEFAULT_STORE,
    DYNAMICS_HIST_VARIABLES,
    EVENT_VARIABLES,
    LARGEST_CHANGE,
    OVERLAP_VARIABLES,
)
from .options import Progress
from .reader import RESTARTS, OpenedStep, extract_layer, open_step, variant_source
from .threads import one_blas_thread_under_lapack

_K_DEPENDENT = (*OVERLAP_VARIABLES, *EVENT_VARIABLES, "mode", "mode2")


@dataclass
class DynamicsResult:
    key: str
    store: Path
    steps: list[int]  # the finished steps used, ascending
    top_k: int  # the k used: min(top_k, d_head)
    read: list[int] = field(default_factory=list)  # steps whose checkpoints were read
    pairs: list[tuple[int, int]] = field(default_factory=list)  # overlaps computed in this pass
    reused: list[tuple[int, int]] = field(default_factory=list)  # overlaps kept from earlier passes


def compute_dynamics(
    model: str,
    store_path: str | Path = DEFAULT_STORE,
    *,
    top_k: int = 8,
    gap_tol: float = kd.GAP_TOL,
    fetch: FetchOptions | None = None,
    progress: Progress | None = None,
    variant: str = "raw",
) -> DynamicsResult:
    """Compute (or bring up to date) the training-dynamics variables of ``model``'s group
    (``<model>@<variant>`` for a weight variant other than raw, as ``spinjax run`` names it);
    ``fetch``: how a hub source reads (its Q/K cache holds what the run fetched)."""
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1, not {top_k}")
    progress = progress or Progress()
    store_path = Path(store_path)
    one_blas_thread_under_lapack()
    source = variant_source(model, variant, fetch)
    key = source.key
    root = store.open_store(store_path)
    if key not in root:
        raise InputError(f"{store_path}: no group {key!r}; run `spinjax run --model {model}` first")
    group = store.ModelGroup(root, key)
    group.check_source(source.source)
    index = {s: i for i, (s, d) in enumerate(zip(group.steps, group.done, strict=True)) if d}
    steps = sorted(index)
    if len(steps) < 2:
        raise InputError(
            f"{store_path}: model {key!r} has {len(steps)} finished step(s); training dynamics "
            "needs at least two finished steps; run more steps first"
        )
    k = min(top_k, int(group.group.attrs["d_head"]))
    result = DynamicsResult(key, store_path, steps, k)

    recorded = _prepare(store_path, key, k, gap_tol)
    group = store.ModelGroup(store.open_store(store_path, create=True, consolidated=False), key)
    _histogram_pass(group, steps, index)
    overlap = group.group["overlap_left"]
    first = index[steps[0]]
    if np.isfinite(overlap[first]).any():  # left from a pass whose first step was another one
        nan = np.full(overlap.shape[1:], np.nan, np.float32)
        group.write_variables(first, {"overlap_left": nan, "overlap_right": nan})
    for pair in zip(steps[:-1], steps[1:], strict=True):
        fresh = list(pair) in recorded and np.isfinite(overlap[index[pair[1]]]).all()
        (result.reused if fresh else result.pairs).append(pair)
    _overlap_pass(source, variant, group, result, index, progress)
    _event_pass(group, steps, index, k, gap_tol)
    pairs = [list(p) for p in sorted(result.reused + result.pairs)]  # stale pairs dropped
    _update_meta(store_path, key, lambda meta: {**meta, "first_step": steps[0], "pairs": pairs})
    return result


def _update_meta(store_path: Path, key: str, update: Callable[[dict], dict]) -> None:
    """Rewrite the group attribute ``dynamics`` (a metadata change: under the lock, committed)."""
    with store.locked(store_path) as root:
        attrs = store.ModelGroup(root, key).group.attrs
        attrs["dynamics"] = update(dict(attrs.get("dynamics", {})))
        store.consolidate(root, key)


def _prepare(store_path: Path, key: str, k: int, gap_tol: float) -> list[list[int]]:
    """Create the variables (anew if k changed) under the lock; the pairs recorded so far."""
    with store.locked(store_path) as root:
        group = store.ModelGroup(root, key)
        meta = dict(group.group.attrs.get("dynamics", {}))
        stale = "mode" in group.group and group.group["mode"].shape[0] != k  # (after a crash in here)
        if meta.get("top_k", k) != k or stale:  # another k: drop the k-shaped arrays, redo every pair
            meta = {}
            group.group.attrs["dynamics"] = {"pairs": []}
            for name in _K_DEPENDENT:
                if name in group.group:
                    del group.group[name]
        group.group.attrs["dynamics"] = {
            **meta,
            "top_k": k,
            "gap_tol": gap_tol,
            "pairs": meta.get("pairs", []),
        }
        coords = {"mode": np.arange(k, dtype=np.int32), "mode2": np.arange(k, dtype=np.int32)}
        specs = {**DYNAMICS_HIST_VARIABLES, **LARGEST_CHANGE, **OVERLAP_VARIABLES, **EVENT_VARIABLES}
        group.add_variables(specs, coords)
        group.group["largest_change_step"].attrs.pop("coordinates", None)  # not along step
        group.group["mode_event"].attrs.update(
            codes={str(c): name for c, name in kd.EVENT_CODES.items()},
            pairs="code of the modes (mode, mode + 1) between the previous finished step and this one",
            gap_tol=gap_tol,
        )
        store.consolidate(root, key)
        return [list(p) for p in meta.get("pairs", [])]


def _histogram_pass(group: store.ModelGroup, steps: list[int], index: dict[int, int]) -> None:
    """kl_first, js_first, change_js of every finished step, and largest_change_step."""
    hist = group.group["hist"]
    first = hist[index[steps[0]]]
    previous, changes = None, []
    for step in steps:
        h = hist[index[step]]
        change = np.full(h.shape[:-1], np.nan, np.float32) if previous is None else js_divergence(h, previous)
        values = {
            "kl_first": kd.kl_smoothed(h, first),
            "js_first": js_divergence(h, first),
            "change_js": change,
        }
        group.write_variables(index[step], {n: np.asarray(v) for n, v in values.items()})
        changes.append(np.asarray(change))
        previous = h
    changes = np.stack(changes)
    defined = np.isfinite(changes).any(0)
    largest = np.asarray(steps)[np.argmax(np.where(np.isfinite(changes), changes, -np.inf), axis=0)]
    group.group["largest_change_step"][...] = np.where(defined, largest, -1).astype(np.int64)


def _overlap_pass(source, variant, group: store.ModelGroup, result: DynamicsResult, index, progress):
    """Read the checkpoints of the pairs to compute, in step order, each once; write overlaps."""
    todo = result.pairs
    later = {b: a for a, b in todo}
    reads = sorted({s for pair in todo for s in pair})
    if not reads:
        return
    progress.on_plan(len(reads), int(group.group.attrs["n_layers"]))
    previous: tuple[int, list] | None = None

    revisions = group.group["revision"][:]  # what the run read: the source's list may have changed since

    def open_checked(step: int):
        opened = open_step(source, step, variant, revision=str(revisions[index[step]]))
        group.check_holds(opened.geometry.attrs(), opened.layout.architecture, group.matrices)
        return opened

    with ThreadPoolExecutor(1) as pool:  # opens (for hub sources: downloads) one step ahead
        opening = pool.submit(open_checked, reads[0])
        for n, step in enumerate(reads):
            opened = opening.result()
            if n + 1 < len(reads):
                opening = pool.submit(open_checked, reads[n + 1])
            for attempt in itertools.count():
                try:
                    vectors = _vectors(opened, result.top_k, progress)
                    break
                except FileChanged:  # a hub file changed under the step: read it again
                    opened.checkpoint.release()
                    if attempt >= RESTARTS:
                        raise
                    opened = open_checked(step)
            result.read.append(step)
            opened.checkpoint.release()
            if step in later and previous is not None and previous[0] == later[step]:
                both = list(zip(previous[1], vectors, strict=True))  # per layer: (left, right) of a, b
                values = {
                    name: np.stack([kd.overlaps(a[side], b[side]) for a, b in both])
                    for side, name in enumerate(OVERLAP_VARIABLES)
                }
                group.write_variables(index[step], values)
                pair = [later[step], step]  # recorded at once: a crash keeps what was done
                _update_meta(
                    result.store, result.key, lambda meta, p=pair: {**meta, "pairs": [*meta["pairs"], p]}
                )
            previous = (step, vectors)
            progress.on_step(step)


def _vectors(opened: OpenedStep, k: int, progress: Progress) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the top-k left and right singular vectors of every head's W_QK."""
    vectors = []
    for layer in range(opened.geometry.n_layers):
        wq, wk, _ = extract_layer(opened, layer)
        # directions do not depend on the scale: factors divided by powers of two never over- or
        # underflow in the QR and SVD
        (wq, _), (wk, _) = pow2_normalized(wq), pow2_normalized(wk)
        _, left, right = kd.top_singular_vectors(wq, wk, k)
        vectors.append((left, right))
        progress.on_layer(opened.step, layer)
    return vectors


def _event_pass(
    group: store.ModelGroup, steps: list[int], index: dict[int, int], k: int, gap_tol: float
) -> None:
    """mode_event of every finished step, from a window of three steps of stored values."""
    sv, qk = group.group["singular_values"], group.matrices.index("W_QK")
    window: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for step in steps:
        i = index[step]
        window = [
            *window[-2:],
            (sv[i, :, :, qk, :k], group.group["overlap_left"][i], group.group["overlap_right"][i]),
        ]
        s, left, right = (np.stack(parts) for parts in zip(*window, strict=True))
        codes = np.asarray(kd.mode_events(s, left, right, gap_tol=gap_tol))[-1]
        group.write_variables(i, {"mode_event": codes})
