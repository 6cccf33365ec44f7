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


GENERATION_BUDGET_S = 240  # ~35-60 s on a 2-core CPU; this only catches gross regressions


@pytest.fixture(scope="session")
def tiny_pythia(tmp_path_factory):
    """tiny-pythia generated once per session into a private cache, which ``SPINJAX_CACHE``
    points to for the whole session (so ``--model tiny-pythia`` finds it and no test touches
    the user's cache). Returns (cache, root, [(step, loss) reported while training])."""
    import time

    from spinjax import tinypythia

    cache = tmp_path_factory.mktemp("spinjax-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("SPINJAX_CACHE", str(cache))
    seen: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    root = tinypythia.ensure_tiny_pythia(cache, on_step=lambda step, loss: seen.append((step, loss)))
    elapsed = time.perf_counter() - t0
    assert elapsed < GENERATION_BUDGET_S, f"tiny-pythia generation took {elapsed:.0f} s"
    yield cache, root, seen
    patch.undo()


@pytest.fixture(scope="session")
def tiny_pythia_ready(request) -> Path:
    """A cache holding tiny-pythia, for tests that only read it: the user's ``SPINJAX_CACHE``
    when it already holds a generated copy (read, never written), else the session's
    :func:`tiny_pythia` (trained once, ``SPINJAX_CACHE`` pointed at it)."""
    import os

    from spinjax import tinypythia

    env = os.environ.get("SPINJAX_CACHE")
    if env and (Path(env) / f"{tinypythia.NAME}-v{tinypythia.VERSION}" / "config.json").is_file():
        return Path(env)
    return request.getfixturevalue("tiny_pythia")[0]


@pytest.fixture(scope="session")
def trajectory_store(tmp_path_factory, tiny_pythia_ready) -> Path:
    """A store with two models (do not modify): ``tiny-pythia``, its whole embedded trajectory
    (14 steps), and ``gpt_neox``, the one-checkpoint fixture (step -1)."""
    from spinjax.pipeline import run

    path = tmp_path_factory.mktemp("trajectory") / "store.zarr"
    assert len(run("tiny-pythia", steps="all", store_path=path).computed) == 14
    assert run(str(NEOX), steps="all", store_path=path).computed == [-1]
    return path


STUDY_STEPS = (0, 16, 128, 512, 1280)
STUDY_NULL_SAMPLES = 200


@pytest.fixture(scope="session")
def study_store(tmp_path_factory, tiny_pythia_ready) -> Path:
    """Everything the figures can show (do not modify): tiny-pythia at ``STUDY_STEPS`` run with
    ``--null`` (``baseline/64x16``, ``STUDY_NULL_SAMPLES`` draws) and ``--pairs layer``, then
    ``spinjax dynamics``, and a null sweep ``--d 64 --d-head 4,16,32`` (same draws)."""
    from spinjax.baseline import run_baseline
    from spinjax.dynamics import compute_dynamics
    from spinjax.pipeline import run

    path = tmp_path_factory.mktemp("study") / "store.zarr"
    steps = ",".join(map(str, STUDY_STEPS))
    done = run("tiny-pythia", steps=steps, store_path=path, null=True, null_samples=STUDY_NULL_SAMPLES)
    assert done.computed == list(STUDY_STEPS)
    compute_dynamics("tiny-pythia", path)
    for d_head in (4, 16, 32):
        run_baseline(64, d_head, store_path=path, samples=STUDY_NULL_SAMPLES)
    return path
