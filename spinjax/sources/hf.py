"""Checkpoints in Hugging Face layout: config.json and safetensors or pickled .bin weights.

An :class:`HFCheckpoint` knows its config and where every tensor lives; it hands out
:class:`~spinjax.sources.base.Tensor` handles that read only the indexed rows from disk.
Nothing is read until a layout asks for a tensor, and only the tensors the statistics need
are ever asked for. Files come through a :class:`Files` (a local directory here; the hub in
:mod:`spinjax.sources.hub`, whose weights files may be read by byte ranges,
:mod:`spinjax.sources.remote`); :meth:`HFCheckpoint.prefetch` tells them which rows will be read
next, so that a remote file fetches them ahead.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from safetensors import safe_open

from ..errors import InputError, shown
from .base import FetchOptions, Source, Tensor, TensorInfo
from .torchbin import TorchBinFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


MAX_JSON_BYTES = 64 << 20  # config.json, index json: an index of 100,000 tensors is ~10 MB


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; InputError naming the file if it is missing, not a regular
    file (a FIFO would block, a device never end), too large, or not an object."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_JSON_BYTES + 1)
        if len(text) > MAX_JSON_BYTES:
            raise InputError(f"{path}: larger than {MAX_JSON_BYTES} bytes; not a checkpoint's JSON")
        data = json.loads(text)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file not found") from exc
    except RecursionError as exc:
        raise InputError(f"{path}: not valid JSON (nested too deeply)") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            self._handle = safe_open(str(path), framework="numpy")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def tensor(self, name: str) -> _SafetensorsTensor:
        return _SafetensorsTensor(self, name)

    def infos(self) -> list[TensorInfo]:
        """Names, shapes and dtypes from the header (safetensors never stores a tensor twice)."""
        out = []
        for name in self.keys():
            view = self._handle.get_slice(name)
            dtype = SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype())
            out.append(TensorInfo(name, tuple(view.get_shape()), dtype))
        return out

    def prefetch(self, requests: Mapping[str, Sequence[slice]], priority: tuple = (0,)) -> None:
        pass  # a local file: rows are read when indexed

    def release(self) -> None:
        pass


@dataclass
class _SafetensorsTensor:
    file: _SafetensorsFile
    name: str

    def __post_init__(self):
        self._slice = self.file._handle.get_slice(self.name)
        self.shape = tuple(self._slice.get_shape())
        self.dtype = SAFETENSORS_DTYPES.get(self._slice.get_dtype(), self._slice.get_dtype())

    def __getitem__(self, rows: slice) -> np.ndarray:
        if self.dtype.startswith("float8"):  # safetensors reads into numpy's own dtypes only
            raise InputError(
                f"{self.file.path}: tensor {self.name!r} is {self.dtype}, which the safetensors reader "
                "cannot read; save the checkpoint in bfloat16 or float16 (or as a PyTorch .bin)"
            )
        try:
            return self._slice[rows]
        except Exception as exc:
            raise InputError(f"{self.file.path}: cannot read tensor {self.name!r} ({exc})") from exc


# safetensors' dtype names as numpy's (what the layouts check), ml_dtypes' for float8
SAFETENSORS_DTYPES = {
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BOOL": "bool", "C64": "complex64",
    "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32", "I32": "int32",
    "U64": "uint64", "I64": "int64",
}  # fmt: skip


class _TorchBinFile:
    """Adapter of the safe pickle reader to the file interface used here."""

    def __init__(self, path: Path):
        self.path = path
        self._file = TorchBinFile(path)

    def keys(self) -> list[str]:
        return self._file.keys()

    def tensor(self, name: str) -> _TorchBinTensor:
        return _TorchBinTensor(self, name)

    def infos(self) -> list[TensorInfo]:
        """From the pickled records only; ``storage`` tells tied tensors apart."""
        f = self._file
        return [TensorInfo(k, tuple(f.shape(k)), str(f.dtype(k)), f"{self.path.name}/{f.storage(k)}")
                for k in f.keys()]  # fmt: skip

    def prefetch(self, requests: Mapping[str, Sequence[slice]], priority: tuple = (0,)) -> None:
        pass  # a local file: rows are read when indexed

    def release(self) -> None:
        pass


@dataclass
class _TorchBinTensor:
    file: _TorchBinFile
    name: str

    def __post_init__(self):
        self.shape = tuple(self.file._file.shape(self.name))
        self.dtype = str(self.file._file.dtype(self.name))

    def __getitem__(self, rows: slice) -> np.ndarray:
        # a view on the memory map: only the indexed rows are read and copied
        return np.array(self.file._file.get(self.name, copy=False)[rows])


class WeightsFile(Protocol):
    """One weights file: its tensors by name, read lazily."""

    path: Path | str  # for messages

    def keys(self) -> list[str]: ...

    def tensor(self, name: str) -> Tensor:
        """A handle on tensor ``name`` (a key of the file)."""
        ...

    def infos(self) -> list[TensorInfo]:
        """Every tensor as the file's header describes it; no data read."""
        ...

    def prefetch(self, requests: Mapping[str, Sequence[slice]], priority: tuple = (0,)) -> None:
        """These rows of these tensors will be read soon (lowest ``priority`` first)."""
        ...

    def release(self) -> None:
        """Drop what is held in memory for rows not read yet."""
        ...


def open_weights(path: Path) -> WeightsFile:
    """A local weights file: ``*.bin`` (a torch zip) or safetensors."""
    return _TorchBinFile(path) if path.suffix == ".bin" else _SafetensorsFile(path)


WEIGHT_CANDIDATES = (SAFETENSORS_INDEX, "model.safetensors", TORCH_INDEX, "pytorch_model.bin")


class Files(Protocol):
    """Where a checkpoint's files come from."""

    def __call__(self, name: str) -> Path:
        """A local path of the (small) file ``name``; FileNotFoundError if there is none."""
        ...

    def has(self, name: str) -> bool:
        """Whether the weights file ``name`` exists (without reading it where that costs)."""
        ...

    def weights(self, name: str) -> WeightsFile:
        """The weights file ``name``; FileNotFoundError if there is none."""
        ...

    def release(self) -> None:
        """Free what was fetched (hub downloads); local files are never touched."""
        ...


@runtime_checkable
class ListsTensors(Protocol):
    """Files that can list a checkpoint's tensors without fetching its weight files (the hub)."""

    def tensor_infos(self) -> list[TensorInfo] | None:
        """Every tensor, or None when the files must be fetched and read to tell."""
        ...


class LocalFiles:
    """The files of a local directory."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __call__(self, name: str) -> Path:
        path = self.directory / name
        if not path.is_file():
            raise FileNotFoundError(f"file {name!r} not found")
        return path

    def has(self, name: str) -> bool:
        return (self.directory / name).is_file()

    def weights(self, name: str) -> WeightsFile:
        return open_weights(self(name))

    def release(self) -> None:
        pass


_OPENED = itertools.count()  # the order in which checkpoints were opened: their fetches' priority


class HFCheckpoint:
    """One checkpoint in Hugging Face layout: config.json plus weight files.

    Weights are ``*.safetensors`` (preferred) or ``pytorch_model*.bin``, single or sharded
    with an index json. Files come through ``files`` (a local directory by default, or hub
    downloads), and only when a tensor in them is asked for. Tensor names resolve exactly
    or by suffix, so that prefixes such as ``transformer.`` (GPT2LMHeadModel) or ``bert.``
    match the layouts' canonical names.
    """

    def __init__(
        self, directory: str | os.PathLike | None = None, *, step: int = -1, revision: str | None = None,
        files: Files | None = None, label: str | None = None,
    ):  # fmt: skip
        if files is None:
            directory = Path(directory)
            if not directory.is_dir():
                raise InputError(f"{directory}: not a checkpoint directory")
            files = LocalFiles(directory)
        self.label = label or str(directory)
        self.step = step
        self.revision = revision if revision is not None else self.label
        self._fetch = files
        self.config = read_json(self._path("config.json"))
        self._files: dict[str, WeightsFile] = {}
        self._order, self._prefetches = next(_OPENED), itertools.count()

    def _path(self, name: str) -> Path:
        try:
            return self._fetch(name)
        except FileNotFoundError as exc:
            raise InputError(f"{self.label}: {exc}") from None

    def _weight_map(self) -> dict[str, str] | list[str]:
        """Tensor -> file from an index json, or the list of unindexed weight files."""
        for name in WEIGHT_CANDIDATES:
            if not name.endswith(".json"):
                if self._fetch.has(name):
                    return [name]
                continue
            try:
                path = self._fetch(name)
            except FileNotFoundError:
                continue
            weight_map = read_json(path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise InputError(f"{path}: no 'weight_map' object")
            for tensor, file in weight_map.items():
                parts = Path(file).parts if isinstance(file, str) else ()
                if not parts or Path(file).is_absolute() or ".." in parts:
                    raise InputError(
                        f"{path}: weight_map[{shown(tensor)}] should name a weight file beside it, "
                        f"got {shown(file)}"
                    )
            return weight_map
        directory = self._fetch("config.json").parent  # unindexed shards in a local directory
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            names = sorted(p.name for p in directory.glob(pattern))
            if names:
                return names
        raise InputError(
            f"{self.label}: no weights found: none of {', '.join(WEIGHT_CANDIDATES)} "
            "(nor other *.safetensors / pytorch_model*.bin) exists; for a hub repo, they are not on "
            "the hub or not in the local cache"
        )

    @cached_property
    def _where(self) -> dict[str, str]:
        """Tensor -> file, on first need: listing tensors needs no weight file fetched."""
        found = self._weight_map()
        if isinstance(found, dict):
            return dict(found)
        return {key: name for name in found for key in self._file(name).keys()}

    def tensor_infos(self) -> list[TensorInfo]:
        """Every stored tensor from the weight files' headers (see :class:`ListsTensors`)."""
        if isinstance(self._fetch, ListsTensors):
            listed = self._fetch.tensor_infos()
            if listed is not None:
                return listed
        found = self._weight_map()
        names = list(dict.fromkeys(found.values())) if isinstance(found, dict) else found
        return [info for name in names for info in self._file(name).infos()]

    def _file(self, name: str) -> WeightsFile:
        if name not in self._files:
            try:
                self._files[name] = self._fetch.weights(name)
            except FileNotFoundError as exc:
                raise InputError(f"{self.label}: {exc}") from None
        return self._files[name]

    def _resolve(self, name: str) -> str:
        if name in self._where:
            return name
        matches = [k for k in self._where if k.endswith("." + name)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise InputError(f"{self.label}: tensor {name!r} is ambiguous: {matches}")
        raise InputError(f"{self.label}: tensor {name!r} not found in the checkpoint")

    def tensor(self, name: str):
        """A lazily-read handle on the stored tensor ``name`` (canonical or full key)."""
        key = self._resolve(name)
        file = self._file(self._where[key])
        if key not in file.keys():
            raise InputError(f"{file.path}: tensor {key!r} listed in the index is missing")
        return file.tensor(key)

    def prefetch(self, reads: Mapping[str, Sequence[slice]]) -> None:
        """These rows of these tensors (canonical or full names) will be read next: a hub file
        read by ranges starts fetching them; earlier calls and checkpoints opened earlier first."""
        by_file: dict[str, dict[str, Sequence[slice]]] = {}
        for name, slices in reads.items():
            key = self._resolve(name)
            by_file.setdefault(self._where[key], {})[key] = slices
        priority = (self._order, next(self._prefetches))
        for file, requests in by_file.items():
            self._file(file).prefetch(requests, priority)

    def release(self) -> None:
        for file in self._files.values():
            file.release()
        self._fetch.release()


class HFDirectoryKind:
    """A local directory with config.json and weights in Hugging Face layout: one checkpoint."""

    name = "huggingface directory"

    def can_open(self, model: str) -> bool:
        return (Path(model).expanduser() / "config.json").is_file()

    def open(self, model: str, fetch: FetchOptions | None = None) -> Source:
        path = Path(model).expanduser().resolve()
        return Source(
            key=path.name, source=str(path), offered=((-1, str(path)),),
            open=lambda step, revision: HFCheckpoint(path, step=step, revision=revision),
        )  # fmt: skip
