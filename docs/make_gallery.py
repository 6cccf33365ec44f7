"""Regenerate docs/gallery/*.png: every figure of `spinjax plot`, from the embedded model.

The store is what the study needs, made by the commands a user would run:

    spinjax run --model tiny-pythia --steps all --null --pairs layer --store STORE
    spinjax dynamics --model tiny-pythia --store STORE
    spinjax baseline --d 64 --d-head 2,4,8,16,32,64 --store STORE

then one PNG per figure at its default size (layer 2, head 1 where a figure shows one; the
last step), at 80 dpi to keep the gallery small. Usage (a few minutes on 2 CPU cores; the
first trajectory map compiles umap with numba):

    .venv/bin/python docs/make_gallery.py [--store PATH]   # PATH reused when it exists
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from spinjax.analysis import figures

HERE = Path(__file__).resolve().parent
GALLERY = HERE / "gallery"
COMMANDS = (
    ["run", "--model", "tiny-pythia", "--steps", "all", "--null", "--pairs", "layer", "--quiet"],
    ["dynamics", "--model", "tiny-pythia", "--quiet"],
    ["baseline", "--d", "64", "--d-head", "2,4,8,16,32,64", "--quiet"],
)
DPI = 80


def build_store(store: Path) -> None:
    spinjax = [sys.executable, "-m", "spinjax.cli"]
    for args in COMMANDS:
        subprocess.run([*spinjax, *args, "--store", str(store)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="the store to draw from (built there when missing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "gallery.zarr"
        if not store.exists():
            build_store(store)
        sel = figures.select(store, "tiny-pythia", layer=2, head=1)
        GALLERY.mkdir(exist_ok=True)
        for name in figures.FIGURES:
            fig = figures.make_figure(name, sel)
            path = GALLERY / f"{name}.png"
            fig.savefig(path, dpi=DPI)
            print(f"{path.relative_to(HERE.parent)}  {path.stat().st_size // 1024} kB")
        total = sum(p.stat().st_size for p in GALLERY.glob("*.png"))
        print(f"{len(figures.FIGURES)} figures, {total / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
