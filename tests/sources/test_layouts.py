"""Per-head W_Q, W_K reproduce the real attention logits that transformers computed.

Fixtures (tests/fixtures/extraction, made by make_extraction_fixtures.py) hold tiny
checkpoints of each family and the pre-softmax logits transformers' own attention code
produced for an input x (biases zeroed, rotary off). Here the logits are rebuilt as
x^T W_Q^hT W_K^h x * scale from spinjax's extraction alone.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings

import hostile
import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES_ROOT
from safetensors.numpy import load_file, save_file

from spinjax.errors import InputError
from spinjax.sources.hf import HFCheckpoint as Checkpoint
from spinjax.sources.hf import _SafetensorsFile
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
    shutil.copytree(FIXTURES / "gpt_neox", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["hidden_size"] = 192  # divisible by its 6 heads: consistent, but not with the tensors
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


# ---- dtypes: real floating point only, checked where every source's tensors reach a layout ----

QKV0 = "gpt_neox.layers.0.attention.query_key_value.weight"


def _neox_with(tmp_path, kind: str, qkv0: np.ndarray) -> Checkpoint:
    """The gpt_neox fixture with layer 0's fused Q/K/V replaced, as safetensors or a torch .bin."""
    tensors = load_file(str(FIXTURES / "gpt_neox" / "model.safetensors"))
    tensors[QKV0] = qkv0
    directory = tmp_path / kind
    directory.mkdir()
    shutil.copy(FIXTURES / "gpt_neox" / "config.json", directory)
    if kind == "safetensors":
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        hostile.torch_bin(directory / "pytorch_model.bin", tensors)
    return Checkpoint(directory)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", ["int64", "uint8", "bool", "complex64"])
def test_non_float_dtypes_refused_naming_tensor_and_dtype(tmp_path, kind, dtype):
    weights = load_file(str(FIXTURES / "gpt_neox" / "model.safetensors"))[QKV0]
    ckpt = _neox_with(tmp_path, kind, (weights * 8).astype(dtype))
    layout = layout_for(ckpt.config, "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complex -> float32 drops the imaginary part with a ComplexWarning
        with pytest.raises(InputError, match=rf"tensor '{QKV0}' has dtype {dtype}; .*real floating point"):
            layout.extract(ckpt.tensor, 0, layout.geometry(ckpt.config, "m"))


def test_float8_bin_is_upcast_exactly(tmp_path):
    weights = load_file(str(FIXTURES / "gpt_neox" / "model.safetensors"))[QKV0].astype(np.float32)
    f8 = (weights * 16).astype(ml_dtypes.float8_e4m3fn)  # scaled into e4m3's normal range
    layout = LAYOUTS["gpt_neox"]
    got = _neox_with(tmp_path, "bin", f8)
    same = _neox_with(tmp_path, "safetensors", f8.astype(np.float32))  # the float8 values, exactly
    assert got.tensor(QKV0).dtype == "float8_e4m3fn"
    g = layout.geometry(got.config, "m")
    for a, b in zip(layout.extract(got.tensor, 0, g), layout.extract(same.tensor, 0, g), strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    assert len(np.unique(f8.astype(np.float32))) > 100  # not a degenerate cast


def test_float8_safetensors_refused_naming_file_and_tensor(tmp_path):
    """safetensors' reader builds numpy arrays, and numpy has no float8: refused, not mangled."""
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes([0x38, 0x40, 0xB8, 0x00]))
    tensor = _SafetensorsFile(path).tensor("w")
    assert tensor.dtype == "float8_e4m3fn"
    with pytest.raises(InputError, match=rf"{path}: tensor 'w' is float8_e4m3fn, which the safetensors"):
        tensor[0:2]
