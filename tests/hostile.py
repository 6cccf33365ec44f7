"""Hostile inputs made at test time: zip archives assembled byte by byte, pickles opcode by opcode.

Nothing here inflates or unpickles what it writes; the tests hand the files to spinjax.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Member:
    """A zip member as stored: its (possibly compressed) bytes and what its headers declare."""

    name: str
    data: bytes
    method: int = zipfile.ZIP_STORED
    size: int | None = None  # declared uncompressed size (default: len(data))
    crc: int | None = None  # declared CRC-32 (default: that of data)


def write_zip(path: Path, members: list[Member]) -> Path:
    """A zip archive with exactly these members (duplicates and lies included), no zip64."""
    body, central = bytearray(), bytearray()
    for m in members:
        name = m.name.encode()
        size = len(m.data) if m.size is None else m.size
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        offset = len(body)
        sizes = (crc, len(m.data), size, len(name), 0)
        body += struct.pack(zipfile.structFileHeader, zipfile.stringFileHeader, 20, 0, 0, m.method, 0, 0x21,
                            *sizes) + name + m.data  # fmt: skip
        central += struct.pack(zipfile.structCentralDir, zipfile.stringCentralDir, 20, 3, 20, 0, 0, m.method,
                               0, 0x21, *sizes, 0, 0, 0, 0, offset) + name  # fmt: skip
    end = struct.pack(zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0, len(members), len(members),
                      len(central), len(body), 0)  # fmt: skip
    path.write_bytes(bytes(body + central + end))
    return path


def deflated_zeros(n_bytes: int, chunk: int = 16 << 20) -> bytes:
    """A raw deflate stream of ``n_bytes`` zeros (a multiple of ``chunk``), compressed ~1000:1
    without ever holding or compressing more than ``chunk`` zeros: after a full flush, deflate
    refers to nothing before it, so the compressed chunk can simply be repeated."""
    assert n_bytes % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return piece * (n_bytes // chunk) + compressor.flush(zlib.Z_FINISH)


# ---- pickles, opcode by opcode (protocol 2), as torch writes a state dict's data.pkl


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def tensor_pickle(
    storage: str, key: str, numel: int, shape: tuple[int, ...], dtype: str | None = None
) -> bytes:
    """``torch._utils._rebuild_tensor_v2`` of a contiguous tensor on a ``torch.<storage>``; with
    ``dtype`` (``float8_e4m3fn``...), ``_rebuild_tensor_v3`` on an untyped storage of ``numel`` bytes."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    stype = _global("torch", storage) if dtype is None else _global("torch.storage", "UntypedStorage")
    pid = _tuple([_str("storage"), stype, _str(key), _str("cpu"), _int(numel)]) + b"Q"
    args = [pid, _int(0), _tuple([_int(s) for s in shape]), _tuple([_int(s) for s in strides]), b"\x89",
            _global("collections", "OrderedDict") + b")R"]  # fmt: skip
    if dtype is None:
        return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"
    return _global("torch._utils", "_rebuild_tensor_v3") + _tuple([*args, _global("torch", dtype)]) + b"R"


_STORAGES = {"float32": "FloatStorage", "float16": "HalfStorage", "float64": "DoubleStorage",
             "bfloat16": "BFloat16Storage", "int64": "LongStorage", "uint8": "ByteStorage",
             "bool": "BoolStorage", "complex64": "ComplexFloatStorage"}  # fmt: skip


def torch_bin(path: Path, tensors: dict) -> Path:
    """``torch.save`` of a state dict of numpy arrays, as torch lays it out (float8: v3)."""
    entries, storages = {}, {}
    for i, (name, array) in enumerate(tensors.items()):
        key, dtype = str(i), str(array.dtype)
        if dtype.startswith("float8"):
            entries[name] = tensor_pickle("", key, array.nbytes, array.shape, dtype)
        else:
            entries[name] = tensor_pickle(_STORAGES[dtype], key, array.size, array.shape)
        storages[key] = array.tobytes()
    return torch_zip(path, state_dict_pickle(entries), storages)


def state_dict_pickle(entries: dict[str, bytes]) -> bytes:
    """A pickled dict of name -> pickled value (e.g. :func:`tensor_pickle`)."""
    items = b"".join(_str(k) + v for k, v in entries.items())
    return b"\x80\x02}(" + items + b"u."


def nested_pickle(depth: int) -> bytes:
    """{"a": {"a": ... {} ...}}: ``depth`` dicts inside the outer one (pickle needs no recursion)."""
    return b"\x80\x02" + (b"}" + _str("a")) * depth + b"}" + b"s" * depth + b"."


def torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes], *, pkl: Member | None = None,
              extra: list[Member] = ()) -> Path:  # fmt: skip
    """A torch-layout zip: archive/data.pkl (or ``pkl``), byteorder, data/<key> records."""
    members = [pkl or Member("archive/data.pkl", data_pkl), Member("archive/byteorder", b"little")]
    members += [Member(f"archive/data/{k}", v) for k, v in storages.items()]
    return write_zip(path, [*members, *extra])
