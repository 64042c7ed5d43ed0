"""Building blocks shared by the Qwen2 decoder and the vision towers.

Every parameter names its logical axes (see `pr1_jax/sharding.py` for the table that maps them to
mesh axes); no module here knows how many devices there are.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def param_init(names: Sequence[str | None], init: Callable = nn.initializers.normal(0.02)):
    return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int, names: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None):
    """nn.Dense with a `[in, out]` kernel named by logical axes `names` (bias takes `names[1]`)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
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


def dot_attention(q, k, v, mask, dtype):
    """Grouped-query attention.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K; mask: [B, T, S] bool (True = attend).
    Scores and softmax in fp32 (as transformers' eager path); every query row must allow at least
    one key (callers give padding rows a key of their own) so no row is all -inf.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dtype))
    return out.reshape(b, t, h * d)


def layer_stack(layer: type[nn.Module], length: int, remat: bool, num_broadcast: int):
    """`layer` repeated `length` times with `nn.scan`: params stacked on a leading `layers` axis,
    one body compiled whatever the depth. The layer's first argument is the carry, its second is
    scanned (per-layer input such as a KV-cache slice), the next `num_broadcast` are shared.
    `remat` recomputes each layer's activations in the backward pass."""
    if remat:
        layer = nn.remat(layer, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    return nn.scan(
        layer, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0,) + (nn.broadcast,) * num_broadcast, length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
