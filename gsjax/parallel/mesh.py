"""Device mesh from config: named axes data / fsdp / expert / tensor, one of them may be -1 (fill the rest).

The same config runs on 1 CPU, 8 fake CPU devices, 8 GPUs, or a multi-host TPU slice; multi-host runs
call `jax.distributed.initialize` first when the environment describes a cluster.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from gsjax.errors import InputError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # tensor innermost: the most communication-heavy axis


class MeshError(InputError, ValueError):
    """The mesh config does not fit the devices present; the message names the axes and the count."""


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with the -1 axis filled so that their product is `num_devices`."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise MeshError(f"mesh axes {free} are all -1; at most one axis may fill the rest")
        if any(s == 0 or s < -1 for s in sizes.values()):
            raise MeshError(f"mesh sizes must be positive or -1, got {sizes}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if num_devices % fixed:
                raise MeshError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes' "
                                f"product {fixed}")
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} slots but {num_devices} devices "
                            f"are present")
        return sizes


def maybe_initialize_distributed() -> bool:
    """Join a multi-host job when the environment says so: SLURM, a TPU pod, or an explicit
    JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
    if jax.distributed.is_initialized():
        return True
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ or "COORDINATOR_ADDRESS" in os.environ
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = int(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")) > 0
    if not (explicit or slurm or tpu_pod):
        return False
    counts = {key: int(os.environ[env]) for key, env in (("num_processes", "JAX_NUM_PROCESSES"),
                                                         ("process_id", "JAX_PROCESS_ID")) if env in os.environ}
    jax.distributed.initialize(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"),
                               **counts)
    log.info("joined distributed job: process %d of %d", jax.process_index(), jax.process_count())
    return True


def build_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = config.sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA's partitioner propagates shardings from the explicit param/batch layouts and the
    # `constrain` hints (jax.make_mesh would default to Explicit, which changes array types).
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)
