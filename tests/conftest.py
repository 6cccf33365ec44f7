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


@pytest.fixture(scope="session")
def trajectory_store(tmp_path_factory) -> Path:
    """A store with two models (do not modify): ``tiny-pythia``, its whole embedded trajectory
    (14 steps; the checkpoints come from the spinjax cache, trained there on first use, about a
    minute), and ``gpt_neox``, the one-checkpoint fixture (step -1)."""
    import warnings

    import zarr

    from spinjax.pipeline import run

    base = tmp_path_factory.mktemp("trajectory")
    path = base / "store.zarr"
    assert len(run("tiny-pythia", steps="all", store_path=path).computed) == 14
    # The gpt_neox group is computed in a store of its own and copied in (a model group is
    # self-contained), so this fixture does not depend on how `run` adds a second model to a
    # store (store.open_store at commit 5585b04 read stale consolidated metadata there).
    assert run(str(NEOX), steps="all", store_path=base / "neox.zarr").computed == [-1]
    shutil.copytree(base / "neox.zarr" / "gpt_neox", path / "gpt_neox")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))
    return path
