"""Figures of the random-matrix null ensembles (``baseline/<d>x<dh>`` groups), in the study's
scaling (N(0, 1) factors, W_QK / sqrt(d); :mod:`spinjax.analysis.rmt`), with their analytic laws."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ...errors import InputError
from .. import rmt, study
from .common import Selection, legend_below, need_baseline, new_figure

GAUSS_SAMPLE_MAX_D = 2048  # a full-rank d x d sample is drawn (SVD) up to this d
_FULL, _LOW, _FACTOR = "tab:blue", "tab:red", "tab:green"


def _geometry(key: str) -> tuple[int, int]:
    d, dh = key.split("x")
    return int(d), int(dh)


def fig_null_matrix(sel: Selection) -> Figure:
    """A full-rank Gaussian d x d matrix beside the null's W_Q^T W_K / sqrt(d) of the same d and
    element variance: entries, singular values by rank, and normalised spectral densities."""
    key, null = need_baseline(sel, "null-matrix")
    d, dh = _geometry(key)
    sigma = float(null.attrs["sigma"])
    scale = rmt.study_scale(d, sigma)
    var = dh / d  # element variance of the null's W_QK in the study's scaling
    full = _full_rank_draws(d, var) if d <= GAUSS_SAMPLE_MAX_D else None
    fig = new_figure(15, 6)
    ax0, ax1, ax2 = fig.subplots(1, 3)
    _entries(ax0, null, full, d, dh, scale["W_QK"])
    _rank_plot(ax1, null, full, d, dh, scale["W_QK"])
    _densities(ax2, null, full, d, dh, sigma)
    fig.suptitle(
        f"What random looks like at d = {d}: full-rank Gaussian d×d vs W_QK = W_Qᵀ W_K / √d "
        f"of rank d_head = {dh} "
        f"(N(0,1) factors; {int(null.sizes['sample'])} draws)"
    )
    return fig


def _full_rank_draws(d: int, var: float) -> tuple[np.ndarray, np.ndarray]:
    """Entries and singular values (draws, d) of full-rank d x d Gaussian matrices of entry
    variance ``var``: enough draws (seed 0) for about 2048 singular values, at most 32."""
    rng = np.random.default_rng(0)
    draws = [rng.standard_normal((d, d)) * math.sqrt(var) for _ in range(min(32, -(-2048 // d)))]
    return np.stack(draws), np.stack([np.linalg.svd(g, compute_uv=False) for g in draws])


def _entries(ax, null, full, d: int, dh: int, c: float) -> None:
    """Element densities: the null's pooled W_QK entries, a full-rank sample, and both laws."""
    sd = math.sqrt(dh / d)
    lim = 6 * sd
    edges = np.linspace(-lim, lim, 121)
    hist = null["hist"].sel(matrix="W_QK").sum("sample").values.astype(np.float64)
    moved = study.rebin(hist, null["bin_edges"].values * c, edges)
    width = np.diff(edges)
    centres = (edges[:-1] + edges[1:]) / 2
    ax.stairs(
        moved / (hist.sum() * width), edges, color=_LOW, lw=1.5, label=f"W_QK, rank {dh} (null, pooled)"
    )
    if full is not None:
        counts, _ = np.histogram(full[0].ravel(), edges)
        ax.stairs(counts / (full[0].size * width), edges, color=_FULL, lw=1,
                  label=f"full-rank Gaussian {d}×{d} ({len(full[0])} draws)")  # fmt: skip
    ax.plot(centres, np.exp(-0.5 * (centres / sd) ** 2) / (sd * math.sqrt(2 * math.pi)), "k--", lw=1,
            label=f"Gaussian N(0, d_head/d), std {sd:.3g}")  # fmt: skip
    ax.plot(centres, rmt.variance_gamma_pdf(centres, dh, 1 / math.sqrt(d)), ":", color="darkred", lw=1.5,
            label=f"exact law of W_QK entries (kurt 6/d_head = {6 / dh:.3g})")  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-4 / sd)
    ax.set_xlabel("entry (study scaling)")
    ax.set_ylabel("density (log)")
    ax.set_title("entries")
    legend_below(ax)


def _rank_plot(ax, null, full, d: int, dh: int, c: float) -> None:
    """All d singular values by rank: the full-rank law, and W_QK's d_head non-zero ones then zeros."""
    k = np.arange(1, d + 1)
    ax.plot(k, math.sqrt(dh) * rmt.singular_value_quantiles(d, 1.0), "-", color=_FULL, lw=1,
            label="full-rank: Marchenko-Pastur (ratio 1) quantiles")  # fmt: skip
    if full is not None:
        ax.plot(k, full[1][0], ".", color=_FULL, ms=3, label="full-rank: one draw")
    s = null["singular_values"].sel(matrix="W_QK").values.astype(np.float64) * c  # (sample, dh)
    lo, mid, hi = np.nanquantile(s, 0.025, axis=0), s.mean(axis=0), np.nanquantile(s, 0.975, axis=0)
    kk = np.arange(1, dh + 1)
    ax.fill_between(kk, lo, hi, color=_LOW, alpha=0.3, lw=0)
    ax.plot(kk, mid, "o-", color=_LOW, ms=3, lw=1, label=f"W_QK: {dh} non-zero (null mean, 95%)")
    floor = 0.1 * min(float(np.nanmin(lo)), math.sqrt(dh) * rmt.singular_value_quantiles(d, 1.0)[-2])
    if d > dh:
        zeros = np.arange(dh + 1, d + 1)
        ax.plot(zeros, np.full(zeros.size, floor * 1.4), "v", color=_LOW, ms=3,
                label=f"W_QK: {d - dh} singular values exactly 0 (drawn at the floor)")  # fmt: skip
    ax.axvline(dh + 0.5, color="k", ls=":", lw=1)
    ax.text(dh + 0.5, math.sqrt(d) * 1.6, f" k = d_head = {dh}", fontsize="small", va="bottom")
    ax.set_yscale("log")
    ax.set_ylim(floor, math.sqrt(d) * 4)
    ax.set_xlim(0, d + 1)
    ax.set_xlabel("rank k")
    ax.set_ylabel("singular value s_k (study scaling)")
    ax.set_title("singular values, all d of them")
    legend_below(ax)


def _densities(ax, null, full, d: int, dh: int, sigma: float) -> None:
    """Squared singular values normalised to mean 1, against their laws."""
    r = dh / d
    sv = null["singular_values"]
    factor = (sv.sel(matrix="W_Q").values.astype(np.float64) ** 2 / (d * sigma**2)).ravel()
    qk = (sv.sel(matrix="W_QK").values.astype(np.float64) ** 2 / (d * sigma**2) ** 2).ravel()
    top = max(np.nanquantile(qk, 0.999), (1 + math.sqrt(r)) ** 2) * 1.1
    if full is not None:
        top = max(top, 4.2)
    edges = np.linspace(0, top, 61)
    x = np.linspace(top / 2000, top, 800)
    for values, colour, label in ((factor, _FACTOR, "factor W_Q"), (qk, _LOW, "W_QK, its d_head non-zero")):
        counts, _ = np.histogram(values, edges)
        ax.stairs(
            counts / (values.size * np.diff(edges)), edges, color=colour, lw=1.2, label=f"{label} (null)"
        )
    ax.plot(x, rmt.marchenko_pastur_pdf(x, r), "--", color=_FACTOR, lw=1.5,
            label=f"Marchenko-Pastur, ratio d_head/d = {r:.3g} (a factor)")  # fmt: skip
    ax.plot(
        x, rmt.free_mp_product_pdf(x, r), ":", color=_LOW, lw=2, label="free product of two factors' laws"
    )
    if full is not None:
        lam = full[1].ravel() ** 2 / (d * dh / d)
        counts, _ = np.histogram(lam, edges)
        ax.stairs(counts / (lam.size * np.diff(edges)), edges, color=_FULL, lw=1,
                  label=f"full-rank d×d ({len(full[1])} draws)")  # fmt: skip
        ax.plot(
            x, rmt.marchenko_pastur_pdf(x, 1.0), "--", color=_FULL, lw=1, label="Marchenko-Pastur, ratio 1"
        )
    peak = max(np.nanmax(rmt.marchenko_pastur_pdf(x, r)), np.nanmax(rmt.free_mp_product_pdf(x[::8], r)))
    ax.set_ylim(0, 1.25 * peak)
    ax.set_xlim(0, top)
    ax.set_xlabel("λ = s² / mean (W_QK: s² / (d σ²)², factor: s² / (d σ²))")
    ax.set_ylabel("density")
    ax.set_title("spectral densities")
    legend_below(ax)


def fig_null_sweep(sel: Selection) -> Figure:
    """W_QK's std, entropy, KL and kurtosis against d_head at one d (null means and 95% bands),
    with the analytic curves, in the study's scaling."""
    key, _ = need_baseline(sel, "null-sweep")
    d = _geometry(key)[0]
    sweep = study.baseline_sweep(sel.store, d, estimator=sel.estimator)
    if sweep.sizes["d_head"] < 2:
        raise InputError(
            f"figure 'null-sweep' needs null ensembles of at least 2 d_head at d = {d}; "
            f"run e.g. `spinjax baseline --d {d} --d-head {max(1, d // 16)},{max(1, d // 4)},{d // 2 or 1}`"
        )
    other = study.baseline_sweep(sel.store, d, estimator="plugin" if sel.estimator == "mm" else "mm")
    dh = sweep["d_head"].values
    grid = np.unique(np.geomspace(dh.min(), dh.max(), 40).round().astype(int))
    curves = rmt.null_curves(d, grid)
    fig = new_figure(13, 8.5)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    analytic = {
        "std": (("std", "std = √(d_head/d)", "k-"),),
        "entropy": (("entropy_gauss", "Gaussian: ½ ln(2πe d_head/d)", "k-"),
                    ("entropy", "exact law: Gaussian − negentropy", "r:")),
        "kl_gauss": (("kl_gauss", "true KL = negentropy of the exact law", "r:"),),
        "kurt": (("kurt", "6 / d_head", "k-"),),
    }  # fmt: skip
    for ax, stat in zip(axes, ("std", "entropy", "kl_gauss", "kurt"), strict=True):
        b = sweep[stat].values
        err = np.abs(b[:, [0, 2]].T - b[:, 1])
        ax.errorbar(dh, b[:, 1], yerr=err, fmt="o", ms=5, capsize=3, color="tab:blue",
                    label="null mean, 95% of draws" + (f" ({_est(sel.estimator)})" if stat in _HIST else ""),
                    )  # fmt: skip
        if stat == "kl_gauss":
            o = other[stat].values[:, 1]
            ax.plot(
                dh,
                o,
                "s",
                mfc="none",
                color="tab:orange",
                label=f"null mean ({_est(other.attrs['estimator'])})",
            )
        for name, label, style in analytic[stat]:
            ax.plot(grid, curves[name], style, lw=1.2, label=label)
        ax.set_xscale("log")
        ax.set_xticks(dh, [str(v) for v in dh])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if stat in ("std", "kurt", "kl_gauss"):
            ax.set_yscale("log")
        ax.set_ylabel(sweep[stat].attrs["label"])
        ax.legend(fontsize="x-small")
    axes[2].set_xlabel("d_head")
    axes[3].set_xlabel("d_head")
    for ax, title in zip(axes, ("element std", "element entropy", "KL from the Gaussian", "excess kurtosis"),
                         strict=True):  # fmt: skip
        ax.set_title(title)
    samples = sorted(set(sweep["samples"].values.tolist()))
    draws = f"{samples[0]} draws each" if len(samples) == 1 else f"{min(samples)} to {max(samples)} draws"
    fig.suptitle(f"Random W_QK = W_Qᵀ W_K / √d at d = {d} against d_head (N(0,1) factors; {draws})")
    return fig


_HIST = ("entropy", "kl_gauss")


def _est(estimator: str) -> str:
    return "Miller-Madow" if estimator == "mm" else "plug-in"
