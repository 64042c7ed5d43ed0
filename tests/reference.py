"""Tiny random-weight checkpoints of the real architectures, written by transformers itself, and
inputs shaped like the processor's output. Shared by the parity tests of the model, sampler and judge."""

from __future__ import annotations

import numpy as np
import torch
import transformers

IMAGE, VSTART, VEND, VIDEO = 100, 98, 99, 97
VOCAB = 128

TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
)


def tiny_config(arch: str, **over):
    """A transformers config of `arch` in ('qwen2', 'qwen2_vl', 'qwen2_5_vl', 'qwen3', 'qwen3_vl')."""
    if arch == "qwen2":
        return transformers.Qwen2Config(**{**TEXT, "rope_theta": 10000.0, **over})
    if arch == "qwen3":
        return transformers.Qwen3Config(**{**TEXT, "head_dim": 16, "rope_theta": 10000.0, **over})
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    half = TEXT["hidden_size"] // TEXT["num_attention_heads"] // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # 16/24/24 at head_dim 128
    if arch == "qwen3_vl":
        # 3 layers so that one is past DeepStack's 2 levels; a 4x4 learned position grid that the
        # test images' grids resample both up and down.
        rope = {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True, "rope_theta": 10000.0}
        text = {**TEXT, "num_hidden_layers": 3, "head_dim": 16, "rope_parameters": rope}
        vision = dict(depth=3, hidden_size=32, out_hidden_size=TEXT["hidden_size"], intermediate_size=48, num_heads=4,
                      num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids, **over)
    text = {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": section}, "rope_theta": 10000.0}
    if arch == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=4, mlp_ratio=2)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids, **over)
    vision = dict(depth=3, hidden_size=32, out_hidden_size=TEXT["hidden_size"], intermediate_size=48, num_heads=4,
                  window_size=56, fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids, **over)


def hf_model(arch: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **over)
    cls = {
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3": transformers.Qwen3ForCausalLM,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
    }[arch]
    model = cls(cfg).eval()
    # HF's init leaves biases at zero; random biases make the parity test see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def vlm_batch(grids_per_row, text_lens, rng: np.random.Generator, pad_left: bool = True, patch: int = 14):
    """A left-padded batch: each row is text, then per image `<vision_start> <image>*n <vision_end>`,
    then text (`patch`: 14 for Qwen2(.5)-VL, 16 for Qwen3-VL). Returns input_ids, attention_mask,
    mm_token_type_ids, pixel_values, image_grid_thw."""
    rows, grids = [], []
    for row_grids, (pre, post) in zip(grids_per_row, text_lens):
        ids = list(rng.integers(0, VSTART - 1, pre))
        for g in row_grids:
            ids += [VSTART] + [IMAGE] * (g[0] * g[1] * g[2] // 4) + [VEND]
            grids.append(g)
        ids += list(rng.integers(0, VSTART - 1, post))
        rows.append(ids)
    t = max(map(len, rows))
    input_ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, ids in enumerate(rows):
        sl = slice(t - len(ids), t) if pad_left else slice(0, len(ids))
        input_ids[i, sl] = ids
        mask[i, sl] = 1
    n = sum(g[0] * g[1] * g[2] for g in grids)
    pixel_values = rng.standard_normal((n, 3 * 2 * patch * patch)).astype(np.float32)
    thw = np.array(grids, np.int64).reshape(-1, 3)
    return input_ids, mask, (input_ids == IMAGE).astype(np.int64), pixel_values, thw


def hf_logits(model, input_ids, mask, mm=None, pixel_values=None, thw=None, position_ids=None) -> np.ndarray:
    kw = dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask))
    if pixel_values is not None:
        kw.update(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(thw),
                  mm_token_type_ids=torch.tensor(mm))
    if position_ids is not None:
        kw["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()
