"""Multi-process (multi-host) start: `jax.distributed.initialize` with the cluster read from settings or the
environment, before JAX touches a device.

    initialize(trainer)  ->  Cluster(coordinator, num_processes, process_id, local_device_ids, source) or None

Where the three numbers come from, first match wins, key by key:
  1. the settings `trainer.coordinator`, `trainer.num_processes`, `trainer.process_id`;
  2. JAX's variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
  3. SLURM (`SLURM_PROCID`, `SLURM_NTASKS`, the first host of `SLURM_STEP_NODELIST`, port `SFTJAX_COORDINATOR_PORT`
     or 61440 + SLURM_JOB_ID % 4096 as JAX picks it): what `conf/hydra/launcher/slurm.yaml` starts, one process per
     task. With several tasks per node each task that sees several GPUs uses its node's device `SLURM_LOCALID`.
Nothing to read from stops with one line, as does a process id out of range.

Failures JAX reports by aborting the process (a C++ fatal error with a stack dump, which Python cannot catch) are
checked first: a coordinator that does not answer within `trainer.init_timeout` seconds (processes other than 0
wait for its port), and a coordinator port already taken on process 0.

On CPU, collectives between processes go over gloo (`jax_cpu_collectives_implementation`); the setting touches
only the CPU backend, so it is set on every platform.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import time

from sftjax.errors import ConfigError

log = logging.getLogger("sftjax")

DEFAULT_PORT = 12321


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # None: every local device
    source: str  # where the numbers came from (for the log line)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    match = re.match(r"([^,\[\]]+)(\[([^\]]+)\])?(,|$)", nodelist.strip())
    if not match:
        raise ConfigError(f"SLURM_STEP_NODELIST={nodelist!r}: not a SLURM node list")
    prefix, ranges = match.group(1), match.group(3)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _int(value, key: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: must be an integer") from None


def resolve(coordinator: str | None, num_processes: int, process_id: int, env=os.environ) -> Cluster:
    """The cluster of this process from the settings (None / 0 / -1: unset) and `env`; one line when incomplete."""
    source = "settings"
    slurm = "SLURM_PROCID" in env and "SLURM_NTASKS" in env
    if coordinator is None:
        if "JAX_COORDINATOR_ADDRESS" in env:
            coordinator, source = env["JAX_COORDINATOR_ADDRESS"], "JAX_COORDINATOR_ADDRESS"
        elif slurm:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
            port = _int(env.get("SFTJAX_COORDINATOR_PORT", _slurm_port(env)), "SFTJAX_COORDINATOR_PORT")
            coordinator, source = f"{first_host(nodes)}:{port}", "SLURM"
    if num_processes == 0:
        if "JAX_NUM_PROCESSES" in env:
            num_processes = _int(env["JAX_NUM_PROCESSES"], "JAX_NUM_PROCESSES")
        elif slurm:
            num_processes = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
    if process_id < 0:
        if "JAX_PROCESS_ID" in env:
            process_id = _int(env["JAX_PROCESS_ID"], "JAX_PROCESS_ID")
        elif slurm:
            process_id = _int(env["SLURM_PROCID"], "SLURM_PROCID")
    missing = [key for key, unset in (("trainer.coordinator", coordinator is None),
                                      ("trainer.num_processes", num_processes == 0),
                                      ("trainer.process_id", process_id < 0)) if unset]
    if missing:
        raise ConfigError(f"trainer.distributed=true: no {', '.join(missing)} (set them, or JAX_COORDINATOR_ADDRESS, "
                          "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM)")
    if ":" not in coordinator:
        raise ConfigError(f"trainer.coordinator={coordinator!r}: must be host:port")
    if num_processes < 1:
        raise ConfigError(f"trainer.num_processes={num_processes}: must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"trainer.process_id={process_id}: out of range for {num_processes} processes "
                          f"(0 to {num_processes - 1})")
    local = None
    visible = env.get("CUDA_VISIBLE_DEVICES")  # a task bound to its own GPU sees only that one
    if slurm and _int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0], "SLURM_NTASKS_PER_NODE") > 1 and \
            (visible is None or len(visible.split(",")) > 1):
        local = (_int(env.get("SLURM_LOCALID", 0), "SLURM_LOCALID"),)
    return Cluster(coordinator, num_processes, process_id, local, source)


def _slurm_port(env) -> int:
    """JAX's own rule for a SLURM job's coordinator port: two jobs on one node do not collide."""
    return 61440 + _int(env.get("SLURM_JOB_ID", 0), "SLURM_JOB_ID") % 4096 if "SLURM_JOB_ID" in env else DEFAULT_PORT


def _split(coordinator: str) -> tuple[str, int]:
    host, port = coordinator.rsplit(":", 1)
    return host.strip("[]"), _int(port, "trainer.coordinator port")


def check_reachable(cluster: Cluster, timeout: float) -> None:
    """Process 0: the coordinator port is free to bind. Others: it accepts a connection within `timeout` s."""
    host, port = _split(cluster.coordinator)
    if cluster.process_id == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as e:
                raise ConfigError(f"trainer.coordinator={cluster.coordinator}: process 0 cannot listen on port "
                                  f"{port} ({e.strerror})") from None
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise ConfigError(f"trainer.coordinator={cluster.coordinator}: no coordinator answered within "
                                  f"{timeout:g} s (trainer.init_timeout; is process 0 running?)") from None
            time.sleep(0.25)


def initialize(coordinator: str | None, num_processes: int, process_id: int, timeout: int) -> Cluster:
    """Start this process's part of a multi-process run; call before any JAX computation."""
    import jax

    cluster = resolve(coordinator, num_processes, process_id)
    check_reachable(cluster, timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                               local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids else None,
                               initialization_timeout=timeout)
    log.info("process %d of %d (coordinator %s, from %s): %d local devices of %d", cluster.process_id,
             cluster.num_processes, cluster.coordinator, cluster.source, jax.local_device_count(), jax.device_count())
    return cluster
