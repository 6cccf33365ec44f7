"""Pure JAX kernels: per-head factors in, statistics out. No files, no model layouts."""

from pathlib import Path

from .bins import NB, NZ, bin_edges, zbin_edges
from .dynamics import kl_smoothed, mode_events, overlaps, top_singular_vectors
from .geometry import head_geometry, js_divergence, layer_geometry, pairwise_js
from .heads import MATRICES, block_entries_cap, block_rows_for_budget, heads_per_block, layer_statistics
from .null import gaussian_factors, matched_scale, null_zscores

__all__ = [
    "MATRICES",
    "NB",
    "NZ",
    "bin_edges",
    "block_entries_cap",
    "block_rows_for_budget",
    "heads_per_block",
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


def _one_blas_thread_under_lapack() -> None:
    """Limits the OpenBLAS under jaxlib's CPU LAPACK kernels (scipy's) to one thread.

    XLA already spreads the matrices of a batched QR or SVD over its own thread pool; OpenBLAS
    threads nested inside each call spin-wait for one another, and on a busy machine (two
    other busy processes on 2 cores) the batched SVD of 48 128x128 matrices took up to 13 s
    instead of 0.05. numpy's own BLAS, and every other library, keep their threads.
    """
    import scipy.linalg  # noqa: F401  loads the library that jaxlib's LAPACK kernels call
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        if {"scipy", "scipy.libs"} & set(Path(lib.filepath).parent.parts[-2:]):
            lib.set_num_threads(1)


_one_blas_thread_under_lapack()
