"""The store's identity check, shared by the writer (store.py) and the JAX-free reader (analysis.py)."""

from __future__ import annotations

from pathlib import Path

from . import SCHEMA, __version__
from .errors import InputError


def check_root_attrs(attrs, path: Path) -> None:
    """Refuse a Zarr group that spinjax did not write, or that another schema wrote."""
    meta = attrs.get("spinjax")
    if not isinstance(meta, dict) or "schema" not in meta:
        raise InputError(f"{path}: a Zarr store, but not written by spinjax (no 'spinjax' attribute)")
    if meta["schema"] != SCHEMA:
        raise InputError(
            f"{path}: store has schema {meta['schema']}, this spinjax (v{__version__}) reads "
            f"and writes schema {SCHEMA}; use another --store"
        )
