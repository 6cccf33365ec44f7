"""tiny-pythia: a small GPT-NeoX-style byte model and its training trajectory, made on demand.

The embedded default model. It is trained here, offline and deterministically, on the
Python standard library's own sources, and saved with orbax at Pythia-like log-spaced steps
(:data:`STEPS`), so that every install has a real (if tiny) training trajectory to analyse.

Architecture (Flax linen, parameter names as Hugging Face's Flax models would use):
token embedding ``gpt_neox/embed_in``; ``N_LAYERS`` blocks ``gpt_neox/layers/{i}`` computing
``x + attention(input_layernorm(x)) + mlp(post_attention_layernorm(x))`` (parallel residual);
attention with ONE fused ``query_key_value`` Dense of ``3 * d_model`` outputs laid out as in
GPT-NeoX (per head, ``[q, k, v]`` blocks of ``d_head``), partial rotary embedding on the first
``ROTARY_PCT`` of each head's dimensions, causal softmax and an output ``dense``;
``gpt_neox/final_layer_norm`` and an untied ``embed_out`` head. Flax Dense kernels are
``(in, out)``: the transposed fused kernel is exactly ``query_key_value.weight`` of GPT-NeoX.

The checkpoint root holds one orbax step directory per entry of :data:`STEPS` (float32 params
pytree, saved by ``ocp.CheckpointManager``) and ``config.json`` with Hugging Face keys plus a
``spinjax`` entry recording the held-out loss at every saved step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from .base import FetchOptions, Source, default_cache
from .jaxtree import OrbaxKind
from .known import TINY_PYTHIA

NAME = TINY_PYTHIA.name
VERSION = 1
D_MODEL, N_HEADS, N_LAYERS = TINY_PYTHIA.d_model, TINY_PYTHIA.n_heads, TINY_PYTHIA.n_layers
VOCAB, CONTEXT = 256, 64
D_HEAD = D_MODEL // N_HEADS
ROTARY_PCT, ROTARY_BASE = 0.25, 10000.0
STEPS: tuple[int, ...] = TINY_PYTHIA.steps
"""Saved steps: 0, 1, 2, 4, ..., 512 (log-spaced like Pythia), then every 256 to 1280."""
FINAL_STEP = STEPS[-1]
log = logging.getLogger(__name__)  # the command line shows its INFO lines on stderr

SEED, BATCH, LR, WARMUP, WEIGHT_DECAY = 0, 8, 3e-3, 50, 0.1
CORPUS_MODULES = (
    "argparse", "json", "textwrap", "dataclasses", "functools", "shlex", "csv", "string",
    "heapq", "bisect", "fractions", "calendar", "configparser", "gettext", "pprint", "tokenize",
)  # fmt: skip
CORPUS_BYTES = 512 * 1024  # cap on the concatenated sources; the last 10% is held out


class Attention(nn.Module):
    """GPT-NeoX attention: fused interleaved qkv, partial rotary, causal softmax, dense."""

    n_heads: int = N_HEADS
    rotary_pct: float = ROTARY_PCT

    def setup(self):
        self.query_key_value = nn.Dense(3 * D_MODEL, name="query_key_value")
        self.dense = nn.Dense(D_MODEL, name="dense")

    def qkv(self, x, *, rotary: bool = True):
        """q, k, v of shape (batch, heads, time, d_head) for x (batch, time, d_model)."""
        b, t, d = x.shape
        d_head = d // self.n_heads
        fused = self.query_key_value(x).reshape(b, t, self.n_heads, 3 * d_head)
        q, k, v = (fused[..., i * d_head : (i + 1) * d_head].transpose(0, 2, 1, 3) for i in range(3))
        if rotary:
            q, k = _rotary(q, int(d_head * self.rotary_pct)), _rotary(k, int(d_head * self.rotary_pct))
        return q, k, v

    def logits(self, x, *, rotary: bool = True):
        """Pre-softmax, pre-mask attention scores q.k / sqrt(d_head): (batch, heads, t, t)."""
        q, k, _ = self.qkv(x, rotary=rotary)
        return jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])

    def __call__(self, x):
        q, k, v = self.qkv(x)
        scores = jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        out = jnp.einsum("bhts,bhsd->bthd", probs, v).reshape(x.shape)
        return self.dense(out)


def _rotary(x, n_rot: int):
    """GPT-NeoX rotary (rotate_half form) on the first n_rot dims of x (..., time, d_head)."""
    if n_rot == 0:
        return x
    inv_freq = 1.0 / ROTARY_BASE ** (jnp.arange(0, n_rot, 2) / n_rot)
    angles = jnp.arange(x.shape[-2])[:, None] * inv_freq[None, :]
    cos, sin = jnp.cos(jnp.tile(angles, 2)), jnp.sin(jnp.tile(angles, 2))
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    half = jnp.concatenate([-rot[..., n_rot // 2 :], rot[..., : n_rot // 2]], axis=-1)
    return jnp.concatenate([rot * cos + half * sin, rest], axis=-1)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        attn = Attention(name="attention")(nn.LayerNorm(name="input_layernorm")(x))
        h = nn.LayerNorm(name="post_attention_layernorm")(x)
        h = nn.gelu(nn.Dense(4 * D_MODEL, name="dense_h_to_4h")(h))
        h = nn.Dense(D_MODEL, name="dense_4h_to_h")(h)
        return x + attn + h


class Layers(nn.Module):
    def setup(self):
        self.blocks = [Block(name=str(i)) for i in range(N_LAYERS)]

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class GPTNeoX(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D_MODEL, name="embed_in")(tokens)
        return nn.LayerNorm(name="final_layer_norm")(Layers(name="layers")(x))


class TinyPythia(nn.Module):
    """Byte-level causal LM: tokens (batch, time) int -> logits (batch, time, 256)."""

    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(VOCAB, use_bias=False, name="embed_out")(GPTNeoX(name="gpt_neox")(tokens))


def attention_logits(params: dict, layer: int, x, *, rotary: bool = True):
    """Attention scores (batch, heads, t, t) of ``layer`` for its input x (batch, t, d_model)."""
    p = params["gpt_neox"]["layers"][str(layer)]["attention"]
    return Attention().apply({"params": p}, jnp.asarray(x), rotary=rotary, method="logits")


def load_params(root: Path, step: int) -> dict:
    """The params pytree (numpy float32) that :func:`train` saved at ``step`` under ``root``."""
    return ocp.StandardCheckpointer().restore(Path(root).absolute() / str(step) / "default")


def hf_config() -> dict[str, Any]:
    """config.json content in Hugging Face GPT-NeoX terms (without the training record)."""
    return {
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
        "hidden_size": D_MODEL, "num_attention_heads": N_HEADS, "num_hidden_layers": N_LAYERS,
        "intermediate_size": 4 * D_MODEL, "rotary_pct": ROTARY_PCT, "rotary_emb_base": ROTARY_BASE,
        "max_position_embeddings": CONTEXT, "vocab_size": VOCAB, "hidden_act": "gelu",
        "layer_norm_eps": 1e-6, "use_parallel_residual": True, "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }  # fmt: skip


def corpus() -> bytes:
    """Concatenated ``.py`` sources of :data:`CORPUS_MODULES` (fixed order), capped in size."""
    parts = []
    for name in CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not (spec.origin or "").endswith(".py"):
            continue
        origin = Path(spec.origin)
        files = sorted(origin.parent.glob("*.py")) if spec.submodule_search_locations else [origin]
        parts += [f.read_bytes() for f in files]
    data = b"\n".join(parts)[:CORPUS_BYTES]
    if len(data) < 64 * 1024:
        raise RuntimeError("tiny-pythia: the Python standard library sources were not found")
    return data


def train(root: Path, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train tiny-pythia, saving params at every step of :data:`STEPS` under ``root``.

    Returns the held-out loss (mean cross-entropy, nats per byte) at each saved step, and
    calls ``on_step(step, loss)`` after each save.
    """
    data = np.frombuffer(corpus(), dtype=np.uint8).astype(np.int32)
    split = int(0.9 * len(data))
    train_data, held = jnp.asarray(data[:split]), data[split:]
    n_eval = min((len(held) - 1) // CONTEXT, 128)
    eval_x = jnp.asarray(held[: n_eval * CONTEXT].reshape(n_eval, CONTEXT))
    eval_y = jnp.asarray(held[1 : n_eval * CONTEXT + 1].reshape(n_eval, CONTEXT))

    model = TinyPythia()
    key = jax.random.PRNGKey(SEED)
    params = model.init(key, jnp.zeros((1, CONTEXT), jnp.int32))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, LR, WARMUP, FINAL_STEP, LR / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=WEIGHT_DECAY))  # noqa: E501
    opt_state = opt.init(params)

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step_fn(p, s, step):
        starts = jax.random.randint(jax.random.fold_in(key, step), (BATCH,), 0, split - CONTEXT - 1)
        window = jax.vmap(lambda i: jax.lax.dynamic_slice(train_data, (i,), (CONTEXT + 1,)))(starts)
        grads = jax.grad(loss_fn)(p, window[:, :-1], window[:, 1:])
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    eval_loss = jax.jit(lambda p: loss_fn(p, eval_x, eval_y))
    losses = []
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=None)
    with ocp.CheckpointManager(root, options=options) as manager:
        for step in range(FINAL_STEP + 1):
            if step in STEPS:
                host = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
                manager.save(step, args=ocp.args.StandardSave(host))
                losses.append(float(eval_loss(params)))
                if on_step is not None:
                    on_step(step, losses[-1])
            if step < FINAL_STEP:
                params, opt_state = step_fn(params, opt_state, step)
        manager.wait_until_finished()
    return losses


def ensure_tiny_pythia(
    cache_dir: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> Path:
    """The tiny-pythia checkpoint root ``<cache_dir>/tiny-pythia-v1``, trained on first use.

    ``cache_dir`` defaults to :func:`default_cache`. Generation (about a minute on two CPU
    cores) writes into a temporary sibling directory renamed into place at the end, so an
    interrupted run never leaves a partial cache; an existing cache is returned at once.
    ``on_start(root)`` is called before training, ``on_step(step, loss)`` at each saved step.
    """
    root = Path(cache_dir or default_cache()) / f"{NAME}-v{VERSION}"
    if (root / "config.json").is_file():
        return root
    if on_start is not None:
        on_start(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        losses = train(tmp / "ckpt", on_step)
        record = {
            "name": NAME, "version": VERSION, "steps": list(STEPS),
            "eval_loss": [round(v, 5) for v in losses],
            "loss_note": "mean next-byte cross-entropy (nats) on the held-out last 10% of the corpus",
            "corpus_modules": list(CORPUS_MODULES), "python": sys.version.split()[0],
            "seed": SEED, "batch": BATCH, "context": CONTEXT, "lr": LR, "weight_decay": WEIGHT_DECAY,
        }  # fmt: skip
        config = {**hf_config(), "spinjax": record}
        (tmp / "ckpt" / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        try:
            os.rename(tmp / "ckpt", root)
        except OSError:  # another process finished first
            if not (root / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class EmbeddedKind:
    """``--model tiny-pythia``: the embedded model's trajectory, trained here on first use."""

    name = "embedded model"

    def can_open(self, model: str) -> bool:
        return model == NAME

    def open(self, model: str, fetch: FetchOptions | None = None) -> Source:
        root = ensure_tiny_pythia(on_start=_announce_training, on_step=_report_training)
        source = OrbaxKind().open(str(root))
        return replace(source, key=NAME, source=f"{NAME} (embedded, trained by spinjax)")


def _announce_training(root: Path) -> None:
    log.info("%s: training the embedded model once (about a minute on 2 cores) into %s", NAME, root)


def _report_training(step: int, loss: float) -> None:
    log.info("%s: step %d of %d saved, held-out loss %.3f nats/byte", NAME, step, FINAL_STEP, loss)
