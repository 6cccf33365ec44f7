"""Hub files read by HTTP range requests: several in flight, retried, resumed and checked.

A :class:`RemoteFile` is one file of a hub repo at a commit, as huggingface_hub describes it
(:func:`~huggingface_hub.get_hf_file_metadata`: where its bytes are, its size and ETag; the
headers of :func:`~huggingface_hub.utils.build_hf_headers`: token and user agent). Its ranges
are fetched with huggingface_hub's own HTTP client (:func:`~huggingface_hub.get_session`), so a
custom client factory, proxies and ``HF_HUB_OFFLINE`` apply as everywhere else; the authorization
header goes only to the hub's own host, never to the CDN its files redirect to.

A :class:`Fetcher` runs a run's range requests on ``connections`` threads, in priority order
(earlier steps and layers first), each on its own connection of the client's pool.

Every response is checked: a 206 with a ``Content-Range`` of exactly the bytes asked and the
file's size, and the ETag the answers name the file by, the same in every answer (another one
means the file changed on the server: :class:`FileChanged`, and the caller reads the file again
from the start). Connection errors,
timeouts, short bodies and 408/429/5xx answers are retried with exponential backoff, resuming
from the last byte received; after :data:`MAX_RETRIES` failures in a row the request fails with a
:class:`FetchError` naming the file and its revision.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx2
from huggingface_hub import HfFileMetadata, constants, get_hf_file_metadata, get_session
from huggingface_hub import errors as hf_errors

from ..errors import InputError
from .ranges import Span

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
MAX_RETRIES = 5
BACKOFF_S = 1.0  # the first wait; doubled after each failure in a row, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 8.0
IDLE_S = 5.0  # a connection thread with nothing to do for this long ends (a new one starts on demand)


class FetchError(InputError):
    """A hub file could not be read (network or server), after retries; the message names it."""


class FileChanged(FetchError):
    """A hub file's content changed between two reads of one run (another ETag or size)."""


class _Transient(Exception):
    def __init__(self, why: str, retry_after: float | None = None):
        super().__init__(why)
        self.retry_after = retry_after


@dataclass
class FetchStats:
    """What a fetcher did: body bytes received, requests sent, retries."""

    bytes: int = 0
    requests: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int = 0, requests: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.requests += requests
            self.retries += retries


def normalize_etag(etag: str | None) -> str | None:
    """An ETag header without its weak marker and quotes (as huggingface_hub compares them)."""
    return etag.removeprefix("W/").strip('"') if etag else None


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urlparse(url)
    return parsed.scheme, (parsed.hostname or "").lower(), parsed.port


class RemoteFile:
    """One hub file at a commit, read by ranges (a :class:`~spinjax.sources.ranges.ByteSource`).

    ``url`` is its resolve URL pinned to the commit (:func:`~huggingface_hub.hf_hub_url`),
    ``meta`` what :func:`~huggingface_hub.get_hf_file_metadata` said of it, ``headers`` the
    hub's request headers, ``label`` names it (repo, revision, file) in messages.
    """

    def __init__(self, url: str, meta: HfFileMetadata, headers: dict[str, str], label: str, fetcher: Fetcher):
        if meta.size is None or meta.etag is None:
            raise FetchError(f"{label}: the hub gave no size or ETag for the file")
        self.url, self.label, self.fetcher = url, label, fetcher
        self.size, self.etag = int(meta.size), meta.etag
        self._headers = {**headers, "Accept-Encoding": "identity"}
        self._served_etag: str | None = None  # the ETag the ranged answers carry
        self._lock = threading.Lock()
        self._locate(meta)

    def _locate(self, meta: HfFileMetadata) -> None:
        self.location = meta.location or self.url
        same_host = _origin(self.location) == _origin(self.url)
        self._location_headers = {
            k: v for k, v in self._headers.items() if same_host or k.lower() != "authorization"
        }

    # ---- ByteSource

    def read(self, start: int, stop: int) -> bytes:
        out = bytearray(stop - start)
        self.fetch_into(start, stop, memoryview(out))
        return bytes(out)

    def read_many(self, spans: Sequence[Span]) -> list[bytes]:
        futures = [self.fetcher.submit(self, a, b, priority=(-1,)) for a, b in spans]
        return [bytes(f.result()) for f in futures]

    # ---- one range

    def fetch_into(self, start: int, stop: int, out: memoryview) -> None:
        """Bytes [start, stop) into ``out``, retried and resumed (see the module docstring)."""
        if not 0 <= start <= stop <= self.size:
            raise FetchError(
                f"{self.label}: bytes [{start}, {stop}) lie outside the file of {self.size} bytes"
            )
        got, failures, refreshed = 0, 0, False
        while got < stop - start:
            received = [0]
            try:
                self._request(start + got, stop, out[got:], received)
            except _Transient as exc:
                got += received[0]
                failures = 1 if received[0] else failures + 1
                if failures > MAX_RETRIES:
                    raise FetchError(
                        f"{self.label}: bytes [{start + got}, {stop}): {exc} ({MAX_RETRIES} retries)"
                    ) from None
                self.fetcher.stats.add(retries=1)
                time.sleep(min(BACKOFF_MAX_S, exc.retry_after or BACKOFF_S * 2 ** (failures - 1)))
                continue
            except _Expired as exc:
                if refreshed or self.location == self.url:
                    raise FetchError(f"{self.label}: {exc}") from None
                self._refresh()  # a signed CDN URL may have expired: ask the hub again, once
                refreshed = True
                continue
            except httpx2.TransportError as exc:  # not a TransportError of the body: bad URL, proxy
                raise FetchError(f"{self.label}: {type(exc).__name__}: {exc}") from None
            except hf_errors.OfflineModeIsEnabled as exc:
                raise FetchError(f"{self.label}: {exc}") from None
            got += received[0]

    def _request(self, start: int, stop: int, out: memoryview, received: list[int]) -> None:
        headers = {**self._location_headers, "Range": f"bytes={start}-{stop - 1}"}
        self.fetcher.stats.add(requests=1)
        try:
            with get_session().stream(
                "GET",
                self.location,
                headers=headers,
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                follow_redirects=True,
            ) as response:
                self._check(response, start, stop)
                for chunk in response.iter_bytes():
                    n = len(chunk)
                    if received[0] + n > len(out):
                        raise _Transient("the server sent more bytes than asked")
                    out[received[0] : received[0] + n] = chunk
                    received[0] += n
                    self.fetcher.stats.add(nbytes=n)
        except (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        if received[0] < stop - start:
            raise _Transient(f"the answer ended after {received[0]} of {stop - start} bytes")

    def _check(self, response: httpx2.Response, start: int, stop: int) -> None:
        status = response.status_code
        if status in RETRY_STATUS:
            raise _Transient(f"HTTP {status}", _retry_after(response))
        if status in (401, 403, 404, 410):
            raise _Expired(f"HTTP {status} from {urlparse(self.location).netloc}")
        if status >= 400:
            raise FetchError(f"{self.label}: HTTP {status} for bytes [{start}, {stop})")
        self._check_etag(response)
        if status == 200 and start == 0 and stop == self.size:
            return  # the whole file was asked for; a server may answer it without Content-Range
        if status != 206:
            raise FetchError(
                f"{self.label}: the server answered a range request with HTTP {status} (it ignores "
                "ranges?); use --download whole"
            )
        expected = f"bytes {start}-{stop - 1}/{self.size}"
        got = response.headers.get("Content-Range", "")
        if got != expected:
            if got.rsplit("/", 1)[-1] != str(self.size):
                raise FileChanged(
                    f"{self.label}: the file's size changed on the server ({got!r}, asked {expected!r})"
                )
            raise _Transient(f"Content-Range {got!r} instead of {expected!r}")

    def _check_etag(self, response: httpx2.Response) -> None:
        served = normalize_etag(response.headers.get("X-Linked-Etag") or response.headers.get("ETag"))
        if served is None:
            return
        with self._lock:
            if self._served_etag is None:
                # the CDN may name the file otherwise than the hub (another hash): answers are
                # compared with each other; the hub's size is checked against Content-Range
                self._served_etag = served
            elif served != self._served_etag:
                raise FileChanged(
                    f"{self.label}: the file changed on the server between two reads (ETag {served}, "
                    f"was {self._served_etag})"
                )

    def _refresh(self) -> None:
        try:
            meta = get_hf_file_metadata(self.url, headers=self._headers, retry_on_errors=True)
        except (hf_errors.HfHubHTTPError, httpx2.TransportError, OSError) as exc:
            raise FetchError(f"{self.label}: {exc}") from None
        if normalize_etag(meta.etag) != self.etag or meta.size != self.size:
            raise FileChanged(
                f"{self.label}: the file changed on the hub (ETag {meta.etag}, was {self.etag})"
            )
        self._locate(meta)


class _Expired(Exception):
    """The file's location answered 401/403/404/410 (an expired signed URL, or gone)."""


def _retry_after(response: httpx2.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


class Fetcher:
    """Range requests of one run on ``connections`` threads, lowest ``priority`` first."""

    def __init__(self, connections: int = 8):
        if connections < 1:
            raise InputError(f"--connections must be at least 1, got {connections}")
        self.connections = connections
        self.stats = FetchStats()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0

    def submit(
        self, file: RemoteFile, start: int, stop: int, out: memoryview | None = None, priority: tuple = (0,)
    ) -> Future:
        """Fetch bytes [start, stop) of ``file`` into ``out`` (a new buffer if None); the future's
        result is the buffer."""
        future: Future = Future()
        with self._lock:  # (a thread ending for idleness checks the queue under the same lock)
            self._queue.put((priority, next(self._order), (file, start, stop, out, future)))
            if self._queue.qsize() > self._idle and len(self._threads) < self.connections:
                thread = threading.Thread(target=self._work, daemon=True, name="spinjax-fetch")
                self._threads.add(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                _, _, (file, start, stop, out, future) = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queue.empty():
                        self._threads.discard(threading.current_thread())
                        return
                continue
            with self._lock:
                self._idle -= 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                buffer = out if out is not None else memoryview(bytearray(stop - start))
                file.fetch_into(start, stop, buffer)
                future.set_result(buffer)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)
