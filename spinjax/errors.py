"""Errors that mean "bad input": the CLI turns them into exit code 2 with their message."""

from __future__ import annotations

from collections.abc import Iterable


class InputError(Exception):
    """Bad input from the user: a file, tensor, argument or store. The message says what and where."""


class UnsafeCheckpointError(InputError):
    """A pickled checkpoint asks for something other than tensor reconstruction."""


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
