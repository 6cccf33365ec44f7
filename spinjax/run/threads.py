"""Process set-up for running the kernels on CPUs: an explicit call, never an import side effect."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import scipy.linalg  # noqa: F401  loads the library that jaxlib's CPU LAPACK kernels call
from threadpoolctl import ThreadpoolController


@cache
def one_blas_thread_under_lapack() -> None:
    """Limit the OpenBLAS under jaxlib's CPU LAPACK kernels (scipy's) to one thread, once.

    XLA already spreads the matrices of a batched QR or SVD over its own thread pool; OpenBLAS
    threads nested inside each call spin-wait for one another, and on a busy machine a batched
    SVD stalled for seconds (benchmarks/RESULTS.md). numpy's own BLAS, and every other library,
    keep their threads. The entry points of a run call this before any kernel.
    """
    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        if {"scipy", "scipy.libs"} & set(Path(lib.filepath).parent.parts[-2:]):
            lib.set_num_threads(1)
