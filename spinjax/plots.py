"""The figures' former home, kept importable: everything now lives in :mod:`spinjax.figures`
(one module per family, the registry in ``spinjax/figures/__init__.py``).

>>> from spinjax import plots
>>> fig = plots.make_figure("hist", "store/spinjax.zarr", "tiny-pythia", layer=2)  # doctest: +SKIP
"""

from .figures import FIGURES, FigureSpec, Selection, file_stem, make_figure, save, select

__all__ = ["FIGURES", "FigureSpec", "Selection", "file_stem", "make_figure", "save", "select"]
