"""Ctrl-C (SIGINT) for long runs: remembered from the very start, acted on between steps.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread is; raised inside a
callback (JAX's garbage-collection hooks, an ``atexit`` function) it is printed and swallowed,
and the run went on. :func:`remembered`, which the command line enters first, also
remembers it, so the run checks :func:`requested` and stops anyway. During the compute loop
:class:`StopAfterStep` makes the first Ctrl-C finish the current step, the second stop at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

_requested = threading.Event()
_depth = 0  # how many remembered() blocks are open: `python -m spinjax` opens one, the command line another


def _remember_and_raise(signum, frame) -> None:
    _requested.set()
    raise KeyboardInterrupt


@contextmanager
def remembered() -> Iterator[None]:
    """Handle Ctrl-C within the block: Python's KeyboardInterrupt, and :func:`requested` true
    from then on until the block ends (a SIGINT ignored by the shell, as for ``nohup``, stays
    ignored). The command line runs each command inside it. Nested, only the outermost block
    acts: a Ctrl-C remembered while the command line was being imported is not forgotten."""
    global _depth
    _depth += 1
    if _depth > 1:
        try:
            yield
        finally:
            _depth -= 1
        return
    previous, report = None, sys.unraisablehook
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            previous = signal.signal(signal.SIGINT, _remember_and_raise)

    def quiet_about_ctrl_c(unraisable) -> None:  # remembered: no "Exception ignored" traceback
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            report(unraisable)

    _requested.clear()
    sys.unraisablehook = quiet_about_ctrl_c
    try:
        yield
    finally:
        _depth -= 1
        _requested.clear()
        sys.unraisablehook = report
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def exit_interrupted(detail: str = "") -> NoReturn:
    """Say "interrupted" (and why) on stderr and exit 130, as a shell does for SIGINT."""
    print(f"interrupted{': ' + detail if detail else ''}", file=sys.stderr, flush=True)
    sys.exit(130)


def requested() -> bool:
    """Whether Ctrl-C was pressed within :func:`remembered` (even if its exception was swallowed)."""
    return _requested.is_set()


class StopAfterStep:
    """Ctrl-C (SIGINT) sets ``requested`` instead of raising; a second one raises at once."""

    def __enter__(self) -> StopAfterStep:
        self.requested, self._previous = requested(), None
        if threading.current_thread() is threading.main_thread():  # signals go to the main thread
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        _requested.set()
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        message = "\ninterrupt: stopping after the current step (Ctrl-C again to stop now)"
        print(message, file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
