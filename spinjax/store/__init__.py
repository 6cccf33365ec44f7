"""The Zarr v3 store: its schema, the model groups, locking and the commit of metadata changes.

No JAX here: the reading side (``spinjax.analysis``) opens and lists stores through this package.
"""

from .group import SHAPE_ATTRS, ModelGroup, step_done, summary, write_coordinates
from .locking import LockFile
from .root import (
    break_stale_locks,
    build_aside,
    check_can_hold,
    claim_path,
    commit_group,
    consolidate,
    locked,
    model_keys,
    open_store,
    store_path,
    writing,
)
from .schema import (
    BASE_DIMS,
    BASELINE_GROUP,
    DEFAULT_STORE,
    MATRICES,
    META_DIR,
    OV_MATRICES,
    RESERVED_GROUPS,
    SCALARS,
    SCHEMA,
    VARIABLES,
)

__all__ = [
    "BASELINE_GROUP",
    "BASE_DIMS",
    "DEFAULT_STORE",
    "LockFile",
    "MATRICES",
    "META_DIR",
    "ModelGroup",
    "OV_MATRICES",
    "RESERVED_GROUPS",
    "SCALARS",
    "SCHEMA",
    "SHAPE_ATTRS",
    "VARIABLES",
    "break_stale_locks",
    "build_aside",
    "check_can_hold",
    "claim_path",
    "commit_group",
    "consolidate",
    "locked",
    "model_keys",
    "open_store",
    "step_done",
    "store_path",
    "summary",
    "write_coordinates",
    "writing",
]
