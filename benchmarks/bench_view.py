"""`spinjax view` on a Pythia-12B-shaped trajectory store, measured in a real browser.

Writes a synthetic store with the store's own writer (36 layers x 40 heads, 154 Pythia
steps, matrices W_Q, W_K, W_QK, d_head 128 singular values, the ``--null`` z-scores, the
``--pairs layer`` variables and a 200-draw null ensemble ``baseline/5120x128``; random
statistics, no weights), serves it with ``spinjax view`` in a child process and drives
headless Chromium (Playwright with Debian's ``chromium``) over the page. Prints:

- first paint: navigation start to the overview heatmap drawn (the page stamps
  ``document.body.dataset.readyAt`` in the animation frame after its first overview is drawn):
  cold = a first visit (new browser context, empty cache; the first one also on a server that
  has read nothing yet), warm = a reload (plotly.js from the browser's cache);
- click: mouse down on a heatmap cell (another head and step) to both histograms and the
  spectrum of that head drawn, median and maximum of 20;
- for scale, the time plotly.js alone takes to load and run in a new browser context;
- server memory: the child's peak resident set (VmHWM) after the clicks and after browsing
  every statistic of two layers.

    python benchmarks/bench_view.py [--store /tmp/view12b.zarr] [--steps 154] [--generate-only]

A store given with ``--store`` is written if missing and kept, so later runs reuse it
(generation takes about a minute on 2 cores, 1.4 GB); without it a temporary store is used.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.special import ndtr

PYTHIA_STEPS = (0, *(2**i for i in range(10)), *range(1000, 143001, 1000))
KEY = "pythia-12b-synthetic"


def _hist(edges: np.ndarray, mean: np.ndarray, std: np.ndarray, tail: np.ndarray, n: int) -> np.ndarray:
    """Counts of n entries on ``edges`` from a two-Gaussian mixture (a heavier tail of weight
    ``tail`` and twice the width), for arrays of heads (broadcast over the last axis)."""
    x = (edges - mean[..., None]) / std[..., None]
    cdf = (1 - tail[..., None]) * ndtr(x / 0.95) + tail[..., None] * ndtr(x / 2.0)
    return np.round(np.diff(cdf, axis=-1) * n).astype(np.uint32)


def synthetic_step(rng: np.random.Generator, shape: tuple[int, int, int], n_sv: int, d_model: int,
                   zedges: np.ndarray, edges: np.ndarray, scalars: tuple[str, ...],
                   null: tuple[str, ...], t: float) -> dict[str, np.ndarray]:  # fmt: skip
    """One step's variables, (layer, head, matrix[, extra]), drifting with ``t`` in [0, 1]."""
    L, H, M = shape
    out: dict[str, np.ndarray] = {}
    std = (0.02 * np.exp(0.3 * rng.standard_normal(shape)) * (1 + t)).astype(np.float32)
    mean = (0.05 * std * rng.standard_normal(shape)).astype(np.float32)
    tail = np.clip(0.05 + 0.1 * t + 0.02 * rng.standard_normal(shape), 0.0, 0.5)
    for name in scalars:
        out[name] = rng.standard_normal(shape).astype(np.float32)
    out.update(std=std, mean=mean, mu_fit=mean, sigma_fit=(std * 0.95).astype(np.float32))
    out["kurt"] = 3 * (0.95**4 * (1 - tail) + 16 * tail) / ((0.95**2 * (1 - tail) + 4 * tail) ** 2) - 3
    out["kurt"] = out["kurt"].astype(np.float32)
    n = np.array([d_model * 128, d_model * 128, d_model * d_model])  # entries of W_Q, W_K, W_QK
    zcounts = np.empty(shape + (len(zedges) - 1,), np.uint32)
    counts = np.empty(shape + (len(edges) - 1,), np.uint32)
    for m in range(M):
        ones = np.ones((L, H))
        zcounts[:, :, m] = _hist(zedges, 0 * ones, ones, tail[:, :, m], int(n[m]))
        counts[:, :, m] = _hist(edges, mean[:, :, m], std[:, :, m], tail[:, :, m], int(n[m]))
    out["zhist"], out["hist"] = zcounts, counts
    out["n_nonfinite"] = np.zeros(shape, np.int64)
    decay = np.exp(-np.arange(n_sv) / (10 + 20 * rng.random(shape)[..., None]))
    out["singular_values"] = (std[..., None] * 40 * decay).astype(np.float32)
    for name in null:
        extra = (n_sv,) if name == "singular_values_z" else ()
        out[name] = rng.standard_normal(shape + extra).astype(np.float32)
    cos = rng.uniform(-0.2, 0.2, (L, H, H)).astype(np.float32)
    cos = (cos + cos.transpose(0, 2, 1)) / 2
    cos[:, np.arange(H), np.arange(H)] = 1
    out["qk_cosine"] = cos
    out["qk_distance"] = np.sqrt(2 * (1 - cos)).astype(np.float32)
    js = np.abs(cos.transpose(0, 2, 1) - cos) + 0.01 * (1 - cos)
    out["js_head"] = js.astype(np.float32)
    return out


def generate(
    path: Path, *, n_layers: int = 36, n_heads: int = 40, d_model: int = 5120, d_head: int = 128,
    steps: tuple[int, ...] = PYTHIA_STEPS, null_samples: int = 200, seed: int = 0,
) -> None:  # fmt: skip
    """A Pythia-12B-shaped trajectory store of random statistics, through the store's writer."""
    from spinjax.run.features import pair_coordinates
    from spinjax.store import ModelGroup, consolidate, locked, open_store
    from spinjax.store.baseline import baseline_key, write_baseline
    from spinjax.store.schema import NULL_VARIABLES, PAIR_VARIABLES, SCALARS, VARIABLES

    rng = np.random.default_rng(seed)
    shape_attrs = {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_heads,
                   "d_head": d_head}  # fmt: skip
    with locked(path) as root:
        group = ModelGroup.create_or_check(
            root, KEY, shape=shape_attrs, architecture="gpt_neox", n_sv=d_head,
            attrs={"source": "synthetic (benchmarks/bench_view.py)", "dtype": "float16", "variant": "raw"},
        )  # fmt: skip
        planned = group.plan([(s, f"step{s}") for s in steps], recompute=False)
        group.add_variables({**NULL_VARIABLES, **PAIR_VARIABLES}, pair_coordinates(n_layers, n_heads))
        key = baseline_key(d_model, d_head)
        group.group.attrs["features"] = {"null": {"baseline": key, "samples": null_samples, "sigma": 1.0},
                                         "pairs": "layer"}  # fmt: skip
        consolidate(root, KEY)
    group = ModelGroup(open_store(path, create=True, consolidated=False), KEY)
    zedges, edges = group.group["zbin_edges"][:], group.group["bin_edges"][:]
    shape = (n_layers, n_heads, 3)
    t0 = time.perf_counter()
    for k, (index, step, _) in enumerate(planned):
        results = synthetic_step(rng, shape, d_head, d_model, zedges, edges, SCALARS, tuple(NULL_VARIABLES),
                                 k / max(len(planned) - 1, 1))  # fmt: skip
        group.write_step(index, results)
        print(f"\rwrote step {step} ({k + 1}/{len(planned)}, {time.perf_counter() - t0:.0f} s)",
              end="", file=sys.stderr, flush=True)  # fmt: skip
    print(file=sys.stderr)
    nrng = np.random.default_rng(seed + 1)
    nshape = (null_samples, 3)
    null = synthetic_step(nrng, (null_samples, 1, 3), d_head, d_model, zedges, edges, SCALARS, (), 0.0)
    stats = {name: null[name].reshape(nshape + null[name].shape[3:]) for name in VARIABLES}
    write_baseline(path, stats, d_model=d_model, d_head=d_head, sigma=1.0, seed=seed)


# ---- measurement in the browser --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait(page, selector: str) -> None:
    page.wait_for_selector(selector, state="attached", timeout=60_000)


def _click(page, row: int, col: int) -> None:
    """Click overview cell (row, col) once plotly has seen the mouse over it (it takes the
    clicked point from its hover state, which lags behind the mouse on a busy machine)."""
    x, y = page.evaluate(
        "([row, col]) => { const gd = document.getElementById('overview'), fl = gd._fullLayout;"
        "const box = gd.getBoundingClientRect();"
        "return [box.left + fl.xaxis._offset + fl.xaxis.l2p(col),"
        "        box.top + fl.yaxis._offset + fl.yaxis.l2p(row)]; }",
        [row, col],
    )
    page.mouse.move(x, y)
    for _ in range(100):
        if page.evaluate(
            "(document.getElementById('overview')._hoverdata || []).map(p => p.pointNumber)"
        ) == [[row, col]]:
            break
        time.sleep(0.02)
    page.mouse.click(x, y)


def measure(path: Path, *, clicks: int = 20, visits: int = 3, reloads: int = 5) -> dict[str, float]:
    """First paint (cold and warm), click to histogram and spectrum, peak server memory."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "spinjax.cli", "view", str(path), "--port", str(port)],
                              stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    ready = "body[data-ready=true][data-head-drawn]"
    paint = "Number(document.body.dataset.readyAt)"  # ms since navigation start
    try:
        for _ in range(400):  # the server is listening
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        out: dict[str, float] = {}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium")
            cold = []  # a first visit: new browser context (empty cache); the first one on a fresh server
            for _ in range(visits):
                context = browser.new_context(viewport={"width": 1400, "height": 900})
                page = context.new_page()
                page.goto(url)
                _wait(page, ready)
                cold.append(page.evaluate(paint))
            warm = []  # reloads: plotly.js from the browser's cache
            for _ in range(reloads):
                page.reload()
                _wait(page, ready)
                warm.append(page.evaluate(paint))
            # for scale: plotly.js alone, loaded and run by an empty page in a new context
            context = browser.new_context()
            alone = context.new_page()
            alone.set_content(
                f"<script>t0 = performance.now()</script><script src='{url}static/plotly.min.js'></script>"
                "<script>document.title = String(performance.now() - t0)</script>"
            )
            out["plotly_js_alone_cold_ms"] = float(alone.title())
            context.close()
            out["first_paint_fresh_server_ms"] = cold[0]
            out["first_paint_cold_median_ms"] = statistics.median(cold)
            out["first_paint_warm_median_ms"] = statistics.median(warm)
            # clicks on random cells (another head and step): mouse down to both histograms and the
            # spectrum of that head drawn
            page.evaluate("document.getElementById('overview').addEventListener('mousedown',"
                          " () => { window.t0 = performance.now(); }, true)")  # fmt: skip
            steps = page.evaluate("APP.meta.models[APP.S.model].steps")
            layer, matrix = page.evaluate("[APP.S.layer, APP.S.matrix]")
            rng = np.random.default_rng(1)
            times = []
            row, col = page.evaluate("APP.S.head"), len(steps) - 1
            for _ in range(clicks):
                now = (row, col)
                while (row, col) == now:  # another cell than the selected one
                    row, col = int(rng.integers(40)), int(rng.integers(len(steps)))
                _click(page, row, col)
                _wait(page, f"body[data-head-drawn='{matrix}/{layer}/{row}/{steps[col]}']")
                times.append(page.evaluate("APP.drawnAt - window.t0"))
            out["click_median_ms"] = statistics.median(times)
            out["click_max_ms"] = max(times)
            # browse on: every statistic of two layers (the server keeps each one's 154 steps)
            for stat in page.evaluate("APP.meta.models[APP.S.model].statistics"):
                for lay in (0, 35):
                    page.select_option("#layer", str(lay))
                    page.select_option("#stat", stat)
                    _wait(page, f"body[data-overview-drawn='{matrix}/{stat}/layer{lay}']")
            browser.close()
        out["server_peak_rss_mb"] = _peak_rss_mb(server.pid)
        return out
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=None,
                    help="Store to write (if missing) and keep; default: a temporary one.")  # fmt: skip
    ap.add_argument("--steps", type=int, default=len(PYTHIA_STEPS), help="The first N Pythia steps.")
    ap.add_argument("--generate-only", action="store_true", help="Write the store, measure nothing.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "pythia-12b-synthetic.zarr"
        if not (store / "zarr.json").exists():
            t0 = time.perf_counter()
            generate(store, steps=PYTHIA_STEPS[: args.steps])
            size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
            print(f"generated {store} in {time.perf_counter() - t0:.0f} s, {size / 1e9:.2f} GB on disk")
        if not args.generate_only:
            for name, value in measure(store).items():
                print(f"{name}: {value:.0f}")


if __name__ == "__main__":
    main()
