"""What every checkpoint kind provides: the protocols of sources, checkpoints and tensors.

A ``--model`` value resolves (see :mod:`spinjax.sources.registry`) to a :class:`Source`: the
model's checkpoints as (step, revision) pairs, and how to open one. An opened
:class:`Checkpoint` knows its ``config.json`` and hands out lazily-read :class:`Tensor` handles
by Hugging Face tensor name; the layouts (:mod:`spinjax.sources.layouts`) read Q and K through
them. Each kind (a Hugging Face directory, the hub, orbax, Flax msgpack, the embedded model) is
one module implementing these protocols.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor as its checkpoint's headers or metadata describe it; no data read.

    ``storage`` names the bytes it lies on where the format tells (a ``.bin`` storage and
    offset), so that tensors sharing them (tied weights) are seen; None otherwise.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    storage: str | None = None


class Tensor(Protocol):
    """A stored tensor that materialises only what is indexed (rows of its first axis)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __getitem__(self, rows: slice) -> np.ndarray: ...


@runtime_checkable
class Checkpoint(Protocol):
    """One checkpoint of a model: its config and its tensors, read on demand."""

    step: int  # training step, -1 when the source has no step notion
    revision: str  # hub revision, ``stepN`` or a path
    label: str  # where it is, for messages
    config: Mapping[str, Any]  # config.json, Hugging Face keys

    def tensor(self, name: str) -> Tensor:
        """The stored tensor ``name`` (a Hugging Face name; InputError if it is missing)."""
        ...

    def prefetch(self, reads: Mapping[str, Sequence[slice]]) -> None:
        """These rows of these tensors will be read next (hub sources start fetching them)."""
        ...

    def release(self) -> None:
        """Free what opening this checkpoint fetched (hub downloads, rows held in memory); local
        files are kept."""
        ...

    def tensor_infos(self) -> list[TensorInfo]:
        """Every stored tensor (its name in the checkpoint, shape, dtype), from the headers or
        metadata only: safetensors headers, a ``.bin``'s pickled storage table, an orbax or
        msgpack tree; for a hub model the hub's safetensors headers."""
        ...


@dataclass(frozen=True)
class Source:
    """A model's checkpoints: the ``offered`` (step, revision) pairs and how to open one.

    ``key`` names the model's group in a store; ``source`` says where it comes from (a hub
    repo id or a path), and is recorded in the store.
    """

    key: str
    source: str
    offered: tuple[tuple[int, str], ...]
    open: Callable[[int, str], Checkpoint]

    def revision(self, step: int) -> str:
        return dict(self.offered)[step]


def default_cache() -> Path:
    """``$SPINJAX_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/spinjax``."""
    if os.environ.get("SPINJAX_CACHE"):
        return Path(os.environ["SPINJAX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "spinjax"


DOWNLOADS = ("ranged", "whole")
DEFAULT_CONNECTIONS = 8
DEFAULT_CACHE_SIZE = 50 << 30


@dataclass(frozen=True)
class FetchOptions:
    """How hub sources read their files (docs/hub.md).

    - ``download``: "ranged", only the byte ranges of the rows a run needs, by HTTP range requests
      on ``connections`` connections, kept in the Q/K cache (``cache_size`` bytes under
      ``cache_dir``, default ``$SPINJAX_CACHE/hub``; 0 keeps nothing); or "whole", every file
      that holds a needed tensor downloaded into the Hugging Face cache, and evicted from it when
      its checkpoint is released unless ``keep_downloads``.
    """

    download: str = "ranged"
    connections: int = DEFAULT_CONNECTIONS
    cache_size: int = DEFAULT_CACHE_SIZE
    cache_dir: Path | None = None
    keep_downloads: bool = False

    def __post_init__(self) -> None:
        if self.download not in DOWNLOADS:
            raise InputError(f"--download {self.download!r}: expected one of {', '.join(DOWNLOADS)}")
        if self.connections < 1:
            raise InputError(f"--connections must be at least 1, got {self.connections}")
        if self.cache_size < 0:
            raise InputError(f"--cache-size must not be negative, got {self.cache_size} bytes")

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache() / "hub"


class SourceKind(Protocol):
    """One kind of ``--model`` value; the registry asks each, in order, whether it claims it."""

    name: str

    def can_open(self, model: str) -> bool:
        """Whether ``model`` is of this kind (cheap: a look at the file system or the name)."""
        ...

    def open(self, model: str, fetch: FetchOptions | None = None) -> Source:
        """The source ``model`` names (InputError when it is of this kind but unusable); ``fetch``
        says how a remote one reads its files."""
        ...
