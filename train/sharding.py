"""Device meshes and shardings by logical axis names.

Params carry logical names (`sam_jax.modeling.common`); `LOGICAL_AXIS_RULES` maps them to
the mesh axes `data` and `fsdp`: the batch is split over both, params are fully sharded
along `fsdp` on their "embed" dimension. Rules live here and in the configs, never in
the model. Meshes use `AxisType.Auto` so linen's logical constraints are applied, not
only checked.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
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
