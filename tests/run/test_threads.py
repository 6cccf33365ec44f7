"""Process set-up that the kernels rely on."""

from __future__ import annotations

from pathlib import Path

from threadpoolctl import threadpool_info

import spinjax.kernels  # noqa: F401  (its import limits the BLAS under jaxlib's LAPACK)


def test_the_blas_under_jaxs_lapack_runs_one_thread():
    # jaxlib's CPU LAPACK kernels call scipy's LAPACK, whose OpenBLAS threads, nested inside
    # XLA's own pool, stalled batched SVDs for seconds on a busy machine (kernels/__init__.py)
    def under_scipy(lib):
        return {"scipy", "scipy.libs"} & set(Path(lib["filepath"]).parent.parts[-2:])

    scipy_blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas" and under_scipy(lib)]
    assert scipy_blas, "scipy's BLAS was not found: the limit would silently not apply"
    assert all(lib["num_threads"] == 1 for lib in scipy_blas), scipy_blas
