"""The Q/K cache: the rows of hub tensors that runs fetched, kept on disk within a size bound.

A ranged run (:mod:`spinjax.sources.remote`) keeps what it fetched, so that ``spinjax dynamics``
and reruns with other options read nothing twice. Entries are keyed by repo, commit (the resolved
revision), file and the file's ETag, then by tensor (so by layer)::

    <root>/models--<owner>--<name>/<commit>/<file>/<etag>/
        tensors.json     the file's tensor table: name -> [dtype, shape] (no header read again)
        <tensor>.npz     rows of one tensor: ``runs`` (k, 2) row ranges, ``rows`` their rows
                         concatenated, as stored (bit-exact; the raw bytes, ``dtype`` and ``shape``)

An entry is written under a temporary name and renamed into place, so an interrupted write leaves
no half entry. Reading an entry marks it used (its mtime); when a write takes the cache past its
size, the least recently used entries are removed until it is back under 90% of it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 and float8 with numpy, so np.dtype(name) knows them
import numpy as np

from .ranges import Span, covers, union


class RowSet:
    """Some rows of one tensor: the ``runs`` of rows held and their rows, concatenated."""

    def __init__(self, runs: Sequence[Span], data: np.ndarray):
        self.runs, self.data = list(runs), data
        self._starts = np.cumsum([0] + [b - a for a, b in self.runs])
        if self._starts[-1] != len(data):
            raise ValueError(f"{len(data)} rows for runs {self.runs}")

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def covers(self, runs: Sequence[Span]) -> bool:
        return covers(self.runs, runs)

    def get(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start..stop-1`` (they lie in one run)."""
        for (a, b), offset in zip(self.runs, self._starts, strict=False):
            if a <= start and stop <= b:
                return self.data[offset + start - a : offset + stop - a]
        raise KeyError(f"rows [{start}, {stop}) are not held (runs {self.runs})")

    def union(self, other: RowSet | None) -> RowSet:
        """The rows of both (this one's where they overlap)."""
        if other is None or covers(self.runs, other.runs):
            return self
        runs = union(self.runs + other.runs)
        parts = []
        for a, b in runs:
            rows, r = [], a
            while r < b:  # each run of the union is made of pieces of the two sets' runs
                held = self if any(s <= r < t for s, t in self.runs) else other
                s, t = next((s, t) for s, t in held.runs if s <= r < t)
                rows.append(held.get(r, min(t, b)))
                r = min(t, b)
            parts.extend(rows)
        return RowSet(runs, np.concatenate(parts))


class QKCache:
    """The cache under ``root``, at most ``max_bytes`` (see the module docstring)."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        self._lock = threading.Lock()
        self._estimate: int | None = None  # bytes held, as of the last scan plus what was written since

    def folder(self, repo: str, commit: str, file: str, etag: str) -> Path:
        """Where the entries of one file (at one ETag) live."""
        return self.root / ("models--" + repo.replace("/", "--")) / commit / file / etag

    def latest(self, repo: str, commit: str, file: str) -> Path | None:
        """The folder of the file's most recently used ETag that has a tensor table (offline runs)."""
        parent = self.root / ("models--" + repo.replace("/", "--")) / commit / file
        tables = (
            [p / "tensors.json" for p in parent.iterdir() if (p / "tensors.json").is_file()]
            if parent.is_dir()
            else []
        )
        return max(tables, key=lambda p: p.stat().st_mtime).parent if tables else None

    # ---- tensor tables

    def table(self, folder: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
        try:
            data = json.loads((folder / "tensors.json").read_text())
            table = {
                name: (str(dtype), tuple(int(s) for s in shape)) for name, (dtype, shape) in data.items()
            }
        except (OSError, ValueError, TypeError):
            return None
        _touch(folder / "tensors.json")
        return table

    def put_table(self, folder: Path, table: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        text = json.dumps({name: [dtype, list(shape)] for name, (dtype, shape) in table.items()})
        self._write(folder / "tensors.json", lambda f: f.write(text.encode()))

    # ---- rows

    def get(self, folder: Path, tensor: str) -> RowSet | None:
        path = folder / f"{tensor}.npz"
        try:
            with np.load(path, allow_pickle=False) as npz:
                runs = [tuple(int(x) for x in r) for r in npz["runs"]]
                dtype, shape = np.dtype(str(npz["dtype"])), tuple(int(s) for s in npz["shape"])
                rows = npz["rows"].view(dtype).reshape(shape)
        except (OSError, KeyError, ValueError, TypeError):
            return None  # absent, evicted meanwhile, or not ours
        _touch(path)
        return RowSet(runs, rows)

    def put(self, folder: Path, tensor: str, rows: RowSet) -> None:
        if rows.nbytes > self.max_bytes:
            return
        data = np.ascontiguousarray(rows.data)
        arrays = {
            "runs": np.asarray(rows.runs, np.int64).reshape(-1, 2),
            "rows": data.reshape(-1).view(np.uint8),
            "dtype": np.asarray(str(data.dtype)),
            "shape": np.asarray(data.shape, np.int64),
        }
        self._write(folder / f"{tensor}.npz", lambda f: np.savez(f, **arrays))
        with self._lock:
            if self._estimate is not None:
                self._estimate += data.nbytes
            over = self._estimate is None or self._estimate > self.max_bytes
        if over:
            self._evict()

    def _write(self, path: Path, write) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            pass  # a cache that cannot be written (full disk, read-only) only costs a refetch

    def _evict(self) -> None:
        """Remove the least recently used entries until the cache holds at most 90% of its size."""
        with self._lock:
            entries = []
            for path in self.root.rglob("*.npz"):
                try:
                    st = path.stat()
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries, key=lambda e: e[0]):
                if total <= 0.9 * self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
            self._estimate = total


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
