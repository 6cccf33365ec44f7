"""What a run is asked to do (:class:`RunOptions`), how it reports (:class:`Progress`) and what it
did (:class:`RunResult`)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jax

from ..errors import InputError
from ..sources.base import DEFAULT_CACHE_SIZE, DEFAULT_CONNECTIONS, FetchOptions
from ..sources.layouts import VARIANTS
from ..store import DEFAULT_STORE, MATRICES, OV_MATRICES, ModelGroup

PAIRS = ("none", "layer", "model")
DEFAULT_NULL_SAMPLES = 1000


@dataclass(frozen=True)
class RunOptions:
    """Everything ``spinjax run`` takes besides the model; validated when made.

    - ``steps``: the ``--steps`` spec (all | last | a,b,c | start:stop:stride | a mix);
    - ``store``: the store's path; ``memory_budget``: bytes for the W_QK blocks in flight
      (None: :func:`default_memory_budget`); ``recompute``: redo finished steps;
    - ``download``, ``connections``, ``cache_size``, ``keep_downloads``: how hub sources read
      (:class:`~spinjax.sources.base.FetchOptions`, docs/hub.md);
    - ``null``, ``null_samples``: z-scores against the random-matrix null (its size when it
      must be computed); ``pairs``: cross-head geometry, "none", "layer" or "model";
      ``variant``: "raw", "ln-folded" or "bias" factors; ``ov``: add W_V, W_O, W_OV;
    - ``process_index``, ``process_count``: this process's share of a distributed run.
    """

    steps: str = "last"
    store: Path = Path(DEFAULT_STORE)
    memory_budget: int | None = None
    recompute: bool = False
    download: str = "ranged"
    connections: int = DEFAULT_CONNECTIONS
    cache_size: int = DEFAULT_CACHE_SIZE
    keep_downloads: bool = False
    null: bool = False
    null_samples: int = DEFAULT_NULL_SAMPLES
    pairs: str = "layer"
    variant: str = "raw"
    ov: bool = False
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        if self.pairs not in PAIRS:
            raise InputError(f"--pairs {self.pairs!r}: expected one of {', '.join(PAIRS)}")
        if self.variant not in VARIANTS:
            raise InputError(f"--variant {self.variant!r}: expected one of {', '.join(VARIANTS)}")
        if self.null_samples < 2:
            raise InputError(f"--null-samples must be at least 2, got {self.null_samples}")
        check_memory_budget(self.memory_budget)
        if not 0 <= self.process_index < self.process_count:
            raise InputError(f"process {self.process_index} is not one of 0..{self.process_count - 1}")
        _ = self.fetch  # validates the hub options

    @property
    def fetch(self) -> FetchOptions:
        """How hub sources read their files."""
        return FetchOptions(
            self.download, self.connections, self.cache_size, keep_downloads=self.keep_downloads
        )

    @property
    def matrices(self) -> tuple[str, ...]:
        return OV_MATRICES if self.ov else MATRICES

    def with_stored_features(self, group: ModelGroup | None) -> RunOptions:
        """The options a run of an existing group uses: what the group holds is sticky.

        A group that has null z-scores, head pairs or the OV matrices gets them for every
        later step too; ``--ov`` on a group without them is refused (its ``matrix`` dimension
        was fixed when it was made).
        """
        if group is None:
            return self
        if self.ov:
            group.check_matrices(OV_MATRICES)
        features = stored_features(group)
        return dataclasses.replace(
            self,
            null=self.null or "null" in features,
            pairs=max(self.pairs, features.get("pairs", "none"), key=PAIRS.index),
            ov="W_OV" in group.matrices,
        )

    def adds_features_to(self, group: ModelGroup | None) -> bool:
        """Whether this run adds a feature (null, pairs) that ``group`` does not have yet."""
        if group is None:
            return False
        features = stored_features(group)
        return (self.null and "null" not in features) or self.pairs != features.get("pairs", "none")


def stored_features(group: ModelGroup) -> Mapping:
    """The group attribute ``features``: what optional variables the group's steps carry."""
    return group.group.attrs.get("features", {})


def check_memory_budget(budget: int | None) -> None:
    """A memory budget (of a run or a baseline) is None, for :func:`default_memory_budget`, or a
    positive number of bytes."""
    if budget is not None and budget <= 0:
        raise InputError(f"--memory-budget must be positive, got {budget} bytes")


def default_memory_budget() -> int:
    """A quarter of the memory available now (at least 256 MiB): of the host's, and of the
    accelerator's where the W_QK blocks live on one (its free bytes, as JAX reports them)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    stats = jax.devices()[0].memory_stats() or {}  # None on CPUs
    if "bytes_limit" in stats:
        available = min(available, stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return max(256 << 20, available // 4)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _inform(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Progress:
    """Callbacks a front end may set to follow a run (all optional)."""

    on_plan: Callable[[int, int], None] = lambda n_steps, n_layers: None
    on_layer: Callable[[int, int], None] = lambda step, layer: None
    on_step: Callable[[int], None] = lambda step: None
    on_warning: Callable[[str], None] = _warn
    on_info: Callable[[str], None] = _inform  # what the run does besides its steps (not a problem)


@dataclass
class RunResult:
    key: str
    store: Path
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    io_wait_s: float = 0.0  # time the compute waited for reads (and downloads)
    compute_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # variables added to steps finished before
