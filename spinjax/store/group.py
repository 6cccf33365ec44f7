"""A model's group in the store (schema 1): its layout, planning steps, writing one step.

Every array carries ``dimension_names``; coordinates are arrays named after their dimension
(plus ``revision`` along ``step``), so ``xarray.open_zarr(path, group=key)`` gives a labelled
Dataset. Data are chunked one step per chunk, and ``done[step]`` is written only after every
array of that step, so a step with ``done`` false holds no trusted data. Step data are written
outside the store's lock (each step is its own chunks); everything else under it (root.py).
"""

from __future__ import annotations

import datetime as _dt
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import InputError
from ..kernels import bins
from ..version import __version__
from .root import (
    COMPRESSORS,
    build_aside,
    commit_group,
    committed_shapes,
    consolidate,
    model_keys,
    open_store,
    reopen,
    store_path,
)
from .schema import BASE_DIMS, BASELINE_GROUP, MATRICES, VARIABLES, VariableSpec, check_group_key

SHAPE_ATTRS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head")
"""The group attributes giving a model's attention geometry."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def step_done(path: str | Path, key: str, step: int) -> bool:
    """Whether ``step`` of ``key`` is done in the committed (consolidated) state of the store."""
    if not (Path(path) / "zarr.json").exists():
        return False
    root = open_store(path)
    if key not in root:
        return False
    group = ModelGroup(root, key)
    return any(s == step and d for s, d in zip(group.steps, group.done, strict=True))


def _committed_length(root: zarr.Group, key: str) -> int | None:
    """Steps of ``key`` in its group's consolidated metadata (the last commit), if recorded."""
    try:
        return int(committed_shapes(store_path(root) / key)["step"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def write_coordinates(
    group: zarr.Group, leading: dict[str, np.ndarray], n_sv: int, matrices: Sequence[str] = MATRICES
) -> None:
    """The coordinate arrays of a group: ``leading`` ones, then matrix, sv, zbin, bin, and
    the auxiliary ``zbin_edges`` / ``bin_edges`` (dimensions ``zbin_edge`` / ``bin_edge``)."""
    coords = {
        **leading,
        "matrix": np.array(matrices, dtype=object),
        "sv": np.arange(n_sv, dtype=np.int32),
        "zbin": np.arange(bins.NZ, dtype=np.int32),
        "bin": np.arange(bins.NB, dtype=np.int32),
    }
    for name, values in coords.items():
        dtype = str if values.dtype == object else values.dtype
        arr = group.create_array(name, shape=values.shape, dtype=dtype, dimension_names=[name])
        arr[:] = values
    for name, edges in (("zbin_edges", bins.zbin_edges()), ("bin_edges", bins.bin_edges())):
        arr = group.create_array(name, shape=edges.shape, dtype="float64", dimension_names=[name[:-1]])
        arr[:] = edges


class ModelGroup:
    """One model's dataset inside the store."""

    def __init__(self, root: zarr.Group, key: str):
        self.root = root
        self.key = key
        if root.metadata.consolidated_metadata is None:
            self._refresh()  # a writer's view (see open_store)
        else:
            self.group = root[key]

    def _refresh(self) -> None:
        """Read each array's own metadata: the group's consolidated copy (the last commit)
        would hide steps appended, or half appended, since."""
        mode = "r" if self.root.read_only else "r+"
        self.group = zarr.open_group(store=self.root.store, path=self.key, mode=mode, use_consolidated=False)

    @property
    def steps(self) -> list[int]:
        return [int(s) for s in self.group["step"][:]]

    @property
    def matrices(self) -> tuple[str, ...]:
        return tuple(str(m) for m in self.group["matrix"][:])

    @property
    def shape(self) -> dict[str, int]:
        """The model's attention geometry as stored (``SHAPE_ATTRS``)."""
        return {k: int(self.group.attrs[k]) for k in SHAPE_ATTRS}

    @property
    def done(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    @classmethod
    def create_or_check(
        cls,
        root: zarr.Group,
        key: str,
        *,
        shape: Mapping[str, int],
        architecture: str,
        attrs: dict[str, Any],
        n_sv: int,
        matrices: Sequence[str] = MATRICES,
    ) -> ModelGroup:
        """The model group ``key``, created with coordinates if new, else checked to match.

        ``shape`` holds the ``SHAPE_ATTRS``; under :func:`~spinjax.store.root.locked`.
        """
        if key in root:
            existing = cls(root, key)
            existing.check_holds(shape, architecture, matrices)
            return existing
        check_group_key(key)
        shape = {k: int(shape[k]) for k in SHAPE_ATTRS}
        group_attrs = {**attrs, "architecture": architecture, **shape,
                       "spinjax_version": __version__, "runs": []}  # fmt: skip
        group = build_aside(root, key, group_attrs)
        n_layers, n_heads = shape["n_layers"], shape["n_heads"]
        write_coordinates(
            group,
            {"layer": np.arange(n_layers, dtype=np.int32), "head": np.arange(n_heads, dtype=np.int32)},
            n_sv,
            matrices,
        )
        group.create_array("step", shape=(0,), chunks=(1,), dtype="int64", dimension_names=["step"])
        group.create_array("revision", shape=(0,), chunks=(1,), dtype=str, dimension_names=["step"])
        group.create_array(
            "done", shape=(0,), chunks=(1,), dtype="bool", fill_value=False, dimension_names=["step"]
        )
        sizes = {"layer": n_layers, "head": n_heads, "matrix": len(matrices),
                 "zbin": bins.NZ, "bin": bins.NB, "sv": n_sv}  # fmt: skip
        for name, (extra, dtype, fill) in VARIABLES.items():
            dims = BASE_DIMS + ((extra,) if extra else ())
            shape = (0,) + tuple(sizes[d] for d in dims[1:])
            arr = group.create_array(
                name, shape=shape, chunks=(1,) + shape[1:], dtype=dtype, fill_value=fill,
                compressors=COMPRESSORS, dimension_names=list(dims),
            )  # fmt: skip
            arr.attrs["coordinates"] = "revision"
        commit_group(root, group, key)
        return cls(reopen(root), key)

    def check_source(self, source: str) -> None:
        """Refuse a run of another source under this key (e.g. two directories of one name)."""
        stored = self.group.attrs.get("source")
        if stored != source:
            raise InputError(
                f"store group {self.key!r} holds results of {stored!r}, not of {source!r}; "
                "use another --store"
            )

    def check_holds(
        self, shape: Mapping[str, int], architecture: str, matrices: Sequence[str] = MATRICES
    ) -> None:
        """Refuse to mix another model into this group (same key, other architecture or shape),
        or other matrices (the ``matrix`` dimension is fixed when the group is created)."""
        want = {"architecture": architecture, **{k: int(shape[k]) for k in SHAPE_ATTRS}}
        stored = {k: self.group.attrs.get(k) for k in want}
        if stored != want:
            raise InputError(
                f"store group {self.key!r} holds another architecture or geometry: {stored}, not {want}"
            )
        self.check_matrices(matrices)

    def check_matrices(self, matrices: Sequence[str]) -> None:
        """Refuse other matrices: the ``matrix`` dimension is fixed when the group is created."""
        if self.matrices != tuple(matrices):
            raise InputError(
                f"store group {self.key!r} holds the matrices {', '.join(self.matrices)}, not "
                f"{', '.join(matrices)}; use another --store to add W_OV (--ov) to a model"
            )

    def step_arrays(self) -> list[str]:
        """Every array along ``step``: coordinates, ``done``, core and optional variables.

        In a fixed order (core variables as in ``VARIABLES``, then the others by name): the
        store's own listing follows the file system, and writes must not depend on it.
        """
        along = [(name, arr.metadata.dimension_names or ()) for name, arr in self.group.arrays()]
        names = [name for name, dims in along if dims[:1] == ("step",)]
        core = list(VARIABLES)
        return sorted(names, key=lambda n: (core.index(n), "") if n in core else (len(core), n))

    def data_variables(self) -> list[str]:
        """The per-step data variables this group holds (core ones and any optional family)."""
        return [n for n in self.step_arrays() if n not in ("step", "revision", "done")]

    def group_variables(self) -> list[str]:
        """The data variables without a step dimension (results over all steps, such as
        ``largest_change_step``), by name: every array that is no coordinate nor grid edges."""
        names = []
        for name, arr in self.group.arrays():
            dims = tuple(arr.metadata.dimension_names or ())
            if dims[:1] != ("step",) and name not in dims and not name.endswith("_edges"):
                names.append(name)
        return sorted(names)

    def add_variables(
        self, specs: Mapping[str, VariableSpec], coords: dict[str, np.ndarray]
    ) -> list[str]:
        """Create the arrays of ``specs`` that the group lacks, with the group's current steps
        (fill values until written), and the coordinate arrays of new dimensions from ``coords``.
        Arrays along ``step`` get one chunk per step; others (per-group results) one chunk.

        Call it under :func:`locked` and consolidate after. Returns the names created.
        """
        self._refresh()
        n_steps = self.group["step"].shape[0]
        created = []
        for name, (dims, dtype, fill) in specs.items():
            if name in self.group:
                continue
            for dim in dims:
                if dim != "step" and dim not in self.group:
                    values = np.asarray(coords[dim])
                    coord = self.group.create_array(dim, shape=values.shape, dtype=values.dtype,
                                                    dimension_names=[dim])  # fmt: skip
                    coord[:] = values
            shape = tuple(n_steps if d == "step" else self.group[d].shape[0] for d in dims)
            chunks = (1,) + shape[1:] if dims[0] == "step" else shape  # per-group ones: one chunk
            arr = self.group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                compressors=COMPRESSORS, dimension_names=list(dims),
            )  # fmt: skip
            arr.attrs["coordinates"] = "revision"
            created.append(name)
        return created

    def write_variables(self, index: int, results: dict[str, np.ndarray]) -> None:
        """Write some variables of one step (derived values of a finished step); ``done`` untouched."""
        for name, values in results.items():
            arr = self.group[name]
            arr[index] = np.asarray(values, dtype=arr.dtype)

    def plan(self, requested: Sequence[tuple[int, str]], *, recompute: bool) -> list[tuple[int, int, str]]:
        """Indices to compute for the requested (step, revision) pairs, appending new steps.

        Finished steps are skipped unless ``recompute``; unfinished ones are redone in place.
        Returns (index, step, revision) in the requested order. Call it under :func:`locked`;
        it ends with the commit (consolidation) of what it appended.
        """
        self._refresh()
        self._repair()
        steps, done = self.steps, self.done
        position = {s: i for i, s in enumerate(steps)}
        new = [(s, r) for s, r in requested if s not in position]
        if new:
            n_old = len(steps)
            # `step` last: it indexes the rest
            for name in [n for n in self.step_arrays() if n != "step"] + ["step"]:
                arr = self.group[name]
                arr.resize((n_old + len(new),) + arr.shape[1:])
            self.group["revision"][n_old:] = np.array([r for _, r in new], dtype=object)
            self.group["step"][n_old:] = np.array([s for s, _ in new], dtype=np.int64)
            for i, (s, _) in enumerate(new):
                position[s] = n_old + i
            consolidate(self.root, self.key)
            done = np.concatenate([done, np.zeros(len(new), bool)])
        todo = []
        for s, r in requested:
            i = position[s]
            if recompute or not done[i]:
                todo.append((i, s, r))
        return todo

    def _repair(self) -> None:
        """Roll back an append that a killed process left half done (arrays of unequal length)."""
        names = self.step_arrays()
        lengths = {name: self.group[name].shape[0] for name in names}
        committed = _committed_length(self.root, self.key)
        target = min(lengths.values()) if committed is None else committed
        for name, n in lengths.items():
            if n != target:
                arr = self.group[name]
                arr.resize((target,) + arr.shape[1:])

    def write_step(self, index: int, results: dict[str, np.ndarray]) -> None:
        """Write every variable of one step (arrays shaped (layer, head, ...)), then done.

        Every core variable must be in ``results``; an optional variable the group holds but
        ``results`` lacks is reset to its fill value, so a recomputed step keeps nothing stale.
        """
        self.group["done"][index] = False
        for name in self.data_variables():
            arr = self.group[name]
            if name in results:
                arr[index] = np.asarray(results[name], dtype=arr.dtype)
            elif name in VARIABLES:
                raise KeyError(f"step results lack the variable {name!r}")
            else:
                arr[index] = np.full(arr.shape[1:], arr.fill_value, dtype=arr.dtype)
        self.group["done"][index] = True

    def start_run(self, steps: Sequence[int]) -> dict[str, Any]:
        """Append this run's provenance record (under :func:`locked`); returns the record."""
        record = {"started": _now(), "finished": None, "host": socket.gethostname(),
                  "version": __version__, "steps": [int(s) for s in steps]}  # fmt: skip
        self.group.attrs["runs"] = [*self.group.attrs.get("runs", []), record]
        return record

    def finish_run(self, record: dict[str, Any] | None = None, *, interrupted: bool = False) -> None:
        """Mark ``record`` (default: the last run) finished, or stopped by an interrupt.

        Concurrent runs append their own records, so the record is found by value.
        """
        runs = list(self.group.attrs.get("runs", []))
        matches = [i for i, r in enumerate(runs) if record is None or r == record]
        if matches:
            end = {"finished": _now(), **({"interrupted": True} if interrupted else {})}
            runs[matches[-1]] = {**runs[matches[-1]], **end}
            self.group.attrs["runs"] = runs


def summary(path: str | Path) -> dict[str, Any]:
    """What ``spinjax show`` prints: per model, geometry, steps done / requested, sizes."""
    root = open_store(path)
    meta = root.attrs["spinjax"]
    models = {}
    for key in model_keys(root):
        group = ModelGroup(root, key)
        attrs = dict(group.group.attrs)
        steps, done = group.steps, group.done
        size = sum(f.stat().st_size for f in (Path(path) / key).rglob("*") if f.is_file())
        models[key] = {
            **{k: attrs.get(k) for k in ("source", "architecture", "dtype", *SHAPE_ATTRS)},
            "steps_done": int(done.sum()),
            "steps_requested": len(steps),
            "steps": [s for s, d in zip(steps, done, strict=True) if d],
            "variables": sorted(group.data_variables() + group.group_variables()),
            "matrices": list(group.matrices),
            "variant": attrs.get("variant", "raw"),
            "features": attrs.get("features", {}),
            "bytes": size,
            "runs": attrs.get("runs", []),
        }
    baselines = {}
    if BASELINE_GROUP in root:
        for name, null in sorted(root[BASELINE_GROUP].groups()):
            key = f"{BASELINE_GROUP}/{name}"
            size = sum(f.stat().st_size for f in (Path(path) / key).rglob("*") if f.is_file())
            baselines[key] = {k: null.attrs.get(k) for k in ("d", "d_head", "sigma", "samples", "seed")}
            baselines[key]["bytes"] = size
    return {
        "schema": meta["schema"], "version": meta.get("version"), "models": models, "baselines": baselines,
    }  # fmt: skip
