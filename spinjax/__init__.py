"""spinjax: statistics and spectra of every attention head's W_QK, in JAX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spinjax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

SCHEMA = 1
DEFAULT_STORE = "store/spinjax.zarr"  # relative to the working directory
RESERVED_GROUPS = ("baseline",)  # root groups of a store that hold no model (null ensembles)

_ANALYSIS = ("open_store", "tidy", "density", "align_layers", "StoreReader")
__all__ = ["DEFAULT_STORE", "SCHEMA", "__version__", *_ANALYSIS]


def __getattr__(name: str):
    """``spinjax.open_store`` and the analysis helpers, imported on first use (``import
    spinjax`` itself stays free of JAX, zarr and xarray)."""
    if name in _ANALYSIS:
        from . import analysis

        return getattr(analysis, name)
    raise AttributeError(f"module 'spinjax' has no attribute {name!r}")
