"""Pure JAX kernels: per-head factors in, statistics out. No files, no model layouts."""

from .bins import NB, NZ, bin_edges, zbin_edges
from .dynamics import kl_smoothed, mode_events, overlaps, top_singular_vectors
from .geometry import head_geometry, js_divergence, layer_geometry, pairwise_js
from .heads import MATRICES, block_entries_cap, block_rows_for_budget, layer_statistics
from .null import gaussian_factors, matched_scale, null_zscores

__all__ = [
    "MATRICES",
    "NB",
    "NZ",
    "bin_edges",
    "block_entries_cap",
    "block_rows_for_budget",
    "gaussian_factors",
    "head_geometry",
    "js_divergence",
    "kl_smoothed",
    "layer_geometry",
    "layer_statistics",
    "matched_scale",
    "mode_events",
    "null_zscores",
    "overlaps",
    "pairwise_js",
    "top_singular_vectors",
    "zbin_edges",
]
