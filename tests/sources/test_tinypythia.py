"""tiny-pythia and the JAX-native sources (orbax, Flax msgpack).

The trajectory is generated once per session into a temporary cache (about a minute on two
CPU cores). The key check: the mapping of :mod:`spinjax.jaxckpt` plus the GPT-NeoX layout
reproduce the Flax model's own attention logits from the stored weights.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from unittest import mock

import numpy as np
import pytest
from flax import serialization
from safetensors.numpy import save_file

from spinjax.errors import InputError
from spinjax.sources import tinypythia as tp
from spinjax.sources.hf import HFCheckpoint as Checkpoint
from spinjax.sources.jaxtree import MAPPING_FILE, FlaxMsgpackModel, OrbaxModel
from spinjax.sources.layouts import LAYOUTS, layout_for

QKV = "gpt_neox.layers.{}.attention.query_key_value.weight"
QKV_BIAS = "gpt_neox.layers.{}.attention.query_key_value.bias"


@pytest.fixture(scope="module")
def generated(tiny_pythia):
    return tiny_pythia


@pytest.fixture(scope="module")
def root(generated):
    return generated[1]


def test_trajectory_has_documented_steps_and_learns(generated):
    cache, root, seen = generated
    assert root == cache / "tiny-pythia-v1"
    assert list(tp.STEPS) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280]
    assert OrbaxModel(root).steps == list(tp.STEPS)
    assert [s for s, _ in seen] == list(tp.STEPS)
    config = json.loads((root / "config.json").read_text())
    assert config["model_type"] == "gpt_neox"
    assert (config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]) == (
        64, 4, 4,
    )  # fmt: skip
    losses = config["spinjax"]["eval_loss"]
    assert config["spinjax"]["steps"] == list(tp.STEPS) and len(losses) == len(tp.STEPS)
    assert losses[0] > 5.0  # ~ln(256) = 5.55 at initialisation
    assert losses[-1] < 2.5 and losses[-1] < losses[0] - 2.5
    assert losses == pytest.approx([round(v, 5) for _, v in seen], abs=1e-5)
    # Second call: returned as it is, nothing regenerated, no temporary directory left behind.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    with mock.patch.object(tp, "train", side_effect=AssertionError("tiny-pythia trained again")):
        assert tp.ensure_tiny_pythia(cache) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-pythia-v1"]


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("SPINJAX_CACHE", str(tmp_path / "sc"))
    assert tp.default_cache() == tmp_path / "sc"
    monkeypatch.delenv("SPINJAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tp.default_cache() == tmp_path / "xdg" / "spinjax"


def _zero_qkv_bias(params: dict) -> dict:
    params = copy.deepcopy(params)
    for layer in params["gpt_neox"]["layers"].values():
        bias = layer["attention"]["query_key_value"]["bias"]
        layer["attention"]["query_key_value"]["bias"] = np.zeros_like(bias)
    return params


def _scores(x, wq, wk):
    """x_t^T (W_Q^h)^T W_K^h x_s for every batch b, head h, positions t, s."""
    q, k = np.einsum("btd,hed->bhte", x, wq), np.einsum("bsd,hed->bhse", x, wk)
    return np.einsum("bhte,bhse->bhts", q, k)


@pytest.mark.parametrize("step", [0, tp.STEPS[-1]])
def test_mapped_layout_reproduces_flax_attention_logits(root, step):
    ckpt = OrbaxModel(root).checkpoint(step)
    layout = layout_for(ckpt.config, str(root))
    assert layout is LAYOUTS["gpt_neox"]
    geometry = layout.geometry(ckpt.config, str(root))
    params = _zero_qkv_bias(tp.load_params(root, step))
    x = np.random.default_rng(step).standard_normal((2, 12, tp.D_MODEL)).astype(np.float32)
    scale = 1 / math.sqrt(tp.D_HEAD)
    for layer in range(tp.N_LAYERS):
        logits = np.asarray(tp.attention_logits(params, layer, x, rotary=False), np.float64)
        wq, wk = layout.extract(ckpt.tensor, layer, geometry)
        assert wq.shape == wk.shape == (tp.N_HEADS, tp.D_HEAD, tp.D_MODEL)
        x64 = x.astype(np.float64)
        want = _scores(x64, wq, wk) * scale
        tol = 1e-5 * np.abs(want).max()
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=tol)
        # The same tensor split as three contiguous Q, K, V blocks is NOT the model's attention.
        fused = ckpt.tensor(QKV.format(layer))[:].astype(np.float64)
        bad_q, bad_k = (fused[i * 64 : (i + 1) * 64].reshape(4, 16, 64) for i in range(2))
        wrong = _scores(x64, bad_q, bad_k) * scale
        assert np.abs(wrong - logits).max() > 100 * tol
        # With rotary on, scores change, except query 0 against key 0 (rotation by angle 0).
        rotated = np.asarray(tp.attention_logits(params, layer, x, rotary=True), np.float64)
        np.testing.assert_allclose(rotated[..., 0, 0], logits[..., 0, 0], rtol=1e-4, atol=tol)
        assert np.abs(rotated - logits).max() > 100 * tol


def _hf_names():
    return [f.format(i) for i in range(tp.N_LAYERS) for f in (QKV, QKV_BIAS)]


def _copies(root, step, tmp_path):
    """The weights of one step saved as a Flax msgpack and as HF safetensors (dirs, tensors)."""
    params = tp.load_params(root, step)
    config = (root / "config.json").read_text()
    flax_dir, hf_dir = tmp_path / "flax", tmp_path / "hf"
    for d in (flax_dir, hf_dir):
        d.mkdir()
        (d / "config.json").write_text(config)
    (flax_dir / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
    tensors = {}
    for i in range(tp.N_LAYERS):
        qkv = params["gpt_neox"]["layers"][str(i)]["attention"]["query_key_value"]
        tensors[QKV.format(i)] = np.ascontiguousarray(qkv["kernel"].T)
        tensors[QKV_BIAS.format(i)] = qkv["bias"]
    save_file(tensors, str(hf_dir / "model.safetensors"))
    return flax_dir, hf_dir, tensors


def test_orbax_msgpack_safetensors_round_trip(root, tmp_path):
    step = tp.STEPS[-1]
    orbax_ckpt = OrbaxModel(root).checkpoint(step)
    assert (orbax_ckpt.step, orbax_ckpt.revision) == (step, f"step{step}")
    flax_dir, hf_dir, tensors = _copies(root, step, tmp_path)

    msgpack_model = FlaxMsgpackModel(flax_dir / "flax_model.msgpack")
    assert msgpack_model.steps == [-1]
    sources = [orbax_ckpt, msgpack_model.checkpoint(), Checkpoint(hf_dir)]
    assert FlaxMsgpackModel(flax_dir).checkpoint().tensor(QKV.format(0))[:].shape == (192, 64)
    for name in _hf_names():
        handles = [src.tensor(name) for src in sources]
        assert {(tuple(h.shape), h.dtype) for h in handles} == {(tensors[name].shape, "float32")}
        for h in handles:
            np.testing.assert_array_equal(h[:], tensors[name])
            np.testing.assert_array_equal(h[16:48], tensors[name][16:48])
    # The layout sees identical factors through all three sources.
    geometry = LAYOUTS["gpt_neox"].geometry(orbax_ckpt.config, "x")
    factors = [LAYOUTS["gpt_neox"].extract(src.tensor, 2, geometry) for src in sources]
    for wq, wk in factors[1:]:
        np.testing.assert_array_equal(wq, factors[0][0])
        np.testing.assert_array_equal(wk, factors[0][1])


def test_user_mapping_file(root, tmp_path):
    params = tp.load_params(root, 0)
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
    (tmp_path / "config.json").write_text((root / "config.json").read_text())
    name = "gpt_neox.embed_in.weight"
    with pytest.raises(InputError, match=name):
        FlaxMsgpackModel(tmp_path).checkpoint().tensor(name)
    rule = {name: {"path": "embed_in/embedding", "transpose": False}}
    (tmp_path / MAPPING_FILE).write_text(json.dumps(rule))
    got = FlaxMsgpackModel(tmp_path).checkpoint().tensor(name)[:]
    np.testing.assert_array_equal(got, params["gpt_neox"]["embed_in"]["embedding"])
    (tmp_path / MAPPING_FILE).write_text(json.dumps({name: "embed_in/embedding"}))
    with pytest.raises(InputError, match=MAPPING_FILE):
        FlaxMsgpackModel(tmp_path)


def test_errors_name_what_and_where(root, tmp_path):
    model = OrbaxModel(root)
    with pytest.raises(InputError, match=r"step 3\b.*nearest: \[1, 2, 4\]") as err:
        model.checkpoint(3)
    assert str(root) in str(err.value)
    ckpt = model.checkpoint(0)
    with pytest.raises(InputError, match=r"step 0.*'gpt_neox\.embed_in\.weight'"):
        ckpt.tensor("gpt_neox.embed_in.weight")
    # A mapped param that the checkpoint lacks.
    params = tp.load_params(root, 0)
    del params["gpt_neox"]["layers"]["1"]
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
    (tmp_path / "config.json").write_text((root / "config.json").read_text())
    with pytest.raises(InputError, match=r"layers/1/attention/query_key_value/kernel.*missing"):
        FlaxMsgpackModel(tmp_path).checkpoint().tensor(QKV.format(1))
    with pytest.raises(InputError, match="step 5"):
        FlaxMsgpackModel(tmp_path).checkpoint(5)
    with pytest.raises(InputError, match="not an orbax checkpoint directory"):
        OrbaxModel(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no finished orbax checkpoint steps"):
        OrbaxModel(tmp_path)


def test_run_on_orbax_msgpack_and_hf_directories_gives_equal_stores(root, tmp_path):
    """`spinjax run` resolves each local form and stores the same values for the same weights."""
    import zarr

    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    step = tp.STEPS[-1]
    flax_dir, hf_dir, _ = _copies(root, step, tmp_path)

    stores = {}
    for name, model, steps in (("orbax", root, str(step)), ("flax", flax_dir, "all"), ("hf", hf_dir, "all")):
        stores[name] = tmp_path / f"{name}.zarr"
        result = run(str(model), RunOptions(steps=steps, store=stores[name]))
        assert len(result.computed) == 1
    groups = {
        name: zarr.open_group(str(path), mode="r")[model.name]
        for name, path, model in (
            ("orbax", stores["orbax"], root),
            ("flax", stores["flax"], flax_dir),
            ("hf", stores["hf"], hf_dir),
        )
    }
    assert list(groups["orbax"]["revision"][:]) == [f"step{step}"]
    for var in ("std", "kurt", "entropy", "zhist", "hist", "singular_values"):
        ref = groups["hf"][var][0]
        for name in ("orbax", "flax"):
            np.testing.assert_array_equal(groups[name][var][0], ref, err_msg=f"{name} {var}")


def test_first_use_of_the_embedded_model_says_it_is_training(tiny_pythia, tmp_path, monkeypatch):
    # training takes about a minute: the command line shows it, step by step with the loss
    from click.testing import CliRunner

    from spinjax.cli import main

    _, trained, seen = tiny_pythia

    def train(destination, on_step):  # the real weights, reported as training reports them
        shutil.copytree(trained, destination)
        for step, loss in seen:
            on_step(step, loss)
        return [loss for _, loss in seen]

    monkeypatch.setattr(tp, "train", train)
    monkeypatch.setenv("SPINJAX_CACHE", str(tmp_path / "cache"))
    args = ["run", "--model", "tiny-pythia", "--steps", "0", "--store", str(tmp_path / "s.zarr")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("tiny-pythia: training the embedded model once")
    saved = [f"tiny-pythia: step {s} of 1280 saved, held-out loss {v:.3f} nats/byte" for s, v in seen]
    assert lines[1:] == saved
    quiet = CliRunner().invoke(main, [*args, "--recompute", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
