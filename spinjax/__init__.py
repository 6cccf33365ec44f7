"""spinjax: statistics and spectra of every attention head's W_QK, in JAX.

The package is a pipeline whose folders are its stages, data flowing one way:

- ``spinjax.sources``: where checkpoints come from and where Q/K live in them;
- ``spinjax.kernels``: pure JAX statistics of one layer's factors (top-level ``kernels/``);
- ``spinjax.store``: the Zarr store (schema, groups, locking, the commit);
- ``spinjax.run``: a run (sources -> kernels -> store) and its post-passes;
- ``spinjax.analysis``: the reading side (datasets, figures, report), free of JAX.

``import spinjax`` is light: the reading API below loads on first use, so the command line
starts without xarray, zarr or JAX.
"""

from ._lazy import lazy_api
from .version import __version__

__getattr__, __dir__, _reading = lazy_api(
    __name__, {"analysis": ("StoreReader", "align_layers", "density", "open_store", "tidy")}
)
__all__ = ["__version__", *_reading]
