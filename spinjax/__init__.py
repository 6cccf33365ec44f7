"""spinjax: statistics and spectra of every attention head's W_QK, in JAX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spinjax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

SCHEMA = 1
DEFAULT_STORE = "store/spinjax.zarr"  # relative to the working directory
