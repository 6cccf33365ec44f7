"""The installed package's version (``0.0.0+unknown`` when running from a source tree not installed)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spinjax")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"
