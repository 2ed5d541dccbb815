"""Devices: the mesh that a sweep's runs are split over, placing arrays on it from one or many
processes, and splitting a CPU host into one XLA device per core.

    run_mesh               a 1-D mesh named "runs" over the devices (of every host after
                           `jax.distributed.initialize()`)
    place / to_host        an array onto the mesh, and back to this process whole
    cpu_devices_for        how many XLA devices to split a CPU host into for K runs
    configure_cpu_devices  do it, before JAX starts (ignored by GPU and TPU backends)
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
