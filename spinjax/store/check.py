"""Finding what is damaged in a store: which array, which file, and what to do about it.

Reading a damaged store fails deep inside zarr, numcodecs or xarray (a decompression error, a
JSON error, "conflicting sizes"); the command line then calls :func:`find_damage`, which reads
every metadata file and every chunk once, and reports the first piece that does not read or
does not agree with the committed (consolidated) metadata, in words a user can act on.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import zarr

from .root import committed_shapes
from .schema import BASELINE_GROUP, META_DIR


def find_damage(path: str | Path) -> str | None:
    """The first damaged piece of the store at ``path`` and how to repair it, or None when
    every metadata file and chunk reads and agrees with the consolidated metadata."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return None
    for meta in sorted(path.rglob("zarr.json")):
        if META_DIR in meta.relative_to(path).parts:
            continue
        try:
            json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            return (
                f"{meta}: damaged metadata ({exc}); {_repair_hint(path, meta.parent.relative_to(path))}"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr notes that .spinjax/ is no node of the hierarchy
        root = zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=False)
        found = list(_groups(root))
    for group_path, _ in found:
        # each array's own metadata, not the group's consolidated copy of it
        group = zarr.open_group(str(path), path=group_path, mode="r", zarr_format=3, use_consolidated=False)
        committed = committed_shapes(path / group_path)
        for name, array in group.arrays():
            where = f"{group_path}/{name}"
            if name in committed and tuple(committed[name]) != array.shape:
                return (
                    f"{path / where}: holds shape {array.shape}, but the committed metadata of "
                    f"{group_path} says {tuple(committed[name])}; "
                    f"{_repair_hint(path, Path(where))}"
                )
            rows = array.chunks[0] if array.ndim else 1  # one read a row of chunks: each decoded once
            for start in range(0, array.shape[0] if array.ndim else 1, rows):
                try:
                    array[start : start + rows] if array.ndim else array[()]
                except Exception as exc:  # noqa: BLE001 - any codec or I/O failure is the damage
                    chunk = path / where / "c" / str(start // rows)
                    step = _step_at(group, array, start) if rows == 1 else None
                    return (
                        f"{chunk}: chunk of {where} cannot be read ({exc}); "
                        f"{_repair_hint(path, Path(where), group.attrs.get('source'), step)}"
                    )
    return None


def _groups(root: zarr.Group):
    """(path, group) of every model group and null ensemble of the store."""
    for key, group in root.groups():
        if key == BASELINE_GROUP:
            for name, null in group.groups():
                yield f"{key}/{name}", null
        else:
            yield key, group


def _step_at(group: zarr.Group, array: zarr.Array, index: int) -> int | None:
    """The training step of ``array``'s chunk ``index`` when the array runs along ``step``."""
    if tuple(array.metadata.dimension_names or ())[:1] != ("step",):
        return None
    try:
        return int(group["step"][index])
    except Exception:  # noqa: BLE001 - the step coordinate itself may be what is damaged
        return None


def _repair_hint(store: Path, where: Path, source: str | None = None, step: int | None = None) -> str:
    """What to do about damage at ``where`` (relative to the store)."""
    top = where.parts[0] if where.parts else ""
    if not top:
        return "the store's root is damaged: restore it from a backup or write a new store"
    if top == BASELINE_GROUP:
        null = "/".join(where.parts[:2])
        d, d_head = null.split("/")[1].split("x")
        return f"recompute the null: spinjax baseline --d {d} --d-head {d_head} --store {store} --recompute"
    if step is not None:
        return (
            f"recompute that step: spinjax run --model MODEL --store {store} --steps {step} --recompute, "
            f"with the --model that wrote {top} (source: {source})"
        )
    return f"remove {store / top} and run that model's steps again (its other groups are not affected)"
