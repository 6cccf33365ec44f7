"""Ranged reads from a hub: a local hub server (tests/hubserver.py) on 127.0.0.1, huggingface_hub
pointed at it, checkpoints made with numpy (tests/hubfixtures.py).

Every value of a ranged run must be bit-identical to a run on the same files from a local
directory, and the bytes the server sent are counted: per checkpoint at most 1.10x the Q/K bytes
plus the headers (config.json, index json, safetensors header, the zip's central directory and
end records, data.pkl, the local headers of the storages read) for GPT-NeoX in both formats,
sharded or not; for GPT-2 at most its c_attn tensors plus headers. Faults (a connection dropped
mid-body, 503s, slow answers, a file that changes between two reads) end in the same values or
in one clear error naming the file and the revision, with finished steps kept.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
import zipfile

import numpy as np
import pytest
import zarr
from hubfixtures import gpt2_config, gpt2_state, hf_files, neox_config, neox_state, write_dir
from hubserver import FakeHub
from huggingface_hub import constants, hf_api

from spinjax.errors import InputError
from spinjax.run import pipeline, reader
from spinjax.run.dynamics import compute_dynamics
from spinjax.run.options import Progress, RunOptions
from spinjax.sources import fetch, registry
from spinjax.sources.base import FetchOptions
from spinjax.sources.fetch import FetchError
from spinjax.sources.known import KNOWN, KnownModel
from spinjax.store import VARIABLES

D, LAYERS, HEADS = 64, 3, 4
QK_BYTES = LAYERS * 2 * D * D * 2  # q and k rows of every layer, float16
C_ATTN_BYTES = LAYERS * D * 3 * D * 4  # GPT-2's fused (d, 3d) float32 weights, read whole
FORMATS = {
    "bin": ("bin", 1),
    "bin-sharded": ("bin", 3),
    "st": ("safetensors", 1),
    "st-sharded": ("safetensors", 2),
}
BUDGET = 64 << 20


def _neox(seed: int, fmt: str = "bin", shards: int = 1) -> dict[str, bytes]:
    return hf_files(neox_state(D, LAYERS, seed=seed), neox_config(D, LAYERS, HEADS), fmt, shards)


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, dict[str, bytes]]:
    out = {name: _neox(i, fmt, shards) for i, (name, (fmt, shards)) in enumerate(FORMATS.items())}
    out["gpt2"] = hf_files(gpt2_state(D, LAYERS, seed=7), gpt2_config(D, LAYERS, HEADS))
    out["changed"] = _neox(11)  # what "bin" becomes when it changes on the server
    return out


@pytest.fixture(scope="module")
def local(checkpoints, tmp_path_factory):
    """``local(name)``: the store values of a run on a plain directory holding the files."""
    base, done = tmp_path_factory.mktemp("local"), {}

    def values(name: str) -> dict[str, np.ndarray]:
        if name not in done:
            directory = write_dir(checkpoints[name], base / name)
            result = pipeline.run(
                str(directory), RunOptions(store=base / f"{name}.zarr", memory_budget=BUDGET)
            )
            done[name] = _values(base / f"{name}.zarr", result.key, -1)
        return done[name]

    return values


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running FakeHub that huggingface_hub talks to; empty caches; quick retries."""
    with FakeHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("SPINJAX_CACHE", str(tmp_path / "spinjax"))
        monkeypatch.setattr(fetch, "BACKOFF_S", 0.01)
        cwd = tmp_path / "cwd"  # so that no relative path shadows a repo id
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        yield server


# ---- helpers


def _values(store_path, key: str, step: int) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store_path), mode="r")[key]
    i = [int(s) for s in group["step"][:]].index(step)
    assert bool(group["done"][i])
    return {name: np.asarray(group[name][i]) for name in VARIABLES}


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name in VARIABLES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name, strict=True)


def _cdn(hub: FakeHub, start: int = 0) -> list:
    return [s for s in hub.log[start:] if s.server == "cdn" and s.method == "GET"]


def header_bytes(files: dict[str, bytes], tensors_read: int) -> int:
    """The bytes a ranged read may spend on headers: config.json and the index json; per
    safetensors file its length and JSON header; per torch zip its central directory and end
    records, everything before its first storage (data.pkl, byteorder) and a local header for
    each storage read (``tensors_read`` of them over all files)."""
    total = sum(len(data) for name, data in files.items() if name.endswith(".json"))
    local_header = 0
    for name, data in files.items():
        if name.endswith(".safetensors"):
            total += 8 + struct.unpack("<Q", data[:8])[0]
        elif name.endswith(".bin"):
            zf = zipfile.ZipFile(io.BytesIO(data))
            storages = [i for i in zf.infolist() if "/data/" in i.filename]
            total += len(data) - zf.start_dir + min(i.header_offset for i in storages)
            local_header = max(local_header, max(30 + len(i.filename) for i in storages))
    return total + tensors_read * local_header


def _factors(model: str, step: int = -1, fetch_options: FetchOptions | None = None) -> list:
    """Every layer's (wq, wk) of one step, read as a run reads them."""
    source = reader.variant_source(model, fetch=fetch_options)
    opened = reader.open_step(source, step)
    out = [reader.extract_layer(opened, layer)[:2] for layer in range(opened.geometry.n_layers)]
    opened.checkpoint.release()
    return out


def _assert_same_factors(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (gq, gk), (wq, wk) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gq, wq, strict=True)
        np.testing.assert_array_equal(gk, wk, strict=True)


# ---- values and bytes, per format


@pytest.mark.parametrize("name", [*FORMATS, "gpt2"])
@pytest.mark.slow
def test_ranged_run_equals_a_local_run_and_reads_only_the_qk_bytes(hub, checkpoints, local, tmp_path, name):
    files = checkpoints[name]
    repo = f"org/{name}"
    hub.add(repo, "main", files)
    options = RunOptions(store=tmp_path / "s.zarr", memory_budget=BUDGET, cache_size=0)
    result = pipeline.run(repo, options)
    _assert_same(_values(tmp_path / "s.zarr", result.key, -1), local(name))

    served = hub.body_bytes(repo)
    needed = C_ATTN_BYTES if name == "gpt2" else QK_BYTES
    allowed = (1.0 if name == "gpt2" else 1.10) * needed + header_bytes(files, LAYERS)
    assert needed < served <= allowed, (served, needed, allowed)
    weights = sum(len(data) for file, data in files.items() if not file.endswith(".json"))
    assert served < weights / 3  # far from whole files (GPT-2: 3 of the 12 d x d of a layer)
    # every range answer was a 206 of exactly the bytes asked
    for s in _cdn(hub):
        a, b = (int(x) for x in s.range.removeprefix("bytes=").split("-"))
        assert s.status == 206 and s.body == b + 1 - a


def test_q_and_k_rows_of_a_head_are_one_read_and_v_rows_are_not_read(hub, checkpoints):
    hub.add("org/bin", "main", checkpoints["bin"])
    _factors("org/bin", fetch_options=FetchOptions(cache_size=0))
    data = [s for s in _cdn(hub) if s.body == 2 * (D // HEADS) * D * 2]  # q and k rows of one head
    assert len(data) == LAYERS * HEADS
    assert hub.body_bytes("org/bin") - sum(s.body for s in data) <= header_bytes(checkpoints["bin"], LAYERS)


# ---- the Q/K cache, the Hugging Face cache, offline


@pytest.fixture
def trajectory(hub, monkeypatch):
    """A known model ``neox-steps`` at the hub: step0, step1 and main (steps 0, 1, 2)."""
    files = {revision: _neox(seed) for seed, revision in enumerate(("step0", "step1", "main"))}
    for revision, content in files.items():
        hub.add("org/neox-steps", revision, content)
    known = KnownModel("neox-steps", "org/neox-steps", D, LAYERS, HEADS, HEADS, steps=(0, 1, 2))
    monkeypatch.setitem(KNOWN, "neox-steps", known)
    return files


@pytest.fixture
def trajectory_local(trajectory, tmp_path):
    """The store values of each step from a local directory."""
    out = {}
    for step, content in enumerate(trajectory.values()):
        directory = write_dir(content, tmp_path / f"local{step}")
        result = pipeline.run(
            str(directory), RunOptions(store=tmp_path / f"local{step}.zarr", memory_budget=BUDGET)
        )
        out[step] = _values(tmp_path / f"local{step}.zarr", result.key, -1)
    return out


@pytest.mark.slow
def test_steps_reruns_dynamics_and_offline_read_nothing_twice(hub, trajectory, trajectory_local, tmp_path,
                                                               monkeypatch):  # fmt: skip
    store_path = tmp_path / "s.zarr"
    options = RunOptions(steps="all", store=store_path, memory_budget=BUDGET, connections=3)
    result = pipeline.run("neox-steps", options)
    assert result.computed == [0, 1, 2]
    for step, revision in enumerate(trajectory):
        _assert_same(_values(store_path, "neox-steps", step), trajectory_local[step])
        served = hub.body_bytes("org/neox-steps", revision=revision)
        assert served <= 1.10 * QK_BYTES + header_bytes(trajectory[revision], LAYERS)

    # a rerun reads every row from the Q/K cache and no header: no GET reaches the CDN
    start = len(hub.log)
    pipeline.run(
        "neox-steps", RunOptions(steps="all", store=store_path, recompute=True, memory_budget=BUDGET)
    )
    assert _cdn(hub, start) == []
    for step in range(3):
        _assert_same(_values(store_path, "neox-steps", step), trajectory_local[step])

    # and so does `spinjax dynamics`
    start = len(hub.log)
    dynamics = compute_dynamics("neox-steps", store_path, top_k=2)
    assert dynamics.read == [0, 1, 2] and _cdn(hub, start) == []

    # another variant reads only what it adds: the layer norms' gains (and the headers again)
    start = len(hub.log)
    pipeline.run(
        "neox-steps", RunOptions(steps="all", store=store_path, variant="ln-folded", memory_budget=BUDGET)
    )
    gains = LAYERS * D * 2
    for revision, files in trajectory.items():
        served = sum(s.body for s in _cdn(hub, start) if s.of(revision))
        assert 0 < served <= gains + header_bytes(files, LAYERS)

    # offline, the caches serve a rerun; nothing at all is asked of the hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = len(hub.log)
    pipeline.run(
        "neox-steps", RunOptions(steps="all", store=store_path, recompute=True, memory_budget=BUDGET)
    )
    assert hub.log[start:] == []
    for step in range(3):
        _assert_same(_values(store_path, "neox-steps", step), trajectory_local[step])


def test_offline_without_the_rows_is_the_clear_error_and_asks_nothing(hub, trajectory, tmp_path, monkeypatch):
    fetch_options = FetchOptions(cache_size=10 << 20)
    _factors("neox-steps", 0, fetch_options)  # step 0's rows go to the Q/K cache, not step 1's
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = len(hub.log)
    _factors("neox-steps", 0, fetch_options)
    with pytest.raises(InputError, match=r"org/neox-steps@step1.*config\.json.*offline.*tiny-pythia"):
        _factors("neox-steps", 1, fetch_options)
    assert hub.log[start:] == []


@pytest.mark.slow
def test_a_file_in_the_hugging_face_cache_is_read_from_there(hub, checkpoints, local, tmp_path):
    hub.add("org/bin", "main", checkpoints["bin"])
    whole = RunOptions(store=tmp_path / "a.zarr", memory_budget=BUDGET, download="whole", keep_downloads=True)
    pipeline.run("org/bin", whole)
    assert [s.range for s in _cdn(hub)] == [None]  # one whole-file GET
    start = len(hub.log)
    result = pipeline.run("org/bin", RunOptions(store=tmp_path / "b.zarr", memory_budget=BUDGET))
    assert _cdn(hub, start) == []
    _assert_same(_values(tmp_path / "b.zarr", result.key, -1), local("bin"))


# ---- faults


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(lambda hub: hub.drop("pytorch_model.bin", 50, 1000, 2000, 300, 3000, 10), id="dropped"),
        pytest.param(lambda hub: hub.fail("pytorch_model.bin", 503, 503, 500, 503), id="503"),
        pytest.param(lambda hub: hub.slow("pytorch_model.bin", 0.01), id="slow"),
        pytest.param(lambda hub: hub.fail("pytorch_model.bin", 403), id="expired location"),
    ],
)
@pytest.mark.slow
def test_faults_end_in_the_same_values_and_bytes(hub, checkpoints, tmp_path, fault):
    hub.add("org/bin", "main", checkpoints["bin"])
    want = _factors(str(write_dir(checkpoints["bin"], tmp_path / "local")))
    clean = FetchOptions(cache_size=0)
    _assert_same_factors(_factors("org/bin", fetch_options=clean), want)
    clean_bytes = sum(s.body for s in _cdn(hub))
    start = len(hub.log)
    fault(hub)
    _assert_same_factors(_factors("org/bin", fetch_options=clean), want)
    assert sum(s.body for s in _cdn(hub, start)) == clean_bytes  # resumed, never read twice
    assert not any(hub.faults.fail.values()) and not any(hub.faults.drop.values())  # every fault was met
    if any(s.status == 403 for s in hub.log[start:]):  # the hub was asked for the file's location again
        heads = [s for s in hub.log[start:] if s.method == "HEAD" and s.file == "pytorch_model.bin"]
        assert len(heads) == 2


def test_a_stalled_server_is_an_error_naming_the_file_and_revision(hub, checkpoints, monkeypatch):
    hub.add("org/bin", "main", checkpoints["bin"])
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.05)
    hub.slow("pytorch_model.bin", 0.5)
    with pytest.raises(FetchError, match=r"org/bin@main: pytorch_model\.bin: .*Timeout.*5 retries"):
        _factors("org/bin", fetch_options=FetchOptions(cache_size=0))


@pytest.mark.slow
def test_a_failing_step_stops_the_run_and_keeps_the_finished_ones(hub, trajectory, tmp_path):
    hub.fail("pytorch_model.bin", *[503] * 50, revision="step1")
    store_path = tmp_path / "s.zarr"
    with pytest.raises(FetchError) as err:
        pipeline.run(
            "neox-steps", RunOptions(steps="all", store=store_path, memory_budget=BUDGET, cache_size=0)
        )
    assert all(s in str(err.value) for s in ("org/neox-steps@step1", "pytorch_model.bin", "HTTP 503"))
    group = zarr.open_group(str(store_path), mode="r")["neox-steps"]
    assert dict(zip([int(s) for s in group["step"][:]], group["done"][:], strict=True)) == {
        0: True, 1: False, 2: False,
    }  # fmt: skip


@pytest.mark.parametrize("after", [2, 14])  # while reading the zip's headers; before the last layer
@pytest.mark.slow
def test_a_file_that_changes_is_read_again_from_the_start(hub, checkpoints, local, tmp_path, after):
    hub.add("org/bin", "main", checkpoints["bin"])
    hub.change("org/bin", "main", "pytorch_model.bin", after, checkpoints["changed"]["pytorch_model.bin"])
    warnings = []
    options = RunOptions(store=tmp_path / "s.zarr", memory_budget=BUDGET, connections=1)
    result = pipeline.run("org/bin", options, Progress(on_warning=warnings.append))
    assert not hub.faults.change  # the change happened during the run
    got = _values(tmp_path / "s.zarr", result.key, -1)
    _assert_same(got, local("changed"))  # all of the new file, nothing of the old one
    assert not np.array_equal(got["std"], local("bin")["std"])
    if after > 2:  # noticed once layers were handed out: the step was read again
        assert len(warnings) == 1 and "org/bin@main: pytorch_model.bin" in warnings[0]
        assert "changed" in warnings[0] and "reading the step again" in warnings[0]


# ---- what is not a hub repo, and a hub that cannot be reached


def test_a_missing_local_path_is_not_asked_of_the_hub(hub, tmp_path):
    (tmp_path / "cwd" / "checkpoints").mkdir()
    for model in ("checkpoints/run1", "./run1", "a/b/c", "bad name/x"):
        with pytest.raises(InputError, match=r"no such directory$"):
            registry.resolve(model)
    assert hub.log == []


def test_an_unknown_repo_is_no_such_directory_nor_repo(hub, tmp_path):
    with pytest.raises(InputError, match=r"--model 'someone/model': no such directory, and no hub repo"):
        pipeline.run("someone/model", RunOptions(store=tmp_path / "s.zarr"))


@pytest.fixture
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    "model, message",
    [
        ("pythia-70m", r"EleutherAI/pythia-70m@main: file 'config.json' is not in the local cache and "
                       r"the hub could not be asked .*--model tiny-pythia"),
        ("someone/model", r"--model 'someone/model': no such directory, and the hub could not be asked"),
    ],
)  # fmt: skip
def test_an_unreachable_hub_is_an_error_at_once(
    hub, closed_port, monkeypatch, tmp_path, caplog, model, message
):
    monkeypatch.setattr(constants, "ENDPOINT", closed_port)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed_port + "/{repo_id}/resolve/{revision}/{filename}"
    )
    with caplog.at_level(logging.INFO), pytest.raises(InputError, match=message):
        pipeline.run(model, RunOptions(store=tmp_path / "s.zarr"))
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]  # no retry lines


def test_the_tensor_table_and_rows_of_the_cache_are_what_the_file_holds(hub, checkpoints, tmp_path):
    hub.add("org/st", "main", checkpoints["st"])
    _factors("org/st")
    (folder,) = {p.parent for p in (tmp_path / "spinjax" / "hub").rglob("tensors.json")}
    assert folder.parent.name == "model.safetensors"  # .../<commit>/<file>/<etag>
    table = json.loads((folder / "tensors.json").read_text())
    state = neox_state(D, LAYERS, seed=2)  # "st" is the third format
    assert table == {name: ["float16", list(a.shape)] for name, a in state.items()}
    entries = sorted(p.name for p in folder.glob("*.npz"))
    assert entries == [f"gpt_neox.layers.{i}.attention.query_key_value.weight.npz" for i in range(LAYERS)]


def test_rows_are_dropped_from_memory_once_handed_out(hub, checkpoints):
    hub.add("org/bin", "main", checkpoints["bin"])
    for ov in (True, False):  # the second pass finds all of each qkv in the cache, and asks for less
        source = reader.variant_source("org/bin")
        opened = reader.open_step(source, -1, ov=ov)
        for layer in range(LAYERS):
            reader.extract_layer(opened, layer)
        (weights,) = opened.checkpoint._files.values()
        assert weights._rows == {}
    assert len(_cdn(hub)) > 0 and all(s.of("main") for s in _cdn(hub))


@pytest.mark.parametrize("name", ["bin", "bin-sharded", "st-sharded"])
def test_tensors_listed_over_the_hub_are_those_of_the_files(hub, checkpoints, tmp_path, monkeypatch, name):
    """`spinjax inventory` of a hub repo: a repo of ``.bin`` files only is listed from their
    pickles read by ranges (no weight file downloaded), as a local copy of the files is."""
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)  # set when huggingface_hub was imported
    hub.add("org/m", "main", checkpoints[name])
    over_hub = reader.open_step(reader.variant_source("org/m"), -1).checkpoint.tensor_infos()
    directory = write_dir(checkpoints[name], tmp_path / "local")
    on_disk = reader.open_step(reader.variant_source(str(directory)), -1).checkpoint.tensor_infos()
    key = lambda info: (info.name, info.shape, info.dtype)  # noqa: E731
    assert sorted(map(key, over_hub)) == sorted(map(key, on_disk)) and len(on_disk) > 3 * LAYERS
    if name.startswith("bin"):  # each tensor on its own storage: none is taken for a tied one
        assert len({i.storage for i in over_hub}) == len(over_hub)
