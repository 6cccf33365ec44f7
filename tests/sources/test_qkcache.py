"""The Q/K cache: rows kept bit-exact, least recently used evicted first, no half entries."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from spinjax.sources import qkcache
from spinjax.sources.qkcache import QKCache, RowSet


def _rows(runs, width=4, dtype=np.float16, seed=0):
    n = sum(b - a for a, b in runs)
    return RowSet(runs, np.random.default_rng(seed).standard_normal((n, width)).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16])
def test_rows_round_trip_bit_exact(tmp_path, dtype):
    cache = QKCache(tmp_path, 1 << 20)
    folder = cache.folder("org/m", "c0ffee", "pytorch_model.bin", "etag1")
    rows = _rows([(0, 3), (6, 9)], dtype=dtype)
    cache.put(folder, "layers.0.qkv.weight", rows)
    got = cache.get(folder, "layers.0.qkv.weight")
    assert got.runs == [(0, 3), (6, 9)] and got.data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.data.view(np.uint8), rows.data.view(np.uint8))
    np.testing.assert_array_equal(got.get(7, 9), rows.data[4:6])
    assert got.covers([(1, 2), (6, 9)]) and not got.covers([(2, 7)])
    assert cache.get(folder, "other") is None
    assert folder == tmp_path / "models--org--m" / "c0ffee" / "pytorch_model.bin" / "etag1"
    cache.put_table(folder, {"layers.0.qkv.weight": ("float16", (9, 4))})
    assert cache.table(folder) == {"layers.0.qkv.weight": ("float16", (9, 4))}
    assert cache.latest("org/m", "c0ffee", "pytorch_model.bin") == folder


def test_union_keeps_both_sets_of_rows():
    a = _rows([(0, 4), (8, 10)], seed=1)
    b = _rows([(2, 6), (9, 12)], seed=2)
    u = a.union(b)
    assert u.runs == [(0, 6), (8, 12)]
    np.testing.assert_array_equal(u.get(0, 4), a.get(0, 4))
    np.testing.assert_array_equal(u.get(4, 6), b.get(4, 6))
    np.testing.assert_array_equal(u.get(8, 10), a.get(8, 10))
    np.testing.assert_array_equal(u.get(10, 12), b.get(10, 12))
    assert a.union(None) is a and a.union(_rows([(1, 2)])) is a


def test_least_recently_used_entries_go_first(tmp_path):
    rows = _rows([(0, 64)], width=64)  # 8 KiB an entry
    cache = QKCache(tmp_path, 4 * rows.nbytes)  # three entries (and their npz headers) fit, not four
    folder = cache.folder("org/m", "c", "f", "e")
    for i, name in enumerate("abc"):
        cache.put(folder, name, rows)
        os.utime(folder / f"{name}.npz", (1000 + i, 1000 + i))  # used in the order a, b, c
    assert cache.get(folder, "a") is not None  # a is now the most recently used
    cache.put(folder, "d", rows)
    assert sorted(p.stem for p in folder.glob("*.npz")) == ["a", "c", "d"]
    cache.put(folder, "huge", _rows([(0, 4096)], width=64))  # larger than the cache: not kept
    assert not (folder / "huge.npz").exists()


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = QKCache(tmp_path, 1 << 20)
    folder = cache.folder("org/m", "c", "f", "e")

    def broken(f, **arrays):
        f.write(b"PK\x03\x04 half an entry")
        raise KeyboardInterrupt

    monkeypatch.setattr(qkcache.np, "savez", broken)
    with pytest.raises(KeyboardInterrupt):
        cache.put(folder, "t", _rows([(0, 2)]))
    assert list(folder.iterdir()) == []
