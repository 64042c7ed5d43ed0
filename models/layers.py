"""Building blocks shared by the Qwen2 decoder and the vision towers.

Every parameter names its logical axes, and the models constrain their activations by logical
axes too (`constrain`); the caller's rules table (`pr1_jax/sharding.py`) maps them to mesh axes
inside `activation_sharding`. No module here knows how many devices there are. `logical_spec` is
the one reading of a rules table, for params and activations alike: a dimension its mesh axes do
not divide stays whole (replicated), so that an activation is laid out as the weights that make
it and XLA never has to re-partition one between them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def param_init(names: Sequence[str | None], init: Callable = nn.initializers.normal(0.02)):
    return nn.with_logical_partitioning(init, tuple(names))


class Dense(nn.Dense):
    """nn.Dense, and with `lora` a low-rank adapter beside its kernel (LoRA):
    y = x W + b + (alpha / rank) * dropout(x) A B, A `lora_a` [in, rank], B `lora_b` [rank, out],
    float32 params next to `kernel` (their logical axes: the kernel's input, resp. output axis),
    computed in the layer's dtype. `lora`: an object with `rank`, `alpha`, `dropout`
    (`pr1_jax.lora.LoraConfig`). Both start at zero here, so the model's own `init` is the base
    model; `pr1_jax.lora.init_adapters` draws A as PEFT does. The dropout runs only when the
    apply is given a "dropout" rng (the learner's update), never when sampling or scoring."""

    lora: Any = None
    axes: tuple[str | None, str | None] = (None, None)  # the kernel's logical axes

    @nn.compact
    def __call__(self, x):
        y = super().__call__(x)
        if self.lora is None:
            return y
        zeros = nn.initializers.zeros
        a = self.param("lora_a", param_init((self.axes[0], None), zeros), (x.shape[-1], self.lora.rank), jnp.float32)
        b = self.param("lora_b", param_init((None, self.axes[1]), zeros), (self.lora.rank, self.features), jnp.float32)
        h = x.astype(self.dtype)
        if self.lora.dropout and self.has_rng("dropout"):
            h = nn.Dropout(self.lora.dropout, deterministic=False)(h)
        delta = (h @ a.astype(self.dtype)) @ b.astype(self.dtype)
        return y + (self.lora.alpha / self.lora.rank) * delta


def dense(features: int, names: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None, lora: Any = None):
    """`Dense` with a `[in, out]` kernel named by logical axes `names` (bias takes `names[1]`), and
    an adapter when `lora` is given."""
    return Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name, lora=lora, axes=names,
        kernel_init=param_init(names), bias_init=param_init(names[1:], nn.initializers.zeros),
    )


class RMSNorm(nn.Module):
    """Qwen's RMSNorm: normalise in fp32, cast back to the input dtype, then scale."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", param_init((self.axis_name,), nn.initializers.ones), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * x32.astype(self.dtype)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str):
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=param_init(("norm",), nn.initializers.ones),
        bias_init=param_init(("norm",), nn.initializers.zeros),
    )


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """x: [..., T, H, D]; cos/sin: [..., T, D] (broadcast over heads). Rotation runs in fp32."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def rope_inv_freq(dim: int, theta: float):
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def layer_stack(layer: type[nn.Module], length: int, remat: bool, num_broadcast: int):
    """`layer` repeated `length` times with `nn.scan`: params stacked on a leading `layers` axis,
    one body compiled whatever the depth. The layer's first argument is the carry, its second is
    scanned (per-layer input such as the vision blocks' full-attention flag, or None), the next
    `num_broadcast` are shared.
    `remat` recomputes each layer's activations in the backward pass. A "dropout" rng (LoRA's, in
    the update) is split per layer, so each layer draws its own masks."""
    if remat:
        layer = nn.remat(layer, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    return nn.scan(
        layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
        in_axes=(0,) + (nn.broadcast,) * num_broadcast, length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def logical_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh,
                 rules: Sequence[tuple[str, Any]]) -> jax.sharding.PartitionSpec:
    """PartitionSpec of an array of `shape` whose axes have these logical names, on `mesh` (a
    Mesh or an AbstractMesh) under `rules`. A dimension the mesh axes do not divide is replicated
    instead (small vocabularies, head counts the tensor axis does not divide); padding it to a
    multiple would leave its neighbours' layouts unreachable without a full copy."""
    if names is None:
        return jax.sharding.PartitionSpec()
    out, used = [], set()
    for dim, ax in zip(shape, nn.logical_to_mesh_axes(tuple(names), rules)):
        axes = tuple(a for a in ((ax,) if isinstance(ax, str) else (ax or ())) if a not in used)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            out.append(axes if len(axes) > 1 else axes[0])
            used.update(axes)
        else:
            out.append(None)
    return jax.sharding.PartitionSpec(*out)


def constrain(x, names: Sequence[str | None]):
    """x laid out by its logical axis `names` (`logical_spec`) inside `activation_sharding`; x
    unchanged outside it (one device, tests)."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh, rules))


@contextlib.contextmanager
def activation_sharding(mesh, rules: Sequence[tuple[str, Any]]):
    """Inside, the models' activation constraints map their logical axes through `rules` onto
    `mesh` (and splash attention runs per shard); outside any such context they are no-ops
    (one device, tests). Enter it where a jitted function is traced: constraints are recorded then."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield
