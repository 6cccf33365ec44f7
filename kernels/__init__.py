"""Pure JAX kernels: per-head factors in, statistics out. No files, no model layouts."""

import os

# XLA:CPU's multi-threaded Eigen pool can wedge: every worker waits for work while the result
# is awaited (seen here on 2 cores mid-run, and reported by others). Single-threaded Eigen
# costs about 7% here. Set before the CPU backend starts; a user's own setting wins.
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()

from .bins import NB, NZ, bin_edges, zbin_edges
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
    "layer_geometry",
    "layer_statistics",
    "matched_scale",
    "null_zscores",
    "pairwise_js",
    "zbin_edges",
]
