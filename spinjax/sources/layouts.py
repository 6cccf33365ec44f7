"""Where each architecture keeps its per-head W_Q and W_K (SPEC section 1, extraction table).

A layout turns ``config.json`` into the model's geometry and one layer's stored tensors into
float32 factors ``wq (n_heads, d_head, d_model)`` and ``wk (n_kv_heads, d_head, d_model)``:
the stored weights (variant ``raw``), with the Q/K biases as an extra column (``bias``) or with
the gain of the norm feeding attention folded in (``ln-folded``); and, for the OV circuit,
``wv`` and ``wo``. It reads through :class:`Tensor` handles so that only the needed rows are
materialised where the storage format allows slicing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from . import config as config_json
from .base import Tensor
from .config import Geometry

__all__ = ["FLOAT_DTYPES", "LAYOUTS", "VARIANTS", "Geometry", "Layout", "layout_for"]

# What a Q/K/V/O tensor or norm gain may be stored as: real floating point, converted to
# float32 (float64 rounds; float8 and the 16-bit formats convert exactly). Integers, bools
# and complex numbers are not weights spinjax can use as they are.
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64",
                "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")  # fmt: skip

TensorLookup = Callable[[str], Tensor]
RowSlices = tuple[list[slice], list[slice], list[slice]]
RowReads = dict[str, list[slice]]  # tensor name -> the row slices read of it

VARIANTS = ("raw", "ln-folded", "bias")


@dataclass(frozen=True)
class Layout:
    """How one family stores attention: config keys, tensor names, where the Q, K, V rows lie.

    Weights are addressed in the torch ``Linear`` orientation (rows = outputs = head dims,
    columns = residual stream); ``conv1d`` marks GPT-2, which stores them ``(in, out)``.
    """

    architecture: str
    config_keys: tuple[str, str, str]  # d_model, n_layers, n_heads
    qkv: tuple[str, str, str]  # tensors holding the Q, K, V rows, less ".weight"/".bias"; "{}" = layer
    rows: Callable[[Geometry], RowSlices]  # the Q, K, V row blocks within those tensors
    out: str  # output projection weight W_O
    norm: Callable[[int], str]  # gain of the norm whose output a layer's attention reads
    centred: bool  # LayerNorm (subtracts the mean), not RMSNorm
    conv1d: bool = False
    grouped: bool = False  # config's num_key_value_heads and head_dim apply (grouped-query attention)

    def geometry(self, config: Mapping[str, Any], where: str) -> Geometry:
        """The geometry config.json gives, validated (:func:`spinjax.sources.config.geometry`)."""
        return config_json.geometry(config, where, self.config_keys, self.architecture, self.grouped)

    def tensor_names(self, layer: int, variant: str = "raw", ov: bool = False) -> list[str]:
        """Every stored tensor that ``extract(..., variant)`` (and ``extract_ov`` when ``ov``) reads."""
        _check_variant(variant)
        names = [self.qkv[0] + ".weight", self.qkv[1] + ".weight"]
        if variant == "bias":
            names += [self.qkv[0] + ".bias", self.qkv[1] + ".bias"]
        if variant == "ln-folded":
            names.append(self.norm(layer))
        if ov:
            names += [self.qkv[2] + ".weight", self.out]
        return list(dict.fromkeys(n.format(layer) for n in names))

    def reads(self, layer: int, g: Geometry, variant: str = "raw", ov: bool = False) -> RowReads:
        """The rows of each stored tensor that ``extract(..., variant)`` (and ``extract_ov`` when
        ``ov``) index, by name: what a source reading by byte ranges fetches for the layer.
        GPT-2's Conv1D weights are read whole (Q, K and V lie side by side in every row)."""
        _check_variant(variant)
        slices = self.rows(g)
        out: dict[str, list[slice]] = {}
        for i in (0, 1, 2) if ov else (0, 1):
            weight = [slice(None)] if self.conv1d else slices[i]
            out.setdefault(self.qkv[i].format(layer) + ".weight", []).extend(weight)
            if variant == "bias" and i < 2:
                out.setdefault(self.qkv[i].format(layer) + ".bias", []).extend(slices[i])
        if variant == "ln-folded":
            out[self.norm(layer)] = [slice(None)]
        if ov:
            out[self.out.format(layer)] = [slice(None)]
        return out

    def extract(
        self, tensor: TensorLookup, layer: int, g: Geometry, variant: str = "raw"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Float32 ``wq (n_heads, d_head, D)``, ``wk (n_kv_heads, d_head, D)``.

        - ``raw``: the stored weights, ``D = d_model``, no biases, no norm (SPEC section 1).
        - ``bias``: ``[W | b]`` with ``D = d_model + 1``, so that ``(W_Q x + b_Q).(W_K y + b_K)
          = [x; 1]^T wq^T wk [y; 1]``. Families without Q/K biases (LLaMA, Mistral) are an error.
        - ``ln-folded``: the gain of the norm feeding attention folded in, ``W diag(gamma)``, and
          for LayerNorm centred over ``d_model`` (its output is orthogonal to the all-ones
          vector), as TransformerLens does with ``fold_ln`` and ``center_weights``; RMSNorm is not
          centred. ``q = W' n`` with ``n`` the normalised input before the gain. The norm's bias
          ``beta`` would fold into ``b_Q``/``b_K``, which these matrices exclude, so it is not
          read. BERT is post-LN: layer ``i`` reads the LayerNorm that produced its input,
          ``embeddings.LayerNorm`` for layer 0 and ``encoder.layer.{i-1}.output.LayerNorm``
          after.
        """
        _check_variant(variant)
        wq, wk = self._heads(tensor, layer, g, (0, 1), ".weight")
        if variant == "bias":
            bq, bk = self._heads(tensor, layer, g, (0, 1), ".bias")  # (heads, d_head, 1)
            wq, wk = np.concatenate([wq, bq], -1), np.concatenate([wk, bk], -1)
        elif variant == "ln-folded":
            gain = tensor(self.norm(layer))
            _check(gain, (g.d_model,))
            gamma = _f32(gain[:])
            wq, wk = wq * gamma, wk * gamma
            if self.centred:
                wq -= wq.mean(-1, keepdims=True, dtype=np.float64).astype(np.float32)
                wk -= wk.mean(-1, keepdims=True, dtype=np.float64).astype(np.float32)
        return wq, wk

    def extract_ov(self, tensor: TensorLookup, layer: int, g: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """Float32 ``wv (n_kv_heads, d_head, d_model)`` and ``wo (n_heads, d_head, d_model)``.

        ``wo[h]`` is head ``h``'s block of the output projection, transposed to
        ``(d_head, d_model)``, so that ``W_OV^h = wv[h // group]^T @ wo[h]`` maps a row vector
        ``x`` to the head's contribution ``x W_OV^h`` (TransformerLens' ``W_V @ W_O``).
        """
        (wv,) = self._heads(tensor, layer, g, (2,), ".weight")
        t = tensor(self.out.format(layer))
        inner = g.n_heads * g.d_head
        _check(t, (inner, g.d_model) if self.conv1d else (g.d_model, inner))
        wo = _f32(t[:]) if self.conv1d else _f32(t[:]).T  # (inner, d_model)
        return wv, wo.reshape(g.n_heads, g.d_head, g.d_model)

    def _heads(
        self, tensor: TensorLookup, layer: int, g: Geometry, which: tuple[int, ...], kind: str
    ) -> list[np.ndarray]:
        """Q (0), K (1), V (2) of the ``kind`` (".weight" / ".bias") tensors as (heads, d_head, -1).

        Only the wanted rows are read, except from GPT-2's (in, out) Conv1D weights."""
        slices = self.rows(g)
        full: dict[str, np.ndarray] = {}  # Conv1D: one read and transpose per tensor
        opened: dict[str, Tensor] = {}  # fused Q/K/V: one handle (an orbax param is read whole, once)
        out = []
        for i in which:
            name = self.qkv[i].format(layer) + kind
            try:
                if name not in opened:
                    opened[name] = tensor(name)
            except InputError as exc:
                if kind != ".bias":
                    raise
                raise InputError(
                    f"weight variant 'bias' needs the Q/K biases ({self.architecture} layout): {exc}"
                ) from exc
            t = opened[name]
            # rows of every projection kept in this tensor: 3 blocks when Q, K, V are fused
            n_rows = sum(s.stop - s.start for j in range(3) if self.qkv[j] == self.qkv[i] for s in slices[j])
            if kind == ".bias" or not self.conv1d:
                _check(t, (n_rows,) if kind == ".bias" else (n_rows, g.d_model))
                rows = [_f32(t[s]) for s in slices[i]]
            else:
                _check(t, (g.d_model, n_rows))
                if name not in full:
                    full[name] = _f32(t[:]).T
                rows = [full[name][s] for s in slices[i]]
            heads = g.n_heads if i == 0 else g.n_kv_heads
            out.append((rows[0] if len(rows) == 1 else np.concatenate(rows)).reshape(heads, g.d_head, -1))
        return out


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise InputError(f"unknown weight variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _check(t: Tensor, shape: tuple[int, ...]) -> None:
    """Every tensor a layout reads passes here before it is read: a real float dtype, the shape
    config.json implies."""
    if str(t.dtype) not in FLOAT_DTYPES:
        raise InputError(
            f"tensor {t.name!r} has dtype {t.dtype}; attention weights must be real floating point "
            f"({', '.join(FLOAT_DTYPES)})"
        )
    if tuple(t.shape) != shape:
        raise InputError(f"tensor {t.name!r} has shape {tuple(t.shape)}, expected {shape} from config.json")


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _rows_gpt2(g: Geometry) -> RowSlices:
    # c_attn outputs are [Q; K; V] blocks of n_heads * d_head (= d_model) rows.
    d = g.n_heads * g.d_head
    return [slice(0, d)], [slice(d, 2 * d)], [slice(2 * d, 3 * d)]


def _rows_gpt_neox(g: Geometry) -> RowSlices:
    # Fused rows are interleaved per head: (n_heads, [q, k, v], d_head), NOT three blocks.
    dh = g.d_head
    per_head = [[slice((3 * h + i) * dh, (3 * h + i + 1) * dh) for h in range(g.n_heads)] for i in range(3)]
    return per_head[0], per_head[1], per_head[2]


def _rows_separate(g: Geometry) -> RowSlices:
    kv = g.n_kv_heads * g.d_head
    return [slice(0, g.n_heads * g.d_head)], [slice(0, kv)], [slice(0, kv)]


_HF = ("hidden_size", "num_hidden_layers", "num_attention_heads")
_NEOX = "gpt_neox.layers.{}.attention."
_LLAMA_ATTN = "model.layers.{}.self_attn."
_BERT = "encoder.layer.{}."
_LLAMA = Layout(
    architecture="llama",
    config_keys=_HF,
    qkv=(_LLAMA_ATTN + "q_proj", _LLAMA_ATTN + "k_proj", _LLAMA_ATTN + "v_proj"),
    rows=_rows_separate,
    out=_LLAMA_ATTN + "o_proj.weight",
    norm=lambda i: f"model.layers.{i}.input_layernorm.weight",
    centred=False,  # RMSNorm
    grouped=True,
)

LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout(
        architecture="gpt2",
        config_keys=("n_embd", "n_layer", "n_head"),
        qkv=("h.{}.attn.c_attn",) * 3,
        rows=_rows_gpt2,
        out="h.{}.attn.c_proj.weight",
        norm=lambda i: f"h.{i}.ln_1.weight",
        centred=True,
        conv1d=True,
    ),
    "gpt_neox": Layout(
        architecture="gpt_neox",
        config_keys=_HF,
        qkv=(_NEOX + "query_key_value",) * 3,
        rows=_rows_gpt_neox,
        out=_NEOX + "dense.weight",
        norm=lambda i: f"gpt_neox.layers.{i}.input_layernorm.weight",
        centred=True,
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,  # the same names; Qwen2 also stores q_proj.bias, k_proj.bias
    "bert": Layout(
        architecture="bert",
        config_keys=_HF,
        qkv=(_BERT + "attention.self.query", _BERT + "attention.self.key", _BERT + "attention.self.value"),
        rows=_rows_separate,
        out=_BERT + "attention.output.dense.weight",
        # post-LN: the LayerNorm that produced the layer's input
        norm=lambda i: (
            f"encoder.layer.{i - 1}.output.LayerNorm.weight" if i else "embeddings.LayerNorm.weight"
        ),
        centred=True,
    ),
}


def layout_for(config: Mapping[str, Any], where: str) -> Layout:
    """The layout for a config's ``model_type``; unknown types name the supported ones."""
    model_type = config_json.model_type(config, where)
    if model_type not in LAYOUTS:
        raise InputError(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type]
