"""`spinjax report`: the HTML page, loaded in headless Chromium, shows every figure."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from spinjax.analysis.figures import FIGURES
from spinjax.analysis.report import build_report
from spinjax.cli import main

TP, NEOX = "tiny-pythia", "gpt_neox"
# what the trajectory store (no `spinjax dynamics`, no null ensemble) cannot show, and umap's map
# (numba compiles for a minute on first use: the full report is test_full_report_of_the_study_store)
NEEDS_MORE = ("mode-overlap", "mode-events", "divergence-steps", "null-matrix", "null-sweep")
SHOWN = [n for n in FIGURES if n not in NEEDS_MORE and n != "trajectory-map"]


def browse(chromium: str, page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``file://page`` with ``args`` (e.g. --dump-dom)."""
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def report(trajectory_store, tmp_path_factory):
    names = [n for n in FIGURES if n != "trajectory-map"]
    return build_report(trajectory_store, TP, tmp_path_factory.mktemp("report"), dpi=80, figures=names)


def _imgs(dom: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', dom)


def test_report_files(report):
    assert report.path.name == "index.html" and list(report.skipped) == list(NEEDS_MORE)
    assert list(report.figures) == SHOWN  # every other figure: the trajectory allows them
    for name in NEEDS_MORE[:3]:
        assert "run `spinjax dynamics --model MODEL` on the store" in report.skipped[name]
    for name in NEEDS_MORE[3:]:
        assert "needs a null ensemble in the store" in report.skipped[name]
    page = report.path.read_text()
    sources = _imgs(page)
    assert len(sources) == len(SHOWN)
    for src in sources:
        path = report.path.parent / src
        assert "/" not in src and path.is_file() and path.stat().st_size > 5000, src
    assert "animation.gif" in sources
    assert "steps done / requested</th><td>14 / 14" in page
    assert "<h2>Per-layer summary" in page and page.count("<section") == len(SHOWN)
    assert "<th>kl_gauss_mm</th>" in page and "<th>entropy_residual_mm</th>" in page  # Miller-Madow
    assert "null ensembles</th><td>none" in page
    for name in SHOWN:
        assert f'id="{name}"' in page and f'href="#{name}"' in page
    assert "http" not in page  # nothing fetched from anywhere


def test_report_renders_in_chromium(chromium, report, tmp_path):
    done = browse(chromium, report.path, tmp_path, "--dump-dom")
    dom = done.stdout
    assert len(_imgs(dom)) == len(SHOWN)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{len(SHOWN)}"' in body and f'data-images-loaded="{len(SHOWN)}"' in body
    assert 'data-loaded="true"' in body, body
    shot = tmp_path / "page.png"
    browse(chromium, report.path, tmp_path, f"--screenshot={shot}", "--window-size=1400,3000")
    with Image.open(shot) as im:
        assert im.size == (1400, 3000)
        grey = np.asarray(im.convert("L"), dtype=float)
    assert grey.std() > 20  # not a blank page
    assert (grey < 200).mean() > 0.02  # text and figures, not just a white page
    # the figures themselves: the middle of the first screen holds coloured pixels (plots)
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    colourful = (rgb.max(axis=2) - rgb.min(axis=2)) > 60
    assert colourful[600:3000].mean() > 0.01


def test_broken_image_is_detected(chromium, report, tmp_path):
    """The page's own check reports a missing figure (so "true" above means something)."""
    copy = tmp_path / "copy"
    shutil.copytree(report.path.parent, copy)
    (copy / "corner.png").unlink()
    dom = browse(chromium, copy / "index.html", tmp_path, "--dump-dom").stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-loaded="false"' in body and f'data-images-loaded="{len(SHOWN) - 1}"' in body


def test_embedded_report_is_one_file(chromium, trajectory_store, tmp_path):
    out = tmp_path / "embedded"
    result = build_report(trajectory_store, TP, out, embed=True, figures=["heads", "animation"], dpi=50)
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]
    sources = _imgs(result.path.read_text())
    assert [s[:22] for s in sources] == ["data:image/png;base64,", "data:image/gif;base64,"]
    dom = browse(chromium, result.path, tmp_path, "--dump-dom").stdout
    assert 'data-loaded="true"' in re.search(r"<body[^>]*>", dom).group(0)


def test_report_command_single_step_model(trajectory_store, tmp_path):
    """A one-checkpoint model: the report holds the one-step figures and says why not the rest."""
    out = tmp_path / "neox"
    done = CliRunner().invoke(main, ["report", str(trajectory_store), "--model", NEOX, "--out", str(out)])
    assert done.exit_code == 0, done.output
    dynamics = [n for n, spec in FIGURES.items() if spec.kind == "dynamics"]
    page = (out / "index.html").read_text()
    shown = len(FIGURES) - len(dynamics) - 2  # nor the two null figures: no null ensemble
    assert len(_imgs(page)) == shown
    for name in dynamics:
        assert f"skipped {name}: figure '{name}' shows training dynamics" in done.output
        assert f"<b>{name}</b>: figure" in page
    assert f"{out / 'index.html'}: {shown} figures" in done.output
    bad = CliRunner().invoke(main, ["report", str(trajectory_store), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "several models" in bad.output


@pytest.mark.slow
def test_full_report_of_the_study_store(study_store, tmp_path):
    """After `run --null --pairs layer`, `spinjax dynamics` and a null sweep the report holds
    every figure (the null and dynamics ones included) and the z-scores in its summary."""
    result = build_report(study_store, TP, tmp_path / "full", dpi=40)
    assert result.skipped == {} and list(result.figures) == list(FIGURES)
    page = result.path.read_text()
    assert len(_imgs(page)) == len(FIGURES)
    assert "<th>kurt_z</th>" in page and "<th>kl_gauss_mm_z</th>" in page
    assert "baseline/64x4, baseline/64x16, baseline/64x32" in page
