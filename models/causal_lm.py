"""The whole model: token embeddings, optional vision tower, Qwen2 decoder, LM head.

One Flax module serves the Qwen2 / Qwen3 judge (text only) and the Qwen2-VL / Qwen2.5-VL / Qwen3-VL
policy. Visual tokens replace the embeddings at `image_token_id` positions, in order of appearance;
Qwen3-VL's DeepStack features (carried beside them on the feature axis, see `models.vision`) are
added at the same positions to the outputs of the first decoder layers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from models.config import ModelConfig
from models.layers import Dtype, constrain, param_init
from models.qwen2 import KVCache, Qwen2Decoder, SharedPrefixCache
from models.vision import VisionInputs, VisionTower


def scatter_image_features(x, is_img, features):
    """x: [B, T, E]; is_img: [B, T] bool, the image-token slots. Visual tokens replace the
    embeddings there, in order:

    features [M, E] (packed for the whole batch): the k-th image token of the row-major
        flattened batch takes features[k];
    features [B, M, E] (per row): the k-th image token of row b takes features[b, k].
    Features beyond the image tokens are padding."""
    if features.ndim == 2:
        idx = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
        feats = features.astype(x.dtype)[jnp.clip(idx, 0, features.shape[0] - 1)]
    else:
        idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, features.shape[1] - 1)
        feats = jnp.take_along_axis(features.astype(x.dtype), idx[..., None], axis=1)
    return jnp.where(is_img[..., None], feats, x)


class QwenCausalLM(nn.Module):
    """attention: the attention implementation of the decoder and the vision tower, "auto" |
    "xla" | "cudnn" | "pallas" (see `models.attention`); decode steps always use "xla"."""

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"
    lora: Any = None  # LoRA adapters on the decoder's projections (`models.layers.Dense`, `pr1_jax.lora`)

    def setup(self):
        text, kw = self.cfg.text, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            text.vocab_size, text.hidden_size, embedding_init=param_init(("vocab", "embed")), **kw
        )
        self.decoder = Qwen2Decoder(text, remat=self.remat, attention=self.attention, lora=self.lora, **kw)
        if not text.tie_word_embeddings:
            self.lm_head = nn.Dense(
                text.vocab_size, use_bias=False, kernel_init=param_init(("embed", "vocab")), **kw
            )
        if self.cfg.vision is not None:
            # Over a leading group axis: one group holds a whole batch's packed patches, or one
            # row's or prompt's (sharded with the rows / prompts).
            self.visual = VisionTower(self.cfg.vision, remat=self.remat, attention=self.attention, **kw)

    def image_features(self, vision: VisionInputs):
        """Visual tokens of the images, in order of appearance: vision packed (`pixel_values`
        [P, patch_dim]) -> [P // merge**2, F]; per group (every field with a leading G axis, a
        group being one row or one prompt) -> [G, P // merge**2, F]. F = E, or (1 + k) * E with
        Qwen3-VL's k DeepStack levels."""
        if vision.pixel_values.ndim == 3:
            return self.visual(vision)
        return self.visual(jax.tree.map(lambda a: a[None], vision))[0]

    def embed(self, input_ids):
        """input_ids [B, T] -> token embeddings [B, T, E] in the rows' layout. The table is gathered
        whole along `embed` first (the all-gather FSDP makes of any weight before its use): a
        lookup in a table split along `embed` gives rows split along E, which XLA can only turn
        into rows split over the batch by replicating them, forward and backward."""
        table = constrain(self.embed_tokens.embedding.astype(self.dtype), ("vocab", None))
        return constrain(jnp.take(table, input_ids, axis=0), ("batch", "length", "embed"))

    def hidden_states(self, input_ids, positions, attention_mask, vision: VisionInputs | None = None,
                      cache_len: int | None = None, branches=None, image_mask=None, features=None, groups=None,
                      pairs=None):
        """input_ids: [B, T] int; positions: [3, B, T] (VLM) or [B, T]; attention_mask: [B, T];
        branches, groups, pairs: see `Qwen2Decoder`. vision: the batch's packed patches (`pixel_values`
        [P, patch_dim]) or per-row patches (every field with a leading B axis). Returns final
        hidden states [B, T, E] and, with cache_len, a KVCache of that many slots holding these
        tokens (a sampler's prefill; else None).
        image_mask: [B, T] bool, the slots that take visual tokens (default: every image token;
        a scorer of sampled responses passes the prompt's only, since a generated image token
        was fed to the sampler as a plain embedding).
        features: instead of `vision`, visual tokens computed already (`image_features`), packed
        [M, E] or per row [B, M, E] (the learner computes them once per prompt and shares them
        among the prompt's samples)."""
        x = self.embed(input_ids)
        deepstack = None
        if vision is not None and features is not None:
            raise ValueError("pass vision or features, not both")
        if vision is not None:
            features = self.image_features(vision)
        if features is not None:
            if image_mask is None:
                image_mask = input_ids == self.cfg.image_token_id
            # Laid out as the rows that read them (per row: split with the rows; packed: any row
            # may read any token, so whole everywhere) and whole along E as the embeddings: left
            # split along E (the merger's last kernel), the lookup would replicate them.
            names = ("batch", None, None) if features.ndim == 3 else (None, None)
            features = constrain(features, names)
            e = self.cfg.text.hidden_size
            x = scatter_image_features(x, image_mask, features[..., :e])
            if features.shape[-1] > e:
                levels = jnp.moveaxis(features[..., e:].reshape(*features.shape[:-1], -1, e), -2, 0)
                deepstack = jnp.stack([scatter_image_features(jnp.zeros_like(x), image_mask, f) for f in levels])
        return self.decoder(x, positions, attention_mask, branches, cache_len, groups, deepstack=deepstack,
                            pairs=pairs)

    def decode(self, input_ids, positions, attention_mask, cache: KVCache | SharedPrefixCache):
        """t new text tokens (input_ids [B, t], positions [3, B, t] or [B, t], attention_mask
        [B, t]) on top of `cache`: returns hidden states [B, t, E] and the extended cache. Apply
        it with `decode_params(params)`, not the stacked params."""
        return self.decoder.decode(self.embed(input_ids), positions, attention_mask, cache)

    def decode_params(self, params, layouts=None) -> dict:
        """The params a decode step reads, made once per sampler call (outside its loop): every
        weight in the compute dtype and the decoder's stacked [L, ...] layers split into a tuple
        of L per-layer trees, so that a step reads each weight once, where it lies (no per-step
        slice or cast of the stacked arrays). Costs one copy of the text weights in the compute
        dtype while sampling. The vision tower is left out.

        layouts: (where the params lie, where the decode params go), two trees like `params` of
        NamedShardings (a layer's weights take their stacked array's less its leading `layers`
        axis): each weight is cast where it lies, then moved, so that a gather moves compute-dtype
        bytes (constrained to the destination only, XLA may gather the params' dtype and cast
        after). The sampler's weights gathered once per call: `pr1_jax.sharding.gather_layouts`.
        None: where XLA propagates them from `params`."""
        nothing = jax.tree.map(lambda _: None, params)
        source, dest = layouts or (nothing, nothing)

        def cast(a, src, dst):
            a = a.astype(self.dtype)
            for sharding in (src, dst):
                a = a if sharding is None else jax.lax.with_sharding_constraint(a, sharding)
            return a

        def layer(sharding):  # a stacked [L, ...] weight's sharding -> one layer's
            return sharding and NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))

        out = {k: jax.tree.map(cast, v, source[k], dest[k])
               for k, v in params.items() if k not in ("decoder", "visual")}
        layers, src, dst = (t["decoder"]["layers"] for t in (params, source, dest))
        out["decoder"] = {
            "layers": tuple(jax.tree.map(lambda a, s, d: cast(a[i], layer(s), layer(d)), layers, src, dst)
                            for i in range(self.cfg.text.num_layers)),
            "norm": jax.tree.map(cast, *(t["decoder"]["norm"] for t in (params, source, dest))),
        }
        return out

    def logits(self, h):
        """[B, T, E] -> [B, T, V]."""
        if self.cfg.text.tie_word_embeddings:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def __call__(self, input_ids, positions, attention_mask, vision: VisionInputs | None = None,
                 cache_len: int | None = None, branches=None):
        h, cache = self.hidden_states(input_ids, positions, attention_mask, vision, cache_len, branches)
        return self.logits(h), cache
