"""Where each architecture keeps its per-head W_Q and W_K (SPEC section 1, extraction table).

A layout turns ``config.json`` into the model's geometry and one layer's stored tensors into
float32 factors ``wq (n_heads, d_head, d_model)`` and ``wk (n_kv_heads, d_head, d_model)``.
It reads through :class:`Tensor` handles so that only the Q/K rows are materialised where
the storage format allows slicing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import InputError


class Tensor(Protocol):
    """A stored tensor that materialises only what is indexed (rows of its first axis)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __getitem__(self, rows: slice) -> np.ndarray: ...


@dataclass(frozen=True)
class Geometry:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int


TensorLookup = Callable[[str], Tensor]


@dataclass(frozen=True)
class Layout:
    """How one family stores attention: config keys, tensor names, per-head split."""

    architecture: str
    config_keys: tuple[str, str, str]  # d_model, n_layers, n_heads
    names: tuple[str, ...]  # stored tensors a layer needs, "{}" = layer index
    split: Callable[[list[Tensor], Geometry], tuple[np.ndarray, np.ndarray]]

    def tensor_names(self, layer: int) -> list[str]:
        return [n.format(layer) for n in self.names]

    def extract(self, tensor: TensorLookup, layer: int, g: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """Float32 ``wq (n_heads, d_head, d_model)``, ``wk (n_kv_heads, d_head, d_model)``."""
        return self.split([tensor(n) for n in self.tensor_names(layer)], g)

    def geometry(self, config: Mapping[str, Any], where: str) -> Geometry:
        try:
            d_model, n_layers, n_heads = (int(config[k]) for k in self.config_keys)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: config lacks a valid {exc} for {self.architecture}") from exc
        n_kv = int(config.get("num_key_value_heads") or n_heads)
        d_head = int(config.get("head_dim") or d_model // max(n_heads, 1))
        if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv or d_head <= 0 or d_head > d_model:
            raise InputError(
                f"{where}: inconsistent attention geometry d_model={d_model} n_heads={n_heads} "
                f"n_kv_heads={n_kv} d_head={d_head}"
            )
        return Geometry(d_model, n_layers, n_heads, n_kv, d_head)


def _expect(t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise InputError(f"tensor {t.name!r} has shape {tuple(t.shape)}, expected {shape} from config.json")


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _split_gpt2(tensors: list[Tensor], g: Geometry):
    # Conv1D stores (in, out) = (d, 3d); transposed, rows are [Q; K; V] blocks of d rows.
    (t,) = tensors
    _expect(t, (g.d_model, 3 * g.d_model))
    qk = _f32(t[:]).T[: 2 * g.d_model]
    wq = qk[: g.d_model].reshape(g.n_heads, g.d_head, g.d_model)
    wk = qk[g.d_model :].reshape(g.n_heads, g.d_head, g.d_model)
    return wq, wk


def _split_gpt_neox(tensors: list[Tensor], g: Geometry):
    # Fused rows are interleaved per head: (n_heads, [q, k, v], d_head, d). Read only each
    # head's q and k rows (2/3 of the tensor).
    (t,) = tensors
    _expect(t, (3 * g.d_model, g.d_model))
    rows = 3 * g.d_head
    heads = [_f32(t[h * rows : h * rows + 2 * g.d_head]) for h in range(g.n_heads)]
    qk = np.stack(heads).reshape(g.n_heads, 2, g.d_head, g.d_model)
    return qk[:, 0], qk[:, 1]


def _split_separate(tensors: list[Tensor], g: Geometry):
    tq, tk = tensors
    _expect(tq, (g.n_heads * g.d_head, g.d_model))
    _expect(tk, (g.n_kv_heads * g.d_head, g.d_model))
    wq = _f32(tq[:]).reshape(g.n_heads, g.d_head, g.d_model)
    wk = _f32(tk[:]).reshape(g.n_kv_heads, g.d_head, g.d_model)
    return wq, wk


_HF = ("hidden_size", "num_hidden_layers", "num_attention_heads")
_LLAMA_ATTN = "model.layers.{}.self_attn."
_BERT_ATTN = "encoder.layer.{}.attention.self."
_LLAMA_NAMES = (_LLAMA_ATTN + "q_proj.weight", _LLAMA_ATTN + "k_proj.weight")
_LLAMA = Layout("llama", _HF, _LLAMA_NAMES, _split_separate)

LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("gpt2", ("n_embd", "n_layer", "n_head"), ("h.{}.attn.c_attn.weight",), _split_gpt2),
    "gpt_neox": Layout(
        "gpt_neox", _HF, ("gpt_neox.layers.{}.attention.query_key_value.weight",), _split_gpt_neox
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "bert": Layout("bert", _HF, (_BERT_ATTN + "query.weight", _BERT_ATTN + "key.weight"), _split_separate),
}


def layout_for(config: Mapping[str, Any], where: str) -> Layout:
    """The layout for a config's ``model_type``; unknown types name the supported ones."""
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        raise InputError(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type]
