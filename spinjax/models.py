"""What a ``--model`` value names (SPEC section 5): known models, local directories, sources.

A source offers checkpoints as (step, revision) pairs and opens one at a time. Local
directories in Hugging Face layout have one checkpoint, step -1, revision = the path.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .sources import Checkpoint

# Pythia's 154 checkpoints: step0, the powers of two up to 512, then every 1000 to 143000.
PYTHIA_STEPS = (0, *(2**i for i in range(10)), *range(1000, 143001, 1000))


@dataclass(frozen=True)
class KnownModel:
    name: str
    repo: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    steps: tuple[int, ...] = (-1,)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def revision(self, step: int) -> str:
        """Hub revision of a step: ``stepN`` for trajectories (the last one is ``main``)."""
        return "main" if step in (-1, self.steps[-1]) else f"step{step}"


def _pythia() -> list[KnownModel]:
    sizes = {  # name: (d_model, n_layers, n_heads)
        "14m": (128, 6, 4), "31m": (256, 6, 8), "70m": (512, 6, 8), "160m": (768, 12, 12),
        "410m": (1024, 24, 16), "1b": (2048, 16, 8), "1.4b": (2048, 24, 16),
        "2.8b": (2560, 32, 32), "6.9b": (4096, 32, 32), "12b": (5120, 36, 40),
    }  # fmt: skip
    out = []
    for size, (d, n_layers, n_heads) in sizes.items():
        variants = ("",) if size in ("14m", "31m") else ("", "-deduped")
        for v in variants:
            name = f"pythia-{size}{v}"
            out.append(KnownModel(name, f"EleutherAI/{name}", d, n_layers, n_heads, n_heads, PYTHIA_STEPS))
    return out


KNOWN: dict[str, KnownModel] = {
    m.name: m
    for m in [
        *_pythia(),
        KnownModel("gpt2", "openai-community/gpt2", 768, 12, 12, 12),
        KnownModel("gpt2-medium", "openai-community/gpt2-medium", 1024, 24, 16, 16),
        KnownModel("gpt2-large", "openai-community/gpt2-large", 1280, 36, 20, 20),
        KnownModel("gpt2-xl", "openai-community/gpt2-xl", 1600, 48, 25, 25),
        KnownModel("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 4096, 32, 32, 8),
        KnownModel("mistral-7b-v0.3", "mistralai/Mistral-7B-v0.3", 4096, 32, 32, 8),
    ]
}


@dataclass
class Source:
    """A model's checkpoints: ``offered`` (step, revision) pairs and how to open one."""

    key: str
    source: str
    offered: list[tuple[int, str]]
    open: Callable[[int, str], Any]
    # Frees what opening a checkpoint downloaded (hub sources); local files are never touched.
    evict: Callable[[Any], None] = lambda checkpoint: None


def _local(path: Path) -> Source:
    """A local checkpoint: Flax msgpack, orbax steps (numbered folders) or HF layout, in that order."""
    from .jaxckpt import FlaxMsgpackModel, OrbaxModel

    resolved = path.resolve()
    key, single = resolved.name.replace("/", "__"), [(-1, str(resolved))]
    if path.is_file() and path.suffix != ".msgpack":
        raise InputError(f"{path}: a file; --model takes a checkpoint directory or a Flax .msgpack file")
    if path.is_file() or (path / "flax_model.msgpack").exists():
        model = FlaxMsgpackModel(path)
        return Source(key, str(resolved), single, lambda step, rev: model.checkpoint(step))
    if any(p.name.isdigit() and p.is_dir() for p in path.iterdir()):
        model = OrbaxModel(path)
        steps = [(s, f"step{s}") for s in model.steps]
        return Source(key, str(resolved), steps, lambda step, rev: model.checkpoint(step))
    if (path / "config.json").exists():
        return Source(
            key, str(resolved), single, lambda step, rev: Checkpoint(resolved, step=step, revision=rev)
        )
    raise InputError(f"{path}: no config.json, Flax msgpack or orbax checkpoint steps found")


def resolve(model: str) -> Source:
    """The source a ``--model`` value names: a local path first, then a known name."""
    path = Path(model).expanduser()
    if path.exists():
        return _local(path)
    if model == "tiny-pythia":
        from .tinypythia import ensure_tiny_pythia

        source = _local(ensure_tiny_pythia())
        source.key = "tiny-pythia"
        source.source = "tiny-pythia (embedded, trained by spinjax)"
        return source
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    if model in KNOWN or ("/" in model and not looks_like_path):
        from .hub import hub_source

        return hub_source(model)
    if looks_like_path:
        raise InputError(f"--model {model!r}: no such directory")
    close = difflib.get_close_matches(model, [*KNOWN, "tiny-pythia"], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `spinjax models`"
    raise InputError(f"--model {model!r}: no such directory and not a known model name{hint}")
