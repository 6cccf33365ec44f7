"""docs/store.md stays true to the stores spinjax writes, and the kernels' doctests run.

The doc's ```python blocks run, in order and in one namespace, from a folder whose
``store/spinjax.zarr`` is a real store: the fixture store, the fixture with ``--pairs model
--ov``, and the doc's own store, tiny-pythia at three steps with ``--null`` and ``spinjax
dynamics``. The blocks assert the documented definitions on the stored numbers.
Every array, dimension, matrix and attribute name of those stores must be named in the doc.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest
import zarr
from conftest import NEOX

DOC = Path(__file__).parents[1] / "docs" / "store.md"
KERNEL_MODULES = ("bins", "elements", "heads", "spectra", "null", "dynamics", "geometry")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def _documented_names() -> set[str]:
    """Every identifier that appears inside a `code span` or code block of the doc."""
    text = DOC.read_text()
    spans = re.findall(r"```.*?```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    return {token for span in spans for token in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


@pytest.fixture(scope="module")
def full_store(tmp_path_factory) -> Path:
    """The fixture checkpoint with the model-wide head pairs and the OV matrices (the null is
    in ``dynamics_store``: each null costs a compilation of its own)."""
    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    path = tmp_path_factory.mktemp("docs-full") / "store.zarr"
    run(str(NEOX), RunOptions(steps="all", store=path, pairs="model", ov=True))
    return path


@pytest.fixture(scope="module")
def dynamics_store(tiny_pythia, tmp_path_factory) -> Path:
    """The doc's own store: tiny-pythia at three steps, --null, --pairs layer, then dynamics."""
    from spinjax.run.dynamics import compute_dynamics
    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    path = tmp_path_factory.mktemp("docs-dynamics") / "store.zarr"
    run("tiny-pythia", RunOptions(steps="0,512,1280", store=path, null=True, null_samples=20, pairs="layer"))
    compute_dynamics("tiny-pythia", path)
    return path


def _run_blocks(store: Path, folder: Path, monkeypatch, capsys) -> str:
    (folder / "store").mkdir()
    (folder / "store" / "spinjax.zarr").symlink_to(store)
    monkeypatch.chdir(folder)
    namespace: dict = {}
    blocks = _python_blocks()
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/store.md, python block {i + 1}", "exec"), namespace)
    return capsys.readouterr().out


def test_snippets_run_on_the_fixture_store(neox_store, tmp_path, monkeypatch, capsys):
    out = _run_blocks(neox_store, tmp_path, monkeypatch, capsys)
    assert "{'version': " in out and "'schema': 1}" in out
    assert "std_z" not in out  # no null in this store: the block was skipped


def test_snippets_run_with_model_pairs_and_ov(full_store, tmp_path, monkeypatch, capsys):
    out = _run_blocks(full_store, tmp_path, monkeypatch, capsys)
    assert "{'version': " in out and "std_z" not in out


def test_snippets_run_on_a_trajectory_with_dynamics(dynamics_store, tmp_path, monkeypatch, capsys):
    out = _run_blocks(dynamics_store, tmp_path, monkeypatch, capsys)
    # the z-score recomputed from the null matched the store, and the dynamics block ran
    assert "std_z of W_QK" in out and "'crossing':" in out


def _store_names(path: Path) -> set[str]:
    """Array, dimension, matrix and attribute names (nested dict keys too) of a whole store."""
    names: set[str] = set()

    def keys(value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k.isidentifier():  # not the codes "-1", "0", ... of mode_event
                    names.add(k)
                keys(v)
        elif isinstance(value, list):
            for v in value:
                keys(v)

    root = zarr.open_group(str(path), mode="r")
    keys(dict(root.attrs))
    groups = [root[k] for k in root.group_keys() if k != "baseline"]
    if "baseline" in root:
        names.add("baseline")
        groups += [g for _, g in root["baseline"].groups()]
    for group in groups:
        keys(dict(group.attrs))
        for name, arr in group.arrays():
            names.add(name)
            names.update(arr.metadata.dimension_names or ())
            keys(dict(arr.attrs))
        names.update(str(m) for m in group["matrix"][:])
    return names


def test_every_stored_name_is_documented(neox_store, full_store, dynamics_store):
    documented = _documented_names()
    for store in (neox_store, full_store, dynamics_store):
        missing = sorted(n for n in _store_names(store) if n not in documented)
        assert not missing, f"docs/store.md does not name {missing} (written to {store.name})"


def test_documented_names_check_is_not_vacuous():
    documented = _documented_names()
    assert {"qk_distance_model", "overlap_left", "zbin_edge", "spinjax_version", "W_OV"} <= documented
    assert "not_a_spinjax_name" not in documented


@pytest.mark.slow
@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernel_doctests(module):
    """The Examples of the kernels' docstrings (``pytest --doctest-modules kernels`` runs them too)."""
    result = doctest.testmod(importlib.import_module(f"spinjax.kernels.{module}"), verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
