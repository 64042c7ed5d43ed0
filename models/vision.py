"""Vision towers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL, one module with the differences as config.

Patches are packed in sequences `[G, P, C*T*ph*pw]` (the HF layout per group), padded to a static
P: one group holds a whole batch's patches, or one row's or prompt's. The group axis is the
tower's batch axis (the attention's B), not a `vmap`: JAX's batching rule for cuDNN attention
breaks on a mask bias (`models.attention`). Which patch may attend to which is given by integer
segment ids computed on the host (`models/positions.py:vision_inputs`): the frame a patch belongs
to (full attention) and, for Qwen2.5-VL, its window. Qwen2.5-VL works in window order: patches
are permuted by merge unit before the blocks and the merged tokens are put back in image order
before the merger's MLP.

Differences (transformers 5.24 is the reference):
- Qwen2-VL: LayerNorm blocks, quick_gelu MLP (fc1/fc2), full attention everywhere, LayerNorm merger.
- Qwen2.5-VL: RMSNorm blocks, gated SiLU MLP with biases, window attention except in
  `fullatt_block_indexes`, RMSNorm merger.
- Qwen3-VL: 16-pixel patches with a bias, plus a learned square grid of position embeddings
  bilinearly resampled to each image's grid (taps and weights from the host, `pos_index` /
  `pos_weight`); LayerNorm blocks, tanh-GELU MLP (linear_fc1/fc2), full attention everywhere,
  LayerNorm merger; DeepStack: the outputs of `deepstack_visual_indexes` blocks go through their
  own mergers (LayerNorm after the 2x2 shuffle) and ride beside the visual tokens, concatenated on
  the feature axis: `[G, M, (1 + k) * out_dim]`, so the learner and sampler move one array.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from models.config import VisionConfig
from models.attention import AttentionMask, attend, resolve
from models.layers import Dtype, RMSNorm, apply_rope, dense, layer_norm, layer_stack, param_init, rope_inv_freq


@flax.struct.dataclass
class VisionInputs:
    """Host-computed layout of the packed patches (all int32), already in the tower's working order.

    pixel_values: [P, patch_dim] in image order
    perm:         [P] working order -> image order (identity for Qwen2-VL)
    rot_pos:      [P, 2] (row, col) of each patch in its image, working order
    seg_full:     [P] frame id for full attention, working order; padding rows share one id
    seg_window:   [P] window id (= seg_full for Qwen2-VL), working order
    unperm:       [P // merge**2] merged-token index in working order for each token in image order
    pos_index, pos_weight: [P, 4] Qwen3-VL only (else None): the learned position grid's bilinear
                  taps (flat index) and weights for each patch, working order

    Packed (the shapes above) or per group (every field with a leading G axis).
    """

    pixel_values: jax.Array
    perm: jax.Array
    rot_pos: jax.Array
    seg_full: jax.Array
    seg_window: jax.Array
    unperm: jax.Array
    pos_index: jax.Array | None = None
    pos_weight: jax.Array | None = None


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"  # resolved (see models.attention)

    def _norm(self, name):
        if self.cfg.kind in ("qwen2_vl", "qwen3_vl"):
            return layer_norm(1e-6, self.dtype, self.param_dtype, name)
        return RMSNorm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x, is_full, cos, sin, seg_full, seg_window):
        """x: [G, P, W]; is_full: [] bool, this block attends over whole frames (segment ids
        seg_full [G, P]) rather than windows (seg_window [G, P])."""
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g, p = x.shape[:2]
        h = self._norm("norm1")(x)
        qkv = dense(3 * cfg.width, ("v_embed", "v_heads"), name="qkv", **kw)(h)
        q, k, v = jnp.moveaxis(qkv.reshape(g, p, 3, cfg.num_heads, cfg.head_dim), 2, 0)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        segment = jnp.where(is_full, seg_full, seg_window)
        heads = lambda a: a.swapaxes(1, 2)  # noqa: E731  [G, P, N, D] -> [G, N, P, D]
        attn = attend(heads(q), heads(k), heads(v), AttentionMask(q_segment=segment, kv_segment=segment),
                      self.attention, self.dtype)
        attn = attn.swapaxes(1, 2).reshape(g, p, -1)
        x = x + dense(cfg.width, ("v_heads", "v_embed"), name="proj", **kw)(attn)
        h = self._norm("norm2")(x)
        if cfg.kind == "qwen2_vl":
            h = _quick_gelu(dense(cfg.mlp_dim, ("v_embed", "v_mlp"), name="fc1", **kw)(h))
            h = dense(cfg.width, ("v_mlp", "v_embed"), name="fc2", **kw)(h)
        elif cfg.kind == "qwen3_vl":
            h = dense(cfg.mlp_dim, ("v_embed", "v_mlp"), name="linear_fc1", **kw)(h)
            h = nn.gelu(h, approximate=cfg.hidden_act == "gelu_pytorch_tanh")
            h = dense(cfg.width, ("v_mlp", "v_embed"), name="linear_fc2", **kw)(h)
        else:
            gate = dense(cfg.mlp_dim, ("v_embed", "v_mlp"), name="gate_proj", **kw)(h)
            up = dense(cfg.mlp_dim, ("v_embed", "v_mlp"), name="up_proj", **kw)(h)
            h = dense(cfg.width, ("v_mlp", "v_embed"), name="down_proj", **kw)(nn.silu(gate) * up)
        x = x + h
        # DeepStack reads intermediate blocks: every block's output leaves the scan (depth x [G, P, W]).
        return x, (x if cfg.deepstack_visual_indexes else None)


class VisionTower(nn.Module):
    """Packed patches `[G, P, ...]` -> merged visual tokens `[G, P // merge**2, out_dim]` in image order
    (Qwen3-VL with DeepStack: `[G, P // merge**2, (1 + k) * out_dim]`, see the module docstring)."""

    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"  # see models.attention

    def _merger(self, x, unperm, prefix: str, postshuffle: bool = False):
        """[G, P, W] in window order -> [G, P // merge**2, out_dim] in image order (`unperm`): 2x2
        patch groups -> one token: norm (per patch, or over the group with `postshuffle`), then
        Linear-GELU-Linear."""
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        merged = cfg.width * cfg.spatial_merge_size**2
        if postshuffle:
            x = x.reshape(x.shape[0], -1, merged)
        if cfg.kind == "qwen2_5_vl":
            x = RMSNorm(1e-6, name=f"{prefix}_ln_q", **kw)(x)
        else:
            x = layer_norm(1e-6, self.dtype, self.param_dtype, f"{prefix}_ln_q")(x)
        x = x.reshape(x.shape[0], -1, merged)
        # Back in image order before the MLP, which works token by token (the same result as after
        # it): gathered after it, the tokens would be split along the decoder's width (the last
        # kernel's `embed`, over the model axis) while the groups are split over the data axes,
        # and XLA would replicate them to take the gather.
        x = jnp.take_along_axis(x, unperm[..., None], axis=1)
        x = dense(merged, ("v_merge", "v_merge_out"), name=f"{prefix}_mlp_0", **kw)(x)
        return dense(cfg.out_dim, ("v_merge_out", "embed"), name=f"{prefix}_mlp_2", **kw)(nn.gelu(x, approximate=False))

    @nn.compact
    def __call__(self, vi: VisionInputs):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qwen3 = cfg.kind == "qwen3_vl"
        # Conv3d with kernel = stride = patch is a Dense over the flattened patch.
        x = dense(cfg.width, ("v_patch", "v_embed"), use_bias=qwen3, name="patch_embed", **kw)(
            vi.pixel_values.astype(self.dtype)
        )
        x = jnp.take_along_axis(x, vi.perm[..., None], axis=1)
        if qwen3:
            table = self.param("pos_embed", param_init(("v_patch", "v_embed")), (cfg.num_position_embeddings, cfg.width),
                               self.param_dtype)
            taps = table[vi.pos_index].astype(jnp.float32) * vi.pos_weight[..., None].astype(jnp.float32)
            x = x + taps.sum(-2).astype(x.dtype)
        inv = rope_inv_freq(cfg.head_dim // 2, cfg.rope_theta)
        freqs = (vi.rot_pos[..., None].astype(jnp.float32) * inv).reshape(*x.shape[:2], -1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        is_full = jnp.array(
            [cfg.kind != "qwen2_5_vl" or i in cfg.fullatt_block_indexes for i in range(cfg.depth)]
        )

        stack = layer_stack(VisionBlock, cfg.depth, self.remat, num_broadcast=4)
        blocks = stack(cfg, self.dtype, self.param_dtype, resolve(self.attention, self.dtype), name="blocks")
        x, taps = blocks(x, is_full, cos, sin, vi.seg_full, vi.seg_window)
        out = [self._merger(x, vi.unperm, "merger")]
        out += [self._merger(taps[i], vi.unperm, f"deepstack_{j}", postshuffle=True)
                for j, i in enumerate(cfg.deepstack_visual_indexes)]
        return jnp.concatenate(out, axis=-1)
