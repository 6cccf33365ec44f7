"""A damaged store (a truncated chunk, broken metadata, metadata that disagree) read by show,
plot, report and run: exit 2 naming the damaged file and saying how to repair, never an
internal error; the repair it names works."""

from __future__ import annotations

import json
import shutil

import pytest
import zarr
from click.testing import CliRunner
from conftest import NEOX

from spinjax.cli import main
from spinjax.run import run_baseline
from spinjax.store.check import find_damage

KEY = "gpt_neox"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def damaged(neox_store, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(neox_store, path)
    return path


@pytest.mark.slow
def test_an_intact_store_has_no_damage(neox_store):
    assert find_damage(neox_store) is None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "emptied"])
def test_an_unreadable_chunk_is_named_with_its_repair(damaged, tmp_path, how):
    chunk = next((damaged / KEY / "kurt" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(chunk.read_bytes()[:5] if how == "truncated" else b"")
    for args in (["report", str(damaged), "--out", str(tmp_path / "r")],
                 ["plot", str(damaged), "--figure", "corner", "--out", str(tmp_path / "f")]):  # fmt: skip
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert f"{damaged / KEY / 'kurt' / 'c' / '0'}" in result.stderr and "--recompute" in result.stderr
        assert "--steps -1" in result.stderr and "internal error" not in result.stderr
    # the repair it names: recompute that step
    assert invoke("run", "--model", str(NEOX), "--store", str(damaged), "--recompute").exit_code == 0
    assert find_damage(damaged) is None
    assert invoke("report", str(damaged), "--out", str(tmp_path / "r2")).exit_code == 0


@pytest.mark.slow
def test_a_damaged_done_chunk_is_named_by_show(damaged):
    (damaged / KEY / "done" / "c" / "0").write_bytes(b"\x00garbage")
    result = invoke("show", str(damaged))
    assert result.exit_code == 2, result.output
    assert str(damaged / KEY / "done" / "c" / "0") in result.stderr


def test_broken_array_metadata_is_named_by_run(damaged, snapshot):
    (damaged / KEY / "kurt" / "zarr.json").write_text("{garbage")
    before = snapshot(damaged)
    result = invoke("run", "--model", str(NEOX), "--store", str(damaged), "--recompute")
    assert result.exit_code == 2, result.output
    assert str(damaged / KEY / "kurt" / "zarr.json") in result.stderr
    assert f"remove {damaged / KEY}" in result.stderr and "internal error" not in result.stderr
    assert snapshot(damaged) == before


@pytest.mark.slow
def test_metadata_that_disagree_with_the_commit_are_named(damaged):
    meta_path = damaged / KEY / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["consolidated_metadata"]["metadata"]["kurt"]["shape"][0] = 3  # the commit says 3 steps
    meta_path.write_text(json.dumps(meta))
    damage = find_damage(damaged)
    assert damage is not None and str(damaged / KEY / "kurt") in damage and "(3," in damage


def test_a_damaged_null_chunk_is_named_and_each_chunk_read_once(tmp_path, monkeypatch):
    """A null ensemble's arrays hold many samples a chunk: the scan reads each chunk once and
    names the chunk file, with the null's own repair."""
    path = tmp_path / "null.zarr"
    run_baseline(8, 2, store_path=path, samples=12)
    kurt = zarr.open_group(str(path), mode="r")["baseline/8x2/kurt"]
    assert kurt.chunks[0] == 12  # one chunk of all the samples
    reads = []
    monkeypatch.setattr(zarr.Array, "__getitem__", _counting(zarr.Array.__getitem__, reads))
    assert find_damage(path) is None
    assert reads.count("baseline/8x2/kurt") == 1
    monkeypatch.undo()
    (chunk,) = [p for p in (path / "baseline" / "8x2" / "kurt" / "c").rglob("*") if p.is_file()]
    chunk.write_bytes(b"")
    damage = find_damage(path)
    assert damage.startswith(f"{path / 'baseline' / '8x2' / 'kurt' / 'c' / '0'}: chunk of baseline/8x2/kurt")
    assert f"spinjax baseline --d 8 --d-head 2 --store {path} --recompute" in damage


def _counting(getitem, reads):
    def counted(self, selection):
        reads.append(self.path)
        return getitem(self, selection)

    return counted
