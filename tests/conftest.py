"""Shared fixtures: one small finished store (gpt_neox fixture), and byte snapshots of stores."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "extraction"
NEOX = FIXTURES / "gpt_neox"  # 2 layers, 6 heads, d_model 96, stored float16


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> content); a missing path is {}."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def neox_store(tmp_path_factory) -> Path:
    """A store holding one finished, uninterrupted run of the gpt_neox fixture (do not modify)."""
    from spinjax.pipeline import run

    path = tmp_path_factory.mktemp("neox") / "store.zarr"
    result = run(str(NEOX), steps="all", store_path=path)
    assert result.computed == [-1] and result.skipped == []
    return path


@pytest.fixture
def store_copy(neox_store, tmp_path) -> Path:
    """A private copy of ``neox_store`` that a test may change."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(neox_store, path)
    return path


@pytest.fixture
def snapshot():
    """``snapshot(path)``: every file under path with its bytes, to compare before/after."""
    return tree_bytes
