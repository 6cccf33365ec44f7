"""The store's contract as data: schema number, names, dimensions, dtypes and fill values.

One definition of every name the writer creates and the readers rely on (docs/store.md says
what each means). Nothing here imports JAX.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..version import __version__

SCHEMA = 1
DEFAULT_STORE = "store/spinjax.zarr"  # relative to the working directory
BASELINE_GROUP = "baseline"  # root group holding the null ensembles baseline/<d>x<dh>
RESERVED_GROUPS = (BASELINE_GROUP,)  # root groups of a store that hold no model
META_DIR = ".spinjax"  # lock, step claims and groups being built; not a zarr node, readers skip it

MATRICES = ("W_Q", "W_K", "W_QK")  # the order of the kernels' matrix axis
OV_MATRICES = MATRICES + ("W_V", "W_O", "W_OV")  # `spinjax run --ov`
BASE_DIMS = ("step", "layer", "head", "matrix")  # dims of every per-head scalar statistic

SCALARS = (
    "mean", "std", "skew", "kurt", "min", "max",
    "entropy", "entropy_residual", "entropy_mm", "kl_gauss", "kl_gauss_mm",
    "mu_fit", "sigma_fit", "kl_fit", "tail_mass", "ks_normal",
    "spectral_norm", "frobenius_norm", "stable_rank", "spectral_entropy",
    "effective_rank", "participation_ratio", "condition_number",
)  # fmt: skip

VariableSpec = tuple[tuple[str, ...], str, Any]
"""(dims, dtype, fill value) of a store variable."""

# Core variables (SPEC section 3): name -> (extra trailing dimension or None, dtype, fill value)
VARIABLES: dict[str, tuple[str | None, str, Any]] = {
    **{name: (None, "float32", np.nan) for name in SCALARS},
    "n_nonfinite": (None, "int64", 0),
    "zhist": ("zbin", "uint32", 0),
    "hist": ("bin", "uint32", 0),
    "singular_values": ("sv", "float32", np.nan),
}

# Per-head measures of the product matrix (no matrix dim; schema 1 additions written by every
# run): the kernels' names with the circuit's prefix, "qk" always and "ov" with `run --ov`.
HEAD_DIMS = ("step", "layer", "head")
EIG_DIMS = HEAD_DIMS + ("eig",)  # eig: 0 .. d_head - 1, largest modulus first
EIGEN_STATS = {"eig_re": EIG_DIMS, "eig_im": EIG_DIMS, "sym_fraction": HEAD_DIMS, "eig_positivity": HEAD_DIMS}


def eigen_variables(circuit: str) -> dict[str, VariableSpec]:
    """``<circuit>_eig_re``, ``_eig_im``, ``_sym_fraction``, ``_eig_positivity`` ("qk" or "ov")."""
    return {f"{circuit}_{name}": (dims, "float32", np.nan) for name, dims in EIGEN_STATS.items()}


def run_variables(matrices: tuple[str, ...]) -> dict[str, VariableSpec]:
    """Every variable a run writes at every step, dims included: the core ones and the eigen
    measures of each circuit the group's ``matrices`` hold. A run adds those a group made by
    an older spinjax lacks (NaN for the steps it finished)."""
    specs = {name: (BASE_DIMS + ((extra,) if extra else ()), dtype, fill)
             for name, (extra, dtype, fill) in VARIABLES.items()}  # fmt: skip
    specs.update(eigen_variables("qk"))
    if "W_OV" in matrices:
        specs.update(eigen_variables("ov"))
    return specs


# Optional variables (schema 1 additions), created in a group when first asked for.
NULL_VARIABLES: dict[str, VariableSpec] = {  # run --null
    **{f"{name}_z": (BASE_DIMS, "float32", np.nan) for name in SCALARS},
    "singular_values_z": (BASE_DIMS + ("sv",), "float32", np.nan),
}
PAIR_VARIABLES: dict[str, VariableSpec] = {  # run --pairs layer
    name: (("step", "layer", "head", "head2"), "float32", np.nan)
    for name in ("qk_distance", "qk_cosine", "js_head")
}
MODEL_PAIR_VARIABLES: dict[str, VariableSpec] = {  # run --pairs model
    name: (("step", "layer", "head", "layer2", "head2"), "float32", np.nan)
    for name in ("qk_distance_model", "qk_cosine_model")
}
# spinjax dynamics
NO_PREDECESSOR = -1  # mode_event of a first step (kernels.dynamics.NO_PREDECESSOR)
DYNAMICS_HIST_VARIABLES: dict[str, VariableSpec] = {
    name: (BASE_DIMS, "float32", np.nan) for name in ("kl_first", "js_first", "change_js")
}
LARGEST_CHANGE: dict[str, VariableSpec] = {"largest_change_step": (("layer", "head", "matrix"), "int64", -1)}
OVERLAP_VARIABLES: dict[str, VariableSpec] = {
    name: (("step", "layer", "head", "mode", "mode2"), "float32", np.nan)
    for name in ("overlap_left", "overlap_right")
}
EVENT_VARIABLES: dict[str, VariableSpec] = {
    "mode_event": (("step", "layer", "head", "mode"), "int8", NO_PREDECESSOR)
}


def check_group_key(key: str) -> None:
    """Refuse a model key that is not a plain group name of the store: the store's own names
    (``baseline``, ``.spinjax``, ``zarr.json``), names zarr reserves (``__``-prefixed) and any
    name that the file system or zarr would read as something else (hidden, ``.``, ``..``)."""
    reserved = (*RESERVED_GROUPS, META_DIR, "zarr.json")
    if key in reserved or key.startswith((".", "__")) or not key or "/" in key or "\\" in key:
        why = "reserved for the store's own files" if key in reserved else "not a usable group name"
        raise InputError(
            f"store group name {key!r} is {why} (names must not start with '.' or '__', nor be "
            f"one of {', '.join(reserved)}); rename the model's directory"
        )


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
