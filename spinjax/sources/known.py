"""The models spinjax knows by name (``spinjax models``): geometry, hub repo and offered steps."""

from __future__ import annotations

from dataclasses import dataclass

# Pythia's 154 checkpoints: step0, the powers of two up to 512, then every 1000 to 143000.
PYTHIA_STEPS = (0, *(2**i for i in range(10)), *range(1000, 143001, 1000))
# tiny-pythia's saved steps: 0, 1, 2, 4, ..., 512 (log-spaced like Pythia), then every 256 to 1280.
TINY_PYTHIA_STEPS = (0, *(2**k for k in range(10)), *range(768, 1281, 256))


@dataclass(frozen=True)
class KnownModel:
    name: str
    repo: str | None  # hub repo id; None for the embedded model (trained locally)
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


TINY_PYTHIA = KnownModel("tiny-pythia", None, 64, 4, 4, 4, TINY_PYTHIA_STEPS)
"""The embedded default model (spinjax.sources.tinypythia), defined and trained by spinjax."""

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
        TINY_PYTHIA,
    ]
}
