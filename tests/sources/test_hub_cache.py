"""The hub source against a Hugging Face cache laid out exactly as huggingface_hub lays it out.

Offline (``HF_HUB_OFFLINE``), a cache under tmp_path holds a made-up repo
``spinjax-tests/tiny-neox`` (the tiny GPT-NeoX of tests/fixtures/torchbin) at four revisions,
each with its own weights: ``refs/<revision>`` hold commit hashes, ``snapshots/<commit>/<file>``
are relative symlinks to ``blobs/<etag>`` (sha256 for LFS files, the git blob sha1 for the
others), ``.no_exist/<commit>/<file>`` marks files the revision lacks, as huggingface_hub does.

    step0  pytorch_model.bin (fixture weights)
    step1  3 shards + index, weights x2; the index also names a 4th shard that is not cached
    step2  pytorch_model.bin, weights x3
    main   model.safetensors, weights x4

Every store value of a hub run must equal (exactly) the value of a run on a plain local copy
of the same snapshot. With ``--download ranged`` (the default) weights files already in the
cache are read from there; ``--download whole`` fetches them through ``hf_hub_download``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import FIXTURES_ROOT
from huggingface_hub import constants, hf_hub_download, scan_cache_dir
from safetensors.numpy import save as safetensors_bytes

import spinjax.sources.hub
from spinjax.errors import InputError
from spinjax.run import pipeline
from spinjax.run.options import RunOptions
from spinjax.sources.hf import open_weights
from spinjax.sources.hub import HubKind
from spinjax.sources.known import KNOWN, KnownModel
from spinjax.sources.torchbin import TorchBinFile
from spinjax.store import VARIABLES

FIXTURES = FIXTURES_ROOT / "torchbin"
REPO = "spinjax-tests/tiny-neox"
NAME = "tiny-neox"
STEPS = (0, 1, 2, 3)  # KnownModel.revision: step0, step1, step2, and the last one -> main
REVISIONS = {0: "step0", 1: "step1", 2: "step2", 3: "main"}
SHARDS = [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
BOGUS_SHARD = "pytorch_model-00004-of-00004.bin"  # named by step1's index, never cached
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")  # fmt: skip


# ---- building the revisions' files (no torch: .bin storages are rescaled inside the zip)


def _scaled_bin(path: Path, factor: float) -> bytes:
    """The torch zip checkpoint at ``path`` with every (float16) storage multiplied by factor."""
    with TorchBinFile(path) as f:
        assert {str(f.dtype(k)) for k in f.keys()} == {"float16"}
    out = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename and not info.filename.endswith("serialization_id"):
                data = (np.frombuffer(data, np.float16) * np.float16(factor)).astype(np.float16).tobytes()
            dst.writestr(info.filename, data)
    return out.getvalue()


def _revision_files() -> dict[str, dict[str, bytes]]:
    config = (FIXTURES / "neox" / "config.json").read_bytes()
    single = FIXTURES / "neox" / "pytorch_model.bin"
    index = json.loads((FIXTURES / "neox_sharded" / "pytorch_model.bin.index.json").read_text())
    for name in ("lm_head.weight", "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"):
        index["weight_map"][name] = BOGUS_SHARD  # non-attention tensors only
    with TorchBinFile(single) as f:
        main = {k: (f.get(k) * np.float16(4)).astype(np.float16) for k in f.keys()}
    return {
        "step0": {"config.json": config, "pytorch_model.bin": single.read_bytes()},
        "step1": {
            "config.json": config,
            "pytorch_model.bin.index.json": json.dumps(index, indent=2).encode(),
            **{s: _scaled_bin(FIXTURES / "neox_sharded" / s, 2) for s in SHARDS},
        },
        "step2": {"config.json": config, "pytorch_model.bin": _scaled_bin(single, 3)},
        "main": {"config.json": config, "model.safetensors": safetensors_bytes(main, {"format": "pt"})},
    }


def _etag(name: str, data: bytes) -> str:
    if name.endswith((".bin", ".safetensors")):  # LFS file: the etag is its sha256
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


def _commit(revision: str) -> str:
    return hashlib.sha1(f"{REPO}@{revision}".encode()).hexdigest()


def build_cache(cache: Path, revisions: dict[str, dict[str, bytes]]) -> Path:
    """``revisions`` laid out as huggingface_hub's cache does; the repo folder."""
    owner, name = REPO.split("/")
    root = cache / f"models--{owner}--{name}"
    for revision, files in revisions.items():
        commit = _commit(revision)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes it
        for file, data in files.items():
            blob = root / "blobs" / _etag(file, data)
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                blob.write_bytes(data)
            link = root / "snapshots" / commit / file
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        for file in WEIGHT_FILES:  # what an online run records for the candidates it lacks
            if file not in files:
                marker = root / ".no_exist" / commit / file
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
    return root


def _blob_of(root: Path, revision: str, file: str) -> Path:
    return (root / "snapshots" / _commit(revision) / file).resolve()


# ---- reading stores


def _values(store_path: Path, key: str, step: int) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store_path), mode="r")[key]
    steps = [int(s) for s in group["step"][:]]
    i = steps.index(step)
    assert bool(group["done"][i])
    return {name: np.asarray(group[name][i]) for name in VARIABLES}


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name in VARIABLES:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name, strict=True)


# ---- fixtures


@pytest.fixture(scope="module")
def files():
    return _revision_files()


@pytest.fixture(scope="module")
def local_values(files, tmp_path_factory):
    """Per revision, the store values of a run on a plain directory holding its files."""
    base = tmp_path_factory.mktemp("local")
    cache = build_cache(base / "hub", files)
    out = {}
    for revision in files:
        directory = base / f"local-{revision}"
        shutil.copytree(cache / "snapshots" / _commit(revision), directory)  # dereferences links
        assert not any(p.is_symlink() for p in directory.iterdir())
        store_path = base / f"store-{revision}"
        result = pipeline.run(str(directory), RunOptions(store=store_path, memory_budget=64 << 20))
        assert result.computed == [-1]
        out[revision] = _values(store_path, result.key, -1)
    return out


@pytest.fixture
def hub(tmp_path, files, monkeypatch):
    """An offline huggingface_hub whose cache holds the repo; ``tiny-neox`` a known model."""
    cache = tmp_path / "hub"
    root = build_cache(cache, files)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import time
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(KNOWN, NAME, KnownModel(NAME, REPO, 32, 2, 4, 4, steps=STEPS))
    cwd = tmp_path / "cwd"  # so that no relative path shadows a model name
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fetched: list[tuple[str, str, bool]] = []

    def recording_download(repo, name, *, revision, **kwargs):
        try:
            path = hf_hub_download(repo, name, revision=revision, **kwargs)
        except Exception:
            fetched.append((revision, name, False))
            raise
        fetched.append((revision, name, True))
        return path

    monkeypatch.setattr(spinjax.sources.hub, "hf_hub_download", recording_download)
    opened: list[Path] = []  # weights files read from the cache (--download ranged)

    def recording_open(path):
        opened.append(path)
        return open_weights(path)

    monkeypatch.setattr(spinjax.sources.hub, "open_weights", recording_open)
    return cache, root, fetched, opened


# ---- tests


def test_cache_layout_is_the_one_huggingface_hub_reads(hub):
    cache, root, _, _ = hub
    info = scan_cache_dir(cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model")
    assert set(repo.refs) == set(REVISIONS.values())
    assert {r.commit_hash for r in repo.revisions} == {_commit(r) for r in REVISIONS.values()}
    for revision in repo.revisions:
        (ref,) = revision.refs
        assert revision.commit_hash == _commit(ref)
        for f in revision.files:
            assert f.file_path.is_symlink() and not os.path.isabs(os.readlink(f.file_path))
            assert f.blob_path.parent == root / "blobs"
    step1 = {f.file_name for r in repo.revisions if "step1" in r.refs for f in r.files}
    assert step1 == {"config.json", "pytorch_model.bin.index.json", *SHARDS}

    snapshot = root / "snapshots" / _commit("step1")
    assert hf_hub_download(REPO, "config.json", revision="step1") == str(snapshot / "config.json")
    assert hf_hub_download(REPO, SHARDS[0], revision=_commit("step1")) == str(snapshot / SHARDS[0])
    with pytest.raises(FileNotFoundError):  # LocalEntryNotFoundError: offline, not cached
        hf_hub_download(REPO, BOGUS_SHARD, revision="step1")


def test_offered_revisions_follow_known_model(hub):
    source = HubKind().open(NAME)
    assert source.source == REPO and source.key == NAME
    assert list(source.offered) == list(REVISIONS.items())
    assert HubKind().open(REPO).offered == source.offered  # by repo id too, through KNOWN
    assert [KNOWN[NAME].revision(s) for s in STEPS] == list(REVISIONS.values())


@pytest.mark.parametrize("download", ["ranged", "whole"])
@pytest.mark.slow
def test_every_revision_from_the_cache_equals_a_local_run(hub, tmp_path, local_values, download):
    cache, _, fetched, opened = hub
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    store_path = tmp_path / "store"
    options = RunOptions(steps="all", store=store_path, memory_budget=64 << 20, download=download)
    result = pipeline.run(NAME, options)
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before  # cache untouched
    assert result.computed == list(STEPS) and result.skipped == []
    group = zarr.open_group(str(store_path), mode="r")[NAME]
    assert [int(s) for s in group["step"][:]] == list(STEPS)
    assert list(group["revision"][:]) == list(REVISIONS.values())
    assert group["done"][:].all()
    assert group.attrs["source"] == REPO
    for step, revision in REVISIONS.items():
        _assert_same(_values(store_path, NAME, step), local_values[revision])
    # the revisions do hold different weights: a mix-up would not go unnoticed
    stds = [local_values[r]["std"] for r in REVISIONS.values()]
    assert all(not np.array_equal(a, b, equal_nan=True) for i, a in enumerate(stds) for b in stds[i + 1 :])

    # only what the statistics need was asked of the hub: never shard 3, never the bogus shard
    found = {(rev, name) for rev, name, ok in fetched if ok}
    asked = {(rev, name) for rev, name, _ in fetched}
    if download == "ranged":  # the weights come straight from the cache, json files through the hub
        revision_of = {_commit(r): r for r in REVISIONS.values()}  # snapshots/<commit>/<file>
        found |= {(revision_of[p.parent.name], p.name) for p in opened}
        assert all(name.endswith(".json") for _, name in asked)
    assert {name for rev, name in found if rev == "step1"} == {
        "config.json", "pytorch_model.bin.index.json", SHARDS[0], SHARDS[1],
    }  # fmt: skip
    assert ("step1", SHARDS[2]) not in asked and ("step1", BOGUS_SHARD) not in asked
    assert {name for rev, name in found if rev == "step0"} == {"config.json", "pytorch_model.bin"}
    assert {name for rev, name in found if rev == "main"} == {"config.json", "model.safetensors"}

    # a rerun finds every step done and fetches nothing
    fetched.clear()
    opened.clear()
    again = pipeline.run(NAME, RunOptions(steps="all", store=store_path, download=download))
    assert again.computed == [] and again.skipped == list(STEPS)
    assert fetched == [] and opened == []


@pytest.mark.slow
def test_hub_id_in_a_subprocess_with_only_environment_variables(hub, tmp_path, local_values):
    cache, _, _, _ = hub
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    env.pop("TRANSFORMERS_OFFLINE", None)
    cli = [sys.executable, "-m", "spinjax.cli"]
    out = subprocess.run([*cli, "steps", REPO], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["-1", "main"]
    store_path = tmp_path / "store"
    out = subprocess.run([*cli, "run", "--model", REPO, "--store", str(store_path), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    _assert_same(_values(store_path, "spinjax-tests__tiny-neox", -1), local_values["main"])


def test_revision_not_in_the_cache_names_repo_revision_and_file(hub, tmp_path, monkeypatch):
    with pytest.raises(InputError) as err:
        HubKind().open(NAME).open(5, "step5")
    assert all(s in str(err.value) for s in (REPO, "step5", "config.json", "offline", "tiny-pythia"))

    # in a run: earlier steps stay done, the missing one is not
    gap = KnownModel("tiny-neox-gap", REPO, 32, 2, 4, 4, steps=(0, 5, 9))
    monkeypatch.setitem(KNOWN, gap.name, gap)
    store_path = tmp_path / "store"
    with pytest.raises(InputError) as err:
        pipeline.run("tiny-neox-gap", RunOptions(steps="all", store=store_path))
    assert all(s in str(err.value) for s in (REPO, "step5", "config.json"))
    group = zarr.open_group(str(store_path), mode="r")["tiny-neox-gap"]
    assert dict(zip([int(s) for s in group["step"][:]], group["done"][:], strict=True)) == {
        0: True, 5: False, 9: False,
    }  # fmt: skip


def test_revision_with_only_its_config_cached(hub, tmp_path, files):
    cache, _, _, _ = hub
    build_cache(cache, {"step3": {"config.json": files["step0"]["config.json"]}})
    checkpoint = HubKind().open(NAME).open(3, "step3")  # weights are looked for on first use
    for use in (lambda: checkpoint.tensor("gpt_neox.embed_in.weight"), checkpoint.tensor_infos):
        with pytest.raises(InputError) as err:
            use()
        assert REPO in str(err.value) and "step3" in str(err.value)


@pytest.mark.parametrize("shard", [0, 1])
def test_missing_shard_blob_names_the_file(hub, tmp_path, shard):
    _, root, _, _ = hub
    _blob_of(root, "step1", SHARDS[shard]).unlink()  # snapshot link now dangles
    store_path = tmp_path / "store"
    with pytest.raises(InputError) as err:
        pipeline.run(NAME, RunOptions(steps="1", store=store_path))
    assert all(s in str(err.value) for s in (REPO, "step1", SHARDS[shard]))
    assert not store_path.exists()  # bad input of the first step leaves the store untouched


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.slow
def test_downloaded_files_of_finished_steps_are_evicted_unless_kept(hub, tmp_path, monkeypatch, keep):
    # Pretend nothing was cached before the run, so every file counts as downloaded by it.
    cache, root, _, _ = hub
    monkeypatch.setattr(spinjax.sources.hub, "try_to_load_from_cache", lambda *a, **k: None)
    blobs_before = {p.name for p in (root / "blobs").iterdir()}
    options = RunOptions(steps="0,2", store=tmp_path / "s.zarr", download="whole", keep_downloads=keep)
    result = pipeline.run(NAME, options)
    assert result.computed == [0, 2]
    for revision in ("step0", "step2"):
        left = [p.name for p in (root / "snapshots" / _commit(revision)).iterdir()]
        assert (left == []) != keep, (revision, left)
    # untouched revisions keep every file, and no blob they link to was removed
    for revision in ("step1", "main"):
        for link in (root / "snapshots" / _commit(revision)).iterdir():
            assert link.resolve().exists(), link
    if keep:
        assert {p.name for p in (root / "blobs").iterdir()} == blobs_before
