"""Checkpoints on the Hugging Face hub, fetched file by file into its standard cache.

``huggingface_hub`` decides where files live and whether the network is used: ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens work as everywhere else. Per revision only
config.json, the index json and the shards holding the attention tensors are downloaded.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import errors as hf_errors
from huggingface_hub import hf_hub_download

from .errors import InputError
from .models import KNOWN, Source
from .sources import Checkpoint

_MISSING_FILE = (hf_errors.EntryNotFoundError, hf_errors.LocalEntryNotFoundError)
_BAD_REFERENCE = (
    hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.GatedRepoError,
)  # fmt: skip


def hub_fetch(repo: str, revision: str):
    """A ``Fetch`` that downloads (or finds in the cache) one file of ``repo`` at ``revision``."""

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(repo, name, revision=revision))
        except _MISSING_FILE as exc:
            raise FileNotFoundError(f"file {name!r} is not on the hub or not in the local cache") from exc
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
        label = f"{repo}@{revision}"
        return Checkpoint(fetch=hub_fetch(repo, revision), step=step, revision=revision, label=label)

    return Source(key=(known.name if known else repo).replace("/", "__"), source=repo,
                  offered=offered, open=open_checkpoint)  # fmt: skip
