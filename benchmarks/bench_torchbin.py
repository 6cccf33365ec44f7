"""Benchmark: read every attention query_key_value weight of a Pythia-1.4B-shaped .bin.

Compares spinjax.torchbin.TorchBinFile.get with torch.load(mmap=True, weights_only=True)
(torch is needed here, for writing the checkpoint and for the comparison; spinjax does
not need it).  Each method runs in its own subprocess, so its peak resident set size
(VmHWM from /proc/self/status: this counts file pages touched through mmap, which
tracemalloc does not see) is its own.  Both produce a C-contiguous numpy copy of each
tensor and checksum its bits; the checksums must agree.

    python benchmarks/bench_torchbin.py            # 24 layers, d 2048, ~2.8 GB file
    python benchmarks/bench_torchbin.py --small    # 4 layers, d 256, a few MB

The checkpoint goes to a temporary directory that is removed at the end.  The page
cache is warm for both methods (the file was just written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LAYER_QKV = "gpt_neox.layers.{}.attention.query_key_value.weight"


def shapes(small: bool) -> dict[str, tuple[int, ...]]:
    layers, d, vocab = (4, 256, 1024) if small else (24, 2048, 50304)
    out: dict[str, tuple[int, ...]] = {"gpt_neox.embed_in.weight": (vocab, d)}
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "input_layernorm.bias"] = (d,)
        out[LAYER_QKV.format(i)] = (3 * d, d)
        out[p + "attention.query_key_value.bias"] = (3 * d,)
        out[p + "attention.dense.weight"] = (d, d)
        out[p + "attention.dense.bias"] = (d,)
        out[p + "mlp.dense_h_to_4h.weight"] = (4 * d, d)
        out[p + "mlp.dense_4h_to_h.weight"] = (d, 4 * d)
    out["embed_out.weight"] = (vocab, d)
    return out


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def checksum(arr) -> int:
    import numpy as np

    return int(arr.view(np.uint16).sum(dtype=np.uint64)) + arr.size


# ---- subprocess workers


def write_checkpoint(path: str, small: bool) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {
        name: (torch.randn(shape, generator=g) * 0.02).to(torch.float16)
        for name, shape in shapes(small).items()
    }
    torch.save(sd, path)


def worker(method: str, path: str, small: bool) -> dict:
    names = [n for n in shapes(small) if n.endswith("attention.query_key_value.weight")]
    if method == "torchbin":
        from spinjax.sources.torchbin import TorchBinFile

        base = vm_hwm_mb()
        t0 = time.perf_counter()
        total = 0
        with TorchBinFile(path) as f:
            for n in names:
                total += checksum(f.get(n))
        dt = time.perf_counter() - t0
    else:
        import torch

        base = vm_hwm_mb()
        t0 = time.perf_counter()
        total = 0
        sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        for n in names:
            total += checksum(sd[n].numpy().copy())
        del sd
        dt = time.perf_counter() - t0
    return {"time_s": dt, "peak_mb": vm_hwm_mb(), "base_mb": base, "checksum": total}


def run_worker(method: str, path: str, small: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, path] + (["--small"] if small else [])
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="4 layers, d 256 (quick check)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method (best time, max RSS)")
    ap.add_argument("--dir", default=None, help="where to put the temporary checkpoint")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.small)))
        return
    if args.write:
        write_checkpoint(args.write, args.small)
        return

    with tempfile.TemporaryDirectory(prefix="bench_torchbin_", dir=args.dir) as tmp:
        path = os.path.join(tmp, "pytorch_model.bin")
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--write", path] + (["--small"] if args.small else [])
        subprocess.run(cmd, check=True)
        size = os.path.getsize(path)
        n_qkv = sum(n.endswith("query_key_value.weight") for n in shapes(args.small))
        print(
            f"checkpoint: {size / 1e9:.3f} GB, {n_qkv} query_key_value tensors, "
            f"written in {time.perf_counter() - t0:.1f} s"
        )
        methods = {"TorchBinFile.get": "torchbin", "torch.load(mmap=True)": "torch"}
        results: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(args.repeat):
            for label, method in methods.items():
                results[label].append(run_worker(method, path, args.small))

    sums = {r["checksum"] for rs in results.values() for r in rs}
    assert len(sums) == 1, f"methods disagree: {sums}"
    rows = {
        label: (
            min(r["time_s"] for r in rs),
            max(r["peak_mb"] for r in rs),
            max(r["peak_mb"] - r["base_mb"] for r in rs),
        )
        for label, rs in results.items()
    }
    ref = rows["torch.load(mmap=True)"]
    print(
        f"{'method':24} {'time s':>8} {'peak RSS MB':>12} {'Δ RSS MB':>9} {'time ratio':>11}"
        f" {'ΔRSS ratio':>11}"
    )
    for label, (t, peak, delta) in rows.items():
        print(
            f"{label:24} {t:8.3f} {peak:12.1f} {delta:9.1f} {t / ref[0]:11.2f}"
            f" {delta / max(ref[2], 1e-9):11.2f}"
        )
    print(
        "(peak RSS: VmHWM of the worker process; Δ: over its VmHWM after imports; "
        f"best time / max RSS of {args.repeat} runs; checksums agree)"
    )


if __name__ == "__main__":
    main()
