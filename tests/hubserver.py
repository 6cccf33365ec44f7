"""A small Hugging Face hub on 127.0.0.1, for the hub tests and benchmarks/bench_hub.py.

Two HTTP servers, as the real hub has: the hub answers ``HEAD``/``GET
/{owner}/{name}/resolve/{revision}/{file}`` with the headers huggingface_hub reads
(``X-Repo-Commit``, ``ETag``; for LFS files, ``.bin`` and ``.safetensors``, a 302 redirect with
``X-Linked-Etag`` / ``X-Linked-Size`` to a second host, the "CDN", which serves the bytes with
``Range`` support, ``Content-Range`` and the sha256 as ``ETag``). Errors carry the
``X-Error-Code`` headers the hub sends (RepoNotFound, RevisionNotFound, EntryNotFound).

Every response is logged with the body bytes it actually sent (:attr:`FakeHub.log`). Faults for
the tests: :meth:`FakeHub.fail` (an HTTP status instead of the answer), :meth:`FakeHub.drop`
(the connection closed after some bytes of the body), :meth:`FakeHub.slow` (a pause before each
chunk), :meth:`FakeHub.change` (a file's content and ETag replaced after some GETs). The
benchmark throttles all bodies together to ``bandwidth`` bytes/s and delays every answer by
``latency`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

CHUNK = 256 << 10
LFS_SUFFIXES = (".bin", ".safetensors")


@dataclass
class Blob:
    """A file's content: bytes, or a (possibly sparse) file on disk."""

    data: bytes | None = None
    path: Path | None = None
    etag: str = ""

    def __post_init__(self):
        self.size = len(self.data) if self.data is not None else self.path.stat().st_size
        if not self.etag:
            self.etag = _sha256(self)

    def read(self, start: int, stop: int) -> bytes:
        if self.data is not None:
            return self.data[start:stop]
        if not hasattr(self, "_fd"):
            self._fd = os.open(self.path, os.O_RDONLY)  # kept open: pread needs no shared position
        return os.pread(self._fd, stop - start, start)


def _sha256(blob: Blob) -> str:
    h = hashlib.sha256()
    for a in range(0, blob.size, 16 << 20):
        h.update(blob.read(a, min(blob.size, a + (16 << 20))))
    return h.hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Served:
    server: str  # "hub" or "cdn"
    method: str
    repo: str
    revision: str  # as asked (a branch, a tag or a commit)
    file: str
    status: int
    range: str | None
    body: int = 0  # bytes of body sent
    revisions: set[str] = field(default_factory=set)  # the commit and its names

    def of(self, revision: str) -> bool:
        """Whether this request was for ``revision`` (a name or the commit)."""
        return revision in self.revisions or revision == self.revision


@dataclass
class _Faults:
    """Faults by file name, or by (revision, file) for one revision's file only."""

    fail: dict = field(default_factory=dict)  # -> statuses to answer, in turn
    drop: dict = field(default_factory=dict)  # -> body bytes before closing, one per GET
    slow: dict = field(default_factory=dict)  # -> seconds before each chunk
    change: dict[tuple[str, str, str], tuple[int, Blob]] = field(default_factory=dict)

    @staticmethod
    def of(faults: dict, revisions: set[str], file: str):
        """The fault for ``file`` at one of ``revisions`` (a commit and its names), else for any."""
        return next((faults[(r, file)] for r in revisions if (r, file) in faults), faults.get(file))


class FakeHub:
    """Repos at revisions, served on 127.0.0.1 (see the module docstring).

    >>> with FakeHub() as hub:
    ...     commit = hub.add("org/model", "main", {"config.json": b"{}"})
    ...     hub.endpoint  # HF_ENDPOINT
    """

    def __init__(self, bandwidth: float | None = None, latency: float = 0.0):
        self.bandwidth, self.latency = bandwidth, latency
        self.repos: dict[str, dict[str, str]] = {}  # repo -> revision -> commit
        self.files: dict[tuple[str, str], dict[str, Blob]] = {}  # (repo, commit) -> file -> blob
        self.log: list[Served] = []
        self.faults = _Faults()
        self._lock = threading.Lock()
        self._next_send = 0.0  # token bucket of the throttle: when the link is free again
        self._gets: dict[tuple[str, str, str], int] = {}
        self._servers: list[ThreadingHTTPServer] = []

    # ---- content

    def add(self, repo: str, revision: str, files: dict[str, bytes | Path], etags: dict | None = None) -> str:
        """``files`` as ``repo`` at ``revision`` (a branch or tag name); its commit hash."""
        commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        self.repos.setdefault(repo, {})[revision] = commit
        blobs = {}
        for name, content in files.items():
            etag = (etags or {}).get(name, "")
            blob = (
                Blob(data=content, etag=etag) if isinstance(content, bytes) else Blob(path=content, etag=etag)
            )
            if not name.endswith(LFS_SUFFIXES) and not etag:
                blob.etag = git_blob_id(blob.read(0, blob.size))
            blobs[name] = blob
        self.files[(repo, commit)] = blobs
        return commit

    def commit(self, repo: str, revision: str) -> str:
        return self.repos[repo][revision]

    # ---- faults

    def fail(self, file: str, *statuses: int, revision: str | None = None) -> None:
        """Answer the next requests of ``file`` (at the CDN for LFS files) with these statuses."""
        self.faults.fail.setdefault((revision, file) if revision else file, []).extend(statuses)

    def drop(self, file: str, *after: int, revision: str | None = None) -> None:
        """Close the connection of the next GETs of ``file`` after these many bytes of body."""
        self.faults.drop.setdefault((revision, file) if revision else file, []).extend(after)

    def slow(self, file: str, pause: float, revision: str | None = None) -> None:
        """Pause ``pause`` seconds before each chunk of ``file``'s bodies."""
        self.faults.slow[(revision, file) if revision else file] = pause

    def change(self, repo: str, revision: str, file: str, after_gets: int, content: bytes) -> None:
        """After ``after_gets`` more GETs of the file, serve ``content`` (and its ETag) instead."""
        commit = self.commit(repo, revision)
        key = (repo, commit, file)
        self.faults.change[key] = (self._gets.get(key, 0) + after_gets, Blob(data=content))

    # ---- accounting

    def body_bytes(
        self, repo: str | None = None, file: str | None = None, revision: str | None = None
    ) -> int:
        """Body bytes served (resolve and CDN), optionally of one repo, file or commit/revision."""

        def match(s: Served) -> bool:
            rev_ok = revision is None or s.of(revision)
            return (repo is None or s.repo == repo) and (file is None or s.file == file) and rev_ok

        return sum(s.body for s in self.log if match(s))

    def requests(self, **match) -> list[Served]:
        return [s for s in self.log if all(getattr(s, k) == v for k, v in match.items())]

    # ---- serving

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_port}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_port}"

    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            handler = type(f"{role.title()}Handler", (_Handler,), {"hub": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            # A short poll so that shutdown() returns at once rather than after half a second.
            serve = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True,
                                     name=f"fakehub-{role}")  # fmt: skip
            serve.start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _blob(self, repo: str, commit: str, file: str, counting: bool) -> Blob | None:
        key = (repo, commit, file)
        with self._lock:
            if counting:
                self._gets[key] = self._gets.get(key, 0) + 1
            change = self.faults.change.get(key)
            if change is not None and self._gets.get(key, 0) > change[0]:
                self.files[(repo, commit)][file] = change[1]
                del self.faults.change[key]
        return self.files.get((repo, commit), {}).get(file)

    def _throttle(self, n: int) -> None:
        if not self.bandwidth:
            return
        with self._lock:
            now = time.perf_counter()
            self._next_send = max(self._next_send, now) + n / self.bandwidth
            wait = self._next_send - now
        if wait > 0:
            time.sleep(wait)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<commit>[0-9a-f]{40})/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub
    role: str

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        hub = self.hub
        if hub.latency:
            time.sleep(hub.latency)
        url = urlparse(self.path)
        if url.path == "/_served":  # what was served so far, for a client in another process
            data = json.dumps({"body": sum(s.body for s in hub.log), "requests": len(hub.log)}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data if body else b"")
            return
        pattern = _RESOLVE if self.role == "hub" else _CDN
        m = pattern.match(unquote(url.path))
        if m is None:
            return self._status(404, {}, served=Served(self.role, self.command, "", "", url.path, 404, None))
        repo, file = m["repo"], m["file"]
        revision = (
            m["revision"] if self.role == "hub" else parse_qs(url.query).get("revision", [m["commit"]])[0]
        )
        served = Served(self.role, self.command, repo, revision, file, 0, self.headers.get("Range"))
        if repo not in hub.repos:
            return self._status(401, {"X-Error-Code": "RepoNotFound"}, served)
        commits = hub.repos[repo]
        commit = m["commit"] if self.role == "cdn" else commits.get(revision, revision)
        if commit not in commits.values():
            return self._status(404, {"X-Error-Code": "RevisionNotFound"}, served)
        served.revisions = {commit} | {name for name, c in commits.items() if c == commit}
        statuses = _Faults.of(hub.faults.fail, served.revisions, file)
        lfs = file.endswith(LFS_SUFFIXES)
        if statuses and (self.role == "cdn" or not lfs):
            return self._status(statuses.pop(0), {"Retry-After": "0"}, served)
        blob = hub._blob(repo, commit, file, counting=body)
        if blob is None:
            return self._status(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, served)
        if self.role == "hub" and lfs:
            location = f"{hub.cdn}/cdn/{quote(repo)}/{commit}/{quote(file)}?revision={quote(revision)}"
            pointer = git_blob_id(blob.etag.encode())  # the hub's ETag of an LFS file: its pointer's id
            headers = {"Location": location, "X-Repo-Commit": commit, "X-Linked-Etag": f'"{blob.etag}"',
                       "X-Linked-Size": str(blob.size), "ETag": f'"{pointer}"'}  # fmt: skip
            return self._status(302, headers, served)
        self._send(blob, body, served, {"X-Repo-Commit": commit} if self.role == "hub" else {})

    def _status(self, status: int, headers: dict, served: Served) -> None:
        served.status = status
        self.hub.log.append(served)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, blob: Blob, body: bool, served: Served, extra: dict) -> None:
        hub, start, stop = self.hub, 0, blob.size
        asked = self.headers.get("Range")
        status = 200
        if asked is not None:
            m = _RANGE.match(asked.strip())
            if m is None or int(m[1]) >= blob.size:
                return self._status(416, {"Content-Range": f"bytes */{blob.size}"}, served)
            start, stop, status = int(m[1]), min(blob.size, int(m[2]) + 1 if m[2] else blob.size), 206
        served.status = status
        hub.log.append(served)
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("ETag", f'"{blob.etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(stop - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{blob.size}")
        self.end_headers()
        if not body:
            return
        drops = _Faults.of(hub.faults.drop, served.revisions, served.file)
        cut = drops.pop(0) if drops else None
        pause = _Faults.of(hub.faults.slow, served.revisions, served.file) or 0.0
        for a in range(start, stop, CHUNK):
            chunk = blob.read(a, min(stop, a + CHUNK))
            if cut is not None and served.body + len(chunk) > cut:
                chunk = chunk[: cut - served.body]
            if pause:
                time.sleep(pause)
            hub._throttle(len(chunk))
            try:
                self.wfile.write(chunk)
            except OSError:  # the client went away
                self.close_connection = True
                return
            served.body += len(chunk)
            if cut is not None and served.body >= cut:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
