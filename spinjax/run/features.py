"""Per-step results beyond the core statistics that ``spinjax run`` adds on request (schema 1 additions).

- ``--null``: ``<stat>_z``, each head statistic as a z-score against the random-matrix null of
  the same geometry (``baseline/<d>x<dh>``, computed and stored when missing) at the head's own
  scale (``kernels.null.matched_scale``). Needs only stored statistics, so steps finished
  before ``--null`` was first asked for are scored from the store.
- ``--pairs layer``: ``qk_distance``, ``qk_cosine`` (Frobenius distance and cosine between the
  W_QK of every two heads of a layer, from inner products the element pass accumulates) and
  ``js_head`` (Jensen-Shannon divergence of their raw histograms), dims (step, layer, head, head2).
- ``--pairs model``: also ``qk_distance_model``, ``qk_cosine_model`` between every two heads of
  the model, dims (step, layer, head, layer2, head2), from the step's layers re-read in blocks
  of layers that fit the memory budget.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..kernels.geometry import cross_inner, pair_summaries, pairwise_js, squared_norms
from ..kernels.heads import expand_kv, pow2_normalized
from ..kernels.null import matched_scale, null_zscores
from ..store import ModelGroup, consolidate, locked, model_keys, open_store, writing
from ..store.baseline import baseline_key, read_baseline, stored_attrs
from ..store.schema import MODEL_PAIR_VARIABLES, NULL_VARIABLES, PAIR_VARIABLES, VariableSpec
from .baseline import run_baseline

FactorsOf = Callable[[int], tuple[np.ndarray, np.ndarray]]  # layer -> (wq, wk)


def variables(*, null: bool, pairs: str) -> dict[str, VariableSpec]:
    """The optional store variables a run with these options writes."""
    specs = {}
    if null:
        specs.update(NULL_VARIABLES)
    if pairs in ("layer", "model"):
        specs.update(PAIR_VARIABLES)
    if pairs == "model":
        specs.update(MODEL_PAIR_VARIABLES)
    return specs


def pair_coordinates(n_layers: int, n_heads: int) -> dict[str, np.ndarray]:
    return {"head2": np.arange(n_heads, dtype=np.int32), "layer2": np.arange(n_layers, dtype=np.int32)}


def layer_pairs(inner: np.ndarray, hist: np.ndarray) -> dict[str, np.ndarray]:
    """``qk_distance``, ``qk_cosine`` and ``js_head`` (heads, heads) of one layer.

    ``inner`` (heads, heads) are the Frobenius inner products of the heads' W_QK (from the
    element pass: ``layer_statistics(..., inner=True)``); ``hist`` (heads, matrix, bin) the
    layer's raw histograms, of which W_QK's (matrix 2) are compared.
    """
    inner = np.asarray(inner, np.float64)
    geometry = pair_summaries(inner, np.diagonal(inner).copy())
    return {
        "qk_distance": geometry["distance"],
        "qk_cosine": geometry["cosine"],
        "js_head": pairwise_js(hist[:, 2]),
    }


def model_pairs(factors_of: FactorsOf, n_layers: int, budget_bytes: int) -> dict[str, np.ndarray]:
    """``qk_distance_model``, ``qk_cosine_model`` (layer, head, layer2, head2) of one step.

    Layers are held in blocks of about half the budget each (a block and the one it is
    compared with), so a model of any size needs about ``budget_bytes`` plus one layer pair's
    cross-Grams; each block after the first is read once per earlier block. The factors are
    divided by powers of two (``heads.pow2_normalized``) and the products scaled back in
    float64, so that no scale of the weights over- or underflows them.
    """

    def load(layer: int):
        wq, wk = factors_of(layer)
        (wq, e_q), (wk, e_k) = pow2_normalized(wq), pow2_normalized(wk)
        group = wq.shape[0] // wk.shape[0]
        return wq, np.asarray(expand_kv(wk, wq.shape[0])), e_q + np.repeat(e_k, group)

    first = load(0)
    per_layer = 2 * first[0].nbytes
    size = max(1, min(n_layers, (budget_bytes // 2) // per_layer))
    blocks = [list(range(a, min(a + size, n_layers))) for a in range(0, n_layers, size)]
    n_heads = first[0].shape[0]
    inner = np.empty((n_layers, n_heads, n_layers, n_heads), np.float64)
    norms = np.empty((n_layers, n_heads), np.float64)
    cached = {0: first}
    for i, block_a in enumerate(blocks):
        held = {layer: cached.pop(layer, None) or load(layer) for layer in block_a}
        for layer, (wq, wk, e) in held.items():
            norms[layer] = np.ldexp(np.asarray(squared_norms(wq, wk), np.float64), 2 * e)
        for block_b in blocks[i:]:
            other = held if block_b is block_a else {layer: load(layer) for layer in block_b}
            for a in block_a:
                for b in block_b:
                    if block_b is block_a and b < a:
                        continue
                    (qa, ka, ea), (qb, kb, eb) = held[a], other[b]
                    g = np.asarray(cross_inner(qa, ka, qb, kb), np.float64)
                    g = np.ldexp(g, ea[:, None] + eb[None, :])
                    inner[a, :, b, :] = g
                    inner[b, :, a, :] = g.T
    flat = pair_summaries(inner.reshape(n_layers * n_heads, -1), norms.reshape(-1))
    shape = (n_layers, n_heads, n_layers, n_heads)
    return {
        "qk_distance_model": flat["distance"].reshape(shape),
        "qk_cosine_model": flat["cosine"].reshape(shape),
    }


class NullScorer:
    """``<stat>_z`` of a step's results against the stored null of the run's geometry."""

    def __init__(
        self, store_path: Path, d_model: int, d_head: int, *, samples: int,
        on_info: Callable[[str], None] = print, on_warning: Callable[[str], None] = print,
    ):  # fmt: skip
        self.d_model, self.d_head = d_model, d_head
        self.key = baseline_key(d_model, d_head)
        if stored_attrs(store_path, d_model, d_head) is None:
            on_info(f"--null: computing the null {self.key} ({samples} random heads), once per store")
            run_baseline(d_model, d_head, store_path=store_path, samples=samples)
        ds = read_baseline(store_path, d_model, d_head)
        self.sigma = float(ds.attrs["sigma"])
        self.samples = int(ds.attrs["samples"])
        names = [n for n in NULL_VARIABLES if n.removesuffix("_z") in ds.data_vars]
        self.null = {n.removesuffix("_z"): np.asarray(ds[n.removesuffix("_z")].values) for n in names}
        lacking = [n for n in NULL_VARIABLES if n not in names]
        if lacking:  # made by an older spinjax: those z-scores keep their fill value
            on_warning(
                f"--null: {self.key} lacks {', '.join(n.removesuffix('_z') for n in lacking)} (an older "
                f"spinjax made it), so {', '.join(lacking)} stay NaN; `spinjax baseline --d {d_model} "
                f"--d-head {d_head} --samples {self.samples} --recompute` replaces it"
            )

    def attrs(self) -> dict:
        return {"baseline": self.key, "samples": self.samples, "sigma": self.sigma}

    def scores(self, results: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """z-scores of ``results`` (name -> (layer, head, matrix, ...)) of one step.

        Matrices come in triples (factor A, factor B, A^T B): (W_Q, W_K, W_QK) and, with
        ``--ov``, (W_V, W_O, W_OV); each triple is scored against the null's three.
        """
        parts = []
        for first in range(0, results["frobenius_norm"].shape[2], 3):
            triple = {name: np.asarray(results[name])[:, :, first : first + 3] for name in self.null}
            scale = matched_scale(triple["frobenius_norm"], d_model=self.d_model, d_head=self.d_head,
                                  sigma=self.sigma)  # fmt: skip
            parts.append(null_zscores(triple, self.null, scale=scale, names=tuple(self.null)))
        return {name: np.concatenate([np.asarray(p[name]) for p in parts], axis=2) for name in parts[0]}

    def rescore(self, group: ModelGroup) -> int:
        """Score every finished step of ``group`` from its stored statistics (no weights are
        read) and record this null in its ``features``; under the store's lock. Returns the
        number of steps scored."""
        finished = np.flatnonzero(group.done)
        for index in finished:
            stored = {name: group.group[name][index] for name in self.null}
            group.write_variables(int(index), self.scores(stored))
        group.group.attrs["features"] = {**group.group.attrs.get("features", {}), "null": self.attrs()}
        return len(finished)


def rescore_dependents(store_path: Path, d_model: int, d_head: int) -> dict[str, int]:
    """Score again, against the null ``baseline/<d_model>x<d_head>`` now in the store, every
    model group whose ``--null`` z-scores came from that null (after ``spinjax baseline
    --recompute`` replaced it): {group: steps scored}. Nothing is left scored against an
    ensemble the store no longer holds."""
    key, root = baseline_key(d_model, d_head), open_store(store_path)
    dependents = [k for k in model_keys(root) if _null_of(root, k) == key]
    if not dependents:
        return {}
    scorer = NullScorer(store_path, d_model, d_head, samples=0)
    scored = {}
    with writing(Path(store_path)), locked(store_path) as root:
        for name in dependents:
            scored[name] = scorer.rescore(ModelGroup(root, name))
            consolidate(root, name)
    return scored


def _null_of(root, key: str) -> str | None:
    """The null a model group's z-scores were scored against, if any."""
    return root[key].attrs.get("features", {}).get("null", {}).get("baseline")
