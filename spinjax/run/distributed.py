"""Multi-process runs: joining JAX's distributed runtime and waiting for every process."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import threading

import jax
from jax._src import distributed as _distributed  # the coordination service's client
from jax.experimental import multihost_utils

from ..errors import InputError, shown

DEFAULT_JOIN_TIMEOUT_S = 300  # JAX's own default
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def check_coordinator(address: str) -> tuple[str, int]:
    """``HOST:PORT`` as JAX takes it (an IPv6 host in brackets): (host, port), or InputError.

    JAX hands the address to gRPC unchecked, where a port that is not a number crashed the
    process in some versions and a missing one failed with an IndexError.
    """
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ok_host = ipaddress.IPv6Address(host) is not None
        except ValueError:
            ok_host = False
    else:
        ok_host = _HOSTNAME.fullmatch(host) is not None
    if not (ok_host and re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise InputError(
            f"--coordinator {shown(address)}: expected HOST:PORT (a host name or address, "
            "[an IPv6 address] in brackets, and a port 1..65535), e.g. node001:1234"
        )
    return host, int(port)


def init_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = DEFAULT_JOIN_TIMEOUT_S,
) -> tuple[int, int]:
    """Join JAX's multi-process runtime (explicit, or auto-detected on SLURM, TPU, clouds).

    Returns (process index, process count) for :class:`~spinjax.run.options.RunOptions`.
    When the other processes have not all joined within ``timeout_s`` seconds, the process
    exits with code 2 and a line naming the coordinator: JAX aborts the process itself
    (a fatal log and SIGABRT, which Python cannot catch) when its own deadline passes, so
    a timer ends it cleanly first. Nothing of a run has started at that point.
    """
    if coordinator is not None:
        check_coordinator(coordinator)
    if timeout_s < 1:
        raise InputError(f"--join-timeout must be at least 1 second, got {timeout_s}")
    where = f"--coordinator {coordinator}" if coordinator else "--distributed (auto-detected coordinator)"
    process = f"process {process_id} of {num_processes}" if num_processes else "this process"

    def give_up() -> None:
        print(f"error: {where}: not every process joined within {timeout_s} s ({process}); start all "
              "of them within --join-timeout of each other", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(2)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id, initialization_timeout=timeout_s + 60
        )
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"{where}: cannot start or join the JAX distributed runtime: {exc}") from exc
    finally:
        timer.cancel()
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
