"""Benchmark: whole-file downloads against ranged reads of the Q/K rows, through a local hub
throttled to a fixed bandwidth (tests/hubserver.py, in its own process).

Pythia-shaped GPT-NeoX checkpoints (float16 ``pytorch_model*.bin``) are written sparsely: the Q
and K rows hold random values, every other byte is a hole of the file, so a multi-GB checkpoint
takes the disk of its Q/K rows; each step is the same file under its own revision, commit and
ETag (so nothing is shared between steps). Per shape, side by side in one run:

- ``local``: ``spinjax run`` on the checkpoint in a local directory (compute and local reads,
  per step: what a run costs without any network);
- ``whole``: ``spinjax run --download whole`` of all steps (every shard downloaded into the
  Hugging Face cache, evicted after its step);
- ``ranged``: ``spinjax run`` (ranged reads, ``--cache-size 0``) of all steps;
- ``fetch``: the reader of a ranged run alone (rows fetched and factors extracted, no kernels):
  the network side, to compare with the Q/K bytes over the bandwidth.

Then, on the 1.4b shape with 20 ms before every answer (a CDN's round trip): the fetch side with
1 to 16 connections, and with Q, K and V read as one range per layer; and a full ranged run at a
bandwidth low enough for the network to be the bottleneck on this machine's CPU.

    python benchmarks/bench_hub.py                     # 1.4b and 12b shapes, 3 steps, 200 MB/s
    python benchmarks/bench_hub.py --small             # d 256: a few seconds
    python benchmarks/bench_hub.py --results benchmarks/RESULTS.md

The 12b shape keeps d_model 5120 and 40 heads, sharded in three files, but 9 of its 36 layers by
default (``--layers-12b``): a whole-file download writes every byte into the cache, 24 GB per
checkpoint at 36 layers; bytes and times per layer are what they are at 36.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hubfixtures import neox_config, neox_shapes, torch_zip  # noqa: E402

REPO = "bench/neox"


def shapes(small: bool, layers_12b: int) -> dict[str, tuple[int, int, int, int, int]]:
    """name -> (d_model, layers, heads, vocab, shards)."""
    if small:
        return {"small": (256, 4, 4, 1024, 1), "small-sharded": (256, 4, 4, 1024, 2)}
    return {"1.4b": (2048, 24, 16, 50304, 1), "12b": (5120, layers_12b, 40, 50688, 3)}


def qk_bytes(d: int, layers: int) -> int:
    return layers * 2 * d * d * 2


# ---- checkpoints


def write_checkpoint(directory: Path, d: int, layers: int, heads: int, vocab: int, shards: int) -> list[str]:
    """A Pythia-shaped checkpoint in ``directory`` (sparse); its file names."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(neox_config(d, layers, heads, vocab), indent=2))
    dh = d // heads

    def qkv_fill(layer: int):
        def fill(first: int, n: int) -> np.ndarray:
            rows = np.zeros((n, d), np.float16)
            which = (np.arange(first, first + n) // dh) % 3  # q, k, v blocks of each head
            keep = which < 2
            rng = np.random.default_rng([layer, first])
            rows[keep] = (rng.standard_normal((int(keep.sum()), d), np.float32) * 0.02).astype(np.float16)
            return rows

        return fill

    def zeros(first: int, n: int, shape) -> np.ndarray:
        return np.zeros((n, *shape[1:]), np.float16)

    tensors = {}
    for name, shape in neox_shapes(d, layers, vocab).items():
        if name.endswith("query_key_value.weight"):
            fill = qkv_fill(int(name.split(".")[2]))
        else:
            fill = lambda first, n, shape=shape: zeros(first, n, shape)  # noqa: E731
        tensors[name] = (np.float16, shape, fill)
    names = list(tensors)
    parts = [names[len(names) * k // shards : len(names) * (k + 1) // shards] for k in range(shards)]
    files, weight_map = [], {}
    for k, part in enumerate(parts):
        file = "pytorch_model.bin" if shards == 1 else f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch_zip({n: tensors[n] for n in part}, directory / file, archive=file.removesuffix(".bin"))
        weight_map |= dict.fromkeys(part, file)
        files.append(file)
    if shards > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
        files.append("pytorch_model.bin.index.json")
    return ["config.json", *files]


# ---- the hub, in its own process


def _serve(directory: str, files: list[str], steps: int, bandwidth: float, latency: float, conn) -> None:
    from hubserver import FakeHub

    hub = FakeHub(bandwidth=bandwidth, latency=latency).start()
    for step in range(steps):
        content = {f: (Path(directory) / f).read_bytes() if f.endswith(".json") else Path(directory) / f
                   for f in files}  # fmt: skip
        etags = {f: hashlib.sha256(f"{f}@{step}".encode()).hexdigest() for f in files if f.endswith(".bin")}
        hub.add(REPO, f"step{step}" if step < steps - 1 else "main", content, etags)
    conn.send(hub.endpoint)
    conn.recv()  # until told to stop
    hub.stop()


class Hub:
    """The hub server process; points huggingface_hub at it."""

    def __init__(self, directory: Path, files: list[str], steps: int, bandwidth: float, latency: float = 0.0):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        args = (str(directory), files, steps, bandwidth, latency, child)
        self._process = ctx.Process(target=_serve, args=args, daemon=True)
        self._process.start()
        self.endpoint = self._conn.recv()
        from huggingface_hub import constants

        constants.ENDPOINT = self.endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"

    def served(self) -> int:
        with urllib.request.urlopen(self.endpoint + "/_served") as r:
            return json.load(r)["body"]

    def stop(self) -> None:
        self._conn.send("stop")
        self._process.join(10)


# ---- one measurement


def _known(steps: int, d: int, layers: int, heads: int) -> None:
    from spinjax.sources.known import KNOWN, KnownModel

    KNOWN["bench-neox"] = KnownModel("bench-neox", REPO, d, layers, heads, heads, steps=tuple(range(steps)))


def measure(mode: str, hub: Hub, work: Path, steps: int, **fetch) -> tuple[float, int]:
    """Wall seconds and bytes served of one mode over ``steps`` steps."""
    from huggingface_hub import constants

    from spinjax.run import pipeline, reader
    from spinjax.run.options import RunOptions

    constants.HF_HUB_CACHE = str(work / f"hf-{mode}-{time.monotonic_ns()}")
    store = work / f"store-{mode}-{time.monotonic_ns()}.zarr"
    before = hub.served()
    t = time.perf_counter()
    if mode == "fetch":
        options = RunOptions(steps="all", store=store, cache_size=0, **fetch)
        source = reader.variant_source("bench-neox", fetch=options.fetch)
        claims = reader.Claims(store, source.key, recompute=True)
        run = reader.Reader(source, list(range(steps)), claims, "raw", False)
        run.start()
        for item in run.items():
            if isinstance(item, reader.StepRead):
                item.opened.checkpoint.release()
        run.join()
        claims.release_all()
    else:
        download = "whole" if mode == "whole" else "ranged"
        options = RunOptions(steps="all", store=store, download=download, cache_size=0, **fetch)
        result = pipeline.run("bench-neox", options)
        assert result.computed == list(range(steps)), result
    return time.perf_counter() - t, hub.served() - before


def local_run(directory: Path, work: Path) -> float:
    from spinjax.run import pipeline
    from spinjax.run.options import RunOptions

    t = time.perf_counter()
    pipeline.run(str(directory), RunOptions(store=work / f"local-{time.monotonic_ns()}.zarr"))
    return time.perf_counter() - t


# ---- the benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None, help="comma list (default: all of the size)")
    parser.add_argument("--small", action="store_true", help="d 256 shapes: seconds")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, default=200, help="MB/s of the hub (all connections)")
    parser.add_argument("--slow-bandwidth", type=float, default=20, help="MB/s of the network-bound run")
    parser.add_argument("--layers-12b", type=int, default=9)
    parser.add_argument("--results", type=Path, default=None, help="append the tables to this markdown file")
    parser.add_argument("--keep", type=Path, default=None, help="keep the checkpoints in this folder")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="spinjax-bench-hub-"))
    work = Path(tempfile.mkdtemp(prefix="spinjax-bench-hub-work-"))
    try:
        text = run(args, root, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(text)
    if args.results is not None:
        with args.results.open("a") as f:
            f.write("\n" + text + "\n")


def run(args: argparse.Namespace, root: Path, work: Path) -> str:
    """Every measurement; the markdown of the results."""
    all_shapes = shapes(args.small, args.layers_12b)
    names = args.shapes.split(",") if args.shapes else list(all_shapes)
    os.environ["SPINJAX_CACHE"] = str(work / "spinjax")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    bw = args.bandwidth * 1e6
    lines = [
        f"`benchmarks/bench_hub.py` ({datetime.date.today()}, {_machine()}): hub throttled to "
        f"{args.bandwidth:g} MB/s over all connections, {args.steps} steps per mode, 8 connections.",
        "",
        "| shape | Q/K MB/step | mode | MB served/step | s/step | ratio to Q/K bytes / bandwidth |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        d, layers, heads, vocab, shards = all_shapes[name]
        directory = root / name
        if not (directory / "config.json").exists():
            t = time.perf_counter()
            files = write_checkpoint(directory, d, layers, heads, vocab, shards)
            print(f"{name}: wrote {directory} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        else:
            files = sorted(p.name for p in directory.iterdir())
        _known(args.steps, d, layers, heads)
        qk = qk_bytes(d, layers)
        floor = qk / bw
        local = local_run(directory, work)  # also compiles the kernels for the shape
        lines.append(f"| {name} | {qk / 1e6:.0f} | local (no network) | - | {local:.1f} | - |")
        hub = Hub(directory, files, args.steps, bw)
        try:
            for mode in ("whole", "ranged", "fetch"):
                wall, served = measure(mode, hub, work, args.steps)
                per_step, mb = wall / args.steps, served / args.steps / 1e6
                lines.append(
                    _row(
                        name,
                        f"{qk / 1e6:.0f}",
                        mode,
                        f"{mb:.0f}",
                        f"{per_step:.1f}",
                        f"{per_step / floor:.2f}",
                    )
                )
                print(lines[-1], file=sys.stderr)
        finally:
            hub.stop()

    if "1.4b" in names or args.small:
        name = "1.4b" if "1.4b" in names else names[0]
        d, layers, heads, vocab, shards = all_shapes[name]
        directory, files = root / name, sorted(p.name for p in (root / name).iterdir())
        _known(1, d, layers, heads)
        floor = qk_bytes(d, layers) / bw
        lines += [
            "",
            f"{name}, fetch side only, 1 step, 20 ms before every answer, {args.bandwidth:g} MB/s:",
            "",
            "| connections | reads | s | ratio to Q/K bytes / bandwidth | MB served |",
            "|---|---|---|---|---|",
        ]
        from spinjax.sources import ranges

        hub = Hub(directory, files, 1, bw, latency=0.02)
        policy = ranges.MERGE_GAP, ranges.MERGE_OVERFETCH
        try:
            for connections, whole_qkv in [(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 1)]:
                if whole_qkv:  # Q, K and V of a layer as one range
                    ranges.MERGE_GAP, ranges.MERGE_OVERFETCH = 1 << 40, 1.0
                wall, served = measure("fetch", hub, work, 1, connections=connections)
                ranges.MERGE_GAP, ranges.MERGE_OVERFETCH = policy
                what = "q, k, v of a layer as one" if whole_qkv else "q and k of a head as one"
                ratio = wall / floor
                lines.append(f"| {connections} | {what} | {wall:.1f} | {ratio:.2f} | {served / 1e6:.0f} |")
                print(lines[-1], file=sys.stderr)
        finally:
            hub.stop()

        slow = args.slow_bandwidth * 1e6
        _known(args.steps, d, layers, heads)
        hub = Hub(directory, files, args.steps, slow)
        try:
            wall, served = measure("ranged", hub, work, args.steps)
        finally:
            hub.stop()
        per_step, slow_floor = wall / args.steps, qk_bytes(d, layers) / slow
        lines += [
            "",
            f"{name}, a full ranged run at {args.slow_bandwidth:g} MB/s (the network slower than this "
            f"machine's kernels): {per_step:.1f} s/step, {per_step / slow_floor:.2f}x Q/K bytes / bandwidth "
            f"({served / args.steps / 1e6:.0f} MB served per step).",
        ]
    return "\n".join(lines)


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _machine() -> str:
    from spinjax.run.bench import machine

    return machine()


if __name__ == "__main__":
    main()
