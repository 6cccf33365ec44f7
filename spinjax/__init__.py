"""spinjax: statistics and spectra of every attention head's W_QK, in JAX.

The package is a pipeline whose folders are its stages, data flowing one way:

- ``spinjax.sources``: where checkpoints come from and where Q/K live in them;
- ``spinjax.kernels``: pure JAX statistics of one layer's factors (top-level ``kernels/``);
- ``spinjax.store``: the Zarr store (schema, groups, locking, the commit);
- ``spinjax.run``: a run (sources -> kernels -> store) and its post-passes;
- ``spinjax.analysis``: the reading side (datasets, figures, report), free of JAX.

``import spinjax`` is light: ``__version__`` and the reading API load on first use, so the
command line starts (and handles Ctrl-C) before xarray, zarr or JAX are imported.
"""

from ._lazy import lazy_api

__getattr__, __dir__, __all__ = lazy_api(
    __name__,
    {
        "analysis": ("StoreReader", "align_layers", "density", "open_store", "tidy"),
        "version": ("__version__",),
    },
)
