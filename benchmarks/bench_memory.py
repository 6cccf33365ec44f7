"""Peak memory of a run on a Pythia-12B-shaped checkpoint, against --memory-budget.

Generates the attention tensors of a GPT-NeoX checkpoint at the 12B shape (d 5120, 40 heads,
d_head 128; fp16 query_key_value only, 157 MB per layer) as safetensors in a temp dir, runs
``spinjax run`` on it in a child process, and prints the child's peak resident memory
(ru_maxrss) next to the budget. Peak memory does not grow with the layer count (layers
stream), so ``--layers`` below 36 measures the same peak in less time.

    python benchmarks/bench_memory.py [--layers 36] [--budget 8GB]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

D, HEADS = 5120, 40


def write_checkpoint(directory: Path, n_layers: int) -> None:
    rng = np.random.default_rng(0)
    weight_map = {}
    for i in range(n_layers):  # one shard per layer keeps the writer's memory small too
        name = f"gpt_neox.layers.{i}.attention.query_key_value.weight"
        shard = f"model-{i:05d}.safetensors"
        qkv = (rng.standard_normal((3 * D, D), np.float32) * 0.02).astype(np.float16)
        save_file({name: qkv}, str(directory / shard))
        weight_map[name] = shard
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"model_type": "gpt_neox", "hidden_size": D, "num_attention_heads": HEADS,
              "num_hidden_layers": n_layers}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--budget", default="8GB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "pythia-12b-shaped"
        model.mkdir()
        t0 = time.perf_counter()
        write_checkpoint(model, args.layers)
        print(f"wrote {args.layers} layers of fp16 query_key_value in {time.perf_counter() - t0:.0f} s")
        cmd = [sys.executable, "-m", "spinjax.cli", "run", "--model", str(model), "--store",
               str(Path(tmp) / "s.zarr"), "--memory-budget", args.budget]  # fmt: skip
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    print(done.stdout.strip() or done.stderr.strip())
    print("| shape | layers | budget | peak RSS | wall s | s/layer | exit |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| 12b (d {D}, {HEADS}x128) | {args.layers} | {args.budget} | {peak_gb:.2f} GB | {wall:.0f} "
        f"| {wall / args.layers:.1f} | {done.returncode} |"
    )


if __name__ == "__main__":
    main()
