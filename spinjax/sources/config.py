"""The config.json values spinjax reads, validated in one place.

Every source kind hands its ``config.json`` to the layouts, which read the model type and the
attention geometry through :func:`model_type` and :func:`geometry` only. A value must be a JSON
integer (not a bool, a fraction or a string) within bounds, and the geometry consistent; else an
:class:`~spinjax.errors.InputError` names config.json and the key. ``null`` counts as absent,
as in ``transformers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError, shown

# Far above any model (d_model ~ 30,000, 128 heads, 200 layers), low enough that the row slices
# a layout builds per head stay small.
MAX_WIDTH = 1 << 20  # d_model, d_head
MAX_COUNT = 1 << 16  # layers, heads


@dataclass(frozen=True)
class Geometry:
    """A model's attention geometry, as config.json gives it."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int

    def attrs(self) -> dict[str, int]:
        """The five numbers by name (what a store group records)."""
        return asdict(self)


def model_type(config: Mapping[str, Any], where: str) -> str:
    """``model_type``, a string; quantized checkpoints are refused (their stored tensors are
    integers or float8 values to be scaled by other tensors, not the weights)."""
    value = config.get("model_type")
    if value is None:
        raise InputError(f"{where}: config.json has no model_type")
    if not isinstance(value, str):
        raise InputError(f"{where}: config.json: model_type should be a string, got {shown(value)}")
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise InputError(
            f"{where}: config.json: quantization_config{f' ({method})' if isinstance(method, str) else ''}: "
            "a quantized checkpoint stores scaled or packed values, not the weights; use the unquantized one"
        )
    return value


def _integer(config: Mapping[str, Any], key: str, where: str, bound: int) -> int | None:
    """``config[key]``, an integer in 1..bound; None when absent or null."""
    value = config.get(key)
    if value is None:
        return None
    if type(value) is not int:  # bool is an int subclass; 64.0 and "64" are not integers either
        raise InputError(f"{where}: config.json: {key} should be an integer, got {shown(value)}")
    if not 1 <= value <= bound:
        raise InputError(f"{where}: config.json: {key} should be between 1 and {bound}, got {value}")
    return value


def geometry(
    config: Mapping[str, Any], where: str, keys: tuple[str, str, str], architecture: str, grouped: bool
) -> Geometry:
    """The attention geometry from ``keys`` (d_model, n_layers, n_heads) and, for ``grouped``
    families (LLaMA, Mistral, Qwen2), ``num_key_value_heads`` and ``head_dim``.

    Families without grouped-query attention have ``n_heads`` K/V heads of ``d_model / n_heads``
    dimensions whatever else config.json says, so those two keys are refused there unless they
    say the same.
    """
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise InputError(f"{where}: config.json lacks {', '.join(missing)} ({architecture} layout)")
    d_model = _integer(config, keys[0], where, MAX_WIDTH)
    n_layers = _integer(config, keys[1], where, MAX_COUNT)
    n_heads = _integer(config, keys[2], where, MAX_COUNT)
    n_kv = _integer(config, "num_key_value_heads", where, MAX_COUNT)
    d_head = _integer(config, "head_dim", where, MAX_WIDTH)
    if d_head is None or not grouped:
        if d_model % n_heads:
            hint = "; give head_dim" if grouped else ""
            raise InputError(
                f"{where}: config.json: {keys[0]} {d_model} is not divisible by {keys[2]} {n_heads}{hint}"
            )
        implied = {"num_key_value_heads": n_heads, "head_dim": d_model // n_heads}
        for key, value in (("num_key_value_heads", n_kv), ("head_dim", d_head)):
            if not grouped and value is not None and value != implied[key]:
                raise InputError(
                    f"{where}: config.json: {key} {value}: {architecture} has no grouped-query "
                    f"attention (its {key} is {implied[key]}, from {keys[0]} and {keys[2]})"
                )
        d_head = implied["head_dim"]
    n_kv = n_heads if n_kv is None else n_kv
    if n_heads % n_kv:
        raise InputError(
            f"{where}: config.json: {keys[2]} {n_heads} is not a multiple of num_key_value_heads {n_kv}"
        )
    if d_head > d_model:
        raise InputError(f"{where}: config.json: head_dim {d_head} exceeds {keys[0]} {d_model}")
    return Geometry(d_model, n_layers, n_heads, n_kv, d_head)
