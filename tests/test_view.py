"""`spinjax view`'s server: data endpoints against the store, refusals, read-only, new steps.

The page itself, in a real browser, is tested in test_view_browser.py.
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

import spinjax
from spinjax.cli import main
from spinjax.tinypythia import STEPS
from spinjax.viewer import make_server
from spinjax.viewer.data import HEAD_STATS, NULL_QUANTILES

TP, NEOX = "tiny-pythia", "gpt_neox"
NEOX_DIR = Path(__file__).parent / "fixtures" / "extraction" / "gpt_neox"


@contextmanager
def serving(store: Path):
    """The viewer of ``store`` on a free loopback port, in a thread of this process."""
    server = make_server(store, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
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
def served(trajectory_store):
    with serving(trajectory_store) as server:
        yield server


@pytest.fixture(scope="module")
def ds(trajectory_store):
    return spinjax.open_store(trajectory_store)[TP]


@pytest.fixture(scope="module")
def null_store(neox_store, tmp_path_factory):
    """The gpt_neox store with ``--null`` added (z-scores and a 40-draw null ensemble)."""
    from spinjax.pipeline import run

    path = tmp_path_factory.mktemp("null") / "store.zarr"
    shutil.copytree(neox_store, path)
    run(str(NEOX_DIR), steps="all", store_path=path, null=True, null_samples=40)
    return path


def test_server_imports_no_jax(trajectory_store):
    code = (
        "import sys; from spinjax.viewer.server import make_server;"
        f"s = make_server({str(trajectory_store)!r}, port=0); s.store.meta(); s.server_close();"
        "print(sorted(m for m in sys.modules if m.startswith(('jax', 'spinjax.kernels'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_meta(served, ds, trajectory_store):
    meta = get_json(served, "/api/meta")
    assert meta["store"] == trajectory_store.name and sorted(meta["models"]) == [NEOX, TP]
    m = meta["models"][TP]
    assert m["steps"] == list(STEPS) and m["requested"] == 14
    assert m["revisions"] == [str(r) for r in ds["revision"].values]
    assert (m["layers"], m["heads"], m["matrices"]) == (4, 4, ["W_Q", "W_K", "W_QK"])
    assert m["statistics"] == sorted(spinjax.analysis.scalar_variables(ds))
    assert {"std", "kurt", "kl_gauss", "stable_rank", "n_nonfinite"} <= set(m["statistics"])
    assert m["vectors"] == ["singular_values"] and m["pairs"] == ["js_head", "qk_cosine", "qk_distance"]
    assert m["baseline"] is None and m["attrs"]["d_model"] == 64
    for name, edges in (("zhist", "zbin_edges"), ("hist", "bin_edges")):
        equal_float32(m["edges"][name], ds[edges].values)
    assert meta["models"][NEOX]["steps"] == [-1]


def test_overviews_and_trajectory_equal_the_store(served, ds):
    for stat, matrix, layer in (("kurt", "W_QK", 2), ("std", "W_Q", 0), ("condition_number", "W_K", 3)):
        q = {"model": TP, "matrix": matrix, "stat": stat}
        stored = ds[stat].sel(matrix=matrix)  # (step, layer, head)
        d = get_json(served, "/api/layer", {**q, "layer": layer})
        assert (d["matrix"], d["stat"], d["layer"]) == (matrix, stat, layer)
        assert d["steps"] == list(STEPS) and d["heads"] == [0, 1, 2, 3]
        equal_float32(d["values"], stored.sel(layer=layer).transpose("head", "step").values)
        d = get_json(served, "/api/step", {**q, "step": 512})
        assert (d["matrix"], d["stat"], d["step"]) == (matrix, stat, 512) and d["layers"] == [0, 1, 2, 3]
        equal_float32(d["values"], stored.sel(step=512).transpose("layer", "head").values)
        d = get_json(served, "/api/trajectory", {**q, "layer": layer, "head": 1})
        equal_float32(d["values"], stored.sel(layer=layer, head=1).values)


def test_head_equals_the_store(served, ds):
    q = {"model": TP, "matrix": "W_QK", "step": 64, "layer": 1, "head": 2}
    d = get_json(served, "/api/head", q)
    point = ds.sel(step=64, layer=1, head=2, matrix="W_QK")
    assert (d["step"], d["layer"], d["head"], d["matrix"]) == (64, 1, 2, "W_QK")
    assert d["zhist"] == point["zhist"].values.tolist() and d["hist"] == point["hist"].values.tolist()
    assert sum(d["zhist"]) == sum(d["hist"]) == 64 * 64  # every entry of a 64 x 64 W_QK, once
    assert sorted(d["stats"]) == sorted(HEAD_STATS)
    for name, value in d["stats"].items():
        equal_float32([value], [point[name].values])
    equal_float32(d["vectors"]["singular_values"], point["singular_values"].values)
    # another head of the same layer and step comes from the cached layer counts: same values
    d = get_json(served, "/api/head", {**q, "head": 3, "matrix": "W_K"})
    assert d["zhist"] == ds["zhist"].sel(step=64, layer=1, head=3, matrix="W_K").values.tolist()


def test_pairs_equal_the_store(served, ds):
    for name in ("js_head", "qk_cosine", "qk_distance"):
        d = get_json(served, "/api/pairs", {"model": TP, "step": 1280, "layer": 3, "name": name})
        assert (d["name"], d["step"], d["layer"]) == (name, 1280, 3)
        equal_float32(d["values"], ds[name].sel(step=1280, layer=3).transpose("head", "head2").values)
    np.testing.assert_allclose(np.diag(values(d["values"])), 0.0, atol=1e-6)  # distance to itself


def test_null_band(null_store):
    with serving(null_store) as server:
        m = get_json(server, "/api/meta")["models"][NEOX]
        assert m["baseline"] == "baseline/96x16"
        assert "std_z" in m["statistics"] and "singular_values_z" in m["vectors"]
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
    band = get_json(served, "/api/null", {"model": TP, "matrix": "W_QK"})
    assert band["baseline"] is None and band["lower"] is None


BAD_QUERIES = [
    ("/api/layer", {"model": "nope", "matrix": "W_QK", "stat": "std", "layer": 0}, "no model 'nope'"),
    ("/api/layer", {"model": TP, "matrix": "W_X", "stat": "std", "layer": 0}, "no matrix 'W_X'"),
    ("/api/layer", {"model": TP, "matrix": "W_QK", "stat": "zhist", "layer": 0}, "no stat 'zhist'"),
    ("/api/layer", {"model": TP, "matrix": "W_QK", "stat": "../zarr.json", "layer": 0}, "no stat"),
    ("/api/layer", {"model": TP, "matrix": "W_QK", "stat": "std", "layer": 4}, "layers 0..3, not 4"),
    ("/api/layer", {"model": TP, "matrix": "W_QK", "stat": "std", "layer": "-1"}, "not -1"),
    ("/api/layer", {"model": TP, "matrix": "W_QK", "stat": "std", "layer": "1e0"}, "must be an integer"),
    ("/api/layer", {"model": TP, "matrix": "W_QK", "stat": "std"}, "missing parameter 'layer'"),
    ("/api/step", {"model": TP, "matrix": "W_QK", "stat": "std", "step": 3}, "no finished step 3"),
    ("/api/head", {"model": TP, "matrix": "W_QK", "step": 64, "layer": 0, "head": 9}, "heads 0..3"),
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
        "/static//etc/passwd", "/static/plotly.min.js/../../zarr.json", "/tiny-pythia/zarr.json",
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
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and len(body) > 1_000_000
    for asset in ("/static/app.js", "/static/app.css"):
        status, _, body = get(served, asset)
        assert status == 200 and b"https://" not in body and b"http://" not in body
    # DNS rebinding: a loopback server answers only requests addressed to a loopback name
    status, _, body = get(served, "/api/meta", host="evil.example:80")
    assert status == 403 and b"localhost only" in body
    assert get(served, "/api/meta", host=f"localhost:{served.server_address[1]}")[0] == 200
    status, _, body = get(served, "/api/meta", method="POST")
    assert status == 501 and b"Traceback" not in body and json.loads(body) == {"error": "Not Implemented"}
    status, _, body = get(served, "/api/layer?model=tiny-pythia&&stat")  # malformed query string
    assert status == 400 and json.loads(body) == {"error": "malformed query"}


def test_browsing_never_writes(trajectory_store, snapshot):
    before = snapshot(trajectory_store)
    with serving(trajectory_store) as server:
        get_json(server, "/api/meta")
        get_json(server, "/api/layer", {"model": TP, "matrix": "W_QK", "stat": "std", "layer": 0})
        get_json(server, "/api/head", {"model": TP, "matrix": "W_QK", "step": 0, "layer": 0, "head": 0})
        get_json(server, "/api/pairs", {"model": TP, "step": 0, "layer": 0, "name": "js_head"})
    assert snapshot(trajectory_store) == before


def test_steps_finished_while_serving_appear_on_reload(trajectory_store, tmp_path):
    """A run that appends a step and finishes it: the step shows up at the next /api/meta."""
    from spinjax import store as writer

    path = tmp_path / "growing.zarr"
    shutil.copytree(trajectory_store, path)
    raw = zarr.open_group(str(path), mode="r+")[TP]
    raw["done"][13] = False  # step 1280 is being (re)computed
    q = {"model": TP, "matrix": "W_QK", "stat": "std", "layer": 1}
    with serving(path) as server:
        assert get_json(server, "/api/meta")["models"][TP]["steps"] == list(STEPS[:13])
        assert get_json(server, "/api/layer", q)["steps"] == list(STEPS[:13])
        status, _, body = get(server, "/api/head", {**q, "step": 1280, "head": 0})
        assert status == 400 and b"no finished step 1280" in body
        # a run plans a new step (appended, committed, not done), then writes it
        with writer.locked(path) as root:
            group = writer.ModelGroup(root, TP)
            ((index, step, _),) = group.plan([(2000, "step2000")], recompute=False)
        assert (index, step) == (14, 2000)
        assert get_json(server, "/api/meta")["models"][TP]["steps"] == list(STEPS[:13])  # not done yet
        group = writer.ModelGroup(writer.open_store(path, create=True, consolidated=False), TP)
        results = {name: group.group[name][12] for name in group.data_variables()}  # step 1024's values
        group.write_step(index, results)
        raw["done"][13] = True
        meta = get_json(server, "/api/meta")["models"][TP]
        assert meta["steps"] == [*STEPS, 2000] and meta["revisions"][-1] == "step2000"
        d = get_json(server, "/api/layer", q)
        assert d["steps"] == [*STEPS, 2000]
        stored = spinjax.open_store(path)[TP]["std"].sel(matrix="W_QK", layer=1)
        equal_float32(d["values"], stored.transpose("head", "step").values)
        np.testing.assert_array_equal(values(d["values"])[:, -1], values(d["values"])[:, -3])  # 1024's


def test_a_model_without_finished_steps(neox_store, tmp_path):
    path = tmp_path / "started.zarr"
    shutil.copytree(neox_store, path)
    zarr.open_group(str(path), mode="r+")[NEOX]["done"][0] = False
    with serving(path) as server:
        m = get_json(server, "/api/meta")["models"][NEOX]
        assert m["steps"] == [] and m["requested"] == 1
        q = {"model": NEOX, "matrix": "W_QK", "stat": "std", "layer": 1}
        d = get_json(server, "/api/layer", q)
        assert (d["steps"], d["heads"], d["values"]) == ([], list(range(6)), [[]] * 6)
        assert get(server, "/api/step", {**q, "step": -1})[0] == 400


def test_view_command(trajectory_store, tmp_path):
    runner = CliRunner()
    done = runner.invoke(main, ["view", str(tmp_path / "missing.zarr")])
    assert done.exit_code == 2 and "not a Zarr store" in done.output and "Traceback" not in done.output
    with serving(trajectory_store) as server:  # a port in use
        done = runner.invoke(main, ["view", str(trajectory_store), "--port", str(server.server_address[1])])
    assert done.exit_code == 2 and "cannot listen on 127.0.0.1" in done.output and "--port" in done.output
    # the real command, listening beyond loopback: it warns, then serves
    command = [sys.executable, "-m", "spinjax.cli", "view", str(trajectory_store), "--port", "0",
               "--host", "0.0.0.0"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        warning, serving_line = proc.stdout.readline(), proc.stdout.readline()
        assert warning.startswith("warning: listening on 0.0.0.0: anyone who can reach port")
        assert "can read the store" in warning
        port = int(serving_line.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/meta")
        assert json.loads(conn.getresponse().read())["models"][TP]["steps"] == list(STEPS)
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
