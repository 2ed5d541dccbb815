"""Devices: the mesh that a sweep's runs are split over, placing arrays on it from one or many
processes, and splitting a CPU host into one XLA device per core.

    run_mesh               a 1-D mesh named "runs" over the devices (of every host after
                           `jax.distributed.initialize()`)
    place / to_host        an array onto the mesh, and back to this process whole
    cpu_devices_for        how many XLA devices to split a CPU host into for K runs
    configure_cpu_devices  do it, before JAX starts (ignored by GPU and TPU backends)
    vmap_width             how many runs a device trains at once, per platform
    check_hosts / start_distributed   one process per host (`jaxmlp sweep --distributed`)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxmlp.errors import ConfigError

RUNS = "runs"  # the mesh axis that the run axis is split over


def run_mesh(devices: Sequence[jax.Device] | None = None, num_runs: int | None = None) -> Mesh:
    """A 1-D mesh named "runs" over `devices` (default: all devices of the default backend,
    those of every process after jax.distributed.initialize()), using no more devices than
    there are runs."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ConfigError("no devices to run on; pass at least one jax.Device")
    if num_runs is not None:
        devices = devices[:max(1, min(len(devices), num_runs))]
    return Mesh(np.asarray(devices), (RUNS,))


def place(tree, sharding: NamedSharding):
    """Put every leaf of `tree` (the same value in every process) on `sharding`: a copy.

    With one process that is device_put. With several (jax.distributed), the mesh spans devices
    of other processes, and each process supplies the shards of its own devices.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding, may_alias=False)

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global
            return jax.device_put(x, sharding, may_alias=False)
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = place(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    return jax.tree.map(leaf, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of `x` as a NumPy array in this process, gathered from all processes if the
    mesh spans several."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def cpu_devices_for(num_runs: int, cores: int | None = None) -> int:
    """How many XLA CPU devices to split the host into for a sweep of `num_runs` runs.

    One device per core keeps every core busy with its own share of the runs; XLA's own
    threading inside one device gains much less on a few small matrices (docs/speed.md).
    """
    cores = cores or os.cpu_count() or 1
    return max(1, min(num_runs, cores))


MAX_CPU_DEVICES = 1024  # XLA sets up every device at start-up, each with its own threads


def configure_cpu_devices(n: int) -> bool:
    """Split the host CPU into `n` XLA devices, if JAX has not started yet and the user has
    not chosen a count (XLA_FLAGS / JAX_NUM_CPU_DEVICES). Returns whether it took effect."""
    if not 1 <= n <= MAX_CPU_DEVICES:
        from jaxmlp.errors import ConfigError

        raise ConfigError(f"--cpu-devices must be from 1 to {MAX_CPU_DEVICES}, got {n}; "
                          "one per core is what the sweeps need")
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError:  # the backend is already initialised: keep its devices
        return False
    return True


# Runs one CPU device vmaps at once: a K = 8 sweep at widths 1, 2, 4 and 8 (docs/speed.md,
# "Runs per vmap"). An accelerator takes all of its runs in one vmap: its cores are many.
CPU_VMAP_WIDTH = 4


def vmap_width(platform: str, runs_per_device: int, width: int | None = None) -> int:
    """Runs each device trains at once (one vmap; the groups one after another): `width` if
    given, else all of a GPU's or TPU's runs, CPU_VMAP_WIDTH on a CPU."""
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"--vmap-width must be a positive integer, got {width!r}")
    elif platform == "cpu":
        width = CPU_VMAP_WIDTH
    else:
        width = runs_per_device
    return max(1, min(width, runs_per_device))


def check_hosts(coordinator: str | None, num_processes: int | None,
                process_id: int | None) -> tuple:
    """ConfigError for an incomplete or inconsistent manual multi-process setup."""
    manual = (coordinator, num_processes, process_id)
    if any(x is not None for x in manual) and None in manual:
        raise ConfigError("--coordinator, --num-processes and --process-id go together; give "
                          "all three, or --distributed alone on a cluster JAX detects")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id must be in 0 .. {num_processes - 1}, got {process_id}")
    return manual


def start_distributed(coordinator=None, num_processes=None, process_id=None) -> None:
    """One process per host; the runs spread over every host's devices. CPU hosts gather the
    losses over gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
