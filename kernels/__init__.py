"""Pure JAX kernels: per-head factors in, statistics out. No files, no model layouts."""

from .bins import NB, NZ, bin_edges, zbin_edges
from .heads import MATRICES, block_entries_cap, block_rows_for_budget, layer_statistics

__all__ = [
    "MATRICES",
    "NB",
    "NZ",
    "bin_edges",
    "block_entries_cap",
    "block_rows_for_budget",
    "layer_statistics",
    "zbin_edges",
]
