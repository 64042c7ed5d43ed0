"""The one place where logical axis names meet mesh axes, and where host data meets the mesh.

Model code names logical axes (`embed`, `mlp`, `q_heads`, `batch`, ...); `RULES` maps them to the
mesh axes `data`, `fsdp`, `tensor`. The policy, its sampler and the judge are all placed with
these rules on the same mesh (`model_shardings`, `load_model`).

Batches (the sampler's prompt inputs, the learner's `LearnerBatch`, the judge's `JudgeBatch`) are
dicts or struct dataclasses of arrays whose sequence axis is the batch; `map_batch` visits their
arrays with that axis, `batch_shardings` places it over the data axes, and `global_batch` turns
each process's rows into one global array (multi-host runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models import layers
from models.causal_lm import QwenCausalLM
from models.config import ModelConfig, load_config
from models.pretrained import Model, abstract_params, as_dtype, load_pretrained
from pr1_jax.multihost import allgather_json

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


def activation_sharding(mesh: Mesh | None):
    """The context to trace a mesh program in: the models' activation constraints follow `RULES`
    (without it they are no-ops and `auto` attention on several TPU chips falls back to xla);
    nothing at all without a mesh."""
    return layers.activation_sharding(mesh, RULES) if mesh is not None else contextlib.nullcontext()


def spec_for(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for an array with these logical axes; a dimension the mesh axes do not
    divide is replicated instead (`models.layers.logical_spec`, the activations' reading too)."""
    return layers.logical_spec(logical, shape, mesh, rules)


def sharding_for(logical, shape, mesh: Mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh, rules))


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules=RULES) -> Any:
    """Tree of NamedShardings for a boxed abstract params tree (see `models.abstract_params`)."""
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return sharding_for(leaf.names, leaf.value.shape, mesh, rules)
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def without_axis(rules=RULES, axis: str = "fsdp", keep: Sequence[str] = ("batch",)):
    """`rules` with the mesh axis `axis` dropped from every logical axis but `keep`'s: a weight
    placed with them is whole over `axis` and split as before over the others."""
    def drop(mesh_axes):
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        axes = tuple(a for a in axes if a != axis)
        return axes[0] if len(axes) == 1 else axes or None

    return tuple((name, mesh_axes if name in keep else drop(mesh_axes)) for name, mesh_axes in rules)


def gather_layouts(module, mesh: Mesh, rules=RULES, axis: str = "fsdp") -> tuple[Any, Any]:
    """(where `module`'s params lie under `rules`, where they lie gathered over `axis` and split
    as before over the other axes, e.g. `tensor`): two trees of NamedShardings, the layouts the
    sampler moves its decode weights between once per call (`QwenCausalLM.decode_params`), so
    that no decode step all-gathers them again."""
    boxed = abstract_params(module)
    return param_shardings(boxed, mesh, rules), param_shardings(boxed, mesh, without_axis(rules, axis))


def placer(shardings: Any):
    """`place(flax_path, host_array)` for `models.load_pretrained`: each leaf straight to its shards."""
    flat = {tuple(k.key for k in kp): s for kp, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    return lambda path, value: jax.device_put(value, flat[path])


def batch_sharding(mesh: Mesh, shape: Sequence[int], batch_axis: int = 0, rules=RULES) -> NamedSharding:
    """Sharding of a data array whose `batch_axis` is the batch (over the data axes, the `batch`
    rule); other axes replicated, and so is a batch the data axes do not divide."""
    logical = [None] * len(shape)
    logical[batch_axis] = "batch"
    return sharding_for(logical, shape, mesh, rules)


def batch_axis_size(mesh: Mesh, rules=RULES) -> int:
    """Devices the `batch` logical axis is split over (the data axes' product)."""
    axes = dict(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))


def model_shardings(config: ModelConfig, mesh: Mesh, param_dtype="float32", rules=RULES) -> Any:
    """Tree of NamedShardings of a model's params on the mesh."""
    return param_shardings(abstract_params(QwenCausalLM(config, param_dtype=as_dtype(param_dtype))), mesh, rules)


def load_model(path: str | Path, mesh: Mesh | None = None, *, dtype="float32", param_dtype=None, **kwargs) -> Model:
    """An HF checkpoint directory as a `Model`; with a mesh, every weight goes straight to its
    shards under `RULES` (no host holds more than one leaf at a time)."""
    place = None
    if mesh is not None:
        place = placer(model_shardings(load_config(path), mesh, param_dtype or dtype))
    return load_pretrained(path, dtype=as_dtype(dtype), param_dtype=param_dtype and as_dtype(param_dtype),
                           place=place, **kwargs)


# --------------------------------------------------------------------------- batches on the mesh

# The one batch array whose sequence axis is not axis 0 (M-RoPE positions [3, N, L]).
_POSITIONS = "positions"
# The token axis of a batch: what `pad_sequences_left` lengthens.
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "positions")


def _items(batch) -> list[tuple[str, Any]]:
    if isinstance(batch, Mapping):
        return list(batch.items())
    return [(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)]


def _rebuild(batch, values: dict):
    return dict(values) if isinstance(batch, Mapping) else dataclasses.replace(batch, **values)


def map_batch(fn: Callable[[Any, int], Any], batch):
    """fn(array, batch_axis) over every array of a batch (a dict or a struct dataclass; a field
    holding a struct, such as `VisionInputs`, has the batch on axis 0 of each array); None
    fields stay None. Returns a batch of the same kind."""
    out = {}
    for k, v in _items(batch):
        if v is None:
            out[k] = None
        elif hasattr(v, "shape"):
            out[k] = fn(v, 1 if k == _POSITIONS and v.ndim == 3 else 0)
        else:
            out[k] = jax.tree.map(lambda x: fn(x, 0), v)
    return _rebuild(batch, out)


def batch_shardings(mesh: Mesh, batch):
    """The batch's shardings: each array's sequence axis over the data axes (`batch_sharding`)."""
    return map_batch(lambda x, axis: batch_sharding(mesh, x.shape, axis), batch)


def pad_sequences_left(batch, length: int):
    """The batch with its token axis (input_ids, attention_mask, positions) left-padded to
    `length` with masked tokens: the same sequences (they are left-padded already), longer."""
    values = dict(_items(batch))
    for k in _SEQUENCE_KEYS:
        x = np.asarray(values[k])
        values[k] = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(length - x.shape[-1], 0)])
    return _rebuild(batch, values)


def global_batch(mesh: Mesh, local_batch):
    """This process's rows (host numpy) -> global arrays sharded over the data axes. With one
    process the local batch is the global batch; with several, each passes its own consecutive
    slice of the sequences (e.g. from its data shard) and the global sequence count is the sum.
    Processes whose batches landed in different length buckets are left-padded to the longest."""
    ids = dict(_items(local_batch)).get("input_ids")
    if jax.process_count() > 1 and ids is not None:
        local_batch = pad_sequences_left(local_batch, max(allgather_json(int(np.shape(ids)[1]))))

    def one(x, axis):
        x = np.asarray(x)
        shape = x.shape[:axis] + (x.shape[axis] * jax.process_count(),) + x.shape[axis + 1:]
        return jax.make_array_from_process_local_data(batch_sharding(mesh, shape, axis), x, shape)

    return map_batch(one, local_batch)
