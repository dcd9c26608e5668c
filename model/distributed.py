"""Data-parallel training over JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same train.py; together they see all devices of all hosts as one mesh
with a single "data" axis (`data_mesh`). Parameters are replicated, each global batch is split
along the mesh, and process p of n feeds only block p of n of its rows: the ones its own devices
hold. Writing files other than checkpoints is process 0's job (`is_main`); orbax coordinates
the checkpoints of all processes itself. One process, one or many devices, is the same code with a count of 1.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh


class DistributedError(RuntimeError):
    """The processes could not be joined into one run; the message says why and what to do."""


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None, auto: bool) -> None:
    """Joins this process to a multi-process run; without a coordinator, a count or `auto`, does nothing.

    Values left None are filled in by JAX: from JAX_COORDINATOR_ADDRESS, or from the cluster it
    detects (SLURM, Open MPI, Kubernetes, Cloud TPU).
    """
    if coordinator is None and num_processes is None and process_id is None and not auto:
        return
    # CPU devices of different processes need a collectives library; GPU and TPU bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=120)
    except (RuntimeError, ValueError) as error:
        where = coordinator or "the coordinator JAX detected"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistributedError(
            f"could not join the run at {where} as process {process_id} of {num_processes} ({first}); "
            "start every process with the same --coordinator and --num-processes and its own --process-id"
        ) from None


def data_mesh() -> Mesh:
    """All devices of all processes on one "data" axis, in process order: process p's devices hold
    one contiguous block of every batch."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("data",))


def is_main() -> bool:
    """Process 0 writes the logs, metrics and model.h5 (every process takes part in checkpoints)."""
    return jax.process_index() == 0


# With several processes, the loop's stop flags are compared every this many steps: an all-gather is
# a round trip between hosts, too slow for every step of a fast network.
AGREE_EVERY = 16


def any_process(step: int, *flags: bool) -> tuple[bool, ...]:
    """Each flag true on every process if it is true on any, so that all act at the same step.

    One process decides alone, at every step, for free. Several compare their flags (in one
    all-gather) only at steps that are multiples of AGREE_EVERY; at other steps every flag is False.
    """
    if jax.process_count() == 1:
        return flags
    if step % AGREE_EVERY:
        return (False,) * len(flags)
    gathered = multihost_utils.process_allgather(np.array(flags, np.int32))
    return tuple(bool(v) for v in np.any(gathered.reshape(-1, len(flags)), axis=0))


def barrier(name: str) -> None:
    """Waits until every process has got here (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
