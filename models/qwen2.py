"""The Qwen2 decoder (text model of Qwen2, Qwen2-VL and Qwen2.5-VL) with an optional KV cache.

Layers are stacked with `nn.scan` (params carry a leading `layers` axis) so that a 28- or 64-layer
model compiles one layer body; `remat` recomputes each layer's activations in the backward pass.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from models.config import TextConfig
from models.layers import Dtype, RMSNorm, apply_rope, dense, dot_attention, layer_stack, rope_inv_freq


@flax.struct.dataclass
class KVCache:
    """Preallocated keys/values of every layer, filled left to right.

    k, v:  [L, B, S, K, D]
    mask:  [B, S] bool, slots holding real (non-padding) tokens
    index: [] int32, the next slot to write (the same for every row: prompts are left-padded)
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> "KVCache":
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
        )

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times in place (row b -> rows b*n .. b*n+n-1): n samples share a prefill."""
        return self.replace(
            k=jnp.repeat(self.k, n, axis=1), v=jnp.repeat(self.v, n, axis=1), mask=jnp.repeat(self.mask, n, axis=0)
        )


def rope_cos_sin(cfg: TextConfig, positions):
    """positions: [3, B, T] (M-RoPE rows t, h, w) or [B, T]. Returns cos, sin: [B, T, head_dim] fp32.

    For M-RoPE, frequency chunk i (sizes `mrope_section`) takes its angle from position row i % 3.
    """
    inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    freqs = positions[..., None].astype(jnp.float32) * inv  # [(3,) B, T, D/2]
    if cfg.mrope_section is not None:
        if positions.ndim == 2:
            freqs = jnp.broadcast_to(freqs, (3, *freqs.shape))
        bounds = [0]
        for s in cfg.mrope_section:
            bounds.append(bounds[-1] + s)
        freqs = jnp.concatenate([freqs[i % 3, ..., a:b] for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv, cos, sin, mask, index):
        """x: [B, T, E]; kv: this layer's (k, v) cache [B, S, K, D] each, or None."""
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, _ = x.shape
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        q = dense(cfg.num_heads * cfg.head_dim, ("embed", "q_heads"), name="q_proj", **kw)(h)
        k = dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), name="k_proj", **kw)(h)
        v = dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), name="v_proj", **kw)(h)
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if kv is not None:
            ck, cv = kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            kv = (k, v)
        attn = dot_attention(q, k, v, mask, self.dtype)
        x = x + dense(cfg.hidden_size, ("q_heads", "embed"), use_bias=False, name="o_proj", **kw)(attn)
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=False, name="gate_proj", **kw)(h)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=False, name="up_proj", **kw)(h)
        x = x + dense(cfg.hidden_size, ("mlp", "embed"), use_bias=False, name="down_proj", **kw)(nn.silu(gate) * up)
        return x, kv


class Qwen2Decoder(nn.Module):
    """Embeddings in, final-norm hidden states out; optionally reading and extending a KV cache."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, positions, attention_mask, cache: KVCache | None = None, branches=None):
        """x: [B, T, E]; positions: [3, B, T] or [B, T]; attention_mask: [B, T] (0 = left padding).

        branches: optional [B, T] int for prefix sharing in one pass: a token of branch k > 0 sees
        the shared prefix (branch 0) and earlier tokens of branch k only, so several continuations
        of one prefix are scored as if each were its own sequence (give them the positions they
        would have there). Not combined with a cache.
        """
        t = x.shape[1]
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            kv_mask, index, kv = attention_mask, jnp.zeros((), jnp.int32), None
        else:
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
            index, kv = cache.index, (cache.k, cache.v)
        q_slot = index + jnp.arange(t)
        k_slot = jnp.arange(kv_mask.shape[1])
        causal = k_slot[None, :] <= q_slot[:, None]
        # A padding query would see no key at all; letting it see itself keeps softmax finite.
        mask = kv_mask[:, None, :] & causal[None]
        if branches is not None:
            if cache is not None:
                raise ValueError("branches cannot be combined with a KV cache")
            mask &= (branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None])
        mask |= (k_slot[None, :] == q_slot[:, None])[None]
        cos, sin = rope_cos_sin(self.cfg, positions)

        stack = layer_stack(DecoderLayer, self.cfg.num_layers, self.remat, num_broadcast=4)
        x, kv = stack(self.cfg, self.dtype, self.param_dtype, name="layers")(x, kv, cos, sin, mask, index)
        x = RMSNorm(self.cfg.rms_norm_eps, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        if cache is not None:
            cache = cache.replace(k=kv[0], v=kv[1], mask=kv_mask, index=index + t)
        return x, cache
