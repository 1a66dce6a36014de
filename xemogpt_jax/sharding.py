"""Device mesh construction and the one table of logical-axis rules.

Every parameter in the project is created with a ``logical_axes`` metadata tuple
(for example ``("embed", "mlp")``). This module is the only place that maps those
names onto the mesh axes ``data``, ``fsdp`` and ``tensor``.

Mesh axis type: we use ``AxisType.Auto`` on purpose. Parameters and batches get
explicit shardings at the jit boundary, and XLA propagates them through the model;
activations are pinned with :func:`constrain` only where it matters. Explicit axes
would make every einsum of the ported HF models carry sharding types for no gain
at the sizes we train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "lora_rank": None,
    "conv_in": None,
    "conv_out": "tensor",
    "kernel": None,
    "frames": None,
    "norm": None,
    "layers": None,
}


def resolve_mesh_shape(shape: Sequence[int], num_devices: int | None = None) -> tuple[int, ...]:
    """Fill in one ``-1`` entry so the product equals the device count."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, {num_devices} are available")
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all devices of all processes (or ``devices``)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[str | None] | None) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    if names is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name in names:
        axes = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes_tuple = tuple(a for a in axes_tuple if a not in used)
        used.update(axes_tuple)
        spec.append(axes_tuple[0] if len(axes_tuple) == 1 else (axes_tuple or None))
    return PartitionSpec(*spec)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide the dimension they would split."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for axis in axes_tuple:
            size = math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]
            if dim % size == 0:
                kept.append(axis)
        fitted.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*fitted)


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The sharding of one variable from its ``logical_axes`` metadata."""
    names = variable.get_metadata().get("logical_axes")
    shape = getattr(variable.get_value(), "shape", ())
    spec = logical_to_spec(names) if names is not None else PartitionSpec()
    return NamedSharding(mesh, _fit_spec(spec, shape, mesh))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A tree of NamedShardings matching an ``nnx.State`` (or any tree of Variables)."""
    return jax.tree.map(
        lambda v: variable_sharding(v, mesh) if isinstance(v, nnx.Variable) else NamedSharding(mesh, PartitionSpec()),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Shard the leading (batch) dimension over ``data`` and ``fsdp``; replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(LOGICAL_AXIS_RULES["batch"], *([None] * (ndim - 1))))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names when a mesh is active; no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))
