"""Checkpoints on the Hugging Face hub (docs/hub.md).

``huggingface_hub`` decides where files live and whether the network is used: ``HF_ENDPOINT``,
``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens work as everywhere else, and it
resolves revisions to commits. Per revision, ``config.json`` and the index json come through the
Hugging Face cache. The weights files that hold the tensors a run needs:

- ``--download ranged`` (the default): a file already in the Hugging Face cache is read from
  there; otherwise only the byte ranges of the rows needed cross the network
  (:mod:`spinjax.sources.remote`), and what was fetched is kept in the Q/K cache; offline, the
  Q/K cache is read.
- ``--download whole``: the files are downloaded into the Hugging Face cache, and a run evicts
  those it downloaded once their step is done (unless ``--keep-downloads``).

The first request of a run is sent without retries: a hub that cannot be reached is an error at
once (or a run from the caches), not half a minute of retries.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    get_safetensors_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers, validate_repo_id

from ..errors import InputError
from ..version import __version__
from .base import FetchOptions, Source, TensorInfo
from .fetch import Fetcher, FetchError, RemoteFile
from .hf import SAFETENSORS_DTYPES, WEIGHT_CANDIDATES, HFCheckpoint, WeightsFile, open_weights, read_json
from .known import KNOWN, KnownModel
from .qkcache import QKCache
from .remote import RangedWeights

_BAD_REFERENCE = (
    hf_errors.RepositoryNotFoundError,
    hf_errors.RevisionNotFoundError,
    hf_errors.GatedRepoError,
    hf_errors.HFValidationError,  # a malformed repo id
)
_UNREACHABLE = (httpx2.ConnectError, httpx2.TimeoutException, hf_errors.OfflineModeIsEnabled)
_LIBRARY = {"library_name": "spinjax", "library_version": __version__}


class HubSession:
    """What the checkpoints of one hub source share: how they fetch, the fetcher, the Q/K cache,
    and whether the hub has answered (after which connection errors are worth retrying)."""

    def __init__(self, model: str, repo: str, known: bool, fetch: FetchOptions):
        self.model, self.repo, self.known, self.fetch = model, repo, known, fetch
        ranged = fetch.download == "ranged"
        self.fetcher = Fetcher(fetch.connections) if ranged else None
        self.cache = QKCache(fetch.cache_root, fetch.cache_size) if ranged and fetch.cache_size > 0 else None
        self.offline = constants.is_offline_mode()
        self.reached = False

    def probe(self, revision: str) -> None:
        """Ask the hub once, without retries, whether it answers; if not, the run is offline."""
        if self.offline or self.reached:
            return
        url = hf_hub_url(self.repo, "config.json", revision=revision)
        try:
            get_hf_file_metadata(url, retry_on_errors=False, **_LIBRARY)
        except _UNREACHABLE:
            self.offline = True
            return
        except (hf_errors.HfHubHTTPError, hf_errors.EntryNotFoundError, hf_errors.FileMetadataError):
            pass  # it answered; what it said is reported by the download that follows
        self.reached = True

    def unreachable(self, name: str) -> str:
        """Why file ``name`` could not be had: not cached, and the hub not asked."""
        if not self.known:
            return (
                f"--model {self.model!r}: no such directory, and the hub could not be asked for a repo "
                "of that name (offline, or HF_HUB_OFFLINE set)"
            )
        return (
            f"file {name!r} is not in the local cache and the hub could not be asked (offline, or "
            "HF_HUB_OFFLINE set); the embedded model runs offline: --model tiny-pythia"
        )


class HubFiles:
    """The files of ``repo`` at ``revision`` (the :class:`~spinjax.sources.hf.Files` protocol).

    Small files and, with ``--download whole``, weights files are downloaded (or found in the
    Hugging Face cache) one at a time; then :meth:`release` removes from the cache the files
    that were not there before. Ranged weights files: :meth:`weights`.
    """

    def __init__(self, session: HubSession, revision: str):
        self.session, self.revision = session, revision
        self.repo = session.repo
        self.commit: str | None = None  # known once config.json is there
        self.downloaded: list[Path] = []
        self._metadata: dict[str, object] = {}

    def __call__(self, name: str) -> Path:
        session, repo, revision = self.session, self.repo, self.revision
        session.probe(revision)
        try:
            cached = try_to_load_from_cache(repo, name, revision=revision)
            path = Path(
                hf_hub_download(repo, name, revision=revision, local_files_only=session.offline, **_LIBRARY)
            )
        except hf_errors.LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError
            raise FileNotFoundError(session.unreachable(name)) from exc
        except hf_errors.EntryNotFoundError as exc:
            raise FileNotFoundError(f"file {name!r} is not on the hub") from exc
        except _BAD_REFERENCE as exc:
            raise self._bad_reference(exc) from exc
        except (hf_errors.HfHubHTTPError, OSError) as exc:
            raise InputError(f"hub repo {repo!r} revision {revision!r}, file {name!r}: {exc}") from exc
        if self.commit is None:
            self.commit = path.parent.name  # <cache>/models--owner--name/snapshots/<commit>/<file>
        if not isinstance(cached, str) and session.fetch.download == "whole":
            self.downloaded.append(path)
        return path

    def _bad_reference(self, exc: Exception) -> InputError:
        if isinstance(exc, hf_errors.RepositoryNotFoundError) and not self.session.known:
            return InputError(
                f"--model {self.session.model!r}: no such directory, and no hub repo of that name"
            )
        return InputError(f"hub repo {self.repo!r} revision {self.revision!r}: {type(exc).__name__}")

    def has(self, name: str) -> bool:
        if self.session.fetch.download == "whole":
            try:
                self(name)
            except FileNotFoundError:
                return False
            return True
        local = self._cached(name)
        if local is not None:
            return isinstance(local, str)
        if self.session.offline:
            cache = self.session.cache
            return cache is not None and cache.latest(self.repo, self._commit(), name) is not None
        return self._meta(name) is not None

    def weights(self, name: str) -> WeightsFile:
        if self.session.fetch.download == "whole":
            return open_weights(self(name))
        local = self._cached(name)
        if isinstance(local, str):
            return open_weights(Path(local))
        session, label = self.session, f"{self.repo}@{self.revision}: {name}"
        fmt = "bin" if name.endswith(".bin") else "safetensors"
        if session.offline:
            folder = session.cache.latest(self.repo, self._commit(), name) if session.cache else None
            if folder is None:
                raise FileNotFoundError(session.unreachable(name))
            return RangedWeights(label, fmt, None, session.cache, folder)
        meta = self._meta(name)
        if meta is None:
            raise FileNotFoundError(f"file {name!r} is not on the hub")
        url = hf_hub_url(self.repo, name, revision=self._commit())
        remote = RemoteFile(url, meta, build_hf_headers(**_LIBRARY), label, session.fetcher)
        cache = session.cache
        folder = cache.folder(self.repo, self._commit(), name, remote.etag) if cache is not None else None
        return RangedWeights(label, fmt, remote, cache, folder)

    def _commit(self) -> str:
        return self.commit or self.revision

    def _cached(self, name: str) -> str | object | None:
        """The file's path in the Hugging Face cache, a marker that it does not exist, or None."""
        return try_to_load_from_cache(self.repo, name, revision=self._commit())

    def _meta(self, name: str):
        """What the hub says of file ``name`` (None: it has no such file)."""
        if name not in self._metadata:
            url = hf_hub_url(self.repo, name, revision=self._commit())
            try:
                self._metadata[name] = get_hf_file_metadata(url, retry_on_errors=True, **_LIBRARY)
            except hf_errors.RemoteEntryNotFoundError:
                self._metadata[name] = None
            except _BAD_REFERENCE as exc:
                raise self._bad_reference(exc) from exc
            except (hf_errors.HfHubHTTPError, httpx2.TransportError, OSError) as exc:
                raise FetchError(f"{self.repo}@{self.revision}: {name}: {exc}") from exc
        return self._metadata[name]

    def release(self) -> None:
        if not self.session.fetch.keep_downloads:
            evict_downloads(self.downloaded)

    def tensor_infos(self) -> list[TensorInfo] | None:
        """Every weight tensor from the safetensors headers on the hub (range requests: no
        weight file is downloaded); None when the cache holds the weights (read there) or the
        repo has no safetensors (its ``.bin`` files must then be fetched to be read)."""
        for name in WEIGHT_CANDIDATES:
            path = self._cached(name)
            if isinstance(path, str) and name.endswith(".json"):
                shards = set(read_json(Path(path)).get("weight_map", {}).values())
                if all(isinstance(self._cached(shard), str) for shard in shards):
                    return None
            elif isinstance(path, str):
                return None
        try:
            meta = get_safetensors_metadata(self.repo, revision=self.revision)
        except hf_errors.NotASafetensorsRepoError:
            return None
        except _BAD_REFERENCE as exc:
            where = f"hub repo {self.repo!r} revision {self.revision!r}"
            raise InputError(f"{where}: {type(exc).__name__}") from exc
        except Exception as exc:  # offline, or the hub client's own transport errors
            raise InputError(
                f"hub repo {self.repo!r} revision {self.revision!r}: its weights are not in the local cache "
                f"and the hub's safetensors headers could not be read ({type(exc).__name__}: {exc})"
            ) from exc
        return [
            TensorInfo(name, tuple(t.shape), SAFETENSORS_DTYPES.get(t.dtype, t.dtype))
            for file in sorted(meta.files_metadata)
            for name, t in meta.files_metadata[file].tensors.items()
        ]


def _known(model: str) -> KnownModel | None:
    known = KNOWN.get(model) or next((m for m in KNOWN.values() if m.repo == model), None)
    return known if known is not None and known.repo is not None else None


def looks_like_path(model: str) -> bool:
    """Whether ``model`` names a local path rather than a hub repo id: it starts like a path, has
    other than one slash, is no valid repo id, or its first part is a local directory."""
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        return True
    try:
        validate_repo_id(model)
    except hf_errors.HFValidationError:
        return True
    return Path(model).parent.is_dir()


class HubKind:
    """A known model name (``spinjax models``) or an ``owner/name`` hub repo id."""

    name = "hugging face hub"

    def can_open(self, model: str) -> bool:
        return _known(model) is not None or not looks_like_path(model)

    def open(self, model: str, fetch: FetchOptions | None = None) -> Source:
        known = _known(model)
        repo = known.repo if known else model
        if known and known.steps != (-1,):
            offered = tuple((s, known.revision(s)) for s in known.steps)
        else:
            offered = ((-1, "main"),)
        session = HubSession(model, repo, known is not None, fetch or FetchOptions())

        def open_checkpoint(step: int, revision: str) -> HFCheckpoint:
            files = HubFiles(session, revision)
            return HFCheckpoint(files=files, step=step, revision=revision, label=f"{repo}@{revision}")

        key = (known.name if known else repo).replace("/", "__")
        return Source(key=key, source=repo, offered=offered, open=open_checkpoint)


def evict_downloads(paths: list[Path]) -> None:
    """Remove files this run downloaded from the hub cache: the snapshot link, and the blob
    unless another snapshot still links to it. Files that were cached before stay."""
    for link in paths:
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            continue
        blob = link.resolve()
        link.unlink()
        snapshots = link.parents[1]  # <cache>/models--owner--name/snapshots/<commit>/<file>
        if not any(p.is_symlink() and p.resolve() == blob for p in snapshots.rglob("*")):
            blob.unlink(missing_ok=True)
    paths.clear()
