"""``spinjax report``: one HTML page with every figure a model's store contents allow.

The page is static (no server, no external resources): figures are PNG (the animation GIF)
files beside ``index.html``, or embedded as data URIs with ``embed=True`` (one file to mail).
Every figure of :data:`spinjax.analysis.figures.FIGURES` that the store supports is on the page: the
training-dynamics ones once the model has several finished steps (the mode and divergence
figures once ``spinjax dynamics`` ran), the null's bands and figures once the store holds a
null ensemble (``run --null``, ``spinjax baseline``); the others are listed with the reason.
A small script marks ``<body data-loaded="true">`` once every image has loaded (``"false"``
if one is broken), which the tests read from headless Chromium.

>>> from spinjax.report import build_report
>>> build_report("store/spinjax.zarr", "tiny-pythia", "report").path   # doctest: +SKIP
PosixPath('report/index.html')
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError, check_writable, writing_to
from ..version import __version__
from . import study
from .figures import FIGURES, Selection, save, select
from .reader import open_store

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 2px 8px; border: 1px solid #ddd; }
th { background: #f4f4f4; text-align: left; } figure { margin: 0; } img { max-width: 100%; }
.desc { color: #555; } .skipped { color: #a33; } nav a { margin-right: 0.8em; }
"""

_SCRIPT = """
function spinjaxCheck() {
  const imgs = Array.from(document.images);
  const loaded = imgs.filter(i => i.complete && i.naturalWidth > 0);
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesLoaded = loaded.length;
  if (loaded.length === imgs.length) document.body.dataset.loaded = "true";
  else if (imgs.every(i => i.complete)) document.body.dataset.loaded = "false";
}
window.addEventListener("load", spinjaxCheck);
"""


@dataclass
class Report:
    path: Path
    figures: dict[str, Path] = field(default_factory=dict)  # name -> image file (PNG or GIF)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason


def build_report(
    store: str | Path,
    model: str | None = None,
    out: str | Path = "report",
    *,
    embed: bool = False,
    figures: Sequence[str] | None = None,
    dpi: int = 100,
    **choices: Any,
) -> Report:
    """Write ``out/index.html`` (and the figure files) for ``model``; return what was made.

    ``figures`` restricts the figures (default: all of :data:`spinjax.analysis.figures.FIGURES`);
    ``choices`` (step, layer, head, matrix, stat, estimator) as
    :func:`spinjax.analysis.figures.select`.
    The cross-model figures show every model of the store.
    """
    out = Path(out)
    check_writable(out, "the report")
    reader = open_store(store)
    sel = select(reader, model, **choices)
    sel.model()  # a report is about one model: InputError naming them when there are several
    names = list(figures) if figures is not None else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise InputError(f"no figure(s) {unknown}; choose from {', '.join(FIGURES)}")
    with writing_to(out, "the report"):
        out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "index.html")
    for name in names:
        try:
            fig = FIGURES[name].func(sel)
        except InputError as exc:
            report.skipped[name] = str(exc)
            continue
        paths = save(fig, out / name, formats=("png",), dpi=dpi)
        report.figures[name] = paths[-1]  # the GIF of an animation, else the PNG
    page = _page(reader, sel, report, embed=embed)
    with writing_to(out, "the report"):
        report.path.write_text(page, encoding="utf-8")
    if embed:
        for path in report.figures.values():
            for sibling in (path, path.with_suffix(".png")):
                sibling.unlink(missing_ok=True)
    return report


def _src(path: Path, embed: bool) -> str:
    if not embed:
        return html.escape(path.name)
    mime = "image/gif" if path.suffix == ".gif" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _page(reader, sel: Selection, report: Report, *, embed: bool) -> str:
    e = html.escape
    attrs = reader.attrs(sel.key)
    comp = reader.completeness[sel.key]
    geometry = ", ".join(
        f"{k} {attrs.get(k)}" for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head")
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>spinjax report: {e(sel.key)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>spinjax report: {e(sel.key)}</h1>",
        "<table>",
        _row("store", str(reader.path)),
        _row("source", str(attrs.get("source"))),
        _row("architecture", f"{attrs.get('architecture')} ({geometry}), dtype {attrs.get('dtype')}"),
        _row("steps done / requested", f"{comp.done} / {comp.requested}"),
        _row("finished steps", ", ".join(map(str, comp.steps_done))),
        *([_row("pending steps", ", ".join(map(str, comp.steps_pending)))] if comp.steps_pending else []),
        _row("figures at", f"step {sel.step}, layer {sel.layer}, head {sel.head}, {sel.matrix}"),
        _row("entropy and KL", "Miller-Madow corrected" if sel.estimator == "mm" else "plug-in"),
        _row("null ensembles", ", ".join(f"baseline/{k}" for k in _baselines(reader)) or "none"),
        _row("models in the store", ", ".join(reader.models)),
        _row("written", f"{_dt.datetime.now().isoformat(timespec='seconds')} by spinjax {__version__}"),
        "</table>",
        "<nav><p>" + " ".join(f'<a href="#{e(n)}">{e(n)}</a>' for n in report.figures) + "</p></nav>",
        f"<h2>Per-layer summary ({e(sel.matrix)}, step {sel.step}, mean over heads)</h2>",
        _summary_table(sel),
    ]  # fmt: skip
    for name, path in report.figures.items():
        desc = FIGURES[name].description
        parts += [
            f'<section id="{e(name)}"><h2>{e(name)}</h2><p class="desc">{e(desc)}</p>',
            f'<figure><img src="{_src(path, embed)}" alt="{e(name)}: {e(desc)}"></figure></section>',
        ]
    if report.skipped:
        parts.append("<h2>Figures not made from this store</h2><ul>")
        parts += [f'<li class="skipped"><b>{e(n)}</b>: {e(why)}</li>' for n, why in report.skipped.items()]
        parts.append("</ul>")
    parts += [f"<script>{_SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _baselines(reader) -> list[str]:
    return list(study.open_baselines(reader.path))


def _row(key: str, value: str) -> str:
    return f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>"


_SUMMARY = ("std", "kurt", "entropy_residual", "kl_gauss", "sigma_fit", "stable_rank", "spectral_norm")
_SUMMARY_Z = ("kurt_z", "kl_gauss_mm_z", "stable_rank_z")  # from `run --null`


def _summary_table(sel: Selection) -> str:
    """Per layer, the mean over heads of a few statistics (entropy and KL with the selection's
    estimator) and, where the store has them, of their z-scores against the null."""
    at = sel.at.sel(matrix=sel.matrix)
    columns = {}
    for name in _SUMMARY + tuple(z for z in _SUMMARY_Z if z in at):
        v = study.statistic(at, name, sel.estimator)
        columns[v.name] = v.mean("head").values
    table = pd.DataFrame({"layer": at["layer"].values, **columns})
    fmt = lambda v: f"{v:.4g}" if np.isfinite(v) else "nan"  # noqa: E731
    return table.to_html(index=False, float_format=fmt, border=0)
