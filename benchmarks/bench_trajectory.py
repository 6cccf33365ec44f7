"""A multi-step run: how much of the time the compute waits for reads (I/O overlap).

Writes an orbax trajectory of random GPT-NeoX attention weights at a Pythia shape (fp16,
only the fused query_key_value kernels, ``--steps`` checkpoints) into a temp dir, runs the
pipeline over all its steps, and prints the time per checkpoint and the share of it the
kernels spent waiting for the reader thread.

    python benchmarks/bench_trajectory.py [--shape 160m] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from spinjax.run.bench import SHAPES
from spinjax.run.options import RunOptions
from spinjax.run.pipeline import run


def write_trajectory(root: Path, shape: str, n_steps: int) -> None:
    d, n_heads, d_head, n_layers = SHAPES[shape]
    rng = np.random.default_rng(0)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=None)
    with ocp.CheckpointManager(root, options=options) as manager:
        for step in range(n_steps):
            layers = {
                str(i): {"attention": {"query_key_value": {
                    "kernel": (rng.standard_normal((d, 3 * d), np.float32) * 0.02).astype(np.float16)
                }}}
                for i in range(n_layers)
            }  # fmt: skip
            manager.save(step * 1000, args=ocp.args.StandardSave({"gpt_neox": {"layers": layers}}))
    config = {"model_type": "gpt_neox", "hidden_size": d, "num_attention_heads": n_heads,
              "num_hidden_layers": n_layers}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="160m", choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / f"traj-{args.shape}"
        t0 = time.perf_counter()
        write_trajectory(root, args.shape, args.steps)
        print(f"wrote {args.steps} orbax steps at {args.shape} shape in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        result = run(str(root), RunOptions(steps="all", store=Path(tmp) / "s.zarr"))
        wall = time.perf_counter() - t0
    busy = result.io_wait_s + result.compute_s
    print("| shape | steps | wall s | s/checkpoint | compute s | waiting for reads s | waiting share |")
    print("|---|---|---|---|---|---|---|")
    n, share = len(result.computed), 100 * result.io_wait_s / busy
    print(
        f"| {args.shape} | {n} | {wall:.1f} | {wall / n:.2f} | {result.compute_s:.1f} "
        f"| {result.io_wait_s:.2f} | {share:.1f}% |"
    )


if __name__ == "__main__":
    main()
