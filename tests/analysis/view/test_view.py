"""`spinjax view`'s server: data endpoints against the store, refusals, read-only, new steps.

On the gpt_neox fixture's store (fast tier); the overviews over a trajectory and the null
band need the embedded model's trajectory or a null ensemble (slow tier). The page itself,
in a real browser, is tested in test_view_browser.py.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from conftest import NEOX as NEOX_DIR

import spinjax
from spinjax.analysis.view import make_server
from spinjax.analysis.view.data import HEAD_STATS, NULL_QUANTILES, StoreView, _Cache
from spinjax.cli import main
from spinjax.sources.tinypythia import STEPS

TP, NEOX = "tiny-pythia", "gpt_neox"


@contextmanager
def serving(store: Path):
    """The viewer of ``store`` on a free loopback port, in a thread of this process."""
    server = make_server(store, port=0)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def get(server, path: str, params: dict | None = None, *, host: str | None = None, method: str = "GET"):
    """(status, headers, body bytes) of one request, the path sent exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        url = path + ("?" + urlencode(params) if params else "")
        conn.putrequest(method, url, skip_host=host is not None, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def get_json(server, path: str, params: dict | None = None):
    status, _, body = get(server, path, params)
    assert status == 200, body
    return json.loads(body)


def values(json_list) -> np.ndarray:
    """JSON numbers (None for non-finite) back to float64."""
    return np.array(json_list, dtype=object).astype(np.float64)


def equal_float32(json_list, stored: np.ndarray) -> None:
    """Sent values are the stored float32 values exactly (NaN / inf sent as null)."""
    got = values(json_list)
    stored = np.asarray(stored, dtype=np.float64)
    assert got.shape == stored.shape
    finite = np.isfinite(stored)
    np.testing.assert_array_equal(np.isnan(got), ~finite)
    np.testing.assert_array_equal(got[finite], stored[finite])


@pytest.fixture(scope="module")
def served(neox_store):
    with serving(neox_store) as server:
        yield server


@pytest.fixture(scope="module")
def ds(neox_store):
    return spinjax.open_store(neox_store)[NEOX]


@pytest.fixture(scope="module")
def null_store(neox_store, tmp_path_factory):
    """The gpt_neox store with ``--null`` added (z-scores and a 40-draw null ensemble)."""
    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    path = tmp_path_factory.mktemp("null") / "store.zarr"
    shutil.copytree(neox_store, path)
    run(str(NEOX_DIR), RunOptions(steps="all", store=path, null=True, null_samples=40))
    return path


def test_server_imports_no_jax(neox_store):
    code = (
        "import sys; from spinjax.analysis.view.server import make_server;"
        f"s = make_server({str(neox_store)!r}, port=0); s.store.meta(); s.server_close();"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'orbax')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_meta(served, ds, neox_store):
    meta = get_json(served, "/api/meta")
    assert meta["store"] == neox_store.name and list(meta["models"]) == [NEOX]
    m = meta["models"][NEOX]
    assert m["steps"] == [-1] and m["requested"] == 1 and m["revisions"] == [str(NEOX_DIR)]
    assert (m["layers"], m["heads"], m["matrices"]) == (2, 6, ["W_Q", "W_K", "W_QK"])
    assert sorted(m["statistics"]) == sorted(spinjax.analysis.scalar_variables(ds))
    assert m["statistics"][:4] == ["mean", "std", "skew", "kurt"] and "n_nonfinite" in m["statistics"]
    assert m["vectors"] == ["singular_values"] and m["pairs"] == ["js_head", "qk_cosine", "qk_distance"]
    assert m["baseline"] is None and m["attrs"]["d_model"] == 96 and m["attrs"]["architecture"] == "gpt_neox"
    for name, edges in (("zhist", "zbin_edges"), ("hist", "bin_edges")):
        equal_float32(m["edges"][name], ds[edges].values)


def test_overviews_and_trajectory_equal_the_store(served, ds):
    for stat, matrix, layer in (("kurt", "W_QK", 1), ("std", "W_Q", 0), ("condition_number", "W_K", 1)):
        q = {"model": NEOX, "matrix": matrix, "stat": stat}
        stored = ds[stat].sel(matrix=matrix)  # (step, layer, head)
        d = get_json(served, "/api/layer", {**q, "layer": layer})
        assert (d["matrix"], d["stat"], d["layer"], d["steps"], d["heads"]) == (matrix, stat, layer, [-1],
                                                                               list(range(6)))  # fmt: skip
        equal_float32(d["values"], stored.sel(layer=layer).transpose("head", "step").values)
        d = get_json(served, "/api/step", {**q, "step": -1})
        assert (d["matrix"], d["stat"], d["step"], d["layers"]) == (matrix, stat, -1, [0, 1])
        equal_float32(d["values"], stored.sel(step=-1).transpose("layer", "head").values)
        d = get_json(served, "/api/trajectory", {**q, "layer": layer, "head": 4})
        equal_float32(d["values"], stored.sel(layer=layer, head=4).values)


def test_overviews_of_a_trajectory(trajectory_store):
    """The embedded model's 14 steps: one column per finished step, ascending."""
    ds = spinjax.open_store(trajectory_store)[TP]
    with serving(trajectory_store) as server:
        assert sorted(get_json(server, "/api/meta")["models"]) == [NEOX, TP]
        for stat, matrix, layer in (("kurt", "W_QK", 2), ("stable_rank", "W_K", 3)):
            q = {"model": TP, "matrix": matrix, "stat": stat}
            stored = ds[stat].sel(matrix=matrix)
            d = get_json(server, "/api/layer", {**q, "layer": layer})
            assert d["steps"] == list(STEPS) and d["heads"] == [0, 1, 2, 3]
            equal_float32(d["values"], stored.sel(layer=layer).transpose("head", "step").values)
            d = get_json(server, "/api/step", {**q, "step": 512})
            equal_float32(d["values"], stored.sel(step=512).transpose("layer", "head").values)
            d = get_json(server, "/api/trajectory", {**q, "layer": layer, "head": 1})
            equal_float32(d["values"], stored.sel(layer=layer, head=1).values)


def test_read_ahead_serves_the_first_overview(neox_store, ds):
    """`serve` reads the page's default statistic ahead: the first overview finds it cached."""
    view = StoreView(neox_store)
    view.warm()
    view.snapshot.cache.get(("scalar", NEOX, "std"), lambda: pytest.fail("std was not read ahead"))
    d = view.layer_overview({"model": NEOX, "matrix": "W_QK", "stat": "std", "layer": "1"})
    equal_float32(d["values"], ds["std"].sel(matrix="W_QK", layer=1).transpose("head", "step").values)


def test_cache_computes_a_key_once_for_concurrent_askers():
    cache, calls, started, release = _Cache(1 << 20), [], threading.Event(), threading.Event()

    def slow():
        calls.append(1)
        started.set()
        release.wait(10)
        return np.arange(4)

    results = []
    first = threading.Thread(target=lambda: results.append(cache.get(("k",), slow)))
    first.start()
    started.wait(10)
    second = threading.Thread(target=lambda: results.append(cache.get(("k",), slow)))
    second.start()
    release.set()
    first.join(10), second.join(10)
    assert len(calls) == 1 and len(results) == 2 and all((r == np.arange(4)).all() for r in results)

    def broken():
        raise OSError("chunk gone")

    with pytest.raises(OSError, match="chunk gone"):
        cache.get(("bad",), broken)
    assert cache.get(("bad",), lambda: np.zeros(1)).tolist() == [0.0]  # an error is not kept


def test_head_equals_the_store(served, ds):
    q = {"model": NEOX, "matrix": "W_QK", "step": -1, "layer": 1, "head": 2}
    d = get_json(served, "/api/head", q)
    point = ds.sel(step=-1, layer=1, head=2, matrix="W_QK")
    assert (d["step"], d["layer"], d["head"], d["matrix"]) == (-1, 1, 2, "W_QK")
    assert d["zhist"] == point["zhist"].values.tolist() and d["hist"] == point["hist"].values.tolist()
    assert sum(d["zhist"]) == sum(d["hist"]) == 96 * 96  # every entry of a 96 x 96 W_QK, once
    assert sorted(d["stats"]) == sorted(HEAD_STATS)
    for name, value in d["stats"].items():
        equal_float32([value], [point[name].values])
    equal_float32(d["vectors"]["singular_values"], point["singular_values"].values)
    # another head of the same layer and step comes from the cached layer counts: same values
    d = get_json(served, "/api/head", {**q, "head": 5, "matrix": "W_K"})
    assert d["zhist"] == ds["zhist"].sel(step=-1, layer=1, head=5, matrix="W_K").values.tolist()
    assert sum(d["zhist"]) == 16 * 96


def test_pairs_equal_the_store(served, ds):
    for name in ("js_head", "qk_cosine", "qk_distance"):
        d = get_json(served, "/api/pairs", {"model": NEOX, "step": -1, "layer": 1, "name": name})
        assert (d["name"], d["step"], d["layer"]) == (name, -1, 1)
        equal_float32(d["values"], ds[name].sel(step=-1, layer=1).transpose("head", "head2").values)
    np.testing.assert_allclose(np.diag(values(d["values"])), 0.0, atol=1e-6)  # distance to itself


@pytest.mark.slow  # compiles and draws a null ensemble
def test_null_band(null_store):
    with serving(null_store) as server:
        m = get_json(server, "/api/meta")["models"][NEOX]
        assert m["baseline"] == "baseline/96x16"
        assert "std_z" in m["statistics"] and "singular_values_z" in m["vectors"]
        assert m["statistics"].index("std_z") > m["statistics"].index("n_nonfinite")  # z-scores last
        band = get_json(server, "/api/null", {"model": NEOX, "matrix": "W_QK"})
    null = xr.open_zarr(null_store, group="baseline/96x16")
    dens = spinjax.density(null[["zhist", "zbin_edges"]].sel(matrix="W_QK"), "z")  # (sample, inner zbin)
    want = np.quantile(dens.transpose("sample", "zbin").values, NULL_QUANTILES, axis=0)
    assert band["samples"] == 40 and band["quantiles"] == list(NULL_QUANTILES)
    for got, w in zip((band["lower"], band["upper"]), want, strict=True):
        assert got[0] is None and got[-1] is None  # the unbounded tail bins
        np.testing.assert_allclose(values(got[1:-1]), w, rtol=1e-12)
    assert np.all(want[1] >= want[0]) and want[1].max() > 0.3  # a band around the normal peak 0.4


def test_no_baseline_no_band(served):
    band = get_json(served, "/api/null", {"model": NEOX, "matrix": "W_QK"})
    assert band["baseline"] is None and band["lower"] is None


BAD_QUERIES = [
    ("/api/layer", {"model": "nope", "matrix": "W_QK", "stat": "std", "layer": 0}, "no model 'nope'"),
    ("/api/layer", {"model": NEOX, "matrix": "W_X", "stat": "std", "layer": 0}, "no matrix 'W_X'"),
    ("/api/layer", {"model": NEOX, "matrix": "W_QK", "stat": "zhist", "layer": 0}, "no stat 'zhist'"),
    ("/api/layer", {"model": NEOX, "matrix": "W_QK", "stat": "../zarr.json", "layer": 0}, "no stat"),
    ("/api/layer", {"model": NEOX, "matrix": "W_QK", "stat": "std", "layer": 2}, "layers 0..1, not 2"),
    ("/api/layer", {"model": NEOX, "matrix": "W_QK", "stat": "std", "layer": "-1"}, "not -1"),
    ("/api/layer", {"model": NEOX, "matrix": "W_QK", "stat": "std", "layer": "1e0"}, "must be an integer"),
    ("/api/layer", {"model": NEOX, "matrix": "W_QK", "stat": "std"}, "missing parameter 'layer'"),
    ("/api/step", {"model": NEOX, "matrix": "W_QK", "stat": "std", "step": 3}, "no finished step 3"),
    ("/api/head", {"model": NEOX, "matrix": "W_QK", "step": -1, "layer": 0, "head": 6}, "heads 0..5"),
    ("/api/pairs", {"model": NEOX, "step": 0, "layer": 0, "name": "qk_cosine"}, "no finished step 0"),
    ("/api/pairs", {"model": NEOX, "step": -1, "layer": 0, "name": "hist"}, "no name 'hist'"),
    ("/api/null", {"model": "../..", "matrix": "W_QK"}, "no model '../..'"),
]


@pytest.mark.parametrize(("path", "params", "message"), BAD_QUERIES)
def test_bad_queries_are_400(served, path, params, message):
    status, headers, body = get(served, path, params)
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert message in json.loads(body)["error"]
    assert b"Traceback" not in body


@pytest.mark.parametrize(
    "path",
    [
        "/static/../server.py", "/static/%2e%2e/data.py", "/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
        "/static//etc/passwd", "/static/plotly.min.js/../../zarr.json", "/gpt_neox/zarr.json",
        "/zarr.json",
        "/api/meta/..", "/api", "/api/", "/static/", "/static/index.html", "/app.js", "/favicon.ico",
        "/api/head/../../../etc/passwd", "//etc/passwd", "/..%2f..%2fetc%2fpasswd",
    ],
)  # fmt: skip
def test_other_paths_are_404(served, path):
    status, _, body = get(served, path)
    assert status == 404 and json.loads(body) == {"error": "not found"}


def test_assets_headers_and_refusals(served):
    status, headers, body = get(served, "/")
    assert status == 200 and b'<script defer src="/static/app.js">' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b"http" not in body  # nothing fetched from elsewhere
    status, headers, body = get(served, "/static/plotly.min.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert body.startswith(b"/*! plotly.js v4.1.1 (core and heatmap only") and len(body) > 1_000_000
    assert headers["Cache-Control"] == "max-age=86400"
    for asset in ("/static/app.js", "/static/app.css"):
        status, headers, body = get(served, asset)
        assert status == 200 and b"https://" not in body and b"http://" not in body
        assert headers["Cache-Control"] == "no-cache"  # edited pages are seen on reload
    # DNS rebinding: a loopback server answers only requests addressed to a loopback name
    status, _, body = get(served, "/api/meta", host="evil.example:80")
    assert status == 403 and b"localhost only" in body
    assert get(served, "/api/meta", host=f"localhost:{served.server_address[1]}")[0] == 200
    status, _, body = get(served, "/api/meta", method="POST")
    assert status == 501 and b"Traceback" not in body and json.loads(body) == {"error": "Not Implemented"}
    status, _, body = get(served, "/api/layer?model=gpt_neox&&stat")  # malformed query string
    assert status == 400 and json.loads(body) == {"error": "malformed query"}


def test_browsing_never_writes(neox_store, snapshot):
    before = snapshot(neox_store)
    with serving(neox_store) as server:
        get_json(server, "/api/meta")
        get_json(server, "/api/layer", {"model": NEOX, "matrix": "W_QK", "stat": "std", "layer": 0})
        get_json(server, "/api/head", {"model": NEOX, "matrix": "W_QK", "step": -1, "layer": 0, "head": 0})
        get_json(server, "/api/pairs", {"model": NEOX, "step": -1, "layer": 0, "name": "js_head"})
        get_json(server, "/api/null", {"model": NEOX, "matrix": "W_Q"})
    assert snapshot(neox_store) == before


def test_steps_finished_while_serving_appear_on_reload(store_copy):
    """A run that appends a step and finishes it: the step shows up at the next /api/meta."""
    from spinjax.store import ModelGroup, locked, open_store

    raw = zarr.open_group(str(store_copy), mode="r+")[NEOX]
    raw["done"][0] = False  # step -1 is being (re)computed
    q = {"model": NEOX, "matrix": "W_QK", "stat": "std", "layer": 1}
    with serving(store_copy) as server:
        assert get_json(server, "/api/meta")["models"][NEOX]["steps"] == []
        assert get_json(server, "/api/layer", q)["steps"] == []
        status, _, body = get(server, "/api/head", {**q, "step": -1, "head": 0})
        assert status == 400 and b"no finished step -1" in body
        # a run plans a new step (appended, committed, not done), then writes it
        with locked(store_copy) as root:
            ((index, step, _),) = ModelGroup(root, NEOX).plan([(2000, "step2000")], recompute=False)
        assert (index, step) == (1, 2000)
        assert get_json(server, "/api/meta")["models"][NEOX]["steps"] == []  # not done yet
        group = ModelGroup(open_store(store_copy, create=True, consolidated=False), NEOX)
        results = {name: group.group[name][0] * 2 for name in group.data_variables()}  # doubled values
        group.write_step(index, results)
        meta = get_json(server, "/api/meta")["models"][NEOX]
        assert meta["steps"] == [2000] and meta["revisions"] == ["step2000"]
        raw["done"][0] = True
        meta = get_json(server, "/api/meta")["models"][NEOX]
        assert meta["steps"] == [-1, 2000] and meta["revisions"] == [str(NEOX_DIR), "step2000"]
        d = get_json(server, "/api/layer", q)
        assert d["steps"] == [-1, 2000]
        stored = spinjax.open_store(store_copy)[NEOX]["std"].sel(matrix="W_QK", layer=1)
        equal_float32(d["values"], stored.transpose("head", "step").values)
        np.testing.assert_array_equal(values(d["values"])[:, 1], 2 * values(d["values"])[:, 0])


def test_a_model_without_finished_steps(store_copy):
    zarr.open_group(str(store_copy), mode="r+")[NEOX]["done"][0] = False
    with serving(store_copy) as server:
        m = get_json(server, "/api/meta")["models"][NEOX]
        assert m["steps"] == [] and m["requested"] == 1
        q = {"model": NEOX, "matrix": "W_QK", "stat": "std", "layer": 1}
        d = get_json(server, "/api/layer", q)
        assert (d["steps"], d["heads"], d["values"]) == ([], list(range(6)), [[]] * 6)
        assert get(server, "/api/step", {**q, "step": -1})[0] == 400


def test_view_command(neox_store, tmp_path):
    runner = CliRunner()
    done = runner.invoke(main, ["view", str(tmp_path / "missing.zarr")])
    assert done.exit_code == 2 and "not a Zarr store" in done.output and "Traceback" not in done.output
    with serving(neox_store) as server:  # a port in use
        done = runner.invoke(main, ["view", str(neox_store), "--port", str(server.server_address[1])])
    assert done.exit_code == 2 and "cannot listen on 127.0.0.1" in done.output and "--port" in done.output
    # the real command, listening beyond loopback: it warns, then serves
    command = [
        sys.executable,
        "-m",
        "spinjax.cli",
        "view",
        str(neox_store),
        "--port",
        "0",
        "--host",
        "0.0.0.0",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        warning, serving_line = proc.stdout.readline(), proc.stdout.readline()
        assert warning.startswith("warning: listening on 0.0.0.0: anyone who can reach port")
        assert "can read the store" in warning
        port = int(serving_line.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/meta")
        assert json.loads(conn.getresponse().read())["models"][NEOX]["steps"] == [-1]
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
