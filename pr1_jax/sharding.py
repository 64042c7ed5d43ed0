"""The one place where logical axis names meet mesh axes.

Model code names logical axes (`embed`, `mlp`, `q_heads`, `batch`, ...); `RULES` maps them to the
mesh axes `data`, `fsdp`, `tensor`. The policy, its sampler and the judge are all placed with
these rules on the same mesh.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated). fsdp shards the model dimension of
# every weight (ZeRO-3 style); tensor shards heads / MLP / vocab (Megatron style).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("v_patch", None),
    ("v_embed", "fsdp"),
    ("v_heads", "tensor"),
    ("v_mlp", "tensor"),
    ("v_merge", "fsdp"),
    ("v_merge_out", "tensor"),
)


class MeshError(ValueError):
    """A mesh shape that the available devices cannot fill."""


def make_mesh(shape: Sequence[int] = (1, -1, 1), axes: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """A mesh over all (or the given) devices; one entry of `shape` may be -1 (the rest).

    Axis types are Auto: jit propagates shardings from the in/out shardings we give it, the
    classic GSPMD model (jax.make_mesh now defaults to Explicit).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if shape.count(-1) > 1:
        raise MeshError(f"mesh shape {shape}: at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise MeshError(f"mesh shape {tuple(shape)}: {len(devices)} devices are not a multiple of {known}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise MeshError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                         devices=devices)


def spec_for(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for an array with these logical axes; a dimension the mesh axes do not
    divide is replicated instead (small vocabularies, odd head counts)."""
    if logical is None:
        return P()
    mesh_axes = nn.logical_to_mesh_axes(tuple(logical), rules)
    out = []
    used: set[str] = set()
    for dim, ax in zip(shape, mesh_axes):
        names = tuple(a for a in ((ax,) if isinstance(ax, str) else (ax or ())) if a not in used)
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if names and dim % size == 0:
            out.append(names if len(names) > 1 else names[0])
            used.update(names)
        else:
            out.append(None)
    return P(*out)


def sharding_for(logical, shape, mesh: Mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh, rules))


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules=RULES) -> Any:
    """Tree of NamedShardings for a boxed abstract params tree (see `models.abstract_params`)."""
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return sharding_for(leaf.names, leaf.value.shape, mesh, rules)
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def placer(shardings: Any):
    """`place(flax_path, host_array)` for `models.load_pretrained`: each leaf straight to its shards."""
    flat = {tuple(k.key for k in kp): s for kp, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    return lambda path, value: jax.device_put(value, flat[path])


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0, rules=RULES) -> NamedSharding:
    """Sharding of a data array whose `batch_axis` is the batch; other axes replicated."""
    logical = [None] * ndim
    logical[batch_axis] = "batch"
    mesh_axes = nn.logical_to_mesh_axes(tuple(logical), rules)
    return NamedSharding(mesh, P(*mesh_axes))


def batch_axis_size(mesh: Mesh, rules=RULES) -> int:
    """Devices the `batch` logical axis is split over (the data axes' product)."""
    axes = dict(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))
