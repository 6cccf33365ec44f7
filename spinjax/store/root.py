"""A store's root: opening, creating, locking, the commit of metadata changes, listing groups.

Crashes and concurrent writers: every metadata change (creating the store or a group, appending
steps, the ``runs`` attribute, consolidation) happens under the store's lock file
(:func:`locked`) and ends with a consolidation, which is the commit: zarr-python replaces each
file atomically, a new group is built aside and renamed into place (:func:`build_aside`,
:func:`commit_group`), and a half-done append (a process killed between array resizes) is rolled
back to the consolidated shapes by the next writer. Readers going through the consolidated
metadata (xarray's default) always see a consistent store.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zarr
import zarr.codecs
import zarr.storage

from ..errors import InputError, writing_to
from ..version import __version__
from .locking import LockFile, LockLostError
from .schema import META_DIR, RESERVED_GROUPS, SCHEMA, check_root_attrs

COMPRESSORS = (zarr.codecs.ZstdCodec(level=3),)


def writing(path: Path, finished: Callable[[], bool] = lambda: False):
    """A store write that fails on an OSError (full disk, no permission) exits as bad input,
    saying whether finished steps are kept (``finished()``) and how to go on."""

    def then() -> str:
        kept = "finished steps are kept, " if finished() else ""
        return f"{kept}rerun the same command when it is writable again"

    return writing_to(path, "the store", then)


def check_can_hold(path: Path) -> None:
    """Refuse a path that is a file, or a folder holding something else than a store."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a Zarr store directory")
    if not (path / "zarr.json").exists() and path.exists():
        if any(p.name != META_DIR for p in path.iterdir()):
            raise InputError(f"{path}: directory is not empty and is not a Zarr store")


class _LockedStore(zarr.storage.WrapperStore):
    """A store opened under its lock: every write first checks that the lock is still this
    process's (:meth:`LockFile.verify`), so a writer that lost it while frozen writes nothing."""

    def __init__(self, store: zarr.storage.LocalStore, lock: LockFile):
        super().__init__(store)
        self.lock = lock

    def _with_store(self, store: zarr.storage.LocalStore) -> _LockedStore:
        return type(self)(store, self.lock)

    @property
    def root(self) -> Path:
        return self._store.root

    async def set(self, key, value) -> None:
        self.lock.verify()
        await super().set(key, value)

    async def set_if_not_exists(self, key, value) -> None:
        self.lock.verify()
        await super().set_if_not_exists(key, value)

    async def _set_many(self, values) -> None:
        self.lock.verify()
        await super()._set_many(values)

    async def delete(self, key) -> None:
        self.lock.verify()
        await super().delete(key)


def open_store(
    path: str | Path, *, create: bool = False, consolidated: bool = True, lock: LockFile | None = None
) -> zarr.Group:
    """Open (or with ``create``, create) the store's root group, refusing anything not schema 1.

    ``consolidated=False`` reads every node's own metadata (what writers holding the lock
    need); else the consolidated copy, the last committed state, which is what readers see.
    Without ``create`` the root is opened read-only. With ``lock`` (held), every write checks
    it is still held. Creating a store should happen under :func:`locked` when other processes
    may create it too.
    """
    path = Path(path)
    check_can_hold(path)
    store = str(path) if lock is None else _LockedStore(zarr.storage.LocalStore(path), lock)
    if not (path / "zarr.json").exists():
        if not create:
            raise InputError(f"{path}: not a Zarr store (no zarr.json)")
        # one write of zarr.json with the attribute: a crash cannot leave an unmarked store
        return zarr.create_group(
            store=store, zarr_format=3, attributes={"spinjax": {"version": __version__, "schema": SCHEMA}}
        )
    try:
        mode, use = ("r+" if create else "r"), (None if consolidated else False)
        root = zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=use)
    except LockLostError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot open as a Zarr v3 group ({exc})") from exc
    check_root_attrs(root.attrs, path)
    return root


def store_path(root: zarr.Group) -> Path:
    """The directory of an opened store."""
    return Path(str(root.store.root))


def committed_shapes(group_dir: Path) -> dict[str, list[int]]:
    """Each array's shape in a group's consolidated metadata (its last commit); {} if unreadable."""
    try:
        meta = json.loads((group_dir / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(meta, dict):
        return {}
    return {name: m["shape"] for name, m in meta.items() if isinstance(m, dict) and "shape" in m}


def reopen(root: zarr.Group) -> zarr.Group:
    """``root`` opened again from its store (the same lock checks), each node's own metadata."""
    return zarr.open_group(root.store, mode="r+", zarr_format=3, use_consolidated=False)


@contextmanager
def locked(path: str | Path) -> Iterator[zarr.Group]:
    """The root group (created if missing), fresh from disk, with the store's lock held.

    Everything that changes metadata goes in here and ends with :func:`consolidate`. Groups
    left half-built by a killed process are removed first.
    """
    path = Path(path)
    check_can_hold(path)  # refuse a foreign directory before writing into it
    (path / META_DIR).mkdir(parents=True, exist_ok=True)
    with LockFile(path / META_DIR / "lock") as lock:
        shutil.rmtree(path / META_DIR / "new", ignore_errors=True)  # only the lock holder builds there
        break_stale_locks(path, claims_only=True)
        yield open_store(path, create=True, consolidated=False, lock=lock)


def break_stale_locks(path: Path, *, claims_only: bool = False) -> None:
    """Remove the store's lock and step claims that dead processes left behind (a process
    killed while it held them); live holders' files stay."""
    meta = path / META_DIR
    candidates = [*(meta / "claims").glob("*/*"), *([] if claims_only else [meta / "lock"])]
    for file in candidates:
        if file.is_file() and not file.name.endswith(".break"):
            LockFile(file).break_if_stale()


def consolidate(root: zarr.Group, key: str | None = None) -> None:
    """Refresh the consolidated metadata (of the group ``key`` and of the root) after shapes or
    attributes changed: the commit of a metadata change, made under :func:`locked`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata is a zarr-python extension
        if key is not None:  # what xarray.open_zarr(store, group=key) reads
            zarr.consolidate_metadata(root.store, path=key)
        zarr.consolidate_metadata(root.store)


def build_aside(root: zarr.Group, key: str, attrs: dict[str, Any]) -> zarr.Group:
    """A new group for ``key``, built in ``.spinjax/new/`` until :func:`commit_group` renames it
    into place, so that a crash never leaves a half-built group. Under :func:`locked`."""
    building = store_path(root) / META_DIR / "new" / f"{key.replace('/', '.')}.{uuid.uuid4().hex}"
    building.parent.mkdir(parents=True, exist_ok=True)
    return zarr.create_group(store=str(building), zarr_format=3, attributes=attrs)


def commit_group(root: zarr.Group, built: zarr.Group, key: str) -> None:
    """Rename a group from :func:`build_aside` to ``key`` (replacing an older one), and commit."""
    path = store_path(root)
    if "/" in key:
        root.require_group(key.rsplit("/", 1)[0])
    if isinstance(root.store, _LockedStore):  # a rename is no store write: check it here
        root.store.lock.verify()
    target, old = path / key, path / META_DIR / "new" / f"old.{uuid.uuid4().hex}"
    if target.exists():
        os.rename(target, old)
    os.rename(str(built.store.root), target)
    shutil.rmtree(old, ignore_errors=True)
    consolidate(root, key)


def model_keys(root: zarr.Group) -> list[str]:
    """The model groups of a store (every root group but the reserved ones), sorted."""
    return sorted(k for k in root.group_keys() if k not in RESERVED_GROUPS)


def claim_path(path: str | Path, key: str, step: int) -> Path:
    """The lock file by which one process claims the computation of ``step`` of model ``key``."""
    return Path(path) / META_DIR / "claims" / key / f"step{step}"
