"""Checkpoints on the Hugging Face hub, fetched file by file into its standard cache.

``huggingface_hub`` decides where files live and whether the network is used: ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens work as everywhere else. Per revision only
config.json, the index json and the shards holding the attention tensors are downloaded.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import errors as hf_errors
from huggingface_hub import hf_hub_download, try_to_load_from_cache

from ..errors import InputError
from .base import Source
from .hf import HFCheckpoint
from .known import KNOWN, KnownModel

_BAD_REFERENCE = (
    hf_errors.RepositoryNotFoundError,
    hf_errors.RevisionNotFoundError,
    hf_errors.GatedRepoError,
    hf_errors.HFValidationError,  # a malformed repo id
)


class HubFiles:
    """The files of ``repo`` at ``revision``, downloaded (or found in the cache) one at a time.

    :meth:`release` removes from the cache the files that were not there before.
    """

    def __init__(self, repo: str, revision: str):
        self.repo, self.revision = repo, revision
        self.downloaded: list[Path] = []

    def __call__(self, name: str) -> Path:
        repo, revision = self.repo, self.revision
        try:
            cached = try_to_load_from_cache(repo, name, revision=revision)
            path = Path(hf_hub_download(repo, name, revision=revision))
            if not isinstance(cached, str):
                self.downloaded.append(path)
            return path
        except hf_errors.LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError
            raise FileNotFoundError(
                f"file {name!r} is not in the local cache and the hub could not be asked (offline, or "
                "HF_HUB_OFFLINE set); the embedded model runs offline: --model tiny-pythia"
            ) from exc
        except hf_errors.EntryNotFoundError as exc:
            raise FileNotFoundError(f"file {name!r} is not on the hub") from exc
        except _BAD_REFERENCE as exc:
            raise InputError(f"hub repo {repo!r} revision {revision!r}: {type(exc).__name__}") from exc
        except (hf_errors.HfHubHTTPError, OSError) as exc:
            raise InputError(f"hub repo {repo!r} revision {revision!r}, file {name!r}: {exc}") from exc

    def release(self) -> None:
        evict_downloads(self.downloaded)


def _known(model: str) -> KnownModel | None:
    known = KNOWN.get(model) or next((m for m in KNOWN.values() if m.repo == model), None)
    return known if known is not None and known.repo is not None else None


class HubKind:
    """A known model name (``spinjax models``) or an ``owner/name`` hub repo id."""

    name = "hugging face hub"

    def can_open(self, model: str) -> bool:
        looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
        return _known(model) is not None or ("/" in model and not looks_like_path)

    def open(self, model: str) -> Source:
        known = _known(model)
        repo = known.repo if known else model
        if known and known.steps != (-1,):
            offered = tuple((s, known.revision(s)) for s in known.steps)
        else:
            offered = ((-1, "main"),)

        def open_checkpoint(step: int, revision: str) -> HFCheckpoint:
            files = HubFiles(repo, revision)
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
