"""The reading side: a store as labelled xarray datasets, the usual reshapes, figures, the report.

Never imports JAX, so opening a store is quick. ``reader``: :func:`open_store`,
:class:`StoreReader`, :func:`tidy`, :func:`density`, :func:`align_layers`; ``plots``: the figures
(``spinjax plot``); ``report``: the static HTML page (``spinjax report``).
"""

from .reader import (
    Completeness,
    StoreReader,
    UnknownModelError,
    align_layers,
    density,
    layer_fraction,
    open_store,
    scalar_variables,
    tidy,
)

__all__ = [
    "Completeness",
    "StoreReader",
    "UnknownModelError",
    "align_layers",
    "density",
    "layer_fraction",
    "open_store",
    "scalar_variables",
    "tidy",
]
