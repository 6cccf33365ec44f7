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

from spinjax.analysis.plots import FIGURES
from spinjax.analysis.report import build_report
from spinjax.cli import main

TP, NEOX = "tiny-pythia", "gpt_neox"


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
    return build_report(trajectory_store, TP, tmp_path_factory.mktemp("report"), dpi=80)


def _imgs(dom: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', dom)


def test_report_files(report):
    assert report.path.name == "index.html" and report.skipped == {}
    assert list(report.figures) == list(FIGURES)  # the trajectory allows every figure
    page = report.path.read_text()
    sources = _imgs(page)
    assert len(sources) == len(FIGURES)
    for src in sources:
        path = report.path.parent / src
        assert "/" not in src and path.is_file() and path.stat().st_size > 5000, src
    assert "animation.gif" in sources
    assert "steps done / requested</th><td>14 / 14" in page
    assert "<h2>Per-layer summary" in page and page.count("<section") == len(FIGURES)
    for name in FIGURES:
        assert f'id="{name}"' in page and f'href="#{name}"' in page
    assert "http" not in page  # nothing fetched from anywhere


def test_report_renders_in_chromium(chromium, report, tmp_path):
    done = browse(chromium, report.path, tmp_path, "--dump-dom")
    dom = done.stdout
    assert len(_imgs(dom)) == len(FIGURES)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{len(FIGURES)}"' in body and f'data-images-loaded="{len(FIGURES)}"' in body
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
    assert 'data-loaded="false"' in body and f'data-images-loaded="{len(FIGURES) - 1}"' in body


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
    dynamics = [n for n, (_, d) in FIGURES.items() if d.startswith("[dynamics]")]
    page = (out / "index.html").read_text()
    assert len(_imgs(page)) == len(FIGURES) - len(dynamics)
    for name in dynamics:
        assert f"skipped {name}: figure '{name}' shows training dynamics" in done.output
        assert f"<b>{name}</b>: figure" in page
    assert f"{out / 'index.html'}: {len(FIGURES) - len(dynamics)} figures" in done.output
    bad = CliRunner().invoke(main, ["report", str(trajectory_store), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "several models" in bad.output
