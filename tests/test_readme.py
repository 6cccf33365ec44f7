"""Every Python snippet of the README runs as written on the store the README builds
(`spinjax run --model tiny-pythia --steps all` into store/spinjax.zarr)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_snippets():
    assert len(_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_snippet_runs_as_written(index, trajectory_store, tmp_path, monkeypatch, capsys):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "spinjax.zarr").symlink_to(trajectory_store)  # where the README writes it
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_blocks()[index], f"README.md, python block {index + 1}", "exec"), {})
    out = capsys.readouterr().out
    if "density" in _python_blocks()[index]:  # the README says the densities integrate to 1
        assert re.search(r"^1\.0+\d*$|^0\.9999\d*$", out, re.M), out
