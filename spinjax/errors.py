"""Errors that mean "bad input": the CLI turns them into exit code 2 with their message."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class InputError(Exception):
    """Bad input from the user: a file, tensor, argument or store. The message says what and where."""


class UnsafeCheckpointError(InputError):
    """A pickled checkpoint asks for something other than tensor reconstruction."""


class WriteError(InputError, OSError):
    """A destination cannot be written (permissions, full disk, read-only file system)."""


@contextmanager
def writing_to(path: str | Path, what: str = "", then: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn an OSError while writing ``path`` (full disk, no permission) into a
    :class:`WriteError` naming it: bad circumstances, not a bug. ``what`` names the destination
    ("the store"); ``then()`` may add what the user should know (what was kept)."""
    try:
        yield
    except InputError:
        raise
    except OSError as exc:
        extra = then() if then is not None else ""
        target = f" {what}" if what else ""
        raise WriteError(f"{path}: cannot write{target} ({exc})" + (f"; {extra}" if extra else "")) from exc


def check_writable(path: str | Path, what: str = "") -> None:
    """Refuse, before any work, a folder destination that cannot be written: a file, one below
    a file, or one whose nearest existing folder is not writable (a read-only file system)."""
    path = Path(path).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    target = f" {what}" if what else ""
    if not existing.is_dir():
        raise WriteError(f"{path}: cannot write{target} ({existing} is a file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WriteError(f"{path}: cannot write{target} ({existing}: not writable)")


def shown(value: object, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters: how a message quotes user input, which can be
    of any size (a 10,000-step ``--steps``, a config value).

    >>> shown("a" * 200, 10)
    "'aaaaaa..."
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def nearest(target: int, values: Iterable[int], k: int = 3) -> list[int]:
    """The ``k`` values closest to ``target``, ascending: the hint of a "no such step" message.

    >>> nearest(700, [0, 256, 512, 768, 1024])
    [512, 768, 1024]
    """
    return sorted(sorted(values, key=lambda v: (abs(v - target), v))[:k])
