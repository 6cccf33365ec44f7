"""config.json values (spinjax.sources.config): every value spinjax reads is checked, none coerced."""

from __future__ import annotations

import json

import pytest
from conftest import NEOX

from spinjax.errors import InputError
from spinjax.sources.config import MAX_COUNT, Geometry
from spinjax.sources.hf import HFCheckpoint, read_json
from spinjax.sources.layouts import LAYOUTS, layout_for

GPT2 = {"model_type": "gpt2", "n_embd": 96, "n_layer": 2, "n_head": 6}
NEOX_CONFIG = {"model_type": "gpt_neox", "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 6}
LLAMA = {"model_type": "llama", "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 6,
         "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip


def _geometry(config: dict) -> Geometry:
    return layout_for(config, "m").geometry(config, "m")


def test_valid_configs():
    assert _geometry(GPT2) == Geometry(96, 2, 6, 6, 16)
    assert _geometry(NEOX_CONFIG) == Geometry(96, 2, 6, 6, 16)
    assert _geometry(LLAMA) == Geometry(96, 2, 6, 2, 16)
    assert _geometry({**LLAMA, "head_dim": 32}) == Geometry(96, 2, 6, 2, 32)  # not d_model / n_heads
    assert _geometry({**LLAMA, "head_dim": None, "num_key_value_heads": None}) == Geometry(96, 2, 6, 6, 16)
    # what a family without grouped-query attention implies anyway may be spelled out
    assert _geometry({**NEOX_CONFIG, "num_key_value_heads": 6, "head_dim": 16}) == Geometry(96, 2, 6, 6, 16)


BAD = [
    (GPT2, "n_layer", -1, "n_layer should be between 1 and 65536, got -1"),
    (GPT2, "n_layer", 0, "n_layer should be between 1 and 65536, got 0"),
    (GPT2, "n_layer", float("inf"), "n_layer should be an integer, got inf"),
    (GPT2, "n_layer", MAX_COUNT + 1, "n_layer should be between 1 and 65536, got 65537"),
    (GPT2, "n_embd", "96", "n_embd should be an integer, got '96'"),
    (GPT2, "n_embd", float("nan"), "n_embd should be an integer, got nan"),
    (GPT2, "n_embd", float("inf"), "n_embd should be an integer, got inf"),
    (GPT2, "n_embd", 64.9, "n_embd should be an integer, got 64.9"),
    (GPT2, "n_embd", 96.0, "n_embd should be an integer, got 96.0"),
    (GPT2, "n_head", True, "n_head should be an integer, got True"),
    (GPT2, "n_head", None, "config.json lacks n_head (gpt2 layout)"),
    (GPT2, "n_head", 5, "n_embd 96 is not divisible by n_head 5"),
    (NEOX_CONFIG, "model_type", ["gpt_neox"], "model_type should be a string, got ['gpt_neox']"),
    (NEOX_CONFIG, "model_type", {"name": "gpt_neox"}, "model_type should be a string, got {'name'"),
    (NEOX_CONFIG, "model_type", None, "config.json has no model_type"),
    (NEOX_CONFIG, "num_key_value_heads", 2, "num_key_value_heads 2: gpt_neox has no grouped-query attention"),
    (NEOX_CONFIG, "head_dim", 8, "head_dim 8: gpt_neox has no grouped-query attention (its head_dim is 16"),
    (LLAMA, "num_key_value_heads", "2", "num_key_value_heads should be an integer, got '2'"),
    (LLAMA, "num_key_value_heads", 4, "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    (LLAMA, "head_dim", [16], "head_dim should be an integer, got [16]"),
    (LLAMA, "head_dim", 0, "head_dim should be between 1 and 1048576, got 0"),
    (LLAMA, "head_dim", 128, "head_dim 128 exceeds hidden_size 96"),
    ({**LLAMA, "head_dim": None}, "num_attention_heads", 5, "not divisible by num_attention_heads 5; give"),
    (NEOX_CONFIG, "quantization_config", {"quant_method": "fp8"}, "quantization_config (fp8): a quantized"),
]


@pytest.mark.parametrize("base, key, value, message", BAD, ids=[f"{c[1]}={c[2]!r}" for c in BAD])
def test_bad_value_names_key_and_config_json(base, key, value, message):
    config = {**base, key: value}
    with pytest.raises(InputError) as info:
        _geometry(config)
    assert str(info.value).startswith("m: config.json")
    assert message in str(info.value)


def test_deeply_nested_config_json_is_input_error(tmp_path):
    """json recurses per level: 100,000 levels is a RecursionError inside json.load."""
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "gpt2", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InputError, match=rf"{path}: not valid JSON \(nested too deeply\)"):
        read_json(path)


def test_checkpoint_geometry_goes_through_the_validator(tmp_path):
    """A real checkpoint directory's layout: the same refusal, with the checkpoint's name."""
    (tmp_path / "m").mkdir()
    for f in NEOX.iterdir():
        (tmp_path / "m" / f.name).symlink_to(f)
    config = json.loads((NEOX / "config.json").read_text())
    (tmp_path / "m" / "config.json").unlink()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_attention_heads": True}))
    checkpoint = HFCheckpoint(tmp_path / "m")
    with pytest.raises(InputError, match=r"config\.json: num_attention_heads should be an integer, got True"):
        LAYOUTS["gpt_neox"].geometry(checkpoint.config, "m")
