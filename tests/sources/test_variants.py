"""Weight variants (bias-augmented, layer-norm-folded) and the OV circuit, against transformers.

Fixtures (tests/fixtures/variants, made by make_variant_fixtures.py) hold tiny checkpoints
with random Q/K biases and norm gains, and what transformers' own attention code computed
on them: pre-softmax scores, probabilities and the output projection's output for an input
x, and (with zero biases) the scores of attn(norm(h)). Here each is rebuilt from spinjax's
factors alone, with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES_ROOT
from safetensors.numpy import load_file

from spinjax.errors import InputError
from spinjax.sources.hf import HFCheckpoint as Checkpoint
from spinjax.sources.layouts import VARIANTS, layout_for

FIXTURES = FIXTURES_ROOT / "variants"
ALL = ["gpt2", "gpt2_ln", "gpt_neox", "gpt_neox_ln", "qwen2", "llama", "mistral", "bert", "bert_ln"]
BIASED = ["gpt2", "gpt_neox", "qwen2", "bert"]
LN_REAL = ["gpt2_ln", "gpt_neox_ln", "bert_ln", "llama", "mistral"]  # all biases and norm biases zero

# LayerNorm (centred) or RMSNorm
CENTRED = {"gpt2": True, "gpt_neox": True, "bert": True, "llama": False, "mistral": False, "qwen2": False}


def _norm_key(family: str, layer: int) -> str:
    """The gain of the norm whose output layer ``layer``'s attention reads, by full stored key."""
    if family == "bert":  # post-LN: the LayerNorm that made the layer's input
        return (
            f"encoder.layer.{layer - 1}.output.LayerNorm.weight" if layer else "embeddings.LayerNorm.weight"
        )
    if family == "gpt2":
        return f"transformer.h.{layer}.ln_1.weight"
    if family == "gpt_neox":
        return f"gpt_neox.layers.{layer}.input_layernorm.weight"
    return f"model.layers.{layer}.input_layernorm.weight"


def _load(name: str):
    ckpt = Checkpoint(FIXTURES / name)
    layout = layout_for(ckpt.config, name)
    g = layout.geometry(ckpt.config, name)
    ref = np.load(FIXTURES / name / "ref.npz")
    assert (g.n_heads, g.n_kv_heads, g.d_head) == (ref["n_heads"], ref["n_kv_heads"], ref["d_head"])
    return ckpt, layout, g, ref


def _family(name: str) -> str:
    return name.removesuffix("_ln")


def _scores(wq, wk, xq, xk, scale, kv_of=None):
    """scale * (wq[h] xq_i) . (wk[kv_of[h]] xk_j), in float64."""
    kv_of = np.arange(wq.shape[0]) // (wq.shape[0] // wk.shape[0]) if kv_of is None else kv_of
    q = np.einsum("had,td->hta", wq.astype(np.float64), xq)
    k = np.einsum("had,td->hta", wk.astype(np.float64), xk)[kv_of]
    return np.einsum("hta,hsa->hts", q, k) * scale


def _with_one(x):
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


@pytest.mark.parametrize("name", BIASED)
def test_bias_variant_reproduces_scores_with_biases(name):
    ckpt, layout, g, ref = _load(name)
    x1, scale = _with_one(ref["x"].astype(np.float64)), float(ref["scale"])
    for layer in range(g.n_layers):
        wq, wk = layout.extract(ckpt.tensor, layer, g, variant="bias")
        assert wq.dtype == wk.dtype == np.float32
        assert wq.shape == (g.n_heads, g.d_head, g.d_model + 1) and wk.shape == (
            g.n_kv_heads,
            g.d_head,
            g.d_model + 1,
        )
        np.testing.assert_allclose(_scores(wq, wk, x1, x1, scale), ref["logits"][layer], rtol=1e-5, atol=1e-5)
        # the raw weights miss the biases' contribution, so they must not reproduce the scores
        rq, rk = layout.extract(ckpt.tensor, layer, g)
        assert np.array_equal(wq[..., :-1], rq) and np.array_equal(wk[..., :-1], rk)
        x = ref["x"].astype(np.float64)
        assert not np.allclose(_scores(rq, rk, x, x, scale), ref["logits"][layer], atol=1e-2)


@pytest.mark.parametrize("name", ALL)
def test_ln_folded_is_gain_times_weights_centred_for_layernorm(name):
    ckpt, layout, g, _ = _load(name)
    stored = load_file(FIXTURES / name / "model.safetensors")
    centred = CENTRED[_family(name)]
    for layer in range(g.n_layers):
        gamma = stored[_norm_key(_family(name), layer)].astype(np.float64)
        assert np.ptp(gamma) > 0.5  # a non-trivial gain
        for raw, got in zip(
            layout.extract(ckpt.tensor, layer, g),
            layout.extract(ckpt.tensor, layer, g, variant="ln-folded"),
            strict=True,
        ):
            want = raw.astype(np.float64) * gamma
            if centred:
                want -= want.mean(axis=-1, keepdims=True)
            assert got.dtype == np.float32 and got.shape == raw.shape
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _normalised(h, eps, centred):
    h = h.astype(np.float64)
    if centred:  # LayerNorm before its gain and bias
        h = h - h.mean(-1, keepdims=True)
        return h / np.sqrt((h**2).mean(-1, keepdims=True) + eps)
    return h / np.sqrt((h**2).mean(-1, keepdims=True) + eps)  # RMSNorm before its gain


@pytest.mark.parametrize("name", LN_REAL)
def test_ln_folded_reproduces_scores_of_the_normalised_input(name):
    ckpt, layout, g, ref = _load(name)
    centred = CENTRED[_family(name)]
    scale = float(ref["scale"])
    for layer in range(g.n_layers):
        n = _normalised(ref["h"][layer], float(ref["eps"]), centred)
        wq, wk = layout.extract(ckpt.tensor, layer, g, variant="ln-folded")
        np.testing.assert_allclose(
            _scores(wq, wk, n, n, scale), ref["ln_logits"][layer], rtol=1e-5, atol=1e-5
        )
        rq, rk = layout.extract(ckpt.tensor, layer, g)  # without the gain: wrong
        assert not np.allclose(_scores(rq, rk, n, n, scale), ref["ln_logits"][layer], atol=1e-2)


def _w_ov(wv, wo, kv_of):
    return np.einsum("had,hae->hde", wv.astype(np.float64)[kv_of], wo.astype(np.float64))


@pytest.mark.parametrize("name", ALL)
def test_ov_circuit_reproduces_attention_output(name):
    ckpt, layout, g, ref = _load(name)
    x = ref["x"].astype(np.float64)
    repeat = np.arange(g.n_heads) // (g.n_heads // g.n_kv_heads)
    for layer in range(g.n_layers):
        wv, wo = layout.extract_ov(ckpt.tensor, layer, g)
        assert wv.dtype == wo.dtype == np.float32
        assert wv.shape == (g.n_kv_heads, g.d_head, g.d_model) and wo.shape == (
            g.n_heads,
            g.d_head,
            g.d_model,
        )
        probs = ref["probs"][layer].astype(np.float64)
        got = np.einsum("hts,sd,hde->te", probs, x, _w_ov(wv, wo, repeat))  # sum_h A^h x W_OV^h
        np.testing.assert_allclose(got, ref["attn_out"][layer], rtol=1e-5, atol=1e-5)
        if g.n_kv_heads < g.n_heads:  # GQA: value heads repeated per block, not tiled
            tiled = np.einsum("hts,sd,hde->te", probs, x, _w_ov(wv, wo, np.arange(g.n_heads) % g.n_kv_heads))
            assert not np.allclose(tiled, ref["attn_out"][layer], atol=1e-2)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("variant", VARIANTS)
def test_tensor_names_are_exactly_what_extraction_reads(name, variant):
    ckpt, layout, g, _ = _load(name)
    if variant == "bias" and name not in BIASED:
        return
    read: set[str] = set()

    def lookup(n: str):
        read.add(n)
        return ckpt.tensor(n)

    for layer in range(g.n_layers):
        read.clear()
        layout.extract(lookup, layer, g, variant)
        assert read == set(layout.tensor_names(layer, variant))
        layout.extract_ov(lookup, layer, g)
        assert read == set(layout.tensor_names(layer, variant, ov=True))
        for n in read:
            ckpt.tensor(n)  # each name resolves in the checkpoint


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2_ln"])
def test_bias_variant_needs_qk_biases(name, tmp_path):
    ckpt, layout, g, _ = _load(name)
    if name == "gpt2_ln":  # a GPT-2 checkpoint written without its biases
        stored = load_file(FIXTURES / name / "model.safetensors")
        from safetensors.numpy import save_file

        (tmp_path / "m").mkdir()
        save_file(
            {k: v for k, v in stored.items() if not k.endswith("bias")}, tmp_path / "m" / "model.safetensors"
        )
        (tmp_path / "m" / "config.json").write_text((FIXTURES / name / "config.json").read_text())
        ckpt = Checkpoint(tmp_path / "m")
    with pytest.raises(InputError, match=r"bias.*Q/K biases.*(q_proj|c_attn)\.bias"):
        layout.extract(ckpt.tensor, 0, g, variant="bias")


class _Wrong:
    """A tensor handle with the right name and a wrong shape."""

    def __init__(self, name: str, shape: tuple[int, ...]):
        self.name, self.shape, self.dtype = name, shape, "float32"

    def __getitem__(self, rows):
        return np.zeros(self.shape, np.float32)[rows]


@pytest.mark.parametrize(
    ("name", "bad", "call"),
    [
        ("llama", "self_attn.o_proj.weight", "ov"),
        ("llama", "self_attn.v_proj.weight", "ov"),
        ("gpt2", "attn.c_proj.weight", "ov"),
        ("bert", "attention.output.dense.weight", "ov"),
        ("llama", "input_layernorm.weight", "ln-folded"),
        ("qwen2", "self_attn.k_proj.bias", "bias"),
        ("gpt_neox", "attention.query_key_value.bias", "bias"),
    ],
)
def test_wrong_shape_names_the_tensor(name, bad, call):
    ckpt, layout, g, _ = _load(name)

    def lookup(n: str):
        t = ckpt.tensor(n)
        return _Wrong(t.name, (t.shape[0] + 1, *t.shape[1:])) if n.endswith(bad) else t

    with pytest.raises(InputError, match=rf"{bad.replace('.', '[.]')}' has shape .*expected"):
        if call == "ov":
            layout.extract_ov(lookup, 0, g)
        else:
            layout.extract(lookup, 0, g, variant=call)


def test_unknown_variant_lists_the_variants():
    ckpt, layout, g, _ = _load("llama")
    with pytest.raises(InputError, match="'folded'.*raw, ln-folded, bias"):
        layout.extract(ckpt.tensor, 0, g, variant="folded")
    with pytest.raises(InputError, match="'folded'.*raw, ln-folded, bias"):
        layout.tensor_names(0, "folded")
