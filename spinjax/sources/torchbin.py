"""Read PyTorch ``pytorch_model*.bin`` state dicts without torch and without executing code.

A torch (>= 1.6) checkpoint is a zip archive (members stored uncompressed)::

    <archive>/data.pkl        the pickled state dict
    <archive>/data/<key>      raw bytes of each storage
    <archive>/byteorder       "little" or "big" (absent in old files: little)

``data.pkl`` is parsed by a restricted unpickler: ``find_class`` resolves only the
tensor-rebuild globals that torch writes for state dicts, each to a small local
stand-in (torch is never imported), and ``persistent_load`` accepts only
``('storage', <storage type>, key, location, numel)`` records.  Any other global is
refused with :class:`~spinjax.errors.UnsafeCheckpointError` before it is looked up,
so nothing in the pickle is ever executed.

Parsing records only (storage key, dtype, offset, shape, stride); a tensor's
:class:`~spinjax.sources.ranges.Placement` (where its bytes lie) needs its storage's local
header, and its bytes are read only when asked for: through a memory map of exactly the region
it covers in a local file, or as byte ranges of a hub file (the same parsing runs on both: the
zip is read through a :class:`~spinjax.sources.ranges.ByteSource`, and every size read from
the file is bounded before it is used).
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..errors import InputError, UnsafeCheckpointError
from .ranges import ByteSource, LocalFile, Placement, merge

__all__ = ["TorchBinFile"]

# torch < 1.6 (`_use_new_zipfile_serialization=False`) starts with a pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes
_LOCAL_HEADER_SIG = b"PK\x03\x04"

_BF16 = np.dtype(ml_dtypes.bfloat16)

# Bounds on what a hostile archive can make us inflate, build or walk, far above real files:
# a state dict's data.pkl holds names, shapes and storage keys, about 100 bytes and 30 pickle
# opcodes per tensor (a 7B-parameter shard: tens of KB). The sizes are checked against the
# zip's declared sizes before anything is inflated; the opcodes are counted before unpickling,
# since one opcode byte can make a ~200-byte object and a memo index a table of that size.
MAX_PICKLE_BYTES = 32 << 20
MAX_PICKLE_OPS = 1 << 21  # about 70,000 tensors in one file
MAX_BYTEORDER_BYTES = 16  # "little" or "big"
MAX_NESTING = 64  # dicts within dicts of a state dict (real ones: 1, or 2 under "model")
MAX_ENTRIES = 1 << 20  # keys visited while flattening (memo references can share sub-dicts)
MAX_NAME_CHARS = 64 << 20  # all tensor names together

# Legacy typed storage classes (`torch.FloatStorage`, ...): what torch writes in
# persistent records, with the element dtype of the storage.  None: known but unsupported.
_STORAGE_DTYPES: dict[str, np.dtype | None] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _BF16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "QInt8Storage": None,
    "QInt32Storage": None,
    "QUInt8Storage": None,
    "QUInt4x2Storage": None,
    "QUInt2x4Storage": None,
}

# torch dtypes, as pickled (`torch.uint16`, ...): the third argument of _rebuild_tensor_v3,
# which torch uses for dtypes without a legacy storage class.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": _BF16,
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _TORCH_DTYPES["float8_e8m0fnu"] = np.dtype(ml_dtypes.float8_e8m0fnu)


def _short(obj: object, limit: int = 160) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- stand-ins


class _Frozen:
    """Base of the stand-ins: a pickle may not BUILD (set state on) any of them."""

    __slots__ = ()

    def __setstate__(self, state):  # called by the BUILD opcode
        raise UnsafeCheckpointError(f"pickle tries to set state on {type(self).__name__} ({_short(state)})")


class _StorageType(_Frozen):
    """Stand-in for `torch.FloatStorage`, `torch.storage.UntypedStorage`, ..."""

    __slots__ = ("name", "dtype", "untyped")

    def __init__(self, name: str, dtype: np.dtype | None, untyped: bool = False):
        self.name, self.dtype, self.untyped = name, dtype, untyped

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class _DType(_Frozen):
    """Stand-in for a pickled `torch.<dtype>`."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<torch.{self.name}>"


class _TypeMarker(_Frozen):
    """Stand-in for `torch.Tensor` / `torch.nn.Parameter` (arguments of _rebuild_from_type_v2)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Rebuild(_Frozen):
    """A rebuild function callable by REDUCE; one instance per unpickler."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)


class _OrderedDict(OrderedDict):
    """Stand-in for `collections.OrderedDict` (state dicts and empty backward hooks).

    `nn.Module.state_dict()` carries a `_metadata` attribute, which pickles as BUILD
    state: accepted (when it is a dict) and dropped.
    """

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f"pickle tries to set state {_short(state)} on an OrderedDict")

    def __reduce__(self):  # pragma: no cover - never pickled
        raise TypeError("not picklable")


@dataclass(frozen=True)
class _StorageRef:
    key: str
    stype: _StorageType
    numel: int  # elements of stype (bytes for UntypedStorage)

    def __setstate__(self, state):  # pragma: no cover - frozen dataclass, BUILD refused
        raise UnsafeCheckpointError("pickle tries to set state on a storage")


@dataclass(frozen=True)
class _TensorRecord:
    key: str  # storage member: <archive>/data/<key>
    dtype: np.dtype
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements of dtype

    def __setstate__(self, state):
        raise UnsafeCheckpointError("pickle tries to set state on a tensor")


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} should be an int, got {_short(value)}")
    return value


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise InputError(f"{what} should be a tuple of ints, got {_short(value)}")
    return tuple(_int(v, what) for v in value)


def _tensor(storage, storage_offset, size, stride, dtype: np.dtype | None) -> _TensorRecord:
    if not isinstance(storage, _StorageRef):
        raise InputError(f"tensor storage should be a persistent storage record, got {_short(storage)}")
    if dtype is None:
        if storage.stype.untyped:
            raise InputError("tensor on an untyped storage without a dtype")
        dtype = storage.stype.dtype
    if dtype is None:
        raise InputError(f"unsupported storage type {storage.stype.name} (quantized tensors)")
    shape = _ints(size, "tensor size")
    strides = _ints(stride, "tensor stride")
    offset = _int(storage_offset, "tensor storage offset")
    if len(shape) != len(strides):
        raise InputError(f"tensor size {shape} and stride {strides} differ in length")
    if offset < 0 or any(s < 0 for s in shape) or any(s < 0 for s in strides):
        raise InputError(f"negative size, stride or offset: {shape}, {strides}, {offset}")
    return _TensorRecord(storage.key, dtype, offset, shape, strides)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    return _tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    if not isinstance(dtype, _DType):
        raise InputError(f"_rebuild_tensor_v3 dtype should be a torch dtype, got {_short(dtype)}")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _TensorRecord):
        raise InputError(f"parameter data should be a tensor, got {_short(data)}")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data)


def _rebuild_from_type_v2(func, new_type, args, state):
    if not isinstance(func, _Rebuild) or not isinstance(new_type, _TypeMarker):
        raise InputError(f"_rebuild_from_type_v2 with {_short(func)}, {_short(new_type)}")
    if not isinstance(args, tuple):
        raise InputError(f"_rebuild_from_type_v2 arguments should be a tuple, got {_short(args)}")
    return func(*args)


_REBUILD_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}


def allowed_globals() -> list[str]:
    """The dotted names of every global a checkpoint may reference."""
    names = [f"{m}.{n}" for m, n in _REBUILD_FUNCTIONS]
    names += ["collections.OrderedDict", "torch.storage.UntypedStorage", "torch.UntypedStorage"]
    names += [f"torch.{n}" for n in _STORAGE_DTYPES]
    names += [f"torch.{n}" for n in _TORCH_DTYPES]
    names += ["torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter"]
    return names


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuild globals, to local stand-ins; refuses everything else."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self._where = where
        self._storage_refs: dict[str, _StorageRef] = {}
        # Fresh objects per load, so that nothing a pickle does can outlive it.
        self._globals: dict[tuple[str, str], object] = {
            key: _Rebuild(key[1], fn) for key, fn in _REBUILD_FUNCTIONS.items()
        }
        self._globals[("collections", "OrderedDict")] = _OrderedDict
        for name, dtype in _STORAGE_DTYPES.items():
            self._globals[("torch", name)] = _StorageType(name, dtype)
        untyped = _StorageType("UntypedStorage", np.dtype(np.uint8), untyped=True)
        self._globals[("torch.storage", "UntypedStorage")] = untyped
        self._globals[("torch", "UntypedStorage")] = untyped
        for name, dtype in _TORCH_DTYPES.items():
            self._globals[("torch", name)] = _DType(name, dtype)
        for module, name in [
            ("torch", "Tensor"),
            ("torch._tensor", "Tensor"),
            ("torch.nn.parameter", "Parameter"),
        ]:
            self._globals[(module, name)] = _TypeMarker(f"{module}.{name}")

    def find_class(self, module, name):
        found = self._globals.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"{self._where}: refusing to unpickle global '{module}.{name}': only the "
                "tensor-rebuild globals of a PyTorch state dict are allowed (nothing was "
                "executed; the file may be malicious)"
            )
        return found

    def persistent_load(self, pid):
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] not in ("storage", b"storage")
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], (str, bytes))
            or not isinstance(pid[3], (str, bytes))
            or isinstance(pid[4], bool)
            or not isinstance(pid[4], int)
            or pid[4] < 0
        ):
            raise UnsafeCheckpointError(
                f"{self._where}: refusing persistent record {_short(pid)}: only "
                "('storage', <storage type>, key, location, numel) records are allowed"
            )
        _, stype, key, _location, numel = pid
        key = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        if not key or "/" in key or key in (".", ".."):
            raise UnsafeCheckpointError(f"{self._where}: bad storage key {key!r}")
        ref = self._storage_refs.get(key)
        if ref is None:
            ref = self._storage_refs[key] = _StorageRef(key, stype, numel)
        return ref


# --------------------------------------------------------------------------- the reader

# Sizes read from the file are bounded before anything is read: the zip's central directory of
# even the largest checkpoints is well under this (its records: MAX_PICKLE_BYTES and the like).
METADATA_BOUND = 64 << 20
# EOCD (22 bytes) + zip64 end-of-central-directory locator (20) and record (56): read in one go.
_TAIL = 22 + 20 + 56
# A local header's extra field as torch writes it: padding to 64-byte alignment ("FB" field) plus
# a zip64 field; the first read of a metadata record takes this much for it (a longer one is
# completed by a second read).
_LOCAL_EXTRA_GUESS = 4 + 64 + 20


@dataclass(frozen=True)
class _Member:
    name: str
    data_offset: int  # absolute offset of the member's bytes in the file
    size: int


class _RangedIO(io.RawIOBase):
    """A :class:`ByteSource` as a seekable file for :mod:`zipfile`: every read is one range of
    the source, except what earlier prefetched windows hold; no read exceeds ``bound`` bytes."""

    def __init__(self, source: ByteSource, bound: int):
        self._source, self._bound, self._pos = source, bound, 0
        self._windows: list[tuple[int, bytes]] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.size}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """Read these ranges now, in one go; later reads inside them are served from memory."""
        spans = [(a, min(b, self._source.size)) for a, b in spans if a < self._source.size]
        for (a, _), data in zip(spans, self._source.read_many(spans), strict=True):
            self._windows.append((a, data))

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._source.size - self._pos))
        data = self._get(self._pos, self._pos + n)
        buffer[:n] = data
        self._pos += n
        return n

    def _get(self, a: int, b: int) -> bytes:
        """Bytes [a, b): what windows hold from memory, each gap between them by one read."""
        pieces, pos = [], a
        while pos < b:
            held = next(((s, w) for s, w in self._windows if s <= pos < s + len(w)), None)
            if held is not None:
                piece = held[1][pos - held[0] : b - held[0]]
            else:
                stop = min([s for s, _ in self._windows if pos < s < b], default=b)
                if stop - pos > self._bound:
                    raise InputError(
                        f"{self._source.label}: a zip record asks for {stop - pos} bytes of metadata, more "
                        f"than the {self._bound} allowed (corrupt or not a checkpoint)"
                    )
                piece = self._source.read(pos, stop)
                self._windows.append((pos, piece))
            pieces.append(piece)
            pos += len(piece)
        return b"".join(pieces)


class TorchBinFile:
    """A PyTorch zip checkpoint (``torch.save`` of a state dict), read lazily and safely.

    ``source`` is a path or a :class:`~spinjax.sources.ranges.ByteSource` (a hub file read by
    range requests): opening reads the zip's end records, its central directory and ``data.pkl``;
    a storage's local header is read when a tensor on it is first placed (:meth:`locate` places
    many at once), its bytes only when asked for.

    >>> with TorchBinFile("pytorch_model.bin") as f:
    ...     w = f.get("gpt_neox.layers.0.attention.query_key_value.weight")
    """

    def __init__(self, source: str | os.PathLike | ByteSource):
        self._source: ByteSource | None = None
        self._records: dict[str, _TensorRecord] = {}
        self._members: dict[str, _Member] = {}  # storage key -> located member
        self._infos: dict[str, zipfile.ZipInfo] = {}  # storage key -> its central directory entry
        if isinstance(source, (str, os.PathLike)):
            local = LocalFile(source)  # InputError "not a file" / "cannot open"
            self._source, self._local = local, True
            fileobj = open(local.label, "rb")  # noqa: SIM115 - closed below
        else:
            self._source, self._local = source, False
            fileobj = _RangedIO(source, METADATA_BOUND)
            fileobj.prefetch([(max(0, source.size - _TAIL), source.size)])
        self.path = self._source.label
        try:
            with fileobj:
                self._open(fileobj)
        except BaseException:
            self.close()
            raise

    # ---- parsing

    def _open(self, fileobj) -> None:
        try:
            zf = zipfile.ZipFile(fileobj)
            infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
            head = self._source.read(0, min(512, self._source.size))
            if head.startswith(_LEGACY_MAGIC) or head[257:262] == b"ustar":
                raise InputError(
                    f"{self.path}: legacy (non-zip) PyTorch format is not supported; re-save with "
                    "torch >= 1.6 (torch.save(torch.load(path), path)) or convert to safetensors"
                ) from e
            kind = "a pickle, not a zip" if head[:1] == b"\x80" else "not a valid zip archive"
            raise InputError(
                f"{self.path}: not a PyTorch zip checkpoint ({kind}; truncated or corrupt?): {e}"
            ) from e

        repeated = sorted(name for name, n in Counter(i.filename for i in infos).items() if n > 1)
        if repeated:  # zip readers disagree on which copy counts: a tampered or broken file
            raise InputError(f"{self.path}: member {_short(repeated[0])} appears more than once in the zip")
        pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if not pkl:
            raise InputError(f"{self.path}: no '<archive>/data.pkl' member: not a PyTorch zip checkpoint")
        if len(pkl) > 1:
            names = ", ".join(_short(i.filename, 60) for i in pkl[:3]) + (", ..." if len(pkl) > 3 else "")
            raise InputError(
                f"{self.path}: {len(pkl)} '<archive>/data.pkl' members ({names}); "
                "a PyTorch checkpoint has one"
            )
        prefix = pkl[0].filename[: -len("data.pkl")]
        by_name = {i.filename: i for i in infos}
        byteorder = by_name.get(prefix + "byteorder")
        metadata = [i for i in (pkl[0], byteorder) if i is not None]
        for info in metadata:  # before any of their bytes is fetched
            self._check_declared(info, MAX_PICKLE_BYTES if info is pkl[0] else MAX_BYTEORDER_BYTES)
        if isinstance(fileobj, _RangedIO):  # both records in one read when they lie close
            offsets = sorted({i.header_offset for i in infos} | {zf.start_dir})
            spans = [_record_span(i, offsets) for i in metadata]
            fileobj.prefetch(merge(spans, max_gap=64 << 10, overfetch=1.0))

        if byteorder is not None:
            order = self._read_member(zf, byteorder, MAX_BYTEORDER_BYTES).strip()
            if order != b"little":
                raise InputError(
                    f"{self.path}: byteorder record says {order.decode('ascii', 'replace')!r}; "
                    "only little-endian checkpoints are supported"
                )

        data = self._read_member(zf, pkl[0], MAX_PICKLE_BYTES)
        self._check_pickle(data, pkl[0].filename)
        unpickler = _RestrictedUnpickler(io.BytesIO(data), self.path)
        try:
            obj = unpickler.load()
        except InputError as e:
            if self.path in str(e):
                raise
            raise type(e)(f"{self.path}: {pkl[0].filename}: {e}") from None
        except RecursionError as e:
            raise InputError(f"{self.path}: {pkl[0].filename} nests too deeply") from e
        except Exception as e:  # malformed pickle: opcodes, types, truncation
            raise InputError(f"{self.path}: cannot parse {pkl[0].filename}: {type(e).__name__}: {e}") from e

        if not isinstance(obj, dict):
            raise InputError(f"{self.path}: holds a {type(obj).__name__}, not a state dict of tensors")
        self._flatten(obj)

        for key in sorted({r.key for r in self._records.values()}):
            name = f"{prefix}data/{key}"
            info = by_name.get(name)
            if info is None:
                raise InputError(f"{self.path}: storage record '{name}' is missing from the archive")
            if info.compress_type != zipfile.ZIP_STORED:
                raise InputError(
                    f"{self.path}: record '{info.filename}' is compressed; torch stores records uncompressed"
                )
            self._infos[key] = info

    def _flatten(self, obj: dict) -> None:
        """Record the tensors of a state dict, nested dicts joined by dots, depth-first in order.

        Walked with an explicit stack, and bounded (:data:`MAX_NESTING`, :data:`MAX_ENTRIES`,
        :data:`MAX_NAME_CHARS`): a pickle can nest dicts thousands deep, or share one sub-dict
        between keys so that the walk doubles at each level.
        """
        stack = [("", iter(obj.items()))]
        entries = chars = 0
        while stack:
            prefix, items = stack[-1]
            for k, v in items:
                entries += 1
                if entries > MAX_ENTRIES:
                    raise InputError(f"{self.path}: state dict has more than {MAX_ENTRIES} entries")
                if not isinstance(k, str):
                    raise InputError(f"{self.path}: state dict key {_short(k)} is not a string")
                if isinstance(v, _TensorRecord):
                    chars += len(prefix) + len(k)
                    self._records[prefix + k] = v
                elif isinstance(v, dict):
                    if len(stack) >= MAX_NESTING:
                        raise InputError(
                            f"{self.path}: state dict nests dicts more than {MAX_NESTING} deep "
                            f"(at {_short(prefix + k, 80)})"
                        )
                    chars += len(prefix) + len(k)
                    stack.append((f"{prefix}{k}.", iter(v.items())))
                # other values (ints, strings, None) are not tensors: skipped
                if chars > MAX_NAME_CHARS:
                    raise InputError(f"{self.path}: state dict names exceed {MAX_NAME_CHARS} characters")
                if stack[-1][1] is not items:  # descend into the dict just pushed
                    break
            else:
                stack.pop()

    def _check_pickle(self, data: bytes, member: str) -> None:
        """Refuse a pickle that would build more than :data:`MAX_PICKLE_OPS` objects or grow
        the unpickler's memo table past that (a PUT index is a table size), before unpickling."""
        try:
            for n, (op, arg, _) in enumerate(pickletools.genops(data)):
                if n >= MAX_PICKLE_OPS:
                    raise InputError(
                        f"{self.path}: {member} has more than {MAX_PICKLE_OPS} pickle opcodes, more than "
                        "a state dict's metadata needs"
                    )
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg < MAX_PICKLE_OPS:
                    raise InputError(f"{self.path}: {member} stores memo entry {arg}, out of range")
        except (ValueError, OverflowError) as e:  # what genops raises for malformed opcodes
            raise InputError(f"{self.path}: cannot parse {member}: {e}") from e

    def _check_declared(self, info: zipfile.ZipInfo, limit: int) -> None:
        """Refuse a metadata record from what the zip declares of it: more than ``limit`` bytes
        (inflated or not), or a compression whose inflating ``zipfile`` does not bound."""
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(
                f"{self.path}: record '{info.filename}' uses zip compression method {info.compress_type}; "
                "PyTorch stores records uncompressed"
            )
        if max(info.file_size, info.compress_size) > limit:
            raise InputError(
                f"{self.path}: record '{info.filename}' declares {info.file_size} bytes; more than "
                f"{limit} is not a PyTorch checkpoint's metadata (refused without inflating it)"
            )

    def _read_member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
        """A small member's bytes; refused before inflating when it declares more than ``limit``.

        ``zipfile`` stops at the declared size and then checks the CRC, so a member whose
        compressed data inflates beyond what it declares is read only up to that size; it
        bounds each inflate step only for deflate, so other methods are refused."""
        self._check_declared(info, limit)
        try:
            with zf.open(info) as member:
                return member.read(info.file_size)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error) as e:
            raise InputError(f"{self.path}: cannot read record '{info.filename}': {e}") from e

    def locate(self, names: list[str]) -> None:
        """Read the local headers of the storages of tensors ``names`` not located yet (at once)."""
        keys = sorted({self._record(n).key for n in names} - set(self._members))
        if not keys:
            return
        source = self._open_source()
        infos = [self._infos[k] for k in keys]
        spans = [(i.header_offset, i.header_offset + _LOCAL_HEADER.size + len(_raw_name(i))) for i in infos]
        if any(b > source.size for _, b in spans):
            bad = next(i for i, (_, b) in zip(infos, spans, strict=True) if b > source.size)
            raise InputError(
                f"{self.path}: bad local header for record '{bad.filename}' (truncated or corrupt)"
            )
        for key, info, header in zip(keys, infos, source.read_many(spans), strict=True):
            self._members[key] = self._member(info, header, source.size)

    def _member(self, info: zipfile.ZipInfo, header: bytes, fsize: int) -> _Member:
        fields = (
            _LOCAL_HEADER.unpack(header[: _LOCAL_HEADER.size]) if len(header) >= _LOCAL_HEADER.size else None
        )
        if (
            fields is None
            or fields[0] != _LOCAL_HEADER_SIG
            or header[_LOCAL_HEADER.size :] != _raw_name(info)
        ):
            raise InputError(
                f"{self.path}: bad local header for record '{info.filename}' (truncated or corrupt)"
            )
        name_len, extra_len = fields[-2], fields[-1]
        data_offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if data_offset + info.file_size > fsize:
            raise InputError(
                f"{self.path}: record '{info.filename}' extends past the end of the file (truncated?)"
            )
        return _Member(info.filename, data_offset, info.file_size)

    # ---- API

    def keys(self) -> list[str]:
        return list(self._records)

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)

    def _record(self, name: str) -> _TensorRecord:
        try:
            return self._records[name]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._record(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._record(name).dtype

    def storage(self, name: str) -> str:
        """Where the tensor's bytes lie: its storage key, element offset and strides; tensors
        torch saved as views of one parameter (tied weights) give the same string."""
        rec = self._record(name)
        return f"{rec.key}@{rec.offset}:{rec.stride}"

    def placement(self, name: str) -> Placement:
        """Where tensor ``name``'s elements lie in the file (its storage located if need be)."""
        rec = self._record(name)
        self.locate([name])
        member = self._members[rec.key]
        item = rec.dtype.itemsize
        extent = 1 + sum((s - 1) * st for s, st in zip(rec.shape, rec.stride, strict=True))
        start, nbytes = rec.offset * item, extent * item
        if all(s > 0 for s in rec.shape) and start + nbytes > member.size:
            raise InputError(
                f"{self.path}: tensor {name!r} (shape {rec.shape}, stride {rec.stride}, offset "
                f"{rec.offset}, {rec.dtype}) needs bytes [{start}, {start + nbytes}) of record "
                f"'{member.name}', which holds {member.size} bytes"
            )
        return Placement(rec.dtype, rec.shape, rec.stride, member.data_offset + start)

    def get(self, name: str, *, copy: bool = True) -> np.ndarray:
        """The tensor `name`, bit-identical to ``torch.load``.

        Only the bytes this tensor covers are read (memory-mapped for a local file).  With
        ``copy`` (the default) the result is a C-contiguous array and a mapping is released at
        once; without, a read-only (possibly strided) view, valid after :meth:`close`.
        """
        self._open_source()
        place = self.placement(name)
        first, last = place.span(0, place.rows)
        if last == first:
            empty = np.empty(place.shape, place.dtype)
            empty.flags.writeable = copy
            return empty
        buffer = (
            self._map(first, last - first, np.dtype(np.uint8))
            if self._local
            else self._source.read(first, last)
        )
        view = place.view(0, place.rows, buffer, first)
        if copy:
            out = np.array(view, order="C", copy=True)
            del view, buffer  # unmaps
            return out
        return view

    def _open_source(self) -> ByteSource:
        if self._source is None:
            raise InputError(f"{self.path}: file is closed")
        return self._source

    def _map(self, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        """A read-only array of `count` elements at absolute file `offset`, on its own mmap."""
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        delta = offset - aligned
        mm = mmap.mmap(
            self._source.fileno(),
            delta + count * dtype.itemsize,
            access=mmap.ACCESS_READ,
            offset=aligned,
        )
        # The array keeps the mmap alive; it is unmapped when the array is freed.
        return np.frombuffer(mm, dtype=dtype, count=count, offset=delta)

    def close(self) -> None:
        if self._source is not None:
            if self._local:
                self._source.close()
            self._source = None

    def __enter__(self) -> TorchBinFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"TorchBinFile({self.path!r}, {len(self._records)} tensors)"


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """The member name as stored in its headers (UTF-8 when flagged, else cp437, as zipfile reads it)."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


def _record_span(info: zipfile.ZipInfo, offsets: list[int]) -> tuple[int, int]:
    """The bytes that reading a metadata record takes: local header, a guess of its extra field,
    data; not past the next record (``offsets``: where records and the central directory start)."""
    start = info.header_offset
    guess = start + _LOCAL_HEADER.size + len(_raw_name(info)) + _LOCAL_EXTRA_GUESS + info.compress_size
    return start, min(guess, next((o for o in offsets if o > start), guess))
