"""`spinjax view`'s page in headless Chromium (Playwright driving Debian's ``chromium``).

On the embedded model's trajectory store (slow tier: it trains the model once per session): no
console errors, the heatmap shows the store's values, a click on a cell draws that head's stored
counts, the URL holds the state, and the page is not blank. ``.ci/run`` installs the browser;
without one (or without playwright) these tests are skipped.
"""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image
from test_view import TP, equal_float32, serving

import spinjax
from spinjax.sources.tinypythia import STEPS

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

VIEWPORT = {"width": 1400, "height": 900}
READY = "body[data-ready=true][data-head-drawn][data-trajectory-drawn][data-pairs-drawn]"


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(trajectory_store):
    with serving(trajectory_store) as server:
        yield server


@pytest.fixture(scope="module")
def ds(trajectory_store):
    return spinjax.open_store(trajectory_store)[TP]


@pytest.fixture
def page(browser):
    """A fresh page at 1400 x 900 that records console errors and uncaught exceptions."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: m.type in ("error", "warning") and page.errors.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.errors.append(f"pageerror: {e}"))
    yield page
    context.close()


def open_view(page, server, query: str = "") -> None:
    page.goto(server.url + query)
    page.wait_for_selector(READY, state="attached", timeout=30_000)


def state(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}


def trace(page, div: str, name: str | None = None) -> dict:
    """The plotted data of a panel's first trace, or of its trace called ``name``."""
    return page.evaluate(
        "([div, name]) => { const data = document.getElementById(div).data;"
        "const t = data.find((t, i) => (name ? t.name === name : i === 0));"
        "return {x: t.x, y: t.y, z: t.z, customdata: t.customdata}; }",
        [div, name],
    )


def click_cell(page, div: str, row: int, col: int) -> None:
    """A real mouse click at the centre of heatmap cell (row, col), once plotly has seen the
    mouse over that cell (it takes the clicked point from its hover state)."""
    x, y = page.evaluate(
        "([div, row, col]) => { const gd = document.getElementById(div), fl = gd._fullLayout;"
        "const box = gd.getBoundingClientRect();"
        "return [box.left + fl.xaxis._offset + fl.xaxis.l2p(col),"
        "        box.top + fl.yaxis._offset + fl.yaxis.l2p(row)]; }",
        [div, row, col],
    )
    page.mouse.move(x, y)
    for _ in range(100):
        hovered = page.evaluate(
            "(div) => (document.getElementById(div)._hoverdata || []).map(p => p.pointNumber)", div
        )
        if hovered == [[row, col]]:
            break
        time.sleep(0.05)
    page.mouse.click(x, y)


def test_page_shows_the_store(page, served, ds):
    open_view(page, served, f"?model={TP}&stat=kurt&layer=2")
    assert page.errors == []
    assert page.title() == "spinjax view"
    # the overview: heads x steps of kurt, layer 2, W_QK, hover values = the store's values
    t = trace(page, "overview")
    assert t["x"] == [str(s) for s in STEPS] and t["y"] == [0, 1, 2, 3]
    stored = ds["kurt"].sel(matrix="W_QK", layer=2).transpose("head", "step").values
    equal_float32(t["customdata"], stored)
    z = np.array(t["z"], dtype=np.float64)
    assert np.allclose(z, stored, rtol=1e-6) or np.allclose(z, np.log10(stored), rtol=1e-6)
    # the default selection: head 0 at the last finished step, drawn in every panel
    assert state(page) == {
        "model": TP, "matrix": "W_QK", "stat": "kurt", "step": "1280", "layer": "2", "head": "0",
        "view": "layer", "log": "0", "pair": "qk_cosine", "vector": "singular_values",
    }  # fmt: skip
    spectrum = trace(page, "spectrum")
    equal_float32(spectrum["y"], ds["singular_values"].sel(step=1280, layer=2, head=0, matrix="W_QK").values)
    equal_float32(trace(page, "trajectory")["y"], ds["kurt"].sel(layer=2, head=0, matrix="W_QK").values)
    equal_float32(trace(page, "pairs")["z"], ds["qk_cosine"].sel(step=1280, layer=2).values)
    info = page.inner_text("#info")
    assert "layer 2 · head 0 · step 1280 (step1280)" in info and "kurt" in info


def test_click_selects_head_and_step(page, served, ds):
    open_view(page, served, f"?model={TP}&layer=1")
    col = STEPS.index(64)
    click_cell(page, "overview", row=3, col=col)
    page.wait_for_selector("body[data-head-drawn='W_QK/1/3/64']", state="attached", timeout=10_000)
    assert state(page)["head"] == "3" and state(page)["step"] == "64"
    point = ds.sel(step=64, layer=1, head=3, matrix="W_QK")
    # z histogram: the stored counts of the occupied bins, at the stored edges
    z = trace(page, "zhist", "store")
    edges = ds["zbin_edges"].values
    first = int(np.flatnonzero(edges == z["x"][0])[0])
    counts = z["customdata"][:-1]  # the step line repeats the last bin
    assert counts == point["zhist"].values[first : first + len(counts)].tolist()
    assert sum(counts) == int(point["zhist"].values[1:-1].sum())
    # raw histogram: merged neighbouring bins of the log-spaced grid, at stored edges, every count
    raw = trace(page, "hist", "store")
    bin_edges = ds["bin_edges"].values
    idx = [int(np.flatnonzero(bin_edges == x)[0]) for x in raw["x"]]
    merged = [int(point["hist"].values[a:b].sum()) for a, b in zip(idx[:-1], idx[1:], strict=True)]
    assert raw["customdata"][:-1] == merged and sum(merged) == int(point["hist"].values[1:-1].sum())
    equal_float32(trace(page, "spectrum")["y"], point["singular_values"].values)
    page.wait_for_selector("body[data-trajectory-drawn='W_QK/std/1/3']", state="attached", timeout=10_000)
    assert trace(page, "trajectory", "selected step")["x"] == ["64"]
    # the pairs panel: a click on a cell selects its column's head
    page.wait_for_selector("body[data-pairs-drawn='qk_cosine/1/64']", state="attached", timeout=10_000)
    click_cell(page, "pairs", row=3, col=0)
    page.wait_for_selector("body[data-head-drawn='W_QK/1/0/64']", state="attached", timeout=10_000)
    assert page.errors == []


def test_url_state_round_trips(page, served, ds):
    query = (f"?model={TP}&matrix=W_K&stat=std_z&step=32&layer=3&head=2&view=step&log=1&pair=js_head"
             "&vector=singular_values")  # fmt: skip
    open_view(page, served, query)
    got = state(page)
    assert got["stat"] == "std"  # no std_z in this store: the default instead
    want = {
        "matrix": "W_K",
        "step": "32",
        "layer": "3",
        "head": "2",
        "view": "step",
        "log": "1",
        "pair": "js_head",
    }
    assert {k: got[k] for k in want} == want
    assert page.input_value("#matrix") == "W_K" and page.input_value("#layer") == "3"
    assert page.is_checked("input[name=view][value=step]") and page.is_checked("#log")
    assert page.input_value("#step") == str(STEPS.index(32))
    # the step view: layers x heads of std at step 32
    t = trace(page, "overview")
    equal_float32(t["customdata"], ds["std"].sel(step=32, matrix="W_K").transpose("layer", "head").values)
    assert page.evaluate("document.getElementById('zhist')._fullLayout.yaxis.type") == "log"
    # a reload (or a shared link) shows the same view
    url = page.url
    page.reload()
    page.wait_for_selector("body[data-head-drawn='W_K/3/2/32']", state="attached", timeout=30_000)
    assert page.url == url
    # a control changes the URL
    page.select_option("#stat", "kurt")
    page.wait_for_url(re.compile(r"[?&]stat=kurt&"), timeout=5_000)
    assert page.errors == []


def test_screenshot_is_not_blank(page, served, tmp_path):
    def colourful(path) -> float:
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=int)
        return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())

    blank = tmp_path / "blank.png"
    page.goto("about:blank")
    page.screenshot(path=str(blank))
    assert colourful(blank) < 0.001  # the check below fails on a blank page
    shot = tmp_path / "view.png"
    open_view(page, served, f"?model={TP}&layer=2&head=1&step=512")
    page.wait_for_timeout(300)
    page.screenshot(path=str(shot))
    with Image.open(shot) as im:
        assert im.size == (1400, 900)
        grey = np.asarray(im.convert("L"), dtype=float)
    assert grey.std() > 20 and (grey < 200).mean() > 0.03  # text and plots
    assert colourful(shot) > 0.05  # the heatmaps
