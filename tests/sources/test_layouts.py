"""Per-head W_Q, W_K reproduce the real attention logits that transformers computed.

Fixtures (tests/fixtures/extraction, made by make_extraction_fixtures.py) hold tiny
checkpoints of each family and the pre-softmax logits transformers' own attention code
produced for an input x (biases zeroed, rotary off). Here the logits are rebuilt as
x^T W_Q^hT W_K^h x * scale from spinjax's extraction alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES_ROOT

from spinjax.errors import InputError
from spinjax.sources.hf import HFCheckpoint as Checkpoint
from spinjax.sources.layouts import LAYOUTS, layout_for

FIXTURES = FIXTURES_ROOT / "extraction"
ARCHS = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "bert"]


def _logits(wq, wk, x, scale):
    group = wq.shape[0] // wk.shape[0]
    q = np.einsum("had,td->hta", wq, x)
    k = np.einsum("had,td->hta", wk, x)
    k = k[np.arange(wq.shape[0]) // group]
    return np.einsum("hta,hsa->hts", q, k) * scale


def _load(arch):
    ckpt = Checkpoint(FIXTURES / arch)
    layout = layout_for(ckpt.config, arch)
    geometry = layout.geometry(ckpt.config, arch)
    ref = np.load(FIXTURES / arch / "logits.npz")
    return ckpt, layout, geometry, ref


@pytest.mark.parametrize("arch", ARCHS)
def test_extraction_reproduces_reference_logits(arch):
    ckpt, layout, g, ref = _load(arch)
    assert (g.n_heads, g.n_kv_heads, g.d_head) == (ref["n_heads"], ref["n_kv_heads"], ref["d_head"])
    for layer in range(g.n_layers):
        wq, wk = layout.extract(ckpt.tensor, layer, g)
        assert wq.dtype == np.float32 and wq.shape == (g.n_heads, g.d_head, g.d_model)
        assert wk.shape == (g.n_kv_heads, g.d_head, g.d_model)
        got = _logits(wq, wk, ref["x"], float(ref["scale"]))
        np.testing.assert_allclose(got, ref["logits"][layer], rtol=1e-5, atol=2e-5)


def test_wrong_splits_do_not_reproduce_logits():
    # NeoX read as three contiguous blocks instead of interleaved per head
    ckpt, layout, g, ref = _load("gpt_neox")
    fused = ckpt.tensor("gpt_neox.layers.0.attention.query_key_value.weight")[:].astype(np.float32)
    wq = fused[: g.d_model].reshape(g.n_heads, g.d_head, g.d_model)
    wk = fused[g.d_model : 2 * g.d_model].reshape(g.n_heads, g.d_head, g.d_model)
    assert not np.allclose(_logits(wq, wk, ref["x"], float(ref["scale"])), ref["logits"][0], atol=1e-2)
    # GQA keys tiled (h % n_kv) instead of repeated per block (h // group)
    ckpt, layout, g, ref = _load("llama")
    wq, wk = layout.extract(ckpt.tensor, 0, g)
    tiled = wk[np.arange(g.n_heads) % g.n_kv_heads]
    got = _logits(wq, tiled, ref["x"], float(ref["scale"]))
    assert not np.allclose(got, ref["logits"][0], atol=1e-2)


def test_sharded_checkpoint_reads_from_several_files():
    ckpt = Checkpoint(FIXTURES / "llama")
    files = {ckpt._where[ckpt._resolve(f"model.layers.0.self_attn.{p}_proj.weight")] for p in "qk"}
    assert len(files) == 2  # q_proj and k_proj live in different shards


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(InputError, match="model_type 'mamba'.*gpt_neox"):
        layout_for({"model_type": "mamba"}, "somewhere/config.json")


def test_config_inconsistent_with_tensors_names_the_tensor(tmp_path):
    import json
    import shutil

    shutil.copytree(FIXTURES / "gpt_neox", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["hidden_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint(tmp_path / "m")
    g = LAYOUTS["gpt_neox"].geometry(ckpt.config, "m")
    with pytest.raises(InputError, match="query_key_value.weight.*shape"):
        LAYOUTS["gpt_neox"].extract(ckpt.tensor, 0, g)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_each_tensor_is_opened_once_per_layer(arch):
    # An orbax param is read whole when first indexed: opening NeoX's fused query_key_value once
    # for Q and again for K read it twice (46 ms each at the 1.4B shape)
    ckpt, layout, g, ref = _load(arch)
    opened = []

    def lookup(name):
        opened.append(name)
        return ckpt.tensor(name)

    wq, wk = layout.extract(lookup, 0, g)
    assert sorted(opened) == sorted(set(opened)) and len(opened) == (1 if arch == "gpt_neox" else 2)
    np.testing.assert_allclose(
        _logits(wq, wk, ref["x"], float(ref["scale"])), ref["logits"][0], rtol=1e-5, atol=2e-5
    )
