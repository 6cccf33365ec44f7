"""Byte placements of rows, row runs, the merging of reads, and the read plan of each layout."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES_ROOT

from spinjax.errors import InputError
from spinjax.sources.hf import SAFETENSORS_DTYPES, HFCheckpoint
from spinjax.sources.layouts import VARIANTS, layout_for
from spinjax.sources.ranges import LocalFile, Placement, merge, row_runs, split, union
from spinjax.sources.remote import safetensors_placements


def test_merge_joins_the_smallest_gaps_within_the_budget():
    spans = [(0, 100), (110, 200), (230, 330), (2000, 2100)]  # gaps 10, 30, 1670; 390 bytes wanted
    assert merge(spans, max_gap=1000, overfetch=1.0) == [(0, 330), (2000, 2100)]  # 1670 > max_gap
    assert merge(spans, max_gap=1 << 20, overfetch=5.0) == [(0, 2100)]
    assert merge(spans, max_gap=1000, overfetch=0.05) == [(0, 200), (230, 330), (2000, 2100)]  # 19.5
    assert merge(spans, max_gap=1000, overfetch=0.11) == [(0, 330), (2000, 2100)]  # 42.9 >= 10 + 30
    assert merge(spans, max_gap=1000, overfetch=0.1) == [(0, 200), (230, 330), (2000, 2100)]  # 39 < 40
    assert merge(spans, max_gap=20, overfetch=1.0) == [(0, 200), (230, 330), (2000, 2100)]
    assert merge(list(reversed(spans)), max_gap=0, overfetch=0) == spans
    assert merge([(5, 10), (0, 6), (10, 12), (20, 20)], max_gap=0, overfetch=0) == [
        (0, 12)
    ]  # overlaps, touching
    assert merge([]) == []


def test_split_and_runs():
    parts = split((100, 100 + 10 * 7 + 3), part=10)
    assert parts[0][0] == 100 and parts[-1][1] == 173 and len(parts) == 8
    assert all(b - a <= 10 for a, b in parts) and all(
        p[1] == q[0] for p, q in zip(parts[:-1], parts[1:], strict=True)
    )
    assert split((0, 5), part=10) == [(0, 5)]
    assert row_runs([slice(8, 12), slice(0, 4), slice(4, 6), slice(None)], 3) == [(0, 3)]
    assert row_runs([slice(8, 12), slice(0, 4), slice(4, 6), slice(20, 30)], 24) == [
        (0, 6),
        (8, 12),
        (20, 24),
    ]
    assert union([(3, 4), (0, 1), (1, 2)]) == [(0, 2), (3, 4)]
    with pytest.raises(InputError, match="not consecutive"):
        row_runs([slice(0, 6, 2)], 10, "t")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16])
def test_placement_spans_and_views_are_numpy_slicing(dtype):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 8)).astype(dtype)
    item = base.dtype.itemsize
    data = bytes(13) + base.tobytes() + bytes(7)  # the tensor at byte 13 of a "file"
    place = Placement(base.dtype, (6, 8), (8, 1), 13)
    assert place.span(2, 5) == (13 + 16 * item, 13 + 40 * item)
    np.testing.assert_array_equal(place.view(2, 5, data, 0), base[2:5], strict=True)
    a, b = place.span(1, 4)
    np.testing.assert_array_equal(place.view(1, 4, data[a:b], a), base[1:4], strict=True)  # just its bytes
    # a transposed tensor (torch keeps views' strides): rows are strided, their span covers them
    t = Placement(base.dtype, (8, 6), (1, 8), 13)
    a, b = t.span(3, 5)
    assert (a, b) == (13 + 3 * item, 13 + (4 + 5 * 8 + 1) * item)
    np.testing.assert_array_equal(t.view(3, 5, data[a:b], a), base.T[3:5], strict=True)
    assert place.span(4, 4) == (13, 13) and place.view(4, 4, data, 0).shape == (0, 8)
    scalar = Placement(base.dtype, (), (), 13)
    assert scalar.span(0, 1) == (13, 13 + item) and scalar.view(0, 1, data, 0) == base[0, 0]


class _Recording:
    def __init__(self, tensor, seen: dict):
        self._tensor, self._seen = tensor, seen
        self.name, self.shape, self.dtype = tensor.name, tensor.shape, tensor.dtype

    def __getitem__(self, rows: slice):
        self._seen.setdefault(self.name, []).append(rows)
        return self._tensor[rows]


ARCHS = ("gpt2", "gpt_neox", "llama", "qwen2", "bert")
# LLaMA has no Q/K biases
ARCH_VARIANTS = [(a, v) for a in ARCHS for v in VARIANTS if not (a == "llama" and v == "bias")]


@pytest.mark.parametrize(("arch", "variant"), ARCH_VARIANTS)
@pytest.mark.parametrize("ov", [False, True])
def test_reads_name_exactly_the_rows_extract_indexes(arch, variant, ov):
    checkpoint = HFCheckpoint(FIXTURES_ROOT / "variants" / arch)
    layout = layout_for(checkpoint.config, arch)
    g = layout.geometry(checkpoint.config, arch)
    for layer in range(g.n_layers):
        seen: dict[str, list[slice]] = {}

        def lookup(name: str, seen=seen) -> _Recording:
            return _Recording(checkpoint.tensor(name), seen)

        layout.extract(lookup, layer, g, variant)
        if ov:
            layout.extract_ov(lookup, layer, g)
        reads = layout.reads(layer, g, variant, ov)
        keys = {checkpoint._resolve(n): n for n in reads}
        assert set(seen) == set(keys)
        for key, name in keys.items():
            rows = checkpoint.tensor(name).shape[0]
            assert row_runs(seen[key], rows) == row_runs(reads[name], rows), (key, seen[key], reads[name])


def test_ranged_header_reads_every_dtype_the_local_reader_lists(tmp_path):
    """The byte-range reader of a safetensors header knows every dtype the local reader does
    (one table: a U32 tensor was "not a readable safetensors header" when it had its own copy)."""
    header, offset = {}, 0
    for i, code in enumerate(sorted(SAFETENSORS_DTYPES)):
        size = np.dtype(SAFETENSORS_DTYPES[code]).itemsize * 6
        header[f"t{i}"] = {"dtype": code, "shape": [2, 3], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path = tmp_path / "all.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    placements = safetensors_placements(LocalFile(path))
    assert sorted(placements) == sorted(header)
    for name, info in header.items():
        assert placements[name].dtype == np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), info["dtype"]
        assert placements[name].shape == (2, 3)
