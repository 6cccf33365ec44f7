"""What the page asks of a store, read lazily: validated queries in, JSON-ready dicts out.

A :class:`StoreView` holds a :class:`Snapshot` of the store's committed state (through the
consolidated metadata: models, finished steps, variables), taken again by :meth:`StoreView.meta`
on every page (re)load, so steps a running ``spinjax run`` finishes appear on reload. Every
other query reads only what it shows: a scalar statistic over all steps (one array, ~2.6 MB
at the Pythia-12B shape, kept in a bounded cache), one head's histograms at one step (that
step's chunk of one layer), one layer's head pairs at one step. The store is opened read-only.

Every parameter is checked against the snapshot (a name the store holds, an index in range, a
finished step) before it reaches zarr; a bad one raises :class:`BadRequest` with a one-line
message. No parameter is ever part of a file path: arrays are looked up by name in the zarr
group, and only names listed in the snapshot are used.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ...store.baseline import baseline_key
from ...store.schema import BASE_DIMS, PAIR_VARIABLES, VARIABLES
from ..reader import StoreReader, open_store

HISTOGRAMS = {"zhist": "zbin_edges", "hist": "bin_edges"}
HEAD_STATS = ("mean", "std", "skew", "kurt", "mu_fit", "sigma_fit", "kl_gauss", "tail_mass", "stable_rank")
PAIR_DIMS = next(iter(PAIR_VARIABLES.values()))[0]  # (step, layer, head, head2)
NULL_QUANTILES = (0.05, 0.95)  # the null band: per-bin 5% and 95% of the null draws' z densities
CACHE_BYTES = 192 << 20  # whole scalar statistics over all steps, null bands, layer histograms
_INT = re.compile(r"-?[0-9]{1,12}")


class BadRequest(ValueError):
    """A query names something the store does not hold, or is malformed (HTTP 400)."""


@dataclass(frozen=True)
class ModelInfo:
    """One model group as the page sees it: finished steps ascending, the variables by kind."""

    key: str
    steps: tuple[int, ...]  # finished, ascending
    index: Mapping[int, int]  # step -> position along the store's step dimension
    revisions: tuple[str, ...]
    n_layers: int
    n_heads: int
    matrices: tuple[str, ...]
    scalars: tuple[str, ...]  # dims (step, layer, head, matrix)
    vectors: Mapping[str, str]  # dims (step, layer, head, matrix, X) but the histograms: name -> X
    pairs: tuple[str, ...]  # dims (step, layer, head, head2)
    baseline: str | None  # the null ensemble's group, when the store holds it
    requested: int
    attrs: Mapping[str, Any]

    def as_json(self, root: zarr.Group) -> dict[str, Any]:
        group = root[self.key]
        return {
            "steps": list(self.steps),
            "revisions": list(self.revisions),
            "requested": self.requested,
            "layers": self.n_layers,
            "heads": self.n_heads,
            "matrices": list(self.matrices),
            "statistics": list(self.scalars),
            "vectors": list(self.vectors),
            "pairs": list(self.pairs),
            "baseline": self.baseline,
            "attrs": dict(self.attrs),
            "edges": {name: _floats(group[edges][:]) for name, edges in HISTOGRAMS.items()},
        }


@dataclass
class Snapshot:
    """The store's committed state at one moment, and the caches valid for it."""

    reader: StoreReader
    models: dict[str, ModelInfo]
    fingerprint: tuple  # what the caches depend on: the finished steps and the variables
    cache: _Cache


class StoreView:
    """Read-only queries of one store for the viewer (thread-safe; see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamped: dict[tuple[str, str], tuple[tuple, Any]] = {}  # see _read_unless_same
        # a head's reads (two histogram chunks, its statistics, its vectors) side by side: zarr
        # decodes without the GIL, and a click waits for the slowest read, not for their sum
        self._reads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spinjax-view-read")
        self.snapshot = self._take(None)  # also refuses what is not a spinjax store (InputError)

    # ---- the store's state -------------------------------------------------------------------

    def _take(self, previous: Snapshot | None) -> Snapshot:
        reader = open_store(self.path)
        models = {key: _model_info(reader, key, *self._steps(reader, key), self._finished(reader, key))
                  for key in reader.models}  # fmt: skip
        fingerprint = tuple(
            (m.key, m.steps, tuple(m.index.values()), m.scalars, tuple(m.vectors), m.pairs, m.baseline)
            for m in models.values()
        )
        keep = previous is not None and previous.fingerprint == fingerprint
        return Snapshot(reader, models, fingerprint, previous.cache if keep else _Cache(CACHE_BYTES))

    def _read_unless_same(self, what: tuple[str, str], stamp: tuple | None, read: Callable[[], Any]) -> Any:
        """``read()``, or what it gave last time for ``what`` if ``stamp`` is unchanged (a stamp of
        None, a file that could not be listed, is never trusted)."""
        cached = self._stamped.get(what)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        value = read()
        self._stamped[what] = (stamp, value)
        return value

    def _steps(self, reader: StoreReader, key: str) -> tuple[list[int], list[str]]:
        """The group's ``step`` and ``revision`` values: one chunk per step, so read again only
        when the committed length or the group's metadata file changed (a commit)."""
        group = reader.root[key]
        try:
            stamp = (group["step"].shape, (self.path / key / "zarr.json").stat().st_mtime_ns)
        except OSError:
            stamp = None
        return self._read_unless_same(
            ("steps", key), stamp,
            lambda: ([int(s) for s in group["step"][:]], [str(r) for r in group["revision"][:]]),
        )  # fmt: skip

    def _finished(self, reader: StoreReader, key: str) -> np.ndarray:
        """The group's ``done`` flags. A commit rewrites one chunk file of ``done`` (one per
        step) and no metadata, so the stamp is every chunk file's inode, mtime and size (zarr
        writes a new file and renames it over the old one: a new inode, while the old one is
        still held). Listing them costs a few ms where reading them all costs ~100 ms at 154
        steps, on every page load."""
        group = reader.root[key]
        try:
            with os.scandir(self.path / key / "done" / "c") as entries:
                files = sorted((e.name, e.inode(), (st := e.stat()).st_mtime_ns, st.st_size) for e in entries)
            stamp = (group["done"].shape, tuple(files))
        except OSError:
            stamp = None
        return self._read_unless_same(("done", key), stamp, lambda: np.asarray(group["done"][:], dtype=bool))

    def refresh(self) -> Snapshot:
        """Read the committed state again (new finished steps, new variables)."""
        with self._lock:
            self.snapshot = self._take(self.snapshot)
            return self.snapshot

    def meta(self) -> dict[str, Any]:
        """Models with their finished steps, dimensions, variables and histogram edges (refreshes)."""
        snap = self.refresh()
        root = snap.reader.root
        return {"store": self.path.name, "models": {k: m.as_json(root) for k, m in snap.models.items()}}

    def warm(self) -> None:
        """Read ahead what a first visit draws first: the page's default statistic (``std``, as
        app.js's ``normalise`` picks it) of its default model over every finished step, which is
        every layer's overview (154 chunks at a Pythia trajectory: ~0.1-0.2 s on a cold server)."""
        snap = self.snapshot
        m = next(iter(snap.models.values()), None)
        if m is not None and m.steps and m.scalars:
            self._scalar(snap, m, "std" if "std" in m.scalars else m.scalars[0])

    # ---- queries -----------------------------------------------------------------------------

    def layer_overview(self, q: Mapping[str, str]) -> dict[str, Any]:
        """One statistic of every head of one layer at every finished step: ``values[head][step]``."""
        snap, m = self._model(q)
        matrix, stat, layer = _choice(q, "matrix", m.matrices), _choice(q, "stat", m.scalars), _layer(q, m)
        values = self._scalar(snap, m, stat)[:, layer, :, m.matrices.index(matrix)]  # (step, head)
        return {"matrix": matrix, "stat": stat, "layer": layer, "steps": list(m.steps),
                "heads": list(range(m.n_heads)), "values": _floats(values.T)}  # fmt: skip

    def step_overview(self, q: Mapping[str, str]) -> dict[str, Any]:
        """One statistic of every head of every layer at one step: ``values[layer][head]``."""
        snap, m = self._model(q)
        matrix, stat, step = _choice(q, "matrix", m.matrices), _choice(q, "stat", m.scalars), _step(q, m)
        values = self._scalar(snap, m, stat)[m.steps.index(step), :, :, m.matrices.index(matrix)]
        return {"matrix": matrix, "stat": stat, "step": step, "layers": list(range(m.n_layers)),
                "heads": list(range(m.n_heads)), "values": _floats(values)}  # fmt: skip

    def trajectory(self, q: Mapping[str, str]) -> dict[str, Any]:
        """One head's statistic at every finished step."""
        snap, m = self._model(q)
        matrix, stat = _choice(q, "matrix", m.matrices), _choice(q, "stat", m.scalars)
        layer, head = _layer(q, m), _head(q, m)
        values = self._scalar(snap, m, stat)[:, layer, head, m.matrices.index(matrix)]
        return {"steps": list(m.steps), "values": _floats(values)}

    def head(self, q: Mapping[str, str]) -> dict[str, Any]:
        """One head at one step: its histogram counts (``zhist``, ``hist``), the statistics
        ``HEAD_STATS`` (what the curves and the summary line need), and its vectors (singular
        values and any other per-head vector)."""
        snap, m = self._model(q)
        matrix, step, layer, head = _choice(q, "matrix", m.matrices), _step(q, m), _layer(q, m), _head(q, m)
        group, i, j = snap.reader.root[m.key], m.index[step], m.matrices.index(matrix)
        # the layer's counts at this step are kept: clicks stay in a layer
        counts = {name: self._reads.submit(snap.cache.get, ("hist", m.key, name, i, layer),
                                           lambda n=name: group[n][i, layer])
                  for name in HISTOGRAMS}  # fmt: skip
        stats = {name: self._reads.submit(lambda n=name: group[n][i, layer, head, j])
                 for name in HEAD_STATS if name in m.scalars}  # fmt: skip
        vectors = {name: self._reads.submit(lambda n=name: group[n][i, layer, head, j]) for name in m.vectors}
        out: dict[str, Any] = {"step": step, "layer": layer, "head": head, "matrix": matrix}
        out.update({name: c.result()[head, j].tolist() for name, c in counts.items()})
        out["stats"] = {name: _float(v.result()) for name, v in stats.items()}
        out["vectors"] = {name: _floats(v.result()) for name, v in vectors.items()}
        return out

    def pairs(self, q: Mapping[str, str]) -> dict[str, Any]:
        """One head-pair variable (``name``) of one layer at one step: ``values[head][head2]``."""
        snap, m = self._model(q)
        name, step, layer = _choice(q, "name", m.pairs), _step(q, m), _layer(q, m)
        values = snap.reader.root[m.key][name][m.index[step], layer]
        return {"name": name, "step": step, "layer": layer, "values": _floats(values)}

    def null_band(self, q: Mapping[str, str]) -> dict[str, Any]:
        """The null ensemble's z-density band (per z bin, the quantiles ``NULL_QUANTILES`` over
        its draws) for one matrix; ``None`` values when the store holds no null of this geometry.
        Matrices of ``--ov`` (W_V, W_O, W_OV) use the null's W_Q, W_K, W_QK, as their z-scores do."""
        snap, m = self._model(q)
        matrix = _choice(q, "matrix", m.matrices)
        if m.baseline is None:
            return {"baseline": None, "quantiles": list(NULL_QUANTILES), "lower": None, "upper": None}
        j = m.matrices.index(matrix) % 3

        def band() -> np.ndarray:
            group = snap.reader.root[m.baseline]
            counts = np.asarray(group["zhist"][:, j], dtype=np.float64)  # (sample, zbin)
            edges = group["zbin_edges"][:]
            n = counts.sum(axis=1, keepdims=True)
            dens = counts[:, 1:-1] / (np.where(n > 0, n, np.nan) * np.diff(edges)[1:-1])
            inner = np.quantile(dens[n[:, 0] > 0], NULL_QUANTILES, axis=0)
            nan = np.full((len(NULL_QUANTILES), 1), np.nan)  # the unbounded tail bins have no density
            return np.concatenate([nan, inner, nan], axis=1)

        lo, hi = snap.cache.get(("null", m.baseline, j), band)
        samples = int(snap.reader.root[m.baseline].attrs.get("samples", 0))
        return {"baseline": m.baseline, "samples": samples, "quantiles": list(NULL_QUANTILES),
                "lower": _floats(lo), "upper": _floats(hi)}  # fmt: skip

    # ---- helpers -----------------------------------------------------------------------------

    def _model(self, q: Mapping[str, str]) -> tuple[Snapshot, ModelInfo]:
        snap = self.snapshot
        return snap, snap.models[_choice(q, "model", tuple(snap.models))]

    @staticmethod
    def _scalar(snap: Snapshot, m: ModelInfo, name: str) -> np.ndarray:
        """``name`` at the finished steps, ascending: (step, layer, head, matrix), cached whole."""

        def read() -> np.ndarray:
            arr = snap.reader.root[m.key][name]
            idx = np.array([m.index[s] for s in m.steps], dtype=np.int64)
            if len(idx) == 0:
                return np.empty((0,) + arr.shape[1:], arr.dtype)
            lo, hi = int(idx.min()), int(idx.max()) + 1  # one read of the span, then the steps
            return np.asarray(arr[lo:hi])[idx - lo]

        return snap.cache.get(("scalar", m.key, name), read)


class _Cache:
    """A least-recently-used map of numpy results, bounded by their bytes (thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[tuple, Future] = {}  # keys being computed

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """The value of ``key``, computed once: a thread asking while another computes it waits
        for that result (or its error) instead of reading the store a second time."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            pending = self._pending.get(key)
            mine = pending is None
            if mine:
                pending = self._pending[key] = Future()
        if not mine:
            return pending.result()
        try:
            value = compute()  # outside the lock: other keys are served meanwhile
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self._items[key] = value
            self._bytes += _nbytes(value)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= _nbytes(old)
        pending.set_result(value)
        return value


def _nbytes(value: Any) -> int:
    return sum(np.asarray(v).nbytes for v in (value if isinstance(value, tuple) else (value,)))


def _model_info(reader: StoreReader, key: str, steps: list[int], revisions: list[str],
                done: np.ndarray) -> ModelInfo:  # fmt: skip
    group = reader.root[key]
    finished = sorted((s, i) for i, (s, d) in enumerate(zip(steps, done, strict=True)) if d)
    dims = {name: tuple(arr.metadata.dimension_names or ()) for name, arr in group.arrays()}
    vectors = {n: d[4] for n, d in sorted(dims.items())
               if len(d) == 5 and d[:4] == BASE_DIMS and n not in HISTOGRAMS}  # fmt: skip
    attrs = dict(group.attrs)
    baseline = (attrs.get("features") or {}).get("null", {}).get("baseline")
    if not isinstance(baseline, str):
        baseline = baseline_key(attrs.get("d_model"), attrs.get("d_head"))
    if baseline not in reader.root or "zhist" not in reader.root[baseline]:
        baseline = None
    shown = ("source", "architecture", "dtype", "variant", "d_model", "n_layers", "n_heads", "n_kv_heads",
             "d_head")  # fmt: skip
    return ModelInfo(
        key=key,
        steps=tuple(s for s, _ in finished),
        index={s: i for s, i in finished},
        revisions=tuple(revisions[i] for _, i in finished),
        n_layers=int(group["layer"].shape[0]),
        n_heads=int(group["head"].shape[0]),
        matrices=tuple(str(x) for x in group["matrix"][:]),
        scalars=tuple(sorted((n for n, d in dims.items() if d == BASE_DIMS), key=_statistic_order)),
        vectors=vectors,
        pairs=tuple(n for n, d in sorted(dims.items()) if d == PAIR_DIMS),
        baseline=baseline,
        requested=len(steps),
        attrs={k: attrs[k] for k in shown if k in attrs},
    )


def _statistic_order(name: str) -> tuple:
    """The schema's order (mean, std, skew, ...), then other statistics by name; each z-score
    ``<s>_z`` in the same order after all of them."""
    core = list(VARIABLES)
    base, z = (name[:-2], 1) if name.endswith("_z") else (name, 0)
    return (z, core.index(base) if base in core else len(core), base)


# ---- parameters ------------------------------------------------------------------------------


def _param(q: Mapping[str, str], name: str) -> str:
    if name not in q:
        raise BadRequest(f"missing parameter {name!r}")
    return q[name]


def _choice(q: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = _param(q, name)
    if value not in allowed:
        raise BadRequest(f"no {name} {value!r} in the store")
    return value


def _int(q: Mapping[str, str], name: str) -> int:
    value = _param(q, name)
    if not _INT.fullmatch(value):
        raise BadRequest(f"parameter {name!r} must be an integer, not {value!r}")
    return int(value)


def _layer(q: Mapping[str, str], m: ModelInfo) -> int:
    layer = _int(q, "layer")
    if not 0 <= layer < m.n_layers:
        raise BadRequest(f"model {m.key!r} has layers 0..{m.n_layers - 1}, not {layer}")
    return layer


def _head(q: Mapping[str, str], m: ModelInfo) -> int:
    head = _int(q, "head")
    if not 0 <= head < m.n_heads:
        raise BadRequest(f"model {m.key!r} has heads 0..{m.n_heads - 1}, not {head}")
    return head


def _step(q: Mapping[str, str], m: ModelInfo) -> int:
    step = _int(q, "step")
    if step not in m.index:
        raise BadRequest(f"model {m.key!r} has no finished step {step}")
    return step


# ---- JSON --------------------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    v = float(value)
    return v if np.isfinite(v) else None


def _floats(values: Any) -> list:
    """Nested lists of floats, non-finite values as ``None`` (JSON has no NaN or infinity)."""
    a = np.asarray(values, dtype=np.float64)
    out = a.astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()
