"""The one-axis device mesh that sharded execution runs on."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding

AXIS = "d"


def make_mesh(num_devices: int, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Mesh ("d",) over the first `num_devices` devices, with Explicit axis types.

    axis_types is always passed: jax changed its default twice, and the stage relies on
    Explicit arrays whose sharding is part of their type.
    """
    devices = list(devices if devices is not None else jax.devices())
    if num_devices > len(devices):
        raise ValueError(f"plan needs {num_devices} devices but only {len(devices)} are "
                         f"available ({devices[0].platform})")
    return jax.make_mesh((num_devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,),
                         devices=devices[:num_devices])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch or device) axis split over "d"."""
    return NamedSharding(mesh, jax.P(AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.P())
