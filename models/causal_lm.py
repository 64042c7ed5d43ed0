"""The whole model: token embeddings, optional vision tower, Qwen2 decoder, LM head.

One Flax module serves the Qwen2 judge (text only) and the Qwen2-VL / Qwen2.5-VL policy. Visual
tokens replace the embeddings at `image_token_id` positions, in order of appearance.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import Dtype, param_init
from models.qwen2 import KVCache, Qwen2Decoder
from models.vision import VisionInputs, VisionTower


def scatter_image_features(x, input_ids, features, image_token_id: int):
    """x: [B, T, E]; features: [M, E] visual tokens in order. The k-th image token of the
    row-major flattened batch takes features[k] (features beyond the image tokens are padding)."""
    is_img = input_ids == image_token_id
    idx = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
    feats = features.astype(x.dtype)[jnp.clip(idx, 0, features.shape[0] - 1)]
    return jnp.where(is_img[..., None], feats, x)


class QwenCausalLM(nn.Module):
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        text, kw = self.cfg.text, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            text.vocab_size, text.hidden_size, embedding_init=param_init(("vocab", "embed")), **kw
        )
        self.decoder = Qwen2Decoder(text, remat=self.remat, **kw)
        if not text.tie_word_embeddings:
            self.lm_head = nn.Dense(
                text.vocab_size, use_bias=False, kernel_init=param_init(("embed", "vocab")), **kw
            )
        if self.cfg.vision is not None:
            self.visual = VisionTower(self.cfg.vision, remat=self.remat, **kw)

    def hidden_states(self, input_ids, positions, attention_mask, vision: VisionInputs | None = None,
                      cache: KVCache | None = None, branches=None):
        """input_ids: [B, T] int; positions: [3, B, T] (VLM) or [B, T]; attention_mask: [B, T];
        branches: see `Qwen2Decoder`. Returns final hidden states [B, T, E] and the extended
        cache (None without one)."""
        x = self.embed_tokens(input_ids)
        if vision is not None:
            x = scatter_image_features(x, input_ids, self.visual(vision), self.cfg.image_token_id)
        return self.decoder(x, positions, attention_mask, cache, branches)

    def logits(self, h):
        """[B, T, E] -> [B, T, V]."""
        if self.cfg.text.tie_word_embeddings:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def __call__(self, input_ids, positions, attention_mask, vision: VisionInputs | None = None,
                 cache: KVCache | None = None, branches=None):
        h, cache = self.hidden_states(input_ids, positions, attention_mask, vision, cache, branches)
        return self.logits(h), cache
