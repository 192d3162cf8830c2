"""Several processes, one program: `jax.distributed` set-up and agreement checks.

On a TPU pod `initialize()` needs no arguments (JAX finds the coordinator from the TPU
metadata). Elsewhere, every process gets the same `--coordinator HOST:PORT` and
`--num-processes N`, and its own `--process-id I`. On CPU the collectives go through gloo.

After set-up, every process runs the same code: the mesh spans all devices of all
processes, and each process feeds and reads only its own devices' shards.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ettin_jax import platforms
from ettin_jax.errors import EttinError

log = logging.getLogger("ettin_jax.distributed")

DEFAULT_TIMEOUT = 300  # seconds to wait for every process to reach the coordinator


class DistributedError(EttinError, RuntimeError):
    """Processes that cannot start together or that disagree, named in the message."""


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: int = DEFAULT_TIMEOUT,
) -> None:
    """Joins this process to the others. With no arguments on a TPU pod (or a cluster JAX
    detects), JAX finds everything itself; elsewhere give all three. A coordinator that does
    not answer within `timeout` seconds is an error, not a hang."""
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit) and any(x is None for x in explicit):
        raise DistributedError("give all of --coordinator, --num-processes and --process-id, or none of them")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id {process_id} is not in [0, {num_processes}) (--num-processes)")
    if coordinator is not None and ":" not in coordinator:
        raise DistributedError(f"--coordinator {coordinator!r} must be HOST:PORT")
    if platforms.backend_started():
        raise DistributedError("jax.distributed must be initialized before JAX runs anything; call it first")
    if coordinator is not None and process_id != 0:
        # JAX aborts the whole process (SIGABRT and a stack dump) when the coordinator never
        # answers; probe it first so that the failure is a message instead.
        _wait_for(coordinator, timeout, process_id)
    if platforms.will_run_on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout,
        )
    except Exception as e:  # jax raises bare RuntimeErrors and XlaRuntimeErrors here
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        if coordinator is None:
            raise DistributedError(
                f"--distributed found no cluster to join ({reason}); JAX detects TPU pods and SLURM jobs by "
                "itself, elsewhere give --coordinator HOST:PORT, --num-processes and --process-id"
            ) from None
        raise DistributedError(
            f"process {process_id} could not join coordinator {coordinator} within {timeout} s ({reason}); "
            "check that every process got the same --coordinator and --num-processes and that the port is open"
        ) from None
    log.info(
        "process %d of %d: %d local devices of %d", jax.process_index(), jax.process_count(),
        jax.local_device_count(), jax.device_count(),
    )  # fmt: skip


def _wait_for(coordinator: str, timeout: float, process_id: int) -> None:
    """Returns once a TCP connection to HOST:PORT succeeds; raises after `timeout` seconds."""
    host, _, port = coordinator.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"process {process_id} could not reach the coordinator {coordinator} within {timeout:g} s "
                    f"({e.strerror or e}); start process 0 there, or check --coordinator and the network"
                ) from None
        except ValueError:
            raise DistributedError(f"--coordinator {coordinator!r} must be HOST:PORT with a numeric port") from None
        time.sleep(0.5)


def fingerprint(*parts: Any) -> str:
    """A short hex digest of strings and bytes."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def agree(what: str, digest: str) -> None:
    """Raises a `DistributedError` naming the processes whose `digest` of `what` differs from
    process 0's. Every process must call it (it is a collective); a no-op in one process."""
    if jax.process_count() == 1:
        return
    mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise DistributedError(
            f"the processes disagree on the {what}: process(es) {', '.join(map(str, differ))} differ from process 0; "
            f"every process must load the same {what}"
        )


def barrier(name: str) -> None:
    """Waits until every process gets here (no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """True in the process that writes shared files (process 0)."""
    return jax.process_index() == 0


class Preemption:
    """SIGTERM (a pod's preemption notice) as a flag that a loop reads between steps, so that it
    stops at a step boundary with its work saved. The handler is set only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def __enter__(self) -> Preemption:
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self.previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self, together: bool = True) -> bool:
        """Whether to stop. `together`: processes that run one program stop at the same step, so
        any process's signal stops them all (a collective: every process must call it)."""
        if not together or jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
