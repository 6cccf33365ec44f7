"""spinjax.torchbin: PyTorch .bin checkpoints read without torch and without executing code.

Fixtures come from tests/fixtures/make_torchbin_fixtures.py (run with torch, once);
this file must not import torch.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import hostile
import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES_ROOT

from spinjax.errors import InputError, UnsafeCheckpointError
from spinjax.sources import torchbin
from spinjax.sources.torchbin import TorchBinFile

FIX = FIXTURES_ROOT / "torchbin"
SENTINEL = Path("/tmp/spinjax_pwned_sentinel")  # what the malicious fixtures would create

NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
}


def same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bit-identical: same shape, and same bytes element by element."""
    assert actual.shape == expected.shape
    assert actual.dtype.itemsize == expected.dtype.itemsize
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def test_no_torch_imported():
    with TorchBinFile(FIX / "basic.bin") as f:
        f.get("f32")
    assert "torch" not in sys.modules


def test_basic_values_dtypes_shapes():
    expected = np.load(FIX / "basic_expected.npz")
    dtypes = json.loads((FIX / "basic_dtypes.json").read_text())
    with TorchBinFile(FIX / "basic.bin") as f:
        assert f.keys() == list(dtypes)
        for name, dt in dtypes.items():
            assert f.dtype(name) == np.dtype(NP_DTYPES[dt]), name
            assert f.shape(name) == expected[name].shape, name
            got = f.get(name)
            assert got.dtype == np.dtype(NP_DTYPES[dt]) and got.flags.c_contiguous, name
            same_bits(got, expected[name])
            view = f.get(name, copy=False)
            same_bits(view, expected[name])
            assert not view.flags.writeable
        # views share one storage: the slice really is at a nonzero offset of base's record
        rec = f._records
        assert rec["row_slice"].key == rec["base"].key == rec["transposed"].key
        assert rec["row_slice"].offset == 16 and rec["transposed"].stride == (1, 8)
        assert f.get("scalar").shape == () and float(f.get("scalar")) == 3.25
        assert f.get("empty").shape == (0, 5) and f.get("empty_f16").dtype == np.float16


def test_v3_dtypes():
    expected = np.load(FIX / "v3_expected.npz")
    with TorchBinFile(FIX / "v3_dtypes.bin") as f:
        assert f.dtype("u16") == np.uint16
        assert f.dtype("f8e4m3") == np.dtype(ml_dtypes.float8_e4m3fn)
        assert f.dtype("f8e5m2") == np.dtype(ml_dtypes.float8_e5m2)
        for name in expected.files:
            same_bits(f.get(name), expected[name])


def test_parameter():
    with TorchBinFile(FIX / "parameter.bin") as f:
        np.testing.assert_array_equal(f.get("weight"), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_neox_tiny_model():
    expected = np.load(FIX / "neox_expected.npz")
    with TorchBinFile(FIX / "neox" / "pytorch_model.bin") as f:
        assert "gpt_neox.embed_in.weight" in f
        for name in expected.files:
            assert f.dtype(name) == np.float16 and f.shape(name) == (96, 32)
            same_bits(f.get(name), expected[name])


def test_neox_sharded():
    expected = np.load(FIX / "neox_expected.npz")
    index = json.loads((FIX / "neox_sharded" / "pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    seen = {}
    for shard in shards:
        with TorchBinFile(FIX / "neox_sharded" / shard) as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
            for name in f.keys():
                seen[name] = f.get(name)
    assert set(seen) == set(index["weight_map"])
    for name in expected.files:
        same_bits(seen[name], expected[name])
    with TorchBinFile(FIX / "neox" / "pytorch_model.bin") as whole:
        for name, value in seen.items():
            same_bits(value, whole.get(name))


@pytest.mark.parametrize(
    "fixture, global_name",
    [
        ("malicious_os_system.bin", "posix.system"),
        ("malicious_exec.bin", "exec"),
        ("malicious_nested.bin", "eval"),
    ],
)
def test_malicious_global_refused_without_running(fixture, global_name):
    SENTINEL.unlink(missing_ok=True)
    with pytest.raises(UnsafeCheckpointError) as info:
        TorchBinFile(FIX / fixture)
    msg = str(info.value)
    assert fixture in msg and global_name in msg
    assert not SENTINEL.exists()


def test_malicious_persistent_record_refused():
    with pytest.raises(UnsafeCheckpointError, match=r"malicious_persid\.bin.*persistent record"):
        TorchBinFile(FIX / "malicious_persid.bin")


def test_unsafe_is_input_error():
    assert issubclass(UnsafeCheckpointError, InputError)
    assert "posix.system" not in torchbin.allowed_globals()


def test_legacy_format():
    with pytest.raises(InputError, match=r"legacy\.bin.*legacy \(non-zip\) PyTorch format") as info:
        TorchBinFile(FIX / "legacy.bin")
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_truncated(tmp_path):
    src = (FIX / "basic.bin").read_bytes()
    cut = tmp_path / "cut_in_half.bin"
    cut.write_bytes(src[: len(src) // 2])
    with pytest.raises(InputError, match="cut_in_half.bin"):
        TorchBinFile(cut)


def test_not_a_file(tmp_path):
    with pytest.raises(InputError, match="nope.bin"):
        TorchBinFile(tmp_path / "nope.bin")
    with pytest.raises(InputError, match=str(tmp_path)):
        TorchBinFile(tmp_path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, not a checkpoint" * 10)
    with pytest.raises(InputError, match="junk.bin"):
        TorchBinFile(junk)


def test_missing_record():
    with pytest.raises(InputError, match=r"missing_record\.bin.*archive/data/7"):
        TorchBinFile(FIX / "missing_record.bin")


def test_big_endian_refused(tmp_path):
    import zipfile

    src = FIX / "basic.bin"
    dst = tmp_path / "big_endian.bin"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            zout.writestr(info, data)
    with pytest.raises(InputError, match=r"big_endian\.bin.*byteorder"):
        TorchBinFile(dst)


def test_unknown_tensor_name():
    with TorchBinFile(FIX / "basic.bin") as f, pytest.raises(InputError, match="nonexistent"):
        f.get("nonexistent")


def test_lazy_huge_tensor_never_read():
    """A record claiming 2**31 float32 (8 GiB) on a 16-byte member: parsing never touches it."""
    with TorchBinFile(FIX / "bogus_huge.bin") as f:
        assert f.shape("huge") == (2**31,) and f.dtype("huge") == np.float32
        np.testing.assert_array_equal(f.get("small"), np.arange(4, dtype=np.float32))
        with pytest.raises(InputError, match=r"bogus_huge\.bin.*'huge'.*holds 16 bytes"):
            f.get("huge")


def test_get_maps_only_that_tensor(monkeypatch):
    calls = []
    real = TorchBinFile._map

    def spy(self, offset, count, dtype):
        calls.append((offset, count * dtype.itemsize))
        return real(self, offset, count, dtype)

    monkeypatch.setattr(TorchBinFile, "_map", spy)
    f = TorchBinFile(FIX / "neox" / "pytorch_model.bin")
    assert calls == []  # opening parses data.pkl only
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    f.get(name)
    member = f._members[f._records[name].key]
    assert calls == [(member.data_offset, 96 * 32 * 2)]
    f.close()


def test_view_outlives_close():
    f = TorchBinFile(FIX / "basic.bin")
    view = f.get("transposed", copy=False)
    f.close()
    same_bits(view, np.load(FIX / "basic_expected.npz")["transposed"])
    with pytest.raises(InputError, match="closed"):
        f.get("f32")


def test_copy_of_fixture_in_odd_place(tmp_path):
    """Reads by absolute offsets computed from local headers, not from the archive name."""
    dst = tmp_path / "renamed model.bin"
    shutil.copy(FIX / "basic.bin", dst)
    os.chmod(dst, 0o444)
    with TorchBinFile(dst) as f:
        same_bits(f.get("col_slice"), np.load(FIX / "basic_expected.npz")["col_slice"])


# ---- hostile archives, made here (tests/hostile.py): bounded before anything is built --------

_OPEN_UNDER_1GIB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from spinjax.errors import InputError
from spinjax.sources.torchbin import TorchBinFile
try:
    TorchBinFile(sys.argv[1])
except InputError as e:
    print(e)
    sys.exit(2)
"""


def _open_under_1gib(path: Path) -> subprocess.CompletedProcess:
    """Open ``path`` in a process that cannot map more than 1 GiB: exit 2 and the message on
    InputError, exit 1 with a MemoryError traceback if the reader tried to inflate the bomb."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _OPEN_UNDER_1GIB, str(path)], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip


@pytest.mark.parametrize("declared", ["honest", "lying"])
@pytest.mark.slow
def test_zip_bomb_refused_without_inflating(tmp_path, declared):
    """A 2 MB data.pkl deflating to 2 GiB: refused from its declared size, or (when the header
    lies) read only up to what it declares, in a process limited to 1 GiB."""
    bomb = hostile.deflated_zeros(2 << 30)
    size = 2 << 30 if declared == "honest" else 1000
    path = hostile.torch_zip(tmp_path / "bomb.bin", b"", {}, pkl=hostile.Member(
        "archive/data.pkl", bomb, zipfile.ZIP_DEFLATED, size=size, crc=0))  # fmt: skip
    assert path.stat().st_size < 3 << 20
    done = _open_under_1gib(path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(path) in done.stdout and "archive/data.pkl" in done.stdout
    assert ("declares 2147483648 bytes" if declared == "honest" else "CRC") in done.stdout


def test_other_compression_of_data_pkl_refused(tmp_path):
    """bzip2 and lzma inflate without a bound per step in zipfile: only stored/deflate are read."""
    pkl = hostile.Member("archive/data.pkl", bz2.compress(bytes(1 << 20)), zipfile.ZIP_BZIP2, size=1 << 20)
    path = hostile.torch_zip(tmp_path / "bz.bin", b"", {}, pkl=pkl)
    bzip2 = r"bz\.bin: record 'archive/data\.pkl' uses zip compression method 12"
    with pytest.raises(InputError, match=bzip2):
        TorchBinFile(path)


def test_compressed_storage_refused(tmp_path):
    data = hostile.state_dict_pickle({"w": hostile.tensor_pickle("FloatStorage", "0", 4, (4,))})
    storage = hostile.Member("archive/data/0", zlib.compress(bytes(16))[2:-4], zipfile.ZIP_DEFLATED, size=16)
    path = hostile.torch_zip(tmp_path / "z.bin", data, {}, extra=[storage])
    with pytest.raises(InputError, match=r"z\.bin: record 'archive/data/0' is compressed"):
        TorchBinFile(path)


def test_two_data_pkl_members_are_ambiguous(tmp_path):
    data = hostile.state_dict_pickle({})
    two = hostile.torch_zip(tmp_path / "two.bin", data, {}, extra=[hostile.Member("other/data.pkl", data)])
    with pytest.raises(InputError, match=r"two\.bin: 2 '<archive>/data\.pkl' members \('archive/data"):
        TorchBinFile(two)
    again = hostile.Member("archive/data.pkl", data)
    same = hostile.torch_zip(tmp_path / "same.bin", data, {}, extra=[again])
    with pytest.raises(InputError, match=r"same\.bin: member 'archive/data\.pkl' appears more than once"):
        TorchBinFile(same)


def test_deeply_nested_state_dict_is_input_error(tmp_path):
    path = hostile.torch_zip(tmp_path / "deep.bin", hostile.nested_pickle(5000), {})
    deep = r"deep\.bin: state dict nests dicts more than 64 deep \(at 'a\.a\.a"
    with pytest.raises(InputError, match=deep):
        TorchBinFile(path)
    ok = hostile.torch_zip(tmp_path / "ok.bin", hostile.nested_pickle(torchbin.MAX_NESTING - 1), {})
    assert TorchBinFile(ok).keys() == []  # as deep as allowed, and no tensors in it


def test_shared_sub_dicts_bounded(tmp_path, monkeypatch):
    """Each level holds the one below twice (memo references): 2**40 keys to walk."""
    levels = b"}q\x00"
    for i in range(1, 41):
        below = b"h" + bytes([i - 1])
        levels += b"}(" + hostile._str("a") + below + hostile._str("b") + below + b"uq" + bytes([i])
    path = hostile.torch_zip(tmp_path / "dag.bin", b"\x80\x02" + levels + b".", {})
    monkeypatch.setattr(torchbin, "MAX_ENTRIES", 1000)
    with pytest.raises(InputError, match=r"dag\.bin: state dict has more than 1000 entries"):
        TorchBinFile(path)


def test_pickle_opcodes_and_memo_bounded(tmp_path, monkeypatch):
    memo = hostile.torch_zip(tmp_path / "memo.bin", b"\x80\x02Nr\xf0\xff\xff\xff.", {})
    with pytest.raises(InputError, match=r"memo\.bin: archive/data\.pkl stores memo entry 4294967280"):
        TorchBinFile(memo)  # the C unpickler would size its memo table to 2**32 entries
    monkeypatch.setattr(torchbin, "MAX_PICKLE_OPS", 1000)
    many = hostile.torch_zip(tmp_path / "many.bin", b"\x80\x02}" + b"N0" * 1000 + b".", {})
    with pytest.raises(InputError, match=r"many\.bin: archive/data\.pkl has more than 1000 pickle opcodes"):
        TorchBinFile(many)


# ---- the same reader on byte ranges (how hub files are read)


class _Ranges:
    """A file held in memory, read by byte ranges (a ByteSource), logging every read."""

    def __init__(self, path: Path, data: bytes | None = None):
        self.label, self.data = str(path), path.read_bytes() if data is None else data
        self.size, self.reads = len(self.data), []

    def read(self, start: int, stop: int) -> bytes:
        assert 0 <= start <= stop <= self.size
        self.reads.append((start, stop))
        return self.data[start:stop]

    def read_many(self, spans):
        return [self.read(a, b) for a, b in spans]


@pytest.mark.parametrize("fixture", ["basic.bin", "v3_dtypes.bin", "parameter.bin", "neox/pytorch_model.bin"])
def test_ranges_read_what_the_file_holds_and_no_byte_twice(fixture):
    source = _Ranges(FIX / fixture)
    ranged = TorchBinFile(source)
    assert len(source.reads) == 3  # the end records, the central directory, data.pkl (and byteorder)
    with TorchBinFile(FIX / fixture) as local:
        assert ranged.keys() == local.keys()
        for name in local.keys():
            same_bits(ranged.get(name), local.get(name))
            assert ranged.placement(name) == local.placement(name)
    opening = sorted(source.reads[:3])
    assert all(a[1] <= b[0] for a, b in zip(opening[:-1], opening[1:], strict=True))


@pytest.mark.parametrize(
    "fixture, error",
    [
        ("malicious_os_system.bin", r"refusing to unpickle global 'posix.system'"),
        ("malicious_exec.bin", r"refusing to unpickle global '__builtin__.exec'"),
        ("malicious_persid.bin", r"refusing persistent record"),
        ("legacy.bin", r"legacy \(non-zip\) PyTorch format"),
        ("missing_record.bin", r"archive/data/7"),
    ],
)
def test_ranges_refuse_what_the_file_reader_refuses(fixture, error):
    SENTINEL.unlink(missing_ok=True)
    with pytest.raises(InputError, match=rf"{fixture}.*{error}"):
        TorchBinFile(_Ranges(FIX / fixture))
    assert not SENTINEL.exists()


def test_metadata_sizes_are_bounded_before_they_are_read(monkeypatch):
    path = FIX / "neox" / "pytorch_model.bin"
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory entry of data.pkl, the first record
    assert data[entry + 46 : entry + 46 + 22] == b"pytorch_model/data.pkl"
    data[entry + 24 : entry + 28] = (1 << 31).to_bytes(4, "little")  # its size: 2 GiB
    source = _Ranges(path, bytes(data))
    with pytest.raises(
        InputError, match=r"pytorch_model\.bin: record 'pytorch_model/data\.pkl' declares 2147483648"
    ):
        TorchBinFile(source)
    assert all(b - a < 10_000 for a, b in source.reads)

    monkeypatch.setattr(torchbin, "METADATA_BOUND", 1000)  # the central directory is ~2.4 kB
    with pytest.raises(InputError, match=r"asks for \d+ bytes of metadata, more than the 1000 allowed"):
        TorchBinFile(_Ranges(path))
