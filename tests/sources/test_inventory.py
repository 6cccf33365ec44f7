"""`spinjax inventory`: every tensor of a checkpoint from its headers, categories, totals, ties;
`spinjax embeddings`: the numbers and figures of learned position embeddings."""

from __future__ import annotations

import json
import struct

import numpy as np
import orbax.checkpoint as ocp
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, FIXTURES_ROOT
from flax import serialization
from huggingface_hub import constants
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata
from huggingface_hub.utils import TensorInfo as HubTensorInfo
from safetensors import safe_open
from safetensors.numpy import load_file

import spinjax.sources.hub
from spinjax.cli import main
from spinjax.sources import resolve
from spinjax.sources.base import TensorInfo
from spinjax.sources.inventory import build, category, checkpoint_inventory
from spinjax.sources.torchbin import TorchBinFile

ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "bert")


def _inventory(path):
    source = resolve(str(path))
    step, revision = source.offered[-1]
    return checkpoint_inventory(source.open(step, revision), source.key)


def _numpy_tensors(directory) -> dict[str, np.ndarray]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for f in sorted(directory.glob("*.bin")):
        with TorchBinFile(f) as t:
            tensors.update({k: t.get(k) for k in t.keys()})
    return tensors


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_fixture_tensor_is_listed_and_counted(arch):
    inv = _inventory(FIXTURES / arch)
    arrays = _numpy_tensors(FIXTURES / arch)
    stored = {e.name: e for e in inv.entries if e.stored}
    assert set(stored) == set(arrays)
    for name, a in arrays.items():
        assert stored[name].shape == a.shape and stored[name].dtype == str(a.dtype), name
    assert inv.stored_elements == sum(a.size for a in arrays.values())
    assert inv.parameters == sum(a.size for a in arrays.values())  # no buffers, nothing stored twice
    assert sum(c["parameters"] for c in inv.per_category().values()) == inv.parameters
    assert "other" not in inv.per_category()  # every tensor of these families has its category
    qk = {
        "gpt2": "h.0.attn.c_attn.weight", "gpt_neox": "layers.0.attention.query_key_value.weight",
        "bert": "layer.0.attention.self.key.weight",
    }.get(arch, "layers.0.self_attn.k_proj.weight")  # fmt: skip
    assert all(e.category == "attention_qkv" for e in inv.entries if e.name.endswith(qk))


def test_gpt2_fixture_counts_its_tied_output_head_once():
    inv = _inventory(FIXTURES / "gpt2")
    (head,) = [e for e in inv.entries if e.category == "output_head"]
    assert (head.name, head.stored, head.tied_to) == ("lm_head.weight", False, "transformer.wte.weight")
    assert inv.parameters_with_tied - inv.parameters == 50 * 96  # vocab x d_model, once more
    heads = inv.per_category()["output_head"]
    assert heads == {"tensors": 1, "parameters": 0, "parameters_with_tied": 50 * 96}


def _gpt2_header_only(path, config: dict) -> None:
    """A GPT-2-shaped model.safetensors whose data is a hole (a sparse file: nothing written but
    the header), with the causal-mask buffers ``h.{i}.attn.bias`` the hub's file holds."""
    d, n_pos, vocab = config["n_embd"], config["n_positions"], config["vocab_size"]
    inner = 4 * d
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (n_pos, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(config["n_layer"]):
        shapes.update({
            f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
            f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
            f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
            f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
            f"h.{i}.mlp.c_fc.weight": (d, inner), f"h.{i}.mlp.c_fc.bias": (inner,),
            f"h.{i}.mlp.c_proj.weight": (inner, d), f"h.{i}.mlp.c_proj.bias": (d,),
            f"h.{i}.attn.bias": (1, 1, n_pos, n_pos),
        })  # fmt: skip
    header, offset = {}, 0
    for name, shape in shapes.items():
        dtype, size = ("BOOL", 1) if name.endswith("attn.bias") else ("F16", 2)
        end = offset + size * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)


def test_a_gpt2_shaped_checkpoint_has_gpt2s_parameter_counts(tmp_path):
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257,
              "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    _gpt2_header_only(tmp_path / "model.safetensors", config)
    assert (tmp_path / "model.safetensors").stat().st_blocks * 512 < 1 << 20  # nothing but the header
    inv = _inventory(tmp_path)
    assert inv.parameters == 124_439_808
    assert inv.parameters_with_tied == 163_037_184
    cats = inv.per_category()
    assert cats["buffer"]["tensors"] == 12 and cats["embedding"]["parameters"] == 50257 * 768
    assert cats["attention_qkv"]["parameters"] == 12 * (768 * 2304 + 2304)
    assert cats["attention_out"]["parameters"] == 12 * (768 * 768 + 768)
    out = CliRunner().invoke(main, ["inventory", str(tmp_path), "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert (data["parameters"], data["parameters_with_tied"]) == (124_439_808, 163_037_184)
    text = CliRunner().invoke(main, ["inventory", str(tmp_path)]).stdout
    assert "124,439,808 unique; 163,037,184 with tied weights counted again" in text
    assert "lm_head.weight" in text and "tied to wte.weight (not stored)" in text


def test_torch_bin_checkpoints_list_from_the_pickle_alone():
    for directory in ("neox", "neox_sharded"):
        path = FIXTURES_ROOT / "torchbin" / directory
        inv = _inventory(path)
        arrays = _numpy_tensors(path)
        assert {e.name for e in inv.entries} == set(arrays)
        assert inv.parameters == inv.stored_elements == sum(a.size for a in arrays.values())
        assert {e.category for e in inv.entries if "lm_head" in e.name} == {"output_head"}


def test_tensors_on_the_same_bytes_are_counted_once():
    infos = [
        TensorInfo("transformer.wte.weight", (10, 4), "float16", "a.bin/0@0:(4, 1)"),
        TensorInfo("lm_head.weight", (10, 4), "float16", "a.bin/0@0:(4, 1)"),  # saved as the same tensor
        TensorInfo("transformer.h.0.attn.c_attn.weight", (4, 12), "float16", "a.bin/1@0:(12, 1)"),
    ]
    inv = build(infos, {"model_type": "gpt2", "tie_word_embeddings": False}, model="m", where="w")
    assert [e.tied_to for e in inv.entries] == [None, "transformer.wte.weight", None]
    assert (inv.parameters, inv.parameters_with_tied, inv.stored_elements) == (88, 128, 128)
    # GPT-NeoX does not tie: a stored head of the embedding's shape is its own parameters
    untied = build([TensorInfo("gpt_neox.embed_in.weight", (10, 4), "float32"),
                    TensorInfo("embed_out.weight", (10, 4), "float32")], {"model_type": "gpt_neox"},
                   model="m", where="w")  # fmt: skip
    assert untied.parameters == 80


def test_orbax_and_msgpack_trees_list_their_params(tmp_path):
    rng = np.random.default_rng(0)
    params = {"gpt_neox": {"embed_in": {"embedding": rng.normal(size=(50, 16)).astype(np.float32)},
                           "layers": {"0": {"attention": {"query_key_value": {
                               "kernel": rng.normal(size=(16, 48)).astype(np.float16),
                               "bias": np.zeros(48, np.float16)}}}}}}  # fmt: skip
    config = {"model_type": "gpt_neox", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
    orbax_dir = tmp_path / "orbax"
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(orbax_dir, options=options) as manager:
        manager.save(7, args=ocp.args.StandardSave(params))
    (orbax_dir / "config.json").write_text(json.dumps(config))
    msgpack_dir = tmp_path / "flax"
    msgpack_dir.mkdir()
    (msgpack_dir / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
    (msgpack_dir / "config.json").write_text(json.dumps(config))
    for directory in (orbax_dir, msgpack_dir):
        inv = _inventory(directory)
        got = {e.name: (e.shape, e.dtype, e.category) for e in inv.entries}
        assert got == {
            "gpt_neox/embed_in/embedding": ((50, 16), "float32", "embedding"),
            "gpt_neox/layers/0/attention/query_key_value/bias": ((48,), "float16", "attention_qkv"),
            "gpt_neox/layers/0/attention/query_key_value/kernel": ((16, 48), "float16", "attention_qkv"),
        }, directory
        assert inv.parameters == 50 * 16 + 48 + 16 * 48


# ---- the hub: headers only


def _cached_repo(cache, repo: str, files: dict) -> None:
    owner, name = repo.split("/")
    root = cache / f"models--{owner}--{name}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file, data in files.items():
        (snapshot / file).write_bytes(data)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fetched = []
    real = spinjax.sources.hub.hf_hub_download

    def recording(repo, name, **kwargs):
        fetched.append(name)
        return real(repo, name, **kwargs)

    monkeypatch.setattr(spinjax.sources.hub, "hf_hub_download", recording)
    monkeypatch.chdir(tmp_path)
    return cache, fetched


def test_a_cached_hub_model_lists_from_its_cached_headers(offline_hub):
    cache, _ = offline_hub
    gpt2 = FIXTURES / "gpt2"
    files = {f: (gpt2 / f).read_bytes() for f in ("config.json", "model.safetensors")}
    _cached_repo(cache, "spinjax-tests/tiny-gpt2", files)
    inv = _inventory("spinjax-tests/tiny-gpt2")
    assert inv.parameters == _inventory(gpt2).parameters and inv.model == "spinjax-tests__tiny-gpt2"


def test_an_uncached_hub_model_lists_from_the_hubs_headers_without_downloading(offline_hub, monkeypatch):
    cache, fetched = offline_hub
    gpt2 = FIXTURES / "gpt2"
    _cached_repo(cache, "spinjax-tests/tiny-gpt2", {"config.json": (gpt2 / "config.json").read_bytes()})
    with safe_open(str(gpt2 / "model.safetensors"), "numpy") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        tensors = {k: HubTensorInfo(dtype=v.get_dtype(), shape=list(v.get_shape()), data_offsets=(0, 0))
                   for k, v in slices.items()}  # fmt: skip
    meta = SafetensorsRepoMetadata(
        metadata=None, sharded=False, weight_map=dict.fromkeys(tensors, "model.safetensors"),
        files_metadata={"model.safetensors": SafetensorsFileMetadata(metadata={}, tensors=tensors)},
    )
    asked = []

    def headers(repo, *, revision=None, **kwargs):
        asked.append((repo, revision))
        return meta

    monkeypatch.setattr(spinjax.sources.hub, "get_safetensors_metadata", headers)
    inv = _inventory("spinjax-tests/tiny-gpt2")
    assert asked == [("spinjax-tests/tiny-gpt2", "main")]
    assert fetched == ["config.json"]  # no weight file was fetched
    assert inv.parameters == _inventory(gpt2).parameters


def test_an_uncached_hub_model_offline_is_an_input_error(offline_hub):
    cache, _ = offline_hub
    config = (FIXTURES / "gpt2" / "config.json").read_bytes()
    _cached_repo(cache, "spinjax-tests/tiny-gpt2", {"config.json": config})
    out = CliRunner().invoke(main, ["inventory", "spinjax-tests/tiny-gpt2"])
    assert out.exit_code == 2 and "not in the local cache" in out.output and "Traceback" not in out.output


def test_categories_of_flax_and_hf_names():
    assert category("encoder.layer.3.output.dense.weight") == "mlp"
    assert category("encoder.layer.3.attention.output.dense.weight") == "attention_out"
    assert category("model.layers.0.self_attn.o_proj.weight") == "attention_out"
    assert category("model.norm.weight") == "norm"
    assert category("gpt_neox.layers.0.attention.rotary_emb.inv_freq") == "buffer"
    assert category("embeddings.position_ids") == "buffer"
    assert category("pooler.dense.weight") == "other"


# ---- spinjax embeddings


@pytest.mark.parametrize("arch, tensor", [("gpt2", "transformer.wpe.weight"),
                                          ("bert", "embeddings.position_embeddings.weight")])
@pytest.mark.slow
def test_embeddings_numbers_equal_numpy_and_figures_are_written(arch, tensor, tmp_path):
    p = load_file(str(FIXTURES / arch / "model.safetensors"))[tensor].astype(np.float64)
    out = CliRunner().invoke(main, ["embeddings", str(FIXTURES / arch), "--out", str(tmp_path), "--json",
                                    "--top", "3"], catch_exceptions=False)  # fmt: skip
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["tensor"] == tensor and data["shape"] == list(p.shape)
    np.testing.assert_allclose(data["variance"], p.var(0), rtol=1e-12)
    assert [d["dimension"] for d in data["top_dimensions"]] == list(np.argsort(-p.var(0), kind="stable")[:3])
    cos = [p[i] @ p[i + 1] / np.linalg.norm(p[i]) / np.linalg.norm(p[i + 1]) for i in range(len(p) - 1)]
    np.testing.assert_allclose(data["adjacent_cosine"], cos, rtol=1e-10)
    centred = p - p.mean(0)
    power = np.array([sum(abs(np.exp(-2j * np.pi * k * np.arange(len(p)) / len(p)) @ centred[:, j]) ** 2
                          for j in range(p.shape[1])) for k in range(len(p) // 2 + 1)])  # fmt: skip
    np.testing.assert_allclose(data["power"], power / power.sum(), rtol=1e-9, atol=1e-15)
    best = int(np.argmax(power[1:])) + 1
    assert data["peaks"][0]["period"] == pytest.approx(len(p) / best)
    for name in ("pos-matrix", "pos-variance", "pos-cosine", "pos-spectrum"):
        assert (tmp_path / f"{arch}_{name}.png").stat().st_size > 1000


def test_embeddings_of_a_flax_checkpoint(tmp_path):
    p = np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32)
    (tmp_path / "flax_model.msgpack").write_bytes(
        serialization.msgpack_serialize({"transformer": {"wpe": {"embedding": p}}})
    )
    config = {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = CliRunner().invoke(main, ["embeddings", str(tmp_path), "--out", str(tmp_path / "f"), "--json"])
    assert out.exit_code == 0, out.output
    np.testing.assert_allclose(json.loads(out.stdout)["variance"], p.astype(np.float64).var(0), rtol=1e-12)


def test_rotary_models_are_refused_with_the_reason(tmp_path):
    for arch in ("gpt_neox", "llama"):
        out = CliRunner().invoke(main, ["embeddings", str(FIXTURES / arch), "--out", str(tmp_path)])
        assert out.exit_code == 2 and "rotary position embeddings" in out.output, out.output
        assert "Traceback" not in out.output
    assert not list(tmp_path.iterdir())
