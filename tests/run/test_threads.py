"""Process set-up that the kernels rely on: an explicit call, never an import side effect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_info

from spinjax.run.threads import one_blas_thread_under_lapack


def _scipy_blas_threads() -> list[int]:
    def under_scipy(lib):
        return {"scipy", "scipy.libs"} & set(Path(lib["filepath"]).parent.parts[-2:])

    libs = [lib for lib in threadpool_info() if lib["user_api"] == "blas" and under_scipy(lib)]
    assert libs, "scipy's BLAS was not found: the limit would silently not apply"
    return [lib["num_threads"] for lib in libs]


def test_the_blas_under_jaxs_lapack_runs_one_thread():
    # jaxlib's CPU LAPACK kernels call scipy's LAPACK, whose OpenBLAS threads, nested inside
    # XLA's own pool, stalled batched SVDs for seconds on a busy machine (spinjax/run/threads.py)
    one_blas_thread_under_lapack()
    assert _scipy_blas_threads() == [1] * len(_scipy_blas_threads())


@pytest.mark.slow
def test_importing_the_packages_changes_no_thread_setting():
    code = (
        "import scipy.linalg, threadpoolctl\n"
        "def threads(): return {i['filepath']: i['num_threads'] for i in threadpoolctl.threadpool_info()}\n"
        "before = threads()\n"
        "import spinjax, spinjax.kernels.heads, spinjax.sources.registry, spinjax.run.pipeline\n"
        "import spinjax.analysis\n"
        "after = threads()\n"
        "assert all(after[f] == n for f, n in before.items()), (before, after)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
