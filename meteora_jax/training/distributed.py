"""Joining several processes into one JAX runtime (`jax.distributed.initialize`)."""

from __future__ import annotations

import os

import jax

from meteora_jax.errors import ConfigError


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Explicit `--coordinator HOST:PORT --num-processes N --process-id I`, all or none; with none,
    JAX auto-detects TPU pods and SLURM / Open MPI jobs, and a lone process stays single-host."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError(
            "--coordinator, --num-processes and --process-id go together: give all three or none"
        )
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} must be in [0, --num-processes {num_processes})")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return
    if _cluster_detected():
        jax.distributed.initialize()


def _cluster_detected() -> bool:
    """Whether this process is one of several in a cluster JAX detects by itself: a multi-host
    TPU slice, a SLURM job or an Open MPI job with more than one task."""
    env = os.environ
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return any(int(env.get(name, "1") or "1") > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def is_main() -> bool:
    """Whether this is process 0, the one that writes logs and plots."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)
