"""What a ``--model`` value names (SPEC section 5): the kinds of sources, asked in a declared order.

Like xarray's backends: each kind says whether it can open a value (:meth:`SourceKind.can_open`)
and the first that can, opens it. A new kind of checkpoint is a new module and one line in
:data:`KINDS`, not a new branch of an if-chain.
"""

from __future__ import annotations

import difflib
import errno
import stat
from pathlib import Path

from ..errors import InputError, shown
from .base import FetchOptions, Source, SourceKind
from .hf import HFDirectoryKind
from .hub import HubKind
from .jaxtree import FlaxMsgpackKind, OrbaxKind
from .known import KNOWN
from .tinypythia import EmbeddedKind

KINDS: tuple[SourceKind, ...] = (
    FlaxMsgpackKind(),  # local: a .msgpack file or a folder holding flax_model.msgpack
    OrbaxKind(),  # local: numbered step folders (also hold a config.json, so before the next)
    HFDirectoryKind(),  # local: config.json with safetensors / .bin weights
    EmbeddedKind(),  # tiny-pythia, trained on first use
    HubKind(),  # a known name or an owner/name hub id
)


_SPECIAL = {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISFIFO: "a FIFO",
            stat.S_ISSOCK: "a socket"}  # fmt: skip


def _local_form(model: str) -> str:
    """``model`` with ``~`` expanded; refused when it names something on disk that is neither a
    directory nor a regular file (reading a FIFO blocks, a device never ends) or cannot be a
    path at all. Any other value (a name, a hub id, a missing path) is left to the kinds."""
    quoted = shown(model, 200)
    if model.startswith("~"):
        try:
            model = str(Path(model).expanduser())
        except RuntimeError:  # ~user of no such user
            raise InputError(f"--model {quoted}: no such user's home directory") from None
    try:
        mode = Path(model).stat().st_mode
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL):
            raise InputError(f"--model {quoted}: {exc.strerror}") from None
        return model  # missing (or unreadable: the kinds say so)
    for test, what in _SPECIAL.items():
        if test(mode):
            raise InputError(f"{model}: {what}; --model takes a checkpoint directory or a Flax .msgpack file")
    return model


def resolve(model: str, fetch: FetchOptions | None = None) -> Source:
    """The source a ``--model`` value names: the first kind of :data:`KINDS` that claims it
    (``fetch``: how a hub source reads its files)."""
    quoted = shown(model, 200)
    model = _local_form(model)
    try:
        for kind in KINDS:
            if kind.can_open(model):
                return kind.open(model, fetch)
    except OSError as exc:  # e.g. a directory without read permission
        raise InputError(f"--model {quoted}: {exc}") from exc
    path = Path(model)
    if path.is_file():
        raise InputError(f"{path}: a file; --model takes a checkpoint directory or a Flax .msgpack file")
    if path.is_dir():
        raise InputError(f"{path}: no config.json, Flax msgpack or orbax checkpoint steps found")
    if "/" in model or model.startswith((".", "~")):  # a path (HubKind claims every hub repo id)
        raise InputError(f"--model {quoted}: no such directory")
    close = difflib.get_close_matches(model, list(KNOWN), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `spinjax models`"
    raise InputError(f"--model {quoted}: no such directory and not a known model name{hint}")
