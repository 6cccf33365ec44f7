"""A run: sources -> per-layer factors -> kernels -> store, and the passes built on it.

- ``options``: :class:`RunOptions` (what a run is asked for), :class:`Progress`, :class:`RunResult`;
- ``pipeline``: :func:`run`, the compute loop; ``reader``: the reader thread and step claims;
  ``writer``: the model group and the step writes; ``distributed``: multi-process runs;
- ``features``: what ``--null`` and ``--pairs`` add per step; ``baseline``: the random-matrix
  null (``spinjax baseline``); ``dynamics``: the training-dynamics post-pass;
- ``bench``: ``spinjax bench``; ``threads``: process set-up for the kernels on CPUs.

Names load their module on first use.
"""

from spinjax._lazy import lazy_api

__getattr__, __dir__, __all__ = lazy_api(
    __name__,
    {
        "baseline": ("compute_baseline", "run_baseline"),
        "distributed": ("init_distributed",),
        "dynamics": ("compute_dynamics",),
        "options": ("Progress", "RunOptions", "RunResult", "default_memory_budget"),
        "pipeline": ("Interrupted", "run"),
    },
)
