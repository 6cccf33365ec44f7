"""spinjax vs per-head numpy loops, timed side by side in one run on this machine.

For each shape, one layer of random weights (all heads) goes through:
  * spinjax: ``layer_statistics`` (every statistic of SPEC section 4, all heads at once);
  * numpy loop, full SVD: per head, for W_Q, W_K and the explicit W_QK, ``np.histogram``
    (z and raw grids) and scipy moments, and ``np.linalg.svd`` of each matrix (the d x d one
    for W_QK) - what the study did;
  * numpy loop, factored: the same, but singular values from the factors (QR + small SVDs),
    the best per-head approach in use today.
Both loops do the work spinjax does for all three matrices (the summaries spinjax derives
from the histograms cost it little). Heads per second for each and the ratios are printed as a
markdown table. The full-SVD loop is timed on a few heads only (it is the slow one) and
reported per head.

    python benchmarks/bench_heads.py [--shapes 160m,1.4b] [--loop-heads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
from scipy import stats

from spinjax.kernels import bin_edges, block_entries_cap, block_rows_for_budget, layer_statistics, zbin_edges

SHAPES = {  # name: (d_model, n_heads, d_head)
    "160m": (768, 12, 64),
    "1.4b": (2048, 16, 128),
    "12b": (5120, 40, 128),
}


def numpy_head(wq: np.ndarray, wk: np.ndarray, *, factored: bool) -> dict:
    """One head the plain way: explicit W_QK; moments, histograms, singular values of all three."""
    w = wq.T @ wk
    out = {}
    for name, m in (("W_Q", wq), ("W_K", wk), ("W_QK", w)):
        flat = m.ravel()
        mean, std = flat.mean(), flat.std()
        out[name] = {
            "skew": stats.skew(flat),
            "kurt": stats.kurtosis(flat),
            "zhist": np.histogram((flat - mean) / std, zbin_edges())[0],
            "hist": np.histogram(flat, bin_edges())[0],
        }
    if factored:
        rq = np.linalg.qr(wq.T, mode="r")
        rk = np.linalg.qr(wk.T, mode="r")
        matrices = {"W_Q": rq, "W_K": rk, "W_QK": rq @ rk.T}
    else:
        matrices = {"W_Q": wq, "W_K": wk, "W_QK": w}
    for name, m in matrices.items():
        out[name]["sv"] = np.linalg.svd(m, compute_uv=False)[: wq.shape[0]]
    return out


def _time(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_shape(name: str, loop_heads: int, budget: int, repeat: int) -> dict:
    d, n_heads, d_head = SHAPES[name]
    rng = np.random.default_rng(0)
    # fp16 values, as checkpoints store them: their exact products are what the kernels meet
    wq = (rng.standard_normal((n_heads, d_head, d)) * 0.02).astype(np.float16).astype(np.float32)
    wk = (rng.standard_normal((n_heads, d_head, d)) * 0.02).astype(np.float16).astype(np.float32)
    block_rows = block_rows_for_budget(n_heads, d, budget, max_entries=block_entries_cap())

    t0 = time.perf_counter()
    layer_statistics(wq, wk, block_rows=block_rows)  # compile once per shape
    compile_s = time.perf_counter() - t0
    spinjax_s = _time(lambda: layer_statistics(wq, wk, block_rows=block_rows), repeat) / n_heads

    heads = range(min(loop_heads, n_heads))
    full_s = _time(lambda: [numpy_head(wq[h], wk[h], factored=False) for h in heads], 1) / len(heads)
    fact_s = _time(lambda: [numpy_head(wq[h], wk[h], factored=True) for h in heads], 1) / len(heads)
    return {
        "shape": name,
        "d": d,
        "heads": n_heads,
        "d_head": d_head,
        "block_rows": block_rows,
        "compile_s": compile_s,
        "spinjax": 1 / spinjax_s,
        "full": 1 / full_s,
        "factored": 1 / fact_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="160m,1.4b")
    ap.add_argument("--loop-heads", type=int, default=2, help="heads timed in the numpy loops")
    ap.add_argument("--budget", default=2 << 30, type=int, help="bytes for W_QK blocks")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    print()
    print(
        "| shape | d, heads, d_head | spinjax heads/s | numpy full-SVD heads/s | numpy factored heads/s "
        "| vs full SVD | vs factored | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        r = bench_shape(name, args.loop_heads, args.budget, args.repeat)
        print(
            f"| {r['shape']} | {r['d']}, {r['heads']}, {r['d_head']} | {r['spinjax']:.2f} | {r['full']:.3f} "
            f"| {r['factored']:.2f} | {r['spinjax'] / r['full']:.0f}x | {r['spinjax'] / r['factored']:.1f}x "
            f"| {r['compile_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
