"""A weights file of the hub read by byte ranges: only the rows a run needs cross the network.

:class:`RangedWeights` is one ``.safetensors`` or ``pytorch_model*.bin`` file of a hub checkpoint.
Its tensor table comes from the Q/K cache (:mod:`spinjax.sources.qkcache`) when a run has seen the
file before, else from the file's header: for safetensors the 8-byte length and the JSON header;
for a torch zip its end records, central directory and ``data.pkl`` (parsed by the restricted
unpickler of :mod:`spinjax.sources.torchbin`), then the local headers of the storages it reads.

Rows are asked for in advance (:meth:`RangedWeights.prefetch`, a layer or more at a time): rows
already in the Q/K cache come from there; the others are planned as byte spans (one per run of
consecutive rows, :class:`~spinjax.sources.ranges.Placement`), merged into reads
(:func:`~spinjax.sources.ranges.merge`), cut into parts and queued on the run's
:class:`~spinjax.sources.fetch.Fetcher`. A tensor's rows are assembled when first indexed,
written to the Q/K cache, and dropped from memory once every row asked for has been handed out.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401 - numpy knows bfloat16 and float8 by name once it is imported
import numpy as np
from huggingface_hub import constants

from ..errors import InputError
from .base import TensorInfo
from .fetch import RemoteFile
from .hf import SAFETENSORS_DTYPES
from .qkcache import QKCache, RowSet
from .ranges import ByteSource, Placement, Span, covers, merge, row_runs, split
from .torchbin import TorchBinFile


def safetensors_placements(source: ByteSource) -> dict[str, Placement]:
    """Every tensor of a safetensors file, from its header (two reads: its length, then it)."""
    where = source.label
    if source.size < 8:
        raise InputError(f"{where}: too small to be a safetensors file")
    (n,) = struct.unpack("<Q", source.read(0, 8))
    if n > constants.SAFETENSORS_MAX_HEADER_LENGTH or 8 + n > source.size:
        raise InputError(f"{where}: safetensors header of {n} bytes (corrupt, or not a safetensors file)")
    try:
        header = json.loads(source.read(8, 8 + n))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])  # ml_dtypes names bfloat16, float8
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            stride = tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape)))
            if (
                any(s < 0 for s in shape)
                or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            ):
                raise ValueError(f"tensor {name!r}: shape {shape} does not fit data_offsets {[begin, end]}")
            if begin < 0 or 8 + n + end > source.size:
                raise ValueError(f"tensor {name!r} lies past the end of the file")
            out[name] = Placement(dtype, shape, stride, 8 + n + begin)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{where}: not a readable safetensors header ({exc})") from None
    return out


@dataclass
class _Read:
    """One merged read: its span of the file, its buffer, the futures of its parts."""

    span: Span
    buffer: bytearray
    parts: list[Future]


class _Pending:
    """Rows of one tensor being fetched (``runs`` of ``reads``), or held (``cached``); ``asked``
    rows are to be handed out, after which they are dropped."""

    def __init__(
        self, runs: list[Span], placement: Placement | None, reads: list[_Read], cached: RowSet | None,
        asked: list[Span],
    ):  # fmt: skip
        self.runs, self.placement, self.reads, self.cached = runs, placement, reads, cached
        self.rows: RowSet | None = None if reads else cached
        self.asked, self.served = sum(b - a for a, b in asked), 0

    def covers(self, runs: Sequence[Span]) -> bool:
        return covers(self.runs, runs)

    def resolve(self) -> tuple[RowSet, bool]:
        """The rows (waiting for their reads); whether they were fetched just now."""
        if self.rows is not None:
            return self.rows, False
        for read in self.reads:
            for part in read.parts:
                part.result()  # raises the fetch's error
        parts = []
        for a, b in self.runs:
            first, _ = self.placement.span(a, b)
            read = next(r for r in self.reads if r.span[0] <= first < r.span[1])
            parts.append(self.placement.view(a, b, read.buffer, read.span[0]))
        self.rows = RowSet(self.runs, np.concatenate(parts)).union(self.cached)
        self.reads, self.cached = [], None
        return self.rows, True

    def cancel(self) -> None:
        for read in self.reads:
            for part in read.parts:
                part.cancel()


class RangedTensor:
    """A tensor of a :class:`RangedWeights` (the :class:`~spinjax.sources.base.Tensor` protocol)."""

    def __init__(self, file: RangedWeights, name: str, dtype: str, shape: tuple[int, ...]):
        self.file, self.name, self.dtype, self.shape = file, name, dtype, shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.file.rows(self.name, rows)


class RangedWeights:
    """One weights file of a hub checkpoint, read by ranges (see the module docstring).

    ``remote`` is None offline: then only what the Q/K cache holds can be read. ``folder`` is the
    file's folder in ``cache`` (None: no cache).
    """

    def __init__(
        self, label: str, fmt: str, remote: RemoteFile | None, cache: QKCache | None, folder: Path | None,
    ):  # fmt: skip
        self.path, self.fmt, self.remote = label, fmt, remote
        self.cache, self.folder = cache, folder
        self._lock = threading.Lock()
        self._rows: dict[str, _Pending] = {}
        self._placements: dict[str, Placement] | None = None
        self._torchbin: TorchBinFile | None = None
        table = cache.table(folder) if cache is not None and folder is not None else None
        if table is None:
            if remote is None:
                raise InputError(f"{label}: not in the local caches and the hub cannot be asked (offline)")
            self._parse()
            table = self._table_of_header()
            if cache is not None and folder is not None:
                cache.put_table(folder, table)
        self._table = table

    # ---- the header

    def _parse(self) -> None:
        if self.fmt == "bin":
            self._torchbin = TorchBinFile(self.remote)
        else:
            self._placements = safetensors_placements(self.remote)

    def _table_of_header(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        if self._torchbin is not None:
            tb = self._torchbin
            return {name: (str(tb.dtype(name)), tuple(tb.shape(name))) for name in tb.keys()}
        return {name: (str(p.dtype), p.shape) for name, p in self._placements.items()}

    def _placement_of(self, names: list[str]) -> dict[str, Placement]:
        if self._torchbin is None and self._placements is None:
            self._parse()  # the table came from the cache; the rows asked for did not
        if self._torchbin is not None:
            self._torchbin.locate(names)  # the storages' local headers, in one go
            return {name: self._torchbin.placement(name) for name in names}
        return {name: self._placements[name] for name in names}

    # ---- the weights-file interface of spinjax.sources.hf

    def keys(self) -> list[str]:
        return list(self._table)

    def tensor(self, name: str) -> RangedTensor:
        dtype, shape = self._table[name]
        return RangedTensor(self, name, dtype, shape)

    def infos(self) -> list[TensorInfo]:
        """Every tensor from the header; for a ``.bin`` the storage it lies on too, which tells
        tied tensors apart (its pickle is read by ranges for that when the table came from the
        Q/K cache; offline such a table lists no storages)."""
        if self.fmt == "bin" and self._torchbin is None and self.remote is not None:
            self._parse()
        tb = self._torchbin
        return [TensorInfo(name, shape, dtype, None if tb is None else f"{self.path}/{tb.storage(name)}")
                for name, (dtype, shape) in self._table.items()]  # fmt: skip

    def prefetch(self, requests: Mapping[str, Sequence[slice]], priority: tuple = (0,)) -> None:
        """Start fetching these rows of these tensors (those not held, cached or on their way)."""
        with self._lock:
            todo: dict[str, tuple[list[Span], RowSet | None]] = {}
            for name, slices in requests.items():
                dtype, shape = self._table[name]
                runs = row_runs(slices, shape[0] if shape else 1, f"{self.path}: {name}")
                held = self._rows.get(name)
                if held is not None and held.covers(runs):
                    continue
                cached = self.cache.get(self.folder, name) if self.cache is not None else None
                if cached is not None and cached.covers(runs):
                    self._rows[name] = _Pending(cached.runs, None, [], cached, runs)
                    continue
                todo[name] = (runs, cached)
            if not todo:
                return
            if self.remote is None:
                raise InputError(
                    f"{self.path}: tensor {next(iter(todo))!r} is not in the local caches and the hub "
                    "cannot be asked (offline)"
                )
            placements = self._placement_of(list(todo))
            spans = [placements[name].span(a, b) for name, (runs, _) in todo.items() for a, b in runs]
            reads = []
            for span in merge(spans):
                buffer = bytearray(span[1] - span[0])
                view = memoryview(buffer)
                parts = [
                    self.remote.fetcher.submit(self.remote, a, b, view[a - span[0] : b - span[0]], priority)
                    for a, b in split(span)
                ]
                reads.append(_Read(span, buffer, parts))
            for name, (runs, cached) in todo.items():
                mine = [r for r in reads if any(r.span[0] <= placements[name].span(a, b)[0] < r.span[1]
                                                for a, b in runs)]  # fmt: skip
                self._rows[name] = _Pending(runs, placements[name], mine, cached, runs)

    def rows(self, name: str, rows: slice) -> np.ndarray:
        """Rows ``rows`` of tensor ``name`` (fetched now if nothing asked for them before)."""
        dtype, shape = self._table[name]
        runs = row_runs([rows], shape[0] if shape else 1, f"{self.path}: {name}")
        if not runs:
            return np.empty((0, *shape[1:]), np.dtype(dtype))
        ((start, stop),) = runs
        with self._lock:
            pending = self._rows.get(name)
        if pending is None or not pending.covers([(start, stop)]):
            self.prefetch({name: [rows]}, priority=(-1,))
            with self._lock:
                pending = self._rows[name]
        held, fetched = pending.resolve()
        if fetched and self.cache is not None:
            self.cache.put(self.folder, name, held)
        out = held.get(start, stop) if shape else held.data.reshape(())
        with self._lock:
            pending.served += stop - start
            if pending.served >= pending.asked and self._rows.get(name) is pending:
                del self._rows[name]  # every row asked for was handed out: free the memory
        return out

    def release(self) -> None:
        with self._lock:
            for pending in self._rows.values():
                pending.cancel()
            self._rows.clear()
