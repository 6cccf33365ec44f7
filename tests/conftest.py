"""Shared fixtures: one small finished store (gpt_neox fixture), and byte snapshots of stores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Compiled kernels are kept between test runs (and reach the CLI subprocesses through the
# environment): most of a cold fast tier is XLA compiling the same shapes again. The key holds
# the jax version, the backend and the flags, so a stale entry is never used.
_JAX_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_JAX_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# Fixtures whose first use trains the embedded model (~1 min on 2 cores), runs whole
# trajectories or compiles and draws a null ensemble: every test that needs one is in the slow
# tier (`pytest -m "not slow"` skips it). Tests slow on their own carry @pytest.mark.slow.
SLOW_FIXTURES = {
    "tiny_pythia", "tiny_pythia_ready", "trajectory_store", "study_store", "study_ds", "study_null",
    "derived_store", "known_nulls", "null_and_heads",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

FIXTURES_ROOT = Path(__file__).parent / "fixtures"  # made by the committed fixtures/make_*.py scripts
FIXTURES = FIXTURES_ROOT / "extraction"
NEOX = FIXTURES / "gpt_neox"  # 2 layers, 6 heads, d_model 96, stored float16


def tree_bytes(path: Path) -> dict[str, bytes | None]:
    """Every file under ``path`` (relative name -> content) and every folder (-> None), empty
    ones included: "the store exactly as it was" is its whole tree. A missing path is {}."""
    path = Path(path)
    if not path.exists():
        return {}
    entries = sorted(path.rglob("*"))
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in entries}


@pytest.fixture(scope="session")
def neox_store(tmp_path_factory) -> Path:
    """A store holding one finished, uninterrupted run of the gpt_neox fixture (do not modify)."""
    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    path = tmp_path_factory.mktemp("neox") / "store.zarr"
    result = run(str(NEOX), RunOptions(steps="all", store=path))
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
def tiny_pythia(tmp_path_factory):
    """tiny-pythia generated once per session into a private cache, which ``SPINJAX_CACHE``
    points to for the whole session (so ``--model tiny-pythia`` finds it and no test touches
    the user's cache). Returns (cache, root, [(step, loss) reported while training])."""
    from spinjax.sources import tinypythia

    cache = tmp_path_factory.mktemp("spinjax-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("SPINJAX_CACHE", str(cache))
    seen: list[tuple[int, float]] = []
    root = tinypythia.ensure_tiny_pythia(cache, on_step=lambda step, loss: seen.append((step, loss)))
    yield cache, root, seen
    patch.undo()


@pytest.fixture(scope="session")
def tiny_pythia_ready(request) -> Path:
    """A cache holding tiny-pythia, for tests that only read it: the user's ``SPINJAX_CACHE``
    when it already holds a generated copy (read, never written), else the session's
    :func:`tiny_pythia` (trained once, ``SPINJAX_CACHE`` pointed at it)."""
    import os

    from spinjax.sources import tinypythia

    env = os.environ.get("SPINJAX_CACHE")
    if env and (Path(env) / f"{tinypythia.NAME}-v{tinypythia.VERSION}" / "config.json").is_file():
        return Path(env)
    return request.getfixturevalue("tiny_pythia")[0]


@pytest.fixture(scope="session")
def trajectory_store(tmp_path_factory, tiny_pythia_ready) -> Path:
    """A store with two models (do not modify): ``tiny-pythia``, its whole embedded trajectory
    (14 steps), and ``gpt_neox``, the one-checkpoint fixture (step -1)."""
    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    path = tmp_path_factory.mktemp("trajectory") / "store.zarr"
    assert len(run("tiny-pythia", RunOptions(steps="all", store=path)).computed) == 14
    assert run(str(NEOX), RunOptions(steps="all", store=path)).computed == [-1]
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """The headless browser of the page tests; skipped when none is installed (``.ci/run``
    installs Debian's ``chromium`` first; tests never install anything)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("no Chromium on PATH: install Debian's chromium (apt-get install chromium) for page tests")


STUDY_STEPS = (0, 16, 128, 512, 1280)
STUDY_NULL_SAMPLES = 200


@pytest.fixture(scope="session")
def study_store(tmp_path_factory, tiny_pythia_ready) -> Path:
    """Everything the figures can show (do not modify): tiny-pythia at ``STUDY_STEPS`` run with
    ``--null`` (``baseline/64x16``, ``STUDY_NULL_SAMPLES`` draws) and ``--pairs layer``, then
    ``spinjax dynamics``, and a null sweep ``--d 64 --d-head 4,16,32`` (same draws)."""
    from spinjax.run import RunOptions, compute_dynamics, run, run_baseline

    path = tmp_path_factory.mktemp("study") / "store.zarr"
    steps = ",".join(map(str, STUDY_STEPS))
    done = run("tiny-pythia", RunOptions(steps=steps, store=path, null=True, null_samples=STUDY_NULL_SAMPLES))
    assert done.computed == list(STUDY_STEPS)
    compute_dynamics("tiny-pythia", path)
    for d_head in (4, 16, 32):
        run_baseline(64, d_head, store_path=path, samples=STUDY_NULL_SAMPLES)
    return path


@pytest.fixture(scope="session")
def study_ds(study_store):
    """tiny-pythia's dataset in the study store (finished steps)."""
    import spinjax

    return spinjax.open_store(study_store)["tiny-pythia"]


@pytest.fixture(scope="session")
def study_null(study_store):
    """The study store's null ensemble of tiny-pythia's geometry (baseline/64x16)."""
    from spinjax.analysis import study

    return study.open_baselines(study_store)["64x16"]
