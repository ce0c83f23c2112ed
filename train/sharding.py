"""Device meshes and shardings by logical axis names.

Params carry logical names (`sam_jax.modeling.common`); `LOGICAL_AXIS_RULES` maps them to
the mesh axes `data` and `fsdp`: the batch is split over both, params are fully sharded
along `fsdp` on their "embed" dimension. Rules live here and in the configs, never in
the model. Meshes use `AxisType.Auto` so linen's logical constraints are applied, not
only checked.

Several processes (one per host): `initialize_distributed` first, then the same code runs
in every process; `jax.devices()` and the meshes span all processes, each process feeds
and sees only its own devices (`fetch` and `sync` cross the process boundary).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", None),
    ("qkv", None),
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all); -1 takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} devices")
    from jax.sharding import AxisType

    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a (possibly abstract) pytree whose leaves carry logical partitioning."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over data and fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- processes


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> bool:
    """Join a run of `num_processes` processes (one per host) -> whether one was joined.

    All three arguments or none; none does nothing (one process, or a launcher that calls
    `jax.distributed.initialize` itself). Process 0 serves the coordinator at
    `coordinator_address` ("host:port", reachable by all); every process waits up to
    `timeout_s` for the others. Must run before anything touches a JAX device. On CPU the
    processes exchange data with gloo (JAX's default; set where an older JAX has none).
    """
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("coordinator address, number of processes and process id: give all three or none")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address must be HOST:PORT, got {coordinator_address!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"need 0 <= process id < number of processes, got {process_id} and {num_processes}")
    if jax.config.values.get("jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout_s)
    return True


def fetch(tree: Any, mesh: Mesh) -> Any:
    """Numpy copies of the arrays of `tree` (placed on `mesh`), whole in every process:
    arrays split over several processes are all-gathered first (every process must call)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    whole = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), whole)


def sync(name: str) -> None:
    """A barrier: returns once every process has reached `sync(name)` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
