"""Multi-process runs: `jax.distributed` from flags or the usual environment variables.

Every process runs the same command; process 0 hosts the coordinator at HOST:PORT. Settings
come from the arguments, else from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID. On CPU, cross-process collectives go through gloo. This must run before JAX
touches any device.

Failures are one clear error each: a partial or inconsistent setting (InputError); a
coordinator that cannot be reached within `timeout_s` (DistributedError). Processes that do not
all join within `timeout_s` would make JAX abort the process (a C++ fatal error, after its own
timeout); a watchdog prints one clear `error: ...` line first and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time

from jaxinfer.errors import InputError, JaxinferError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 120


class DistributedError(JaxinferError):
    """The processes of a multi-process run could not be connected."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    coordinator: str  # HOST:PORT
    num_processes: int
    process_id: int

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.coordinator.rsplit(":", 1)
        return host.strip("[]"), int(port)


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer, got {value!r}") from None


def settings_from(coordinator: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None, env=None) -> DistributedSettings | None:
    """Validated settings from the arguments, else the environment; None for a one-process run
    (nothing given at all)."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID)
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise InputError(f"a multi-process run needs --coordinator, --num-processes and "
                         f"--process-id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                         f"{ENV_PROCESS_ID}); missing: {', '.join(missing)}")
    num_processes = _int(num_processes, "--num-processes")
    process_id = _int(process_id, "--process-id")
    if num_processes < 1:
        raise InputError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise InputError(f"--process-id {process_id} is inconsistent with --num-processes "
                         f"{num_processes}: process ids run from 0 to {num_processes - 1}")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    return DistributedSettings(coordinator, num_processes, process_id)


def _wait_reachable(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
               env=None) -> DistributedSettings | None:
    """Join a multi-process run (no-op and None when no setting is given).

    Processes other than 0 first wait up to `timeout_s` for the coordinator's port; then
    `jax.distributed.initialize` waits up to `timeout_s` for every process to join.
    """
    settings = settings_from(coordinator, num_processes, process_id, env)
    if settings is None:
        return None
    import jax
    from jax._src import xla_bridge

    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (settings.num_processes,
                                                          settings.process_id):
            raise InputError(f"jax.distributed is already initialized as process "
                             f"{jax.process_index()} of {jax.process_count()}")
        return settings
    timeout = max(1, int(round(timeout_s)))
    host, port = settings.host_port
    where = (f"process {settings.process_id} of {settings.num_processes}, coordinator "
             f"{settings.coordinator}")
    if settings.process_id != 0 and not _wait_reachable(host, port, timeout_s):
        raise DistributedError(f"could not reach the coordinator at {settings.coordinator} within "
                               f"{timeout} s ({where}); start process 0 there first, and check "
                               "the address and port")
    if xla_bridge.backends_are_initialized():
        raise DistributedError("jax.distributed must be initialized before JAX uses any device "
                               "(call it first thing)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    joined = threading.Event()

    def watchdog():  # JAX aborts the process on its own join timeout; say why, first
        if not joined.wait(timeout_s):
            sys.stderr.write(
                f"error: not all {settings.num_processes} processes joined the run within "
                f"{timeout} s ({where}); start every process with the same --coordinator and "
                "--num-processes and distinct --process-id values\n")
            sys.stderr.flush()
            os._exit(2)

    threading.Thread(target=watchdog, name="jaxinfer-join-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(settings.coordinator, settings.num_processes,
                                   settings.process_id, initialization_timeout=timeout + 60,
                                   cluster_detection_method="deactivate")
    except Exception as e:  # XlaRuntimeError and friends: one clear message instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"multi-process setup failed ({where}): {first}. Check that all "
            f"{settings.num_processes} processes were started with the same --coordinator and "
            "--num-processes and distinct --process-id values") from None
    finally:
        joined.set()
    if jax.process_count() != settings.num_processes:
        raise InputError(f"inconsistent process counts: this process was given --num-processes "
                         f"{settings.num_processes}, but the run at {settings.coordinator} has "
                         f"{jax.process_count()} processes")
    return settings


def is_primary() -> bool:
    """True on process 0 (the one that prints results)."""
    import jax

    return jax.process_index() == 0
