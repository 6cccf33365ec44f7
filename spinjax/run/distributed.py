"""Multi-process runs: joining JAX's distributed runtime and waiting for every process."""

from __future__ import annotations

import jax
from jax._src import distributed as _distributed  # the coordination service's client
from jax.experimental import multihost_utils

from ..errors import InputError


def init_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> tuple[int, int]:
    """Join JAX's multi-process runtime (explicit, or auto-detected on SLURM, TPU, clouds).

    Returns (process index, process count) for :class:`~spinjax.run.options.RunOptions`.
    """
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"--distributed: cannot start or join the JAX distributed runtime: {exc}") from exc
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Wait until every process of the distributed run gets here."""
    client = getattr(_distributed.global_state, "client", None)
    if client is not None and hasattr(client, "wait_at_barrier"):
        # the coordination service's own barrier: no devices, no compilation; fails when a
        # process died (missed heartbeats) instead of waiting for ever
        client.wait_at_barrier(name, 7 * 24 * 3600 * 1000)
    else:  # public API, a tiny collective over every device
        multihost_utils.sync_global_devices(name)
