"""What every checkpoint kind provides: the protocols of sources, checkpoints and tensors.

A ``--model`` value resolves (see :mod:`spinjax.sources.registry`) to a :class:`Source`: the
model's checkpoints as (step, revision) pairs, and how to open one. An opened
:class:`Checkpoint` knows its ``config.json`` and hands out lazily-read :class:`Tensor` handles
by Hugging Face tensor name; the layouts (:mod:`spinjax.sources.layouts`) read Q and K through
them. Each kind (a Hugging Face directory, the hub, orbax, Flax msgpack, the embedded model) is
one module implementing these protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


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

    def release(self) -> None:
        """Free what opening this checkpoint fetched (hub downloads); local files are kept."""
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


class SourceKind(Protocol):
    """One kind of ``--model`` value; the registry asks each, in order, whether it claims it."""

    name: str

    def can_open(self, model: str) -> bool:
        """Whether ``model`` is of this kind (cheap: a look at the file system or the name)."""
        ...

    def open(self, model: str) -> Source:
        """The source ``model`` names (InputError when it is of this kind but unusable)."""
        ...
