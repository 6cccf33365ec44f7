"""``spinjax view``: browse every head of every step of a store in a local web page.

The server (:mod:`spinjax.analysis.view.server`, standard library only) serves one page
(``static/``: HTML, one readable JavaScript file, CSS; plots drawn by a partial plotly.js
bundle that ships with spinjax, see ``static/plotly-bundle``) and JSON endpoints that read
the store lazily and read-only (:mod:`spinjax.analysis.view.data`). Nothing here imports JAX.
"""

from .data import BadRequest, StoreView
from .server import make_server, serve

__all__ = ["BadRequest", "StoreView", "make_server", "serve"]
