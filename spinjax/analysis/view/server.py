"""The ``spinjax view`` web server: one page, its assets, and the store's data endpoints.

Built on the standard library's ``ThreadingHTTPServer`` (no dependency beyond the reading
side). Routes, all ``GET``:

- ``/`` (the page), ``/static/app.js``, ``/static/app.css``, ``/static/plotly.min.js`` (the
  plotting library's JavaScript: a partial plotly.js bundle that ships with spinjax, built by
  ``static/plotly-bundle``; no network, the page works offline);
- ``/api/meta`` (re-reads the store's committed state) and ``/api/layer``, ``/api/step``,
  ``/api/trajectory``, ``/api/head``, ``/api/pairs``, ``/api/null`` (see
  :class:`~spinjax.analysis.view.data.StoreView`), JSON.

Anything else is 404; a parameter naming something the store lacks, or malformed, is 400 with
a one-line JSON message; an unexpected failure is 500 without a traceback. Paths are matched
against this fixed table only: no part of a request becomes a file path. Served on loopback,
requests must name a loopback ``Host`` (a web page elsewhere cannot reach the store through
DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading
import traceback
import webbrowser
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ...errors import InputError
from .data import BadRequest, StoreView

STATIC = Path(__file__).parent / "static"
ASSETS = {  # URL path -> (file name in static/, content type, Cache-Control)
    "/": ("index.html", "text/html; charset=utf-8", "no-cache"),
    "/index.html": ("index.html", "text/html; charset=utf-8", "no-cache"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8", "no-cache"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8", "no-cache"),
    # versioned by its banner and large: the browser may keep it a day
    "/static/plotly.min.js": ("plotly.min.js", "text/javascript; charset=utf-8", "max-age=86400"),
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)  # plotly sets inline styles on its elements


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ViewServer(ThreadingHTTPServer):
    """The HTTP server of one store; ``url`` is where the page is."""

    daemon_threads = True

    def __init__(self, store: StoreView, host: str, port: int, *, debug: bool = False):
        self.store = store
        self.debug = debug
        self.routes: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
            "/api/layer": store.layer_overview,
            "/api/step": store.step_overview,
            "/api/trajectory": store.trajectory,
            "/api/head": store.head,
            "/api/pairs": store.pairs,
            "/api/null": store.null_band,
        }
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), Handler)
        except OSError as exc:
            why = exc.strerror or exc
            raise InputError(f"cannot listen on {host}:{port} ({why}); try another --port") from exc
        self.host = host
        bound = self.server_address[1]
        self.allowed_hosts = (
            {f"{n}:{bound}" for n in ("localhost", "127.0.0.1", "[::1]")} if is_loopback(host) else None
        )

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.server_address[1]}/"

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):  # a browser closing a connection is no error
            print(f"spinjax view: {client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)


class Handler(BaseHTTPRequestHandler):
    """Answers GET from the fixed route table; everything else is refused."""

    server: ViewServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page's requests reuse one connection
    server_version = "spinjax-view"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        try:
            self._get()
        except ConnectionError:
            raise
        except InputError as exc:  # the store went away or changed under the server
            print(f"spinjax view: {exc}", file=sys.stderr)
            self._json({"error": str(exc)}, HTTPStatus.INTERNAL_SERVER_ERROR)
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback to the client
            print(f"spinjax view: {self.path[:200]}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if self.server.debug:
                traceback.print_exc()
            self._json({"error": "internal error"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _get(self) -> None:
        allowed = self.server.allowed_hosts
        if allowed is not None and self.headers.get("Host", "") not in allowed:
            self._json({"error": "this server answers requests to localhost only"}, HTTPStatus.FORBIDDEN)
            return
        parts = urlsplit(self.path)
        path = parts.path
        if path in ASSETS:
            name, kind, cache = ASSETS[path]
            self._send((STATIC / name).read_bytes(), kind, cache=cache)
        elif path == "/api/meta":
            self._json(self.server.store.meta())
        elif path in self.server.routes:
            try:
                query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query),
                                       max_num_fields=16))  # fmt: skip
                self._json(self.server.routes[path](query))
            except (BadRequest, ValueError) as exc:
                message = str(exc) if isinstance(exc, BadRequest) else "malformed query"
                self._json({"error": message}, HTTPStatus.BAD_REQUEST)
        else:
            self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests and other methods: a short JSON answer (no server details)."""
        self.close_connection = True
        self._json({"error": HTTPStatus(code).phrase}, HTTPStatus(code))

    def _json(self, obj: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
        self._send(body, "application/json; charset=utf-8", status=status, cache="no-store")

    def _send(self, body: bytes, kind: str, *, status: HTTPStatus = HTTPStatus.OK, cache: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if kind.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server interface
        if self.server.debug:
            super().log_message(format, *args)


def make_server(store_path: str | Path, host: str = "127.0.0.1", port: int = 8000, *,
                debug: bool = False) -> ViewServer:  # fmt: skip
    """A server of ``store_path`` bound to ``host:port`` (``port=0``: any free port), not yet serving.

    Raises :class:`~spinjax.errors.InputError` for what is not a spinjax store or an address
    that cannot be bound.
    """
    return ViewServer(StoreView(store_path), host, port, debug=debug)


def _warm(server: ViewServer) -> None:
    """Read ahead for the first visit; a failure here is met again, and reported, by the request."""
    try:
        server.store.warm()
    except Exception as exc:  # noqa: BLE001 - best effort, in a thread of its own
        if server.debug:
            print(f"spinjax view: reading ahead failed: {exc}", file=sys.stderr)


def serve(store_path: str | Path, host: str = "127.0.0.1", port: int = 8000, *, open_browser: bool = False,
          debug: bool = False, echo: Callable[[str], None] = print) -> None:  # fmt: skip
    """Serve the viewer of ``store_path`` until Ctrl-C."""
    server = make_server(store_path, host, port, debug=debug)
    if not is_loopback(host):
        echo(f"warning: listening on {host}: anyone who can reach port {server.server_address[1]} "
             "can read the store")  # fmt: skip
    echo(f"spinjax view: {store_path} at {server.url} (Ctrl-C to stop)")
    threading.Thread(target=_warm, args=(server,), daemon=True).start()
    if open_browser:
        threading.Timer(0.3, webbrowser.open, args=(server.url,)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
