"""Where a tensor's rows lie in its file, and which byte ranges fetch the rows a layer needs.

A :class:`Placement` says where a stored tensor's elements lie in its file (dtype, shape, strides,
byte offset of the first element), whatever the format: a safetensors entry or a torch zip storage
both reduce to one. :meth:`Placement.span` gives the bytes holding some rows of the first axis,
:meth:`Placement.view` those rows from the bytes. :func:`row_runs` turns the row slices a layout
asks for into runs of consecutive rows, :func:`merge` turns the runs' byte spans into the reads that
fetch them, and :func:`split` cuts long reads into parts that several connections share.

A :class:`ByteSource` is a file read by byte ranges: a local file (:class:`LocalFile`) or a hub
file read by HTTP range requests (:mod:`spinjax.sources.fetch`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import InputError

Span = tuple[int, int]  # [start, stop) in bytes of a file, or in rows of a tensor

# Reads are merged across a gap when it is at most MERGE_GAP bytes and the bytes merged in stay
# within MERGE_OVERFETCH of the bytes wanted (benchmarks/RESULTS.md, "Ranged reads"): with several
# requests in flight a separate request costs little more than its headers, so only small gaps are
# worth reading through, and never enough of them to read more than 5% beyond what is needed.
MERGE_GAP = 256 << 10
MERGE_OVERFETCH = 0.05
# Reads longer than this are cut into parts fetched in parallel (one connection of a CDN is often
# slower than the link).
PART_BYTES = 16 << 20


class ByteSource(Protocol):
    """A file read by byte ranges."""

    label: str  # for messages: a path, or repo@revision:file
    size: int

    def read(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the file (InputError naming the file if it cannot)."""
        ...

    def read_many(self, spans: Sequence[Span]) -> list[bytes]:
        """Several ranges at once (in parallel where that helps), in order."""
        ...


class LocalFile:
    """A local file as a :class:`ByteSource` (positional reads, no shared file position)."""

    def __init__(self, path: str | os.PathLike):
        self.label = os.fspath(path)
        if not os.path.isfile(self.label):
            raise InputError(f"{self.label}: not a file")
        try:
            self._fd = os.open(self.label, os.O_RDONLY)
        except OSError as e:
            raise InputError(f"{self.label}: cannot open: {e.strerror or e}") from e
        self.size = os.fstat(self._fd).st_size

    def fileno(self) -> int:
        if self._fd < 0:
            raise InputError(f"{self.label}: file is closed")
        return self._fd

    def read(self, start: int, stop: int) -> bytes:
        data = os.pread(self.fileno(), max(0, stop - start), start)
        if len(data) != stop - start:
            raise InputError(
                f"{self.label}: bytes [{start}, {stop}) lie past the end of the file (truncated?)"
            )
        return data

    def read_many(self, spans: Sequence[Span]) -> list[bytes]:
        return [self.read(a, b) for a, b in spans]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class Placement:
    """Where one stored tensor's elements lie in its file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    offset: int  # absolute byte offset of the first element

    @property
    def rows(self) -> int:
        """Length of the first axis (1 for a 0-d tensor, which is read whole)."""
        return self.shape[0] if self.shape else 1

    def span(self, start: int, stop: int) -> Span:
        """The bytes [a, b) of the file that hold rows ``start..stop-1`` (empty if there are none)."""
        item = self.dtype.itemsize
        if not self.shape:
            return self.offset, self.offset + item
        if stop <= start or any(s == 0 for s in self.shape):
            return self.offset, self.offset
        inner = sum((s - 1) * st for s, st in zip(self.shape[1:], self.stride[1:], strict=True))
        first, last = start * self.stride[0], (stop - 1) * self.stride[0] + inner
        return self.offset + first * item, self.offset + (last + 1) * item

    def view(self, start: int, stop: int, buffer, buffer_start: int) -> np.ndarray:
        """Rows ``start..stop-1`` as a read-only view on ``buffer``, which holds the file's bytes
        from ``buffer_start`` on (and at least :meth:`span` of those rows)."""
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        a, b = self.span(start, stop)
        if b == a:
            return np.empty(shape, self.dtype)
        item = self.dtype.itemsize
        flat = np.frombuffer(buffer, dtype=np.uint8, count=b - a, offset=a - buffer_start)
        # as_strided goes through __array_interface__, which cannot name ml_dtypes types
        # (bfloat16, float8): stride a void view of the same width, then view back.
        strides = tuple(st * item for st in self.stride)
        view = np.lib.stride_tricks.as_strided(flat.view(f"V{item}"), shape, strides, writeable=False)
        return view.view(self.dtype)


def row_runs(slices: Sequence[slice], n_rows: int, where: str = "") -> list[Span]:
    """The rows ``slices`` select (of ``n_rows``), as sorted runs of consecutive rows."""
    spans = []
    for s in slices:
        start, stop, step = s.indices(n_rows)
        if step != 1:
            raise InputError(f"{where}: rows {s} are not consecutive")
        if stop > start:
            spans.append((start, stop))
    return union(spans)


def union(spans: Sequence[Span]) -> list[Span]:
    """Sorted, with overlapping or touching spans joined."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def covers(runs: Sequence[Span], wanted: Sequence[Span]) -> bool:
    """Whether every span of ``wanted`` lies inside one of ``runs`` (both unions)."""
    return all(any(a <= s and t <= b for a, b in runs) for s, t in wanted)


def merge(spans: Sequence[Span], max_gap: int | None = None, overfetch: float | None = None) -> list[Span]:
    """Reads that fetch ``spans``: neighbours are joined across their gap, smallest gaps first,
    while a gap is at most ``max_gap`` bytes and all gaps joined stay within ``overfetch`` times
    the bytes wanted (default: :data:`MERGE_GAP`, :data:`MERGE_OVERFETCH`)."""
    max_gap = MERGE_GAP if max_gap is None else max_gap
    overfetch = MERGE_OVERFETCH if overfetch is None else overfetch
    spans = union([s for s in spans if s[1] > s[0]])
    if not spans:
        return []
    budget = overfetch * sum(b - a for a, b in spans)
    gaps = sorted((spans[i + 1][0] - spans[i][1], i) for i in range(len(spans) - 1))
    joined = set()
    for gap, i in gaps:
        if gap > max_gap or gap > budget:
            break
        budget -= gap
        joined.add(i)
    reads = [list(spans[0])]
    for i in range(1, len(spans)):
        if i - 1 in joined:
            reads[-1][1] = spans[i][1]
        else:
            reads.append(list(spans[i]))
    return [(a, b) for a, b in reads]


def split(span: Span, part: int | None = None) -> list[Span]:
    """``span`` cut into consecutive parts of at most ``part`` bytes (default :data:`PART_BYTES`),
    of about equal length."""
    part = PART_BYTES if part is None else part
    a, b = span
    n = max(1, -(-(b - a) // part))
    edges = [a + (b - a) * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))
