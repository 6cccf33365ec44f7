"""A checkpoint's every tensor at a glance (``spinjax inventory``), from headers and metadata only.

Each tensor gets a category from its name (the families' naming: Hugging Face names and flax
param paths alike), and parameters are counted per category and in total. Tied weights are
counted once: tensors a ``.bin`` stores on the same bytes, and an output head that the config
ties to the token embedding, whether the checkpoint stores it again or (as safetensors does)
leaves it out; ``parameters_with_tied`` counts them again. Buffers a checkpoint may hold (GPT-2's
causal masks ``attn.bias``, rotary ``inv_freq``, BERT's ``position_ids``) are listed, not counted
as parameters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from math import prod
from typing import Any

from ..errors import InputError
from .base import Checkpoint, TensorInfo

CATEGORIES = (
    "embedding", "position_embedding", "attention_qkv", "attention_out", "mlp", "norm", "output_head",
    "other", "buffer",
)  # fmt: skip
"""In the order tables list them; ``buffer`` holds no parameters."""

# First match wins, on the name with "/" (flax paths) read as "." and case ignored.
_RULES = (
    ("buffer", r"(^|\.)(attn\.(bias|masked_bias)|masked_bias|inv_freq|position_ids)$"),
    ("norm", r"(^|\.)(ln_\d+|ln_f|\w*layer_?norm\w*|\w*norm)(\.|$)"),
    ("position_embedding", r"(^|\.)(wpe|position_embeddings|embed_positions)(\.|$)"),
    ("output_head", r"(^|\.)(lm_head|embed_out|cls\.predictions\.decoder)(\.|$)"),
    ("embedding", r"(^|\.)(wte|embed_in|embed_tokens|word_embeddings|token_type_embeddings)(\.|$)"),
    ("attention_out", r"(^|\.)(attn\.c_proj|attention\.dense|o_proj|attention\.output\.dense)(\.|$)"),
    ("attention_qkv", r"(^|\.)(c_attn|query_key_value|[qkv]_proj|query|key|value)(\.|$)"),
    ("mlp", r"(^|\.)(mlp|dense_h_to_4h|dense_4h_to_h|intermediate|output\.dense|c_fc)(\.|$)"),
)
_COMPILED = tuple((category, re.compile(rule, re.IGNORECASE)) for category, rule in _RULES)
_TOKEN_EMBEDDING = re.compile(r"(^|\.)(wte|embed_in|embed_tokens|word_embeddings)(\.|$)", re.IGNORECASE)
# transformers' default of `tie_word_embeddings` where a family's config does not say
_TIED_BY_DEFAULT = {"gpt2": True, "bert": True, "gpt_neox": False, "llama": False, "mistral": False,
                    "qwen2": False}  # fmt: skip
_HEADED = ("LMHeadModel", "ForCausalLM", "ForMaskedLM", "ForPreTraining", "WithLMHead")
_CAUSAL_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2")
# learned absolute position embeddings, by family; rotary families have none
POSITION_TENSORS = {"gpt2": "wpe.weight", "bert": "embeddings.position_embeddings.weight"}
ROTARY_FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2")


def category(name: str) -> str:
    """The category of a tensor name (one of :data:`CATEGORIES`).

    Examples:
      >>> from spinjax.sources.inventory import category
      >>> [category(n) for n in ("transformer.h.0.attn.c_attn.weight", "h.3.attn.c_proj.bias",
      ...                        "h.3.mlp.c_proj.weight", "transformer.wpe.weight", "h.0.attn.bias",
      ...                        "encoder.layer.1.attention.output.LayerNorm.weight",
      ...                        "gpt_neox/layers/0/input_layernorm/scale", "embed_out/kernel")]
      ['attention_qkv', 'attention_out', 'mlp', 'position_embedding', 'buffer', 'norm', 'norm', 'output_head']
    """
    plain = name.replace("/", ".")
    for found, rule in _COMPILED:
        if rule.search(plain):
            return found
    return "other"


@dataclass(frozen=True)
class Entry:
    """One tensor of the inventory; ``stored`` False for a tied output head the checkpoint
    leaves out, ``tied_to`` the tensor whose parameters it shares (then not counted again)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    category: str
    tied_to: str | None = None
    stored: bool = True

    @property
    def size(self) -> int:
        return prod(self.shape)


@dataclass
class Inventory:
    """A checkpoint's tensors, with counts per category and in total."""

    model: str
    where: str
    architecture: str | None
    entries: list[Entry]

    @property
    def parameters(self) -> int:
        """Unique parameters: every stored non-buffer tensor, tied ones once."""
        return sum(e.size for e in self.entries if e.category != "buffer" and e.tied_to is None)

    @property
    def parameters_with_tied(self) -> int:
        """Parameters with every tied tensor counted again (the output head of GPT-2)."""
        return sum(e.size for e in self.entries if e.category != "buffer")

    @property
    def stored_elements(self) -> int:
        """Elements of every tensor stored in the checkpoint (buffers included)."""
        return sum(e.size for e in self.entries if e.stored)

    def per_category(self) -> dict[str, dict[str, int]]:
        """category -> tensors, parameters (unique) and parameters with tied ones again."""
        out = {}
        for cat in CATEGORIES:
            held = [e for e in self.entries if e.category == cat]
            if held:
                out[cat] = {
                    "tensors": len(held),
                    "parameters": sum(e.size for e in held if e.tied_to is None),
                    "parameters_with_tied": sum(e.size for e in held),
                }
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "where": self.where,
            "architecture": self.architecture,
            "parameters": self.parameters,
            "parameters_with_tied": self.parameters_with_tied,
            "stored_elements": self.stored_elements,
            "categories": self.per_category(),
            "tensors": [{**asdict(e), "shape": list(e.shape), "parameters": e.size} for e in self.entries],
        }


def _ties_output_head(config: Mapping[str, Any]) -> bool:
    """Whether the model has an output head and the config ties it to the token embedding."""
    model_type = config.get("model_type")
    tied = config.get("tie_word_embeddings", _TIED_BY_DEFAULT.get(model_type, True))
    architectures = config.get("architectures") or []
    if architectures:
        return bool(tied) and any(a.endswith(_HEADED) for a in architectures)
    return bool(tied) and model_type in _CAUSAL_FAMILIES


def build(infos: list[TensorInfo], config: Mapping[str, Any], *, model: str, where: str) -> Inventory:
    """The inventory of a checkpoint's tensors (see the module's docstring for the ties)."""
    entries: list[Entry] = []
    first_on: dict[str, str] = {}  # storage -> the first tensor stored there
    for info in infos:
        tied = first_on.setdefault(info.storage, info.name) if info.storage else info.name
        entries.append(Entry(info.name, tuple(info.shape), info.dtype, category(info.name),
                             tied_to=None if tied == info.name else tied))  # fmt: skip
    if _ties_output_head(config):
        embedding = next((e for e in entries if _TOKEN_EMBEDDING.search(e.name.replace("/", "."))), None)
        heads = [i for i, e in enumerate(entries) if e.category == "output_head" and e.tied_to is None]
        if embedding is not None and heads:
            for i in heads:  # stored again although tied: the same parameters
                if sorted(entries[i].shape) == sorted(embedding.shape):
                    entries[i] = Entry(**{**asdict(entries[i]), "tied_to": embedding.name})
        elif embedding is not None and not any(e.category == "output_head" for e in entries):
            bert = config.get("model_type") == "bert"
            name = "cls.predictions.decoder.weight" if bert else "lm_head.weight"
            entries.append(Entry(name, embedding.shape, embedding.dtype, "output_head",
                                 tied_to=embedding.name, stored=False))  # fmt: skip
    return Inventory(model, where, config.get("model_type"), entries)


def checkpoint_inventory(checkpoint: Checkpoint, model: str) -> Inventory:
    """The inventory of an opened checkpoint, from its headers and metadata only."""
    return build(checkpoint.tensor_infos(), checkpoint.config, model=model, where=checkpoint.label)


def position_tensor(config: Mapping[str, Any], where: str) -> str:
    """The name of a family's learned absolute position embedding; InputError naming why not.

    Examples:
      >>> from spinjax.sources.inventory import position_tensor
      >>> position_tensor({"model_type": "gpt2"}, "gpt2")
      'wpe.weight'
    """
    model_type = config.get("model_type")
    if model_type in POSITION_TENSORS:
        return POSITION_TENSORS[model_type]
    if model_type in ROTARY_FAMILIES or any(k.startswith(("rotary", "rope")) for k in config):
        raise InputError(
            f"{where}: {model_type} uses rotary position embeddings (a rotation of queries and keys "
            "inside attention, by position): there is no learned position matrix to show"
        )
    raise InputError(
        f"{where}: no learned absolute position embeddings known for model_type {model_type!r} "
        f"(known: {', '.join(POSITION_TENSORS)})"
    )
