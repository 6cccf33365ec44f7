"""Kernel throughput on this machine's device, against the floor measured in the same run.

The floor of one layer is the unavoidable work: forming every head's W_QK once (one batched
matmul, 2 * d_head * d_model^2 FLOPs per head, at the device's matmul rate: the better of a
square GEMM and the batched product on spinjax's own block shape, both measured here), one
read of its entries (4 bytes each, at the bandwidth of a plain reduction measured here), and
reading the layer's Q/K bytes (fp16, from a file just written, so from the page cache: an
optimistic disk). ``spinjax bench`` prints the ratio of spinjax's time to it.

Shared machines change speed from minute to minute, so spinjax and every floor part are timed
in turns, round after round, and each keeps its best round: a slow spell then costs all of
them alike instead of one.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..kernels.heads import block_entries_cap, block_rows_for_budget, heads_per_block, layer_statistics
from ..version import __version__
from .threads import one_blas_thread_under_lapack

SHAPES = {  # name: (d_model, n_heads, d_head, n_layers), Pythia geometries
    "160m": (768, 12, 64, 12),
    "1.4b": (2048, 16, 128, 24),
    "12b": (5120, 40, 128, 36),
}


@dataclass
class ShapeResult:
    shape: str
    device: str
    d_model: int
    n_heads: int
    d_head: int
    n_layers: int
    block_rows: int
    layer_s: float  # spinjax, all statistics of one layer
    matmul_s: float  # floor parts, one layer
    matmul_gflops: float  # the device's matmul rate used for matmul_s
    pass_s: float
    read_s: float
    compile_s: float
    pairs_layer_s: float  # spinjax with the heads' inner products too (a run's default --pairs layer)

    @property
    def floor_s(self) -> float:
        return self.matmul_s + self.pass_s + self.read_s

    @property
    def heads_per_s(self) -> float:
        return self.n_heads / self.layer_s

    @property
    def flops(self) -> float:
        return 2.0 * self.n_heads * self.d_head * self.d_model**2

    @property
    def entry_bytes(self) -> float:
        return 4.0 * self.n_heads * self.d_model**2

    def row(self) -> dict:
        return {
            **asdict(self),
            "floor_s": self.floor_s,
            "ratio_to_floor": self.layer_s / self.floor_s,
            "heads_per_s": self.heads_per_s,
            "achieved_gflops": self.flops / self.layer_s / 1e9,
            "achieved_gbps": self.entry_bytes / self.layer_s / 1e9,
            "checkpoint_s": self.layer_s * self.n_layers,
            "checkpoint_floor_s": self.floor_s * self.n_layers,
        }


def _best(fn, repeat: int) -> float:
    return _best_in_turns({"fn": fn}, repeat)["fn"]


def _best_in_turns(fns: dict, repeat: int) -> dict[str, float]:
    """Best time of each function over ``repeat`` rounds, each round calling every one in turn."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile, warm caches
    best = dict.fromkeys(fns, np.inf)
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _read_time(wq: np.ndarray, wk: np.ndarray) -> float:
    """Seconds to read one layer's Q and K (as fp16 safetensors) back from a file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.safetensors"
        save_file({"q": wq.astype(np.float16), "k": wk.astype(np.float16)}, str(path))

        def read():
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor("q").astype(np.float32), f.get_tensor("k").astype(np.float32)

        return _best(read, 3)


def measure_shape(name: str, *, budget_bytes: int = 1 << 30, repeat: int = 2) -> ShapeResult:
    """spinjax's time per layer at a Pythia shape, and the floor parts, on the default device."""
    one_blas_thread_under_lapack()
    d, n_heads, d_head, n_layers = SHAPES[name]
    rng = np.random.default_rng(0)
    # fp16 values, as checkpoints store them: their exact products are what the kernels meet
    wq = (rng.standard_normal((n_heads, d_head, d)) * 0.02).astype(np.float16).astype(np.float32)
    wk = (rng.standard_normal((n_heads, d_head, d)) * 0.02).astype(np.float16).astype(np.float32)
    rows = block_rows_for_budget(n_heads, d, budget_bytes, max_entries=block_entries_cap())
    rows_pairs = block_rows_for_budget(n_heads, d, budget_bytes, max_entries=block_entries_cap(), inner=True)

    start = time.perf_counter()
    layer_statistics(wq, wk, block_rows=rows)
    compile_s = time.perf_counter() - start

    # Floor parts: the batched matmul on the same block shape, a square GEMM (the device's
    # matmul rate), and one read of a block.
    group = heads_per_block(n_heads)
    q, k = jnp.asarray(wq[:group, :, :rows]), jnp.asarray(wk[:group])
    form = jax.jit(lambda a, b: jnp.einsum("har,hac->hrc", a, b, precision="highest"))
    block = form(q, k)
    n = 2048 if jax.default_backend() == "cpu" else 8192
    square = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    gemm = jax.jit(lambda a: jnp.matmul(a, a, precision="highest"))
    read_once = jax.jit(lambda x: x.sum())
    best = _best_in_turns(
        {
            "spinjax": lambda: layer_statistics(wq, wk, block_rows=rows),
            "spinjax_pairs": lambda: layer_statistics(wq, wk, block_rows=rows_pairs, inner=True),
            "block_matmul": lambda: form(q, k),
            "gemm": lambda: gemm(square),
            "pass": lambda: read_once(block),
        },
        repeat,
    )
    n_blocks = d / rows * n_heads / group
    rate = max(2.0 * group * rows * d_head * d / best["block_matmul"], 2.0 * n**3 / best["gemm"])
    flops = 2.0 * n_heads * d_head * d * d
    return ShapeResult(
        name, jax.devices()[0].device_kind, d, n_heads, d_head, n_layers, rows,
        best["spinjax"], flops / rate, rate / 1e9, best["pass"] * n_blocks, _read_time(wq, wk), compile_s,
        best["spinjax_pairs"],
    )  # fmt: skip


def machine() -> str:
    """This machine and its default device, in words, for a results table's heading."""
    cpu = platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    device = jax.devices()[0]
    kind = device.platform if device.device_kind == device.platform else device.device_kind
    devices = f"{len(jax.devices())} x {kind}"
    return f"{cpu}, {os.cpu_count()} cores{memory}; device: {devices}; jax {jax.__version__}"


def results_section(results: list[ShapeResult]) -> str:
    """A dated markdown section naming the machine and device, with the table of ``results``."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"## `spinjax bench`, {when}, spinjax {__version__}\n\n{machine()}\n\n{markdown(results)}\n"


def markdown(results: list[ShapeResult]) -> str:
    head = (
        "| shape | device | heads/s | GFLOP/s | GB/s | s/layer | floor s/layer (matmul + pass + read) "
        "| device matmul GFLOP/s | ratio to floor | s/checkpoint | s/layer with --pairs layer |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in results:
        x = r.row()
        lines.append(
            f"| {r.shape} (d {r.d_model}, {r.n_heads}x{r.d_head}) | {r.device} | {x['heads_per_s']:.1f} "
            f"| {x['achieved_gflops']:.1f} | {x['achieved_gbps']:.2f} | {r.layer_s:.3f} "
            f"| {r.floor_s:.3f} ({r.matmul_s:.3f} + {r.pass_s:.3f} + {r.read_s:.3f}) "
            f"| {r.matmul_gflops:.0f} | {x['ratio_to_floor']:.2f}x | {x['checkpoint_s']:.1f} "
            f"| {r.pairs_layer_s:.3f} |"
        )
    return "\n".join(lines)
