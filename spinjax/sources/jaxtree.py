"""JAX-native checkpoint sources: orbax CheckpointManager directories and Flax msgpack files.

Both hand out :class:`TreeCheckpoint` objects, which implement the
:class:`~spinjax.sources.base.Checkpoint` protocol, so the layouts read them unchanged. A params
pytree is flattened to ``/``-joined paths (``gpt_neox/layers/0/attention/query_key_value/kernel``)
and the Hugging Face tensor names that the layouts ask for are translated to those paths by a
small mapping:

``{"<HF name pattern>": {"path": "<param path pattern>", "transpose": <bool>}}``

``{i}`` stands for a layer number in both patterns. ``transpose`` is true for kernels stored
``(in, out)`` (``flax.linen.Dense``), which become the torch ``(out, in)`` layout. A param
path matches exactly or as a ``/``-separated suffix, so wrapper prefixes (``gpt_neox/``,
``model/``, ``params/`` of a train state) need not be spelled. :data:`DEFAULT_MAPPING`
covers tiny-pythia and Hugging Face's Flax models of the supported families; a
``spinjax_mapping.json`` of the same format beside ``config.json`` adds to it (and wins).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization
from orbax.checkpoint import utils as ocp_utils

from ..errors import InputError, nearest
from .base import FetchOptions, Source, TensorInfo
from .hf import read_json

MAPPING_FILE = "spinjax_mapping.json"


def _rule(path: str, transpose: bool = True) -> dict[str, Any]:
    return {"path": path, "transpose": transpose}


DEFAULT_MAPPING: dict[str, dict[str, Any]] = {
    # GPT-NeoX / Pythia, tiny-pythia: fused interleaved qkv, linen Dense kernel (d, 3d).
    "gpt_neox.layers.{i}.attention.query_key_value.weight":
        _rule("layers/{i}/attention/query_key_value/kernel"),
    "gpt_neox.layers.{i}.attention.query_key_value.bias":
        _rule("layers/{i}/attention/query_key_value/bias", False),
    # for --variant ln-folded and --ov: the attention norm's gain (linen LayerNorm `scale`), W_O
    "gpt_neox.layers.{i}.input_layernorm.weight": _rule("layers/{i}/input_layernorm/scale", False),
    "gpt_neox.layers.{i}.attention.dense.weight": _rule("layers/{i}/attention/dense/kernel"),
    # GPT-2: HF's FlaxConv1D stores (out, in) = (3d, d); the layout wants Conv1D's (d, 3d).
    "h.{i}.attn.c_attn.weight": _rule("h/{i}/attn/c_attn/kernel"),
    # LLaMA / Mistral / Qwen2 and BERT: linen Dense kernels (in, out).
    "model.layers.{i}.self_attn.q_proj.weight": _rule("layers/{i}/self_attn/q_proj/kernel"),
    "model.layers.{i}.self_attn.k_proj.weight": _rule("layers/{i}/self_attn/k_proj/kernel"),
    "encoder.layer.{i}.attention.self.query.weight":
        _rule("encoder/layer/{i}/attention/self/query/kernel"),
    "encoder.layer.{i}.attention.self.key.weight":
        _rule("encoder/layer/{i}/attention/self/key/kernel"),
    # learned position embeddings (`spinjax embeddings`): linen Embed tables (positions, d)
    "wpe.weight": _rule("wpe/embedding", False),
    "embeddings.position_embeddings.weight": _rule("embeddings/position_embeddings/embedding", False),
}  # fmt: skip


def load_mapping(root: Path) -> dict[str, dict[str, Any]]:
    """:data:`DEFAULT_MAPPING` updated with ``root/spinjax_mapping.json`` when present."""
    mapping = dict(DEFAULT_MAPPING)
    path = root / MAPPING_FILE
    if path.exists():
        for name, rule in read_json(path).items():
            ok = isinstance(rule, dict) and isinstance(rule.get("path"), str)
            if not ok or not isinstance(rule.get("transpose", False), bool):
                raise InputError(f'{path}: entry {name!r} must be {{"path": str, "transpose": bool}}')
            mapping[name] = {"path": rule["path"], "transpose": rule.get("transpose", False)}
    return mapping


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))


def _flatten(tree) -> dict[str, tuple[tuple, Any]]:
    """{"a/b/c": (jax key path, leaf)} for every leaf of a pytree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key(k) for k in path): (path, leaf) for path, leaf in flat}


class TreeTensor:
    """A mapped param as a torch-layout tensor; reads (and transposes) on first index."""

    def __init__(self, name: str, shape, dtype, load: Callable[[], np.ndarray], transpose: bool):
        self.name, self._load, self._transpose = name, load, transpose
        self.shape = tuple(shape)[::-1] if transpose else tuple(shape)
        self.dtype = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
        self._array: np.ndarray | None = None

    def __getitem__(self, rows: slice) -> np.ndarray:
        if self._array is None:
            a = np.asarray(self._load())
            self._array = a.T if self._transpose else a
        return self._array[rows]


class TreeCheckpoint:
    """One params pytree seen through a mapping, as a :class:`~spinjax.sources.base.Checkpoint`."""

    def __init__(self, where: str, step: int, revision: str, config: dict, mapping: dict,
                 leaves: dict[str, Any], load: Callable[[str], np.ndarray]):  # fmt: skip
        self.label, self.step, self.revision, self.config = where, step, revision, config
        self.param_paths = sorted(leaves)
        self._mapping, self._leaves, self._load = mapping, leaves, load

    def prefetch(self, reads: Mapping[str, Sequence[slice]]) -> None:
        pass  # local files: read when indexed

    def release(self) -> None:
        pass  # local files only

    def tensor_infos(self) -> list[TensorInfo]:
        """Every param of the tree by its ``/``-joined path, from orbax's metadata (or the
        msgpack file's arrays), as stored (flax kernels ``(in, out)``)."""
        def info(path: str, leaf) -> TensorInfo:
            dtype = np.dtype(getattr(leaf, "dtype", "float32"))
            return TensorInfo(path, tuple(getattr(leaf, "shape", ())), str(dtype))

        return [info(path, leaf) for path, leaf in sorted(self._leaves.items())]

    def _rule(self, name: str) -> tuple[str, bool]:
        for pattern, rule in self._mapping.items():
            regex = re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)")
            m = re.fullmatch(regex, name)
            if m:
                path = rule["path"].replace("{i}", m.groupdict().get("i") or "")
                return path, bool(rule.get("transpose", False))
        raise InputError(
            f"{self.label} (step {self.step}): no mapping for tensor {name!r}; add it to {MAPPING_FILE} "
            f'as {{"{name}": {{"path": "<param/path>", "transpose": true|false}}}}'
        )

    def tensor(self, name: str) -> TreeTensor:
        """The param that ``name`` maps to, in the torch (out, in) orientation."""
        path, transpose = self._rule(name)
        hits = [path] if path in self._leaves else [p for p in self._leaves if p.endswith("/" + path)]
        if len(hits) != 1:
            what = "is ambiguous" if hits else "is missing"
            raise InputError(
                f"{self.label} (step {self.step}): param {path!r} for tensor {name!r} {what}"
                + (f": {hits}" if hits else "")
            )
        leaf = self._leaves[hits[0]]  # an array or orbax's metadata of one
        shape, dtype = getattr(leaf, "shape", ()), getattr(leaf, "dtype", "float32")
        return TreeTensor(name, shape, dtype, lambda: self._load(hits[0]), transpose)


class OrbaxModel:
    """A directory written by ``orbax.checkpoint.CheckpointManager`` plus ``config.json``.

    Steps are the numbered step directories; each holds the params pytree either directly
    or as an item (``default`` for ``StandardSave``, else ``params`` or the only item).
    Params are restored one at a time as numpy arrays on the host.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser().absolute()  # orbax takes absolute paths only
        if not self.directory.is_dir():
            raise InputError(f"{self.directory}: not an orbax checkpoint directory")
        self.config = read_json(self.directory / "config.json")
        self.mapping = load_mapping(self.directory)
        self._paths = {
            ocp_utils.step_from_checkpoint_name(p.name): Path(p)
            for p in ocp_utils.checkpoint_steps_paths(self.directory)
        }
        if not self._paths:
            raise InputError(f"{self.directory}: no finished orbax checkpoint steps found")

    @property
    def steps(self) -> list[int]:
        return sorted(self._paths)

    def _item_dir(self, step_dir: Path) -> Path:
        if (step_dir / "_METADATA").exists():
            return step_dir
        items = sorted(d.name for d in step_dir.iterdir() if (d / "_METADATA").exists())
        for name in ("default", "params"):
            if name in items:
                return step_dir / name
        if len(items) == 1:
            return step_dir / items[0]
        raise InputError(f"{step_dir}: cannot tell which orbax item holds the params: {items}")

    def checkpoint(self, step: int) -> TreeCheckpoint:
        if step not in self._paths:
            raise InputError(
                f"{self.directory}: no checkpoint for step {step}; nearest: {nearest(step, self._paths)}"
            )
        item = epath.Path(self._item_dir(self._paths[step]))
        handler = ocp.PyTreeCheckpointHandler()
        metadata = handler.metadata(item)
        tree = getattr(metadata, "tree", metadata)
        flat = _flatten(tree)

        def load(path: str) -> np.ndarray:
            key_path = flat[path][0]
            as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
            if all(isinstance(k, jax.tree_util.DictKey) for k in key_path):
                sub, args = as_numpy, as_numpy  # nested dicts holding just this leaf
                for k in reversed(key_path):
                    sub, args = {k.key: sub}, {k.key: args}
                restore = ocp.args.PyTreeRestore(item=sub, restore_args=args, partial_restore=True)
            else:
                args = jax.tree.map(lambda _: as_numpy, tree)
                restore = ocp.args.PyTreeRestore(restore_args=args)
            out = handler.restore(item, args=restore)
            for k in key_path:
                out = out[getattr(k, "key", getattr(k, "idx", None))]
            return out

        leaves = {p: leaf for p, (_, leaf) in flat.items()}
        return TreeCheckpoint(str(item), step, f"step{step}", self.config, self.mapping, leaves, load)


class FlaxMsgpackModel:
    """A Flax ``flax.serialization`` msgpack file (``flax_model.msgpack``) with config.json beside.

    One checkpoint with step -1 (no step notion); the revision is the file path.
    """

    FILENAME = "flax_model.msgpack"

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser().absolute()
        self.file = path / self.FILENAME if path.is_dir() else path
        if not self.file.is_file():
            raise InputError(f"{path}: no Flax msgpack file ({self.FILENAME}) found")
        self.directory = self.file.parent
        self.config = read_json(self.directory / "config.json")
        self.mapping = load_mapping(self.directory)
        self.steps = [-1]
        self._tree = None

    def checkpoint(self, step: int = -1) -> TreeCheckpoint:
        if step != -1:
            raise InputError(f"{self.file}: a single checkpoint (step -1), no step {step}")
        if self._tree is None:
            try:
                self._tree = serialization.msgpack_restore(self.file.read_bytes())
            except Exception as exc:  # msgpack raises several unrelated error types
                raise InputError(f"{self.file}: not a readable Flax msgpack file ({exc})") from exc
        leaves = {p: np.asarray(v) for p, (_, v) in _flatten(self._tree).items()}
        return TreeCheckpoint(str(self.file), -1, str(self.file), self.config, self.mapping,
                              leaves, leaves.__getitem__)  # fmt: skip


def _group_key(path: Path) -> str:
    """A local checkpoint's store group: its directory's name."""
    return path.resolve().name


class FlaxMsgpackKind:
    """A ``flax_model.msgpack`` file, or a directory holding one, with config.json beside it."""

    name = "flax msgpack"

    def can_open(self, model: str) -> bool:
        path = Path(model).expanduser()
        return (path.is_file() and path.suffix == ".msgpack") or (path / FlaxMsgpackModel.FILENAME).is_file()

    def open(self, model: str, fetch: FetchOptions | None = None) -> Source:
        path = Path(model).expanduser()
        flax_model = FlaxMsgpackModel(path)
        resolved = str(path.resolve())
        return Source(key=_group_key(path), source=resolved, offered=((-1, resolved),),
                      open=lambda step, revision: flax_model.checkpoint(step))  # fmt: skip


class OrbaxKind:
    """An orbax ``CheckpointManager`` directory (numbered step folders) with config.json."""

    name = "orbax"

    def can_open(self, model: str) -> bool:
        path = Path(model).expanduser()
        return path.is_dir() and any(p.name.isdigit() and p.is_dir() for p in path.iterdir())

    def open(self, model: str, fetch: FetchOptions | None = None) -> Source:
        path = Path(model).expanduser()
        orbax_model = OrbaxModel(path)
        return Source(key=_group_key(path), source=str(path.resolve()),
                      offered=tuple((s, f"step{s}") for s in orbax_model.steps),
                      open=lambda step, revision: orbax_model.checkpoint(step))  # fmt: skip
