"""The one-axis device mesh that sharded execution runs on."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding

from autoshard_jax.errors import InputError

AXIS = "d"


def make_mesh(num_devices: int, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Mesh ("d",) over the first `num_devices` devices, with Explicit axis types.

    axis_types is always passed: jax changed its default twice, and the stage relies on
    Explicit arrays whose sharding is part of their type. This is the package's one check that
    enough devices exist.

    Args:
      num_devices: D.
      devices: the devices to take them from (default: jax.devices()).

    Returns:
      The mesh.
    """
    devices = list(devices if devices is not None else jax.devices())
    if num_devices > len(devices):
        raise InputError(f"a plan for {num_devices} devices needs {num_devices} devices, "
                         f"{len(devices)} are available ({devices[0].platform}; on CPU, "
                         "simulate more: --simulate_cpu_devices / jax_num_cpu_devices)")
    return jax.make_mesh((num_devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,),
                         devices=devices[:num_devices])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch or device) axis split over "d".

    Args:
      mesh: a mesh with axis "d".

    Returns:
      NamedSharding(mesh, P("d")).
    """
    return NamedSharding(mesh, jax.P(AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A full copy on every device of `mesh`: NamedSharding(mesh, P())."""
    return NamedSharding(mesh, jax.P())
