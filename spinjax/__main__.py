"""The ``spinjax`` command (and ``python -m spinjax``): Ctrl-C is handled from the first instant.

The handler goes in before the command line and its libraries are imported, so a Ctrl-C that
arrives while Python is still importing them also ends with "interrupted" and exit code 130.
"""

from __future__ import annotations

from spinjax.run import interrupt


def main() -> None:
    with interrupt.remembered():
        try:
            from spinjax.cli import main as commands  # after the handler, deliberately
        except KeyboardInterrupt:
            interrupt.exit_interrupted()
        commands()


if __name__ == "__main__":
    main()
