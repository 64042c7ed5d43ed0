"""The Qwen2 / Qwen3 decoder (text model of Qwen2, Qwen2-VL, Qwen2.5-VL, Qwen3 and Qwen3-VL) with a
KV cache for sampling. Qwen3 differs by config only (`TextConfig.qk_norm`, `qkv_bias`,
`mrope_interleaved`), and Qwen3-VL adds DeepStack: visual features of intermediate vision blocks
added to the outputs of the first decoder layers at the image tokens.

A forward (`Qwen2Decoder.__call__`: learner, judge, a sampler's prefill) runs the layers as an
`nn.scan` (params carry a leading `layers` axis) so that a 28- or 64-layer model compiles one
layer body; `remat` recomputes each layer's activations in the backward pass. A prefill also
returns the tokens' keys and values as a `KVCache`.

A decode step (`Qwen2Decoder.decode`, on a `KVCache` or on the sampler's `SharedPrefixCache`:
a group's prompt KV once, each row's response KV) runs the layers unrolled on per-layer weights
and per-layer cache buffers (`QwenCausalLM.decode_params` splits the stacked weights once per
sampler call), so that a step reads each weight and each cache slot once, where it lies, and
writes only the new token's keys and values: no slice of a stacked array per layer (XLA:CPU
copies those, XLA:GPU without dynamic-slice fusion too) and no restacking of the cache.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models.attention import AttentionMask, SharedPrefixMask, attend, attend_shared_prefix, padding_last, resolve
from models.config import TextConfig
from models.layers import Dtype, RMSNorm, apply_rope, constrain, dense, layer_stack, rope_inv_freq


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer, filled left to right.

    k, v:  tuples of L arrays [B, K, S, D] (heads-major; one buffer per layer, updated in place)
    mask:  [B, S] bool, slots holding real (non-padding) tokens
    index: [] int32, the next slot to write (the same for every row: prompts are left-padded)
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def from_prefill(cls, k, v, mask, max_len: int) -> "KVCache":
        """k, v: [L, B, K, T, D] of T tokens; mask: [B, T] bool. A cache of max_len >= T slots."""
        t = mask.shape[1]
        grow = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, max_len - t), (0, 0)))  # noqa: E731
        return cls(k=tuple(grow(x) for x in k), v=tuple(grow(x) for x in v),
                   mask=jnp.pad(mask.astype(bool), ((0, 0), (0, max_len - t))), index=jnp.asarray(t, jnp.int32))

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated n times in place (row b -> rows b*n .. b*n+n-1): n samples share a prefill."""
        rep = lambda xs: tuple(jnp.repeat(x, n, axis=0) for x in xs)  # noqa: E731
        return self.replace(k=rep(self.k), v=rep(self.v), mask=jnp.repeat(self.mask, n, axis=0))


@flax.struct.dataclass
class SharedPrefixCache:
    """The sampler's cache for groups of samples of one prompt (GRPO's n): the prompt's keys and
    values stored once per group, each row's response keys and values on its own row.

    prompt_k, prompt_v: tuples of L arrays [G, K, T, D] (a prefill's `KVCache` without free slots);
    k, v: tuples of L arrays [R, K, S, D], response slot s = the row's s-th new token;
    layout: which group each row reads, which slots are real, the slot to write (see
    `models.attention.SharedPrefixMask`)."""

    prompt_k: tuple[jax.Array, ...]
    prompt_v: tuple[jax.Array, ...]
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    layout: SharedPrefixMask


def mrope_rows(cfg: TextConfig) -> np.ndarray:
    """[head_dim // 2]: which M-RoPE position row (0 = t, 1 = h, 2 = w) each frequency takes.

    Chunked (Qwen2-VL): frequency chunk i (sizes `mrope_section`) takes row i. Interleaved
    (Qwen3-VL): frequency j takes row j % 3 while j < 3 * section of that row, else t."""
    t, h, w = cfg.mrope_section
    if not cfg.mrope_interleaved:
        return np.repeat([0, 1, 2], [t, h, w])
    j = np.arange(t + h + w)
    rows = j % 3
    return np.where((rows == 1) & (j < 3 * h) | (rows == 2) & (j < 3 * w), rows, 0)


def rope_cos_sin(cfg: TextConfig, positions):
    """positions: [3, B, T] (M-RoPE rows t, h, w) or [B, T]. Returns cos, sin: [B, T, head_dim] fp32."""
    inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    freqs = positions[..., None].astype(jnp.float32) * inv  # [(3,) B, T, D/2]
    if cfg.mrope_section is not None:
        if positions.ndim == 2:
            freqs = jnp.broadcast_to(freqs, (3, *freqs.shape))
        rows = mrope_rows(cfg)
        freqs = jnp.moveaxis(freqs[rows, ..., np.arange(len(rows))], 0, -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"  # resolved (see models.attention)
    emit_kv: bool = False
    # LoRA: `models.layers.Dense`'s adapters on the projections named in `lora.targets`.
    lora: Any = None

    @nn.compact
    def __call__(self, x, index, kv, cos, sin, mask: AttentionMask, deepstack=None):
        """x: [B, T, E]. kv: None, the T tokens attend to each other (with `emit_kv` their keys and
        values [B, K, T, D] are returned for a prefill's cache, else None); or this layer's cache
        (k, v), [B, K, S, D] each: the new keys and values are written at slots `mask.q_offset`..,
        the queries attend over the whole cache, and the updated cache is returned; or, with a
        `SharedPrefixMask` (one token per row), this layer's (prompt k, prompt v, response k,
        response v) of a `SharedPrefixCache`: the new key and value are written at response slot
        `mask.index` and the query attends to its group's prompt and its own response so far.
        deepstack: None or [k, B, T, E] (visual features at image tokens, zero elsewhere): layer
        `index` < k adds row `index` to its output (Qwen3-VL)."""
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(features, names, name, use_bias=False):
            lora = self.lora if self.lora is not None and name in self.lora.targets else None
            return dense(features, names, use_bias=use_bias, name=name, lora=lora, **kw)

        b, t, _ = x.shape
        x = constrain(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        q = proj(cfg.num_heads * cfg.head_dim, ("embed", "q_heads"), "q_proj", cfg.qkv_bias)(h)
        k = proj(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), "k_proj", cfg.qkv_bias)(h)
        v = proj(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), "v_proj", cfg.qkv_bias)(h)

        def heads(a, n, name):
            # Split by whole heads right at the reshape: the projection's columns (heads x
            # head_dim) may divide where the head count does not, and a layout split inside the
            # head dim cannot become a split over heads without a full copy.
            return constrain(a.reshape(b, t, n, cfg.head_dim), ("batch", "length", name, None))

        q, k = heads(q, cfg.num_heads, "q_heads"), heads(k, cfg.num_kv_heads, "kv_heads")
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, name="q_norm", **kw)(q)
            k = RMSNorm(cfg.rms_norm_eps, name="k_norm", **kw)(k)
        q = apply_rope(q, cos, sin).swapaxes(1, 2)
        k = apply_rope(k, cos, sin).swapaxes(1, 2)
        v = heads(v, cfg.num_kv_heads, "kv_heads").swapaxes(1, 2)
        implementation = self.attention
        if isinstance(mask, SharedPrefixMask):  # kv: (prompt k, prompt v, response k, response v)
            pk, pv, rk, rv = kv
            rk, rv = (jax.lax.dynamic_update_slice(c, a.astype(c.dtype), (0, 0, mask.index, 0))
                      for c, a in zip((rk, rv), (k, v)))
            kv = (pk, pv, rk, rv)
            attn = attend_shared_prefix(q, pk, pv, rk, rv, mask, self.dtype)
        else:
            if kv is not None:
                k, v = (jax.lax.dynamic_update_slice(c, a.astype(c.dtype), (0, 0, mask.q_offset, 0))
                        for c, a in zip(kv, (k, v)))
                kv, implementation = (k, v), "xla"
            elif self.emit_kv:
                kv = (k, v)
            attn = attend(q, k, v, mask, implementation, self.dtype)
        attn = attn.swapaxes(1, 2).reshape(b, t, -1)
        attn = constrain(attn, ("batch", "length", "q_heads"))
        x = x + proj(cfg.hidden_size, ("q_heads", "embed"), "o_proj")(attn)
        x = constrain(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        gate = proj(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(h)
        up = proj(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(h)
        hidden = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        x = x + proj(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden)
        if deepstack is not None:
            n = deepstack.shape[0]
            x = x + jnp.where(index < n, deepstack[jnp.minimum(index, n - 1)].astype(x.dtype), 0)
        return constrain(x, ("batch", "length", "embed")), kv


class Qwen2Decoder(nn.Module):
    """Embeddings in, final-norm hidden states out; a prefill also returns the KV cache, a decode
    step extends it."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"  # see models.attention
    lora: Any = None  # adapters on the layers' projections (`DecoderLayer`)

    @nn.compact
    def __call__(self, x, positions, attention_mask, branches=None, cache_len: int | None = None, groups=None,
                 deepstack=None, pairs=None):
        """x: [B, T, E]; positions: [3, B, T] or [B, T]; attention_mask: [B, T] (0 = padding).

        branches: optional [B, T] int for prefix sharing in one pass: a token of branch k > 0 sees
        the shared prefix (branch 0) and earlier tokens of branch k only, so several continuations
        of one prefix are scored as if each were its own sequence (give them the positions they
        would have there).
        groups: optional [B, T] int, several independent sequences (or prefixes with their
        branches) packed in one row: a token sees tokens of its own group only.
        cache_len: also return a KVCache of cache_len >= T slots holding these tokens (a prefill);
        else the cache returned is None.
        deepstack: Qwen3-VL's [k, B, T, E], added to the outputs of the first k layers (see `DecoderLayer`).
        pairs: optional [B, P, 2] int32, the (query block, key block) pairs that hold every token's
        visible keys (`models.attention.AttentionMask.pairs`): attention computes only those.
        """
        valid = attention_mask.astype(bool)
        group = valid.astype(jnp.int32) if groups is None else jnp.where(valid, groups, 0)
        segment, shared, shared_group = group, None, None
        if branches is not None:
            # One segment per (group, branch): branch ids are below the row length.
            segment = jnp.where(valid, group * (x.shape[1] + 1) + branches + 1, 0)
            shared = valid & (branches == 0)
            shared_group = None if groups is None else group
        implementation = resolve(self.attention, self.dtype)
        mask = AttentionMask(q_segment=segment, kv_segment=segment, kv_shared=shared, q_group=shared_group,
                             kv_group=shared_group, causal=True, pairs=pairs)
        cos, sin = rope_cos_sin(self.cfg, positions)
        order = None
        if implementation == "cudnn" and branches is None and groups is None:
            # cuDNN takes padding at the end of rows as lengths, with no [B, T, S] bias: the rows
            # run with their tokens first (exact, see `padding_last`) and are put back after.
            order = padding_last(valid)
            x, cos, sin = (jnp.take_along_axis(a, order[..., None], axis=1) for a in (x, cos, sin))
            if deepstack is not None:  # [k, B, T, E]
                deepstack = jnp.take_along_axis(deepstack, order[None, ..., None], axis=2)
            # A row of padding only keeps one slot (no row without keys, as in the segment mask).
            mask = AttentionMask.right_padded(jnp.maximum(valid.sum(axis=1), 1), valid.shape[1], causal=True)
        mask = mask.prepare(implementation, self.dtype)
        stack = layer_stack(DecoderLayer, self.cfg.num_layers, self.remat, num_broadcast=5)
        layers = stack(self.cfg, self.dtype, self.param_dtype, implementation, emit_kv=bool(cache_len), lora=self.lora,
                       name="layers")
        x, kv = layers(x, jnp.arange(self.cfg.num_layers), None, cos, sin, mask, deepstack)
        if order is not None:
            back = jnp.argsort(order, axis=1)
            x = jnp.take_along_axis(x, back[..., None], axis=1)
            if kv is not None:  # [L, B, K, T, D]
                kv = tuple(jnp.take_along_axis(a, back[None, :, None, :, None], axis=3) for a in kv)
        x = RMSNorm(self.cfg.rms_norm_eps, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x, (KVCache.from_prefill(*kv, valid, cache_len) if cache_len else None)

    def decode(self, x, positions, attention_mask, cache: KVCache | SharedPrefixCache):
        """x: [B, t, E] of t new tokens (positions [3, B, t] or [B, t], attention_mask [B, t]),
        written into `cache` at its index; they attend to the cache's real slots and causally to
        each other. A `SharedPrefixCache` takes one token per row (t = 1, every row real): it
        attends to its group's prompt and its own response so far. Params in the layout of
        `QwenCausalLM.decode_params`. Returns the final-norm hidden states [B, t, E] and the
        extended cache."""
        params = self.variables["params"]
        if not isinstance(params["layers"], (tuple, list)):
            raise TypeError("decode reads per-layer params: pass QwenCausalLM.decode_params(params)")
        t = x.shape[1]
        if isinstance(cache, SharedPrefixCache):
            mask, layers = cache.layout, zip(cache.prompt_k, cache.prompt_v, cache.k, cache.v)
        else:
            new = attention_mask.astype(jnp.int32)
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, new.astype(bool), (0, cache.index))
            mask = AttentionMask(q_segment=new, kv_segment=kv_mask.astype(jnp.int32), q_offset=cache.index,
                                 causal=True)
            layers = zip(cache.k, cache.v)
        cos, sin = rope_cos_sin(self.cfg, positions)
        layer = DecoderLayer(self.cfg, self.dtype, self.param_dtype, "xla", lora=self.lora, parent=None)
        kvs = []
        for p, kv in zip(params["layers"], layers):
            x, kv = layer.apply({"params": p}, x, None, kv, cos, sin, mask)
            kvs.append(kv)
        norm = RMSNorm(self.cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, parent=None)
        x = norm.apply({"params": params["norm"]}, x)
        if isinstance(cache, SharedPrefixCache):
            return x, cache.replace(k=tuple(kv[2] for kv in kvs), v=tuple(kv[3] for kv in kvs),
                                    layout=mask.replace(index=mask.index + t))
        return x, KVCache(k=tuple(kv[0] for kv in kvs), v=tuple(kv[1] for kv in kvs), mask=kv_mask,
                          index=cache.index + t)
