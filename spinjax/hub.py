"""Checkpoints on the Hugging Face hub, fetched file by file into its standard cache.

``huggingface_hub`` decides where files live and whether the network is used: ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens work as everywhere else. Per revision only
config.json, the index json and the shards holding the attention tensors are downloaded.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import errors as hf_errors
from huggingface_hub import hf_hub_download, try_to_load_from_cache

from .errors import InputError
from .models import KNOWN, Source
from .sources import Checkpoint

_BAD_REFERENCE = (
    hf_errors.RepositoryNotFoundError,
    hf_errors.RevisionNotFoundError,
    hf_errors.GatedRepoError,
    hf_errors.HFValidationError,  # a malformed repo id
)


def hub_fetch(repo: str, revision: str, downloaded: list[Path]):
    """A ``Fetch`` that downloads (or finds in the cache) one file of ``repo`` at ``revision``.

    Files that were not in the cache before are appended to ``downloaded`` (for eviction).
    """

    def fetch(name: str) -> Path:
        try:
            cached = try_to_load_from_cache(repo, name, revision=revision)
            path = Path(hf_hub_download(repo, name, revision=revision))
            if not isinstance(cached, str):
                downloaded.append(path)
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

    return fetch


def hub_source(model: str) -> Source:
    """A known model name or an ``owner/name`` hub id as a source of checkpoints."""
    known = KNOWN.get(model) or next((m for m in KNOWN.values() if m.repo == model), None)
    repo = known.repo if known else model
    if known and known.steps != (-1,):
        offered = [(s, known.revision(s)) for s in known.steps]
    else:
        offered = [(-1, "main")]

    def open_checkpoint(step: int, revision: str) -> Checkpoint:
        downloaded: list[Path] = []
        fetch = hub_fetch(repo, revision, downloaded)
        ckpt = Checkpoint(fetch=fetch, step=step, revision=revision, label=f"{repo}@{revision}")
        ckpt.downloaded = downloaded
        return ckpt

    key = (known.name if known else repo).replace("/", "__")
    return Source(
        key=key, source=repo, offered=offered, open=open_checkpoint,
        evict=lambda ckpt: evict_downloads(ckpt.downloaded),
    )  # fmt: skip


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
