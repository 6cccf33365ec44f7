"""Heads as points: pairwise divergences, Ward trees, and a map of training trajectories (no JAX).

- :func:`js_matrix`: Jensen-Shannon divergence between every two histograms (numpy);
- :func:`head_distances`: a step's head x head similarity or divergence, within each layer
  or across the whole model;
- :func:`ward_tree`: Ward's hierarchical clustering of a model's heads from one of them;
- :func:`trajectory_map`: every head at every step as a point of a 2-D UMAP embedding of its
  statistics, with a k-nearest-neighbour graph and HDBSCAN clusters (``umap-learn``,
  ``scikit-learn``), as a pandas DataFrame.

>>> from spinjax import headmaps, open_store
>>> ds = open_store("store/spinjax.zarr")["tiny-pythia"]            # doctest: +SKIP
>>> tree, labels = headmaps.ward_tree(ds, step=1280, kind="js")      # doctest: +SKIP
>>> points = headmaps.trajectory_map(ds)                             # doctest: +SKIP
>>> points.groupby("cluster").size()                                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from ..errors import InputError
from . import study

KINDS = ("cosine", "js")


def js_matrix(hist: np.ndarray, block: int = 64) -> np.ndarray:
    """JS divergence (natural log, in [0, ln 2]) between every two rows of ``hist`` (N, B),
    counts or probabilities on shared bins: symmetric, 0 on the diagonal, NaN for an empty row.
    The same divergence as ``spinjax.kernels.pairwise_js``, in numpy."""
    p = np.asarray(hist, np.float64)
    total = p.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / total
    n = p.shape[0]
    out = np.empty((n, n))
    for a in range(0, n, block):
        x = p[a : a + block, None, :]
        y = p[None, :, :]
        m = x + y
        with np.errstate(invalid="ignore", divide="ignore"):
            hx = np.where(x > 0, x * np.log(np.where(x > 0, 2 * x / m, 1.0)), 0.0).sum(-1)
            hy = np.where(y > 0, y * np.log(np.where(y > 0, 2 * y / m, 1.0)), 0.0).sum(-1)
        out[a : a + block] = 0.5 * (hx + hy)
    out = 0.5 * (out + out.T)
    np.fill_diagonal(out, np.where(total[:, 0] > 0, 0.0, np.nan))
    return out


def head_distances(
    ds: xr.Dataset, step: int, *, kind: str = "cosine", scope: str = "layer", matrix: str = "W_QK"
) -> xr.DataArray:
    """Similarity (``kind="cosine"``: Frobenius cosine of W_QK) or divergence (``"js"``: JS of
    the raw histograms of ``matrix``) between heads at ``step``.

    ``scope="layer"``: dims (layer, head, head2), the stored ``qk_cosine`` / ``js_head``
    (``spinjax run --pairs layer``). ``scope="model"``: every head against every other, dims
    (unit, unit2) with coordinates ``layer`` and ``head`` along each; cosine from the stored
    ``qk_cosine_model`` (``--pairs model``), JS computed here from ``hist``.
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    at = ds.sel(step=step)
    n_layers, n_heads = at.sizes["layer"], at.sizes["head"]
    if scope == "layer":
        name = "qk_cosine" if kind == "cosine" else "js_head"
        if name not in at:
            raise InputError(f"no {name!r} in the store: run `spinjax run --pairs layer`")
        if kind == "js" and matrix != "W_QK":
            hist = at["hist"].sel(matrix=matrix).transpose("layer", "head", "bin").values
            values = np.stack([js_matrix(hist[layer]) for layer in range(n_layers)])
            return xr.DataArray(values, dims=("layer", "head", "head2"), name="js_head",
                                coords={"layer": at["layer"].values, "head": at["head"].values})  # fmt: skip
        return at[name].transpose("layer", "head", "head2")
    if scope != "model":
        raise InputError(f"scope must be 'layer' or 'model', not {scope!r}")
    if kind == "cosine":
        if "qk_cosine_model" not in at:
            raise InputError("no 'qk_cosine_model' in the store: run `spinjax run --pairs model`")
        values = at["qk_cosine_model"].transpose("layer", "head", "layer2", "head2").values
        values = values.reshape(n_layers * n_heads, n_layers * n_heads).astype(np.float64)
        name = "qk_cosine_model"
    else:
        hist = at["hist"].sel(matrix=matrix).transpose("layer", "head", "bin").values
        values = js_matrix(hist.reshape(n_layers * n_heads, -1))
        name = "js_model"
    layer = np.repeat(at["layer"].values, n_heads)
    head = np.tile(at["head"].values, n_layers)
    coords = {
        "layer": ("unit", layer),
        "head": ("unit", head),
        "layer2": ("unit2", layer),
        "head2": ("unit2", head),
    }
    return xr.DataArray(values, dims=("unit", "unit2"), coords=coords, name=name)


def ward_tree(
    ds: xr.Dataset, step: int, *, kind: str = "js", matrix: str = "W_QK"
) -> tuple[np.ndarray, list[str]]:
    """Ward linkage of every head of the model at ``step`` (scipy's ``linkage`` format) and the
    leaf labels ``L<layer>H<head>``.

    Distances: ``kind="cosine"``: sqrt(2 (1 - cosine)), the Euclidean distance between the
    unit-norm W_QK (needs ``--pairs model``); ``"js"``: sqrt(JS) of the raw histograms of
    ``matrix`` (a metric). Heads whose distances are NaN (all-zero heads) are left out.
    """
    sim = head_distances(ds, step, kind=kind, scope="model", matrix=matrix)
    values = sim.values
    dist = (
        np.sqrt(np.clip(2 * (1 - values), 0, None)) if kind == "cosine" else np.sqrt(np.clip(values, 0, None))
    )
    bad = ~np.isfinite(np.diag(values)) | ~np.isfinite(values).any(axis=1)
    keep = np.flatnonzero(~bad)
    if keep.size < 2:
        raise InputError(f"fewer than 2 heads with finite {kind} distances at step {step}")
    dist = dist[np.ix_(keep, keep)]
    if not np.isfinite(dist).all():
        raise InputError(f"{kind} distances between heads at step {step} are not all finite")
    np.fill_diagonal(dist, 0.0)
    labels = [f"L{int(sim['layer'].values[i])}H{int(sim['head'].values[i])}" for i in keep]
    return linkage(squareform(0.5 * (dist + dist.T), checks=False), method="ward"), labels


TRAJECTORY_FEATURES = (
    "std",
    "skew",
    "kurt",
    "entropy_residual",
    "kl_gauss",
    "stable_rank",
    "spectral_entropy",
)
_LOG = ("std", "stable_rank")


def trajectory_features(
    ds: xr.Dataset,
    *,
    matrices: Sequence[str] = ("W_Q", "W_K", "W_QK"),
    variables: Sequence[str] = TRAJECTORY_FEATURES,
    estimator: str = "mm",
) -> pd.DataFrame:
    """One row per (layer, head, step), one standardized column per (matrix, statistic).

    ``std`` and ``stable_rank`` enter as logs; each column is centred and divided by its
    standard deviation over all rows; constant or all-NaN columns are dropped, then rows with
    any NaN left.
    """
    cols = {}
    for m in matrices:
        for v in variables:
            x = study.statistic(ds, v, estimator).sel(matrix=m).transpose("layer", "head", "step").values
            x = x.astype(np.float64)
            if v in _LOG:
                with np.errstate(divide="ignore", invalid="ignore"):
                    x = np.log(np.where(x > 0, x, np.nan))
            cols[f"{m}:{v}"] = x.ravel()
    index = pd.MultiIndex.from_product(
        [ds["layer"].values, ds["head"].values, ds["step"].values], names=["layer", "head", "step"]
    )
    frame = pd.DataFrame(cols, index=index)
    sd = frame.std()
    frame = frame.loc[:, (sd > 0) & np.isfinite(sd)]
    frame = (frame - frame.mean()) / frame.std()
    return frame.dropna()


def trajectory_map(
    ds: xr.Dataset,
    *,
    matrices: Sequence[str] = ("W_Q", "W_K", "W_QK"),
    variables: Sequence[str] = TRAJECTORY_FEATURES,
    estimator: str = "mm",
    n_neighbors: int = 15,
    knn: int = 5,
    min_cluster_size: int | None = None,
    random_state: int = 0,
) -> pd.DataFrame:
    """Every head at every step as a point of a UMAP embedding of its statistics.

    Features: :func:`trajectory_features`. Returns one row per (layer, head, step) with
    columns ``layer, head, step, x, y, cluster``: (x, y) the 2-D UMAP embedding (``umap-learn``,
    ``n_neighbors``, fixed ``random_state``), ``cluster`` the HDBSCAN label of the point in
    the embedding (scikit-learn; "leaf" selection, the finest stable clusters; -1 = noise;
    ``min_cluster_size`` default max(5, rows / 25)).
    ``frame.attrs["neighbours"]`` (rows, ``knn``) holds each row's k nearest neighbours in
    feature space (row positions): the k-nearest-neighbour graph; ``attrs["features"]`` the
    feature columns.
    """
    import umap  # imports numba and compiles on first use (seconds): only when a map is asked for
    from sklearn.cluster import HDBSCAN
    from sklearn.neighbors import NearestNeighbors

    feats = trajectory_features(ds, matrices=matrices, variables=variables, estimator=estimator)
    n = len(feats)
    if n < 8:
        raise InputError(f"a trajectory map needs at least 8 points (heads x steps), got {n}")
    x = feats.values
    reducer = umap.UMAP(
        n_neighbors=max(2, min(n_neighbors, n - 1)), n_components=2, random_state=random_state, n_jobs=1,
        init="spectral" if n > 20 else "random",
    )  # fmt: skip
    emb = reducer.fit_transform(x)
    k = min(knn, n - 1)
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    size = min_cluster_size or max(5, n // 25)
    # leaf clusters: the finest stable ones (excess of mass tends to one cluster for all)
    hdbscan = HDBSCAN(min_cluster_size=min(size, n), cluster_selection_method="leaf", copy=True)
    labels = hdbscan.fit_predict(emb)
    out = feats.index.to_frame(index=False)
    out["x"], out["y"], out["cluster"] = emb[:, 0], emb[:, 1], labels
    out.attrs = {"neighbours": neighbours, "features": list(feats.columns), "random_state": random_state}
    return out
