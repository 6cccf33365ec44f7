"""Pure JAX kernels: per-head factors in, statistics out. No files, no model layouts, no state.

- ``bins``: the two histogram grids (numpy only);
- ``elements``: one fused pass of power sums and histograms, and the element statistics;
- ``spectra``: singular values of W_Q, W_K and W_QK from the factors, spectral summaries;
- ``heads``: every statistic of one layer's heads (:func:`layer_statistics`), blocked to a budget;
- ``geometry``: inner products and divergences between heads;
- ``null``: Gaussian factors of the random-matrix null and z-scores against it;
- ``dynamics``: singular directions, their overlaps across steps, level crossings.

Names load their module on first use, so ``spinjax.kernels.bins`` imports without JAX and
importing this package changes nothing in the process.
"""

from spinjax._lazy import lazy_api

__getattr__, __dir__, __all__ = lazy_api(
    __name__,
    {
        "bins": ("NB", "NZ", "bin_edges", "zbin_edges"),
        "dynamics": ("kl_smoothed", "mode_events", "overlaps", "top_singular_vectors"),
        "geometry": ("cross_inner", "js_divergence", "pair_summaries", "pairwise_js", "squared_norms"),
        "heads": ("block_entries_cap", "block_rows_for_budget", "expand_kv", "heads_per_block",
                  "layer_statistics"),  # fmt: skip
        "null": ("gaussian_factors", "matched_scale", "null_zscores"),
    },
)
