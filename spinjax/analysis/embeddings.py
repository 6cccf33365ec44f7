"""Learned absolute position embeddings (GPT-2's ``wpe``, BERT's ``position_embeddings``): numbers
and figures (``spinjax embeddings``), from the matrix P (positions x d_model).

- the variance of each dimension over positions (which dimensions carry position), the
  largest named;
- the cosine similarity of adjacent positions' vectors (how smoothly position moves);
- the power spectrum over positions: each dimension's mean removed, |rfft|^2 along positions,
  summed over dimensions and normalised to 1 (periodicity: a peak at k cycles over the n
  positions is a period of n / k positions).

JAX-free; figures without pyplot, like :mod:`spinjax.analysis.figures`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from scipy.signal import find_peaks


def position_summary(p: np.ndarray, *, top: int = 10) -> dict[str, Any]:
    """The numbers of a position-embedding matrix ``p`` (positions, d_model).

    Returns a JSON-ready dict: ``shape``; ``variance`` per dimension and ``top_dimensions``
    (index, variance, share of the total) for the ``top`` largest; ``adjacent_cosine``
    (positions - 1) and its mean, min and argmin; ``frequency`` (cycles per position, rfft
    bins) and ``power`` (normalised) and ``peaks``, the ``top`` largest local maxima past
    frequency 0 with their ``period`` in positions.

    Examples:
      >>> import numpy as np
      >>> from spinjax.analysis.embeddings import position_summary
      >>> t = np.arange(64)[:, None]
      >>> p = np.concatenate([np.sin(2 * np.pi * t / 16), 0.1 * np.cos(2 * np.pi * t / 8)], axis=1)
      >>> out = position_summary(p, top=2)
      >>> [d["dimension"] for d in out["top_dimensions"]], [pk["period"] for pk in out["peaks"]]
      ([0, 1], [16.0, 8.0])
    """
    p = np.asarray(p, np.float64)
    n_pos, _ = p.shape
    variance = p.var(axis=0)
    order = np.argsort(-variance, kind="stable")[:top]
    total = variance.sum()
    norms = np.linalg.norm(p, axis=1)
    cosine = (p[:-1] * p[1:]).sum(1) / np.where(norms[:-1] * norms[1:] > 0, norms[:-1] * norms[1:], np.nan)
    power = (np.abs(np.fft.rfft(p - p.mean(axis=0), axis=0)) ** 2).sum(axis=1)
    power = power / power.sum() if power.sum() > 0 else power
    frequency = np.fft.rfftfreq(n_pos)
    local = find_peaks(np.concatenate([[0.0], power[1:], [0.0]]))[0]  # past frequency 0, ends included
    peaks = sorted(local, key=lambda k: -power[k])[:top]
    finite = np.isfinite(cosine)
    share = variance / total if total > 0 else np.zeros_like(variance)
    return {
        "shape": [int(n_pos), int(p.shape[1])],
        "variance": variance.tolist(),
        "top_dimensions": [
            {"dimension": int(i), "variance": float(variance[i]), "share": float(share[i])} for i in order
        ],
        "adjacent_cosine": cosine.tolist(),
        "adjacent_cosine_mean": float(np.nanmean(cosine)) if finite.any() else float("nan"),
        "adjacent_cosine_min": float(np.nanmin(cosine)) if finite.any() else float("nan"),
        "adjacent_cosine_argmin": int(np.nanargmin(cosine)) if finite.any() else -1,
        "frequency": frequency.tolist(),
        "power": power.tolist(),
        "peaks": [
            {"frequency": float(frequency[k]), "period": float(1 / frequency[k]), "power": float(power[k])}
            for k in peaks
        ],
    }


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def position_figures(p: np.ndarray, summary: dict[str, Any], title: str) -> dict[str, Figure]:
    """name -> Figure: ``pos-matrix``, ``pos-variance``, ``pos-cosine``, ``pos-spectrum``."""
    p = np.asarray(p, np.float64)
    figures = {}

    fig = _figure(9, 5)
    ax = fig.subplots()
    bound = float(np.abs(p).max()) or 1.0
    im = ax.imshow(p, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                   norm=TwoSlopeNorm(0.0, -bound, bound))  # fmt: skip
    ax.set_xlabel("dimension")
    ax.set_ylabel("position")
    ax.set_title(f"{title}: position embedding matrix ({p.shape[0]} x {p.shape[1]})")
    fig.colorbar(im, ax=ax, label="value")
    figures["pos-matrix"] = fig

    fig = _figure(9, 4)
    ax = fig.subplots()
    variance = np.asarray(summary["variance"])
    ax.bar(np.arange(len(variance)), variance, width=1.0, color="0.45")
    for d in summary["top_dimensions"][:5]:
        ax.annotate(f"{d['dimension']}", (d["dimension"], d["variance"]), ha="center", va="bottom",
                    fontsize="small", color="C3")  # fmt: skip
    ax.set_xlabel("dimension")
    ax.set_ylabel("variance over positions")
    names = ", ".join(str(d["dimension"]) for d in summary["top_dimensions"][:5])
    ax.set_title(f"{title}: variance of each dimension over positions (largest: {names})")
    figures["pos-variance"] = fig

    fig = _figure(9, 4)
    ax = fig.subplots()
    cosine = np.asarray(summary["adjacent_cosine"])
    ax.plot(np.arange(1, len(cosine) + 1), cosine, lw=1)
    ax.set_xlabel("position i")
    ax.set_ylabel("cos(p[i - 1], p[i])")
    mean = summary["adjacent_cosine_mean"]
    ax.set_title(f"{title}: cosine similarity of adjacent positions (mean {mean:.3f})")
    figures["pos-cosine"] = fig

    fig = _figure(9, 4)
    ax = fig.subplots()
    freq, power = np.asarray(summary["frequency"]), np.asarray(summary["power"])
    ax.semilogy(freq[1:], np.where(power[1:] > 0, power[1:], np.nan), lw=1)
    for pk in summary["peaks"][:3]:
        ax.annotate(f"period {pk['period']:.1f}", (pk["frequency"], pk["power"]), fontsize="small",
                    color="C3", xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("frequency (cycles per position)")
    ax.set_ylabel("share of power")
    ax.set_title(f"{title}: power spectrum over positions, summed over dimensions")
    figures["pos-spectrum"] = fig
    return figures
