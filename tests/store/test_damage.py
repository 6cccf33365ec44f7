"""A damaged store (a truncated chunk, broken metadata, metadata that disagree) read by show,
plot, report and run: exit 2 naming the damaged file and saying how to repair, never an
internal error; the repair it names works."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import NEOX

from spinjax.cli import main
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
