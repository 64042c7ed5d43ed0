"""FLOPs one GRPO update computes, from XLA's cost analysis of the compiled update, against the
FLOPs its real tokens need: does the update pay for the work or for the padding?

    python bench/update_cost.py --config 1.5b --lengths lognormal:median=600,sigma=0.9,cap=4096
    python bench/update_cost.py --config 7b --lengths cap --packing off groups

One JSON line per case: {"config", "sequences", "packing", "xla_flops", "ideal_flops", "ratio",
"peak_memory"} and, for the packed layouts, "rows", "fill" (real tokens / row slots) and "pairs"
(the attention's block pairs per row, `pr1_jax.packing.layout`).

The update is `Learner.jitted_step` (forward, backward, remat forward, optimizer) lowered and
compiled on one CPU device on abstract inputs (nothing allocated) for `--prompts` prompts x
`--n` samples, prompts of `--prompt` tokens holding one `--patches`-patch image, response lengths
drawn from `--lengths` (seeded): `lognormal:median=M,sigma=S,cap=C` (a long-tailed distribution,
clipped at the sampler's cap) or `cap` (every response at the cap). Layouts (`--packing`):
`off`, today's padded rows (prompt + the response bucket that holds the step's longest response)
in micro-batches of `--micro` sequences; `groups` / `sequences`, rows of `--row-tokens` tokens
(`pr1_jax.packing`). `xla_flops` counts every trip of the micro-batch and layer loops
(`decode_cost.HloCosts`); `peak_memory` is XLA's temp + argument bytes of the compiled update.

`ideal_flops` is the work of the real tokens only: each prompt's tokens once per group and every
response token; per token 2 x the decoder's matmul params, the LM head at response tokens, and
causal attention 4 x layers x keys x width (a response token's keys: its prompt and itself so
far); the vision tower once per prompt (its matmuls and attention: window and full layers);
forward + backward (2 x forward) + the remat forward of the decoder's and the tower's layers (the
LM head runs outside the rematerialised layers: forward + backward). ratio = xla_flops / ideal_flops.

Models: the 1.5B-class Qwen2.5-VL of `bench/common.py` and the Qwen2.5-VL-7B shapes of
`bench/memory.py`, fp32 (XLA:CPU's cost analysis counts the same FLOPs whatever the dtype).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import QWEN25VL_1_5B, response_lengths  # noqa: E402
from memory import POLICY  # noqa: E402
from projection import text_params, vision_params  # noqa: E402

CONFIGS = {"1.5b": QWEN25VL_1_5B, "7b": POLICY}


def ideal_flops(config: dict, prompt: int, patches: int, lengths: np.ndarray, n: int, remat: bool) -> float:
    """Forward + backward (+ remat forward) FLOPs of the real tokens (module docstring)."""
    t, v = config["text_config"], config["vision_config"]
    dec, head = text_params(t)
    layers, width = t["num_hidden_layers"], t["hidden_size"]
    prompts = len(lengths) // n
    tokens = prompts * prompt + lengths.sum()
    attn_keys = prompts * prompt * (prompt + 1) / 2 + (lengths * prompt + lengths * (lengths + 1) / 2).sum()
    fwd = 2 * dec * tokens + 4 * layers * width * attn_keys
    window = (v["window_size"] // v["patch_size"]) ** 2
    full = len(v["fullatt_block_indexes"])
    vis_attn = 4 * v["hidden_size"] * patches * (full * patches + (v["depth"] - full) * window)
    fwd += prompts * (2 * vision_params(v) * patches + vis_attn)
    # remat recomputes the decoder's and the tower's layers, not the LM head.
    return fwd * (4 if remat else 3) + 3 * 2 * head * lengths.sum()


def packed_shapes(prompt: int, lengths: np.ndarray, n: int, mode: str, row_tokens: int) -> tuple[int, float, int]:
    """(rows, fill, attention block pairs per row) of the packed layout (`pr1_jax.packing`) on one
    data shard."""
    from pr1_jax.packing import layout, micro_bucket

    placed, pairs = layout([prompt] * (len(lengths) // n), lengths, n, mode, row_tokens)
    tokens = sum(prompt + lengths[seqs].sum() for row in placed for _, seqs in row)
    rows = micro_bucket(len(placed))
    return rows, float(tokens) / (rows * row_tokens), micro_bucket(max(map(len, pairs)))


def abstract_batch(cfg, packing: str, prompts: int, n: int, prompt: int, patches: int, length: int, rows: int,
                   pairs: int = 0):
    """ShapeDtypeStructs of the learner batch: per sequence [N, prompt + length], or packed
    [rows, length] with `pairs` attention block pairs per row; one vision group per prompt."""
    import jax
    import jax.numpy as jnp

    from models.vision import VisionInputs
    from pr1_jax.packing import PackedBatch
    from pr1_jax.rollout import LearnerBatch

    sds = jax.ShapeDtypeStruct
    m = cfg.vision.spatial_merge_size ** 2
    patch_dim = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2
    vision = VisionInputs(pixel_values=sds((prompts, patches, patch_dim), jnp.float32),
                          perm=sds((prompts, patches), jnp.int32), rot_pos=sds((prompts, patches, 2), jnp.int32),
                          seg_full=sds((prompts, patches), jnp.int32), seg_window=sds((prompts, patches), jnp.int32),
                          unperm=sds((prompts, patches // m), jnp.int32))
    if packing == "off":
        seqs, total = prompts * n, prompt + length
        i32, f32 = (lambda *s: sds(s, jnp.int32)), (lambda *s: sds(s, jnp.float32))  # noqa: E731
        return LearnerBatch(input_ids=i32(seqs, total), attention_mask=i32(seqs, total),
                            positions=i32(3, seqs, total), response_mask=i32(seqs, length),
                            old_logprobs=f32(seqs, length), advantages=f32(seqs), vision=vision)
    i32, f32 = sds((rows, length), jnp.int32), sds((rows, length), jnp.float32)
    return PackedBatch(input_ids=i32, attention_mask=i32, positions=sds((3, rows, length), jnp.int32), groups=i32,
                       sources=i32, response_mask=i32, old_logprobs=f32, sequence=i32, image_index=i32,
                       pairs=sds((rows, pairs, 2), jnp.int32),
                       branches=i32 if packing == "groups" else None, advantages=f32, vision=vision)


def update_cost(name: str, lengths_spec: str, packing: str, a) -> dict:
    import flax.linen as nn
    import jax

    from decode_cost import HloCosts
    from models import config_from_dict
    from models.pretrained import abstract_params
    from pr1_jax.learner import Learner, LearnerConfig, init_state
    from pr1_jax.rollout import response_bucket
    from pr1_jax.sharding import make_mesh

    config = CONFIGS[name]
    cfg = config_from_dict(config)
    n, prompts = a.n, a.prompts
    lengths = response_lengths(lengths_spec, prompts * n, a.cap, a.seed)
    lcfg = LearnerConfig(remat=a.remat, micro_batch_size=a.micro, recompute_old_logprobs=True, packing=packing,
                         max_tokens_per_micro_batch=a.row_tokens)
    learner = Learner(cfg, lcfg, make_mesh((1, 1, 1), devices=jax.devices()[:1]), 100)
    out = dict(config=name, lengths=lengths_spec, sequences=prompts * n, packing=packing)
    if packing == "off":
        length = response_bucket(int(lengths.max()), lcfg.response_buckets, a.cap)
        rows, pairs = prompts * n, 0
    else:
        length = a.row_tokens
        rows, fill, pairs = packed_shapes(a.prompt, lengths, n, packing, a.row_tokens)
        out.update(rows=rows, fill=round(fill, 4), pairs=pairs)
    batch = abstract_batch(cfg, packing, prompts, n, a.prompt, a.patches, length, rows, pairs)
    params = nn.unbox(abstract_params(learner.module))
    state = jax.eval_shape(functools.partial(init_state, tx=learner.tx), params)
    compiled = learner.jitted_step(batch).lower(state, batch).compile()
    xla = HloCosts(compiled.as_text(), jax.devices()[0].client).cost("flops")
    ideal = ideal_flops(config, a.prompt, a.patches, lengths, n, a.remat)
    mem = compiled.memory_analysis()
    out.update(xla_flops=float(xla), ideal_flops=float(ideal), ratio=round(xla / ideal, 3),
               peak_memory=int(mem.temp_size_in_bytes + mem.argument_size_in_bytes))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", nargs="+", default=["1.5b"], choices=sorted(CONFIGS))
    p.add_argument("--lengths", nargs="+", default=["lognormal:median=600,sigma=0.9,cap=4096", "cap"])
    p.add_argument("--packing", nargs="+", default=["off", "groups"], choices=["off", "groups", "sequences"])
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens (the image's included)")
    p.add_argument("--patches", type=int, default=1024)
    p.add_argument("--cap", type=int, default=4096, help="the sampler's max_new_tokens")
    p.add_argument("--micro", type=int, default=8, help="sequences per micro-batch of the padded layout")
    p.add_argument("--row-tokens", type=int, default=17408,
                   help="max_tokens_per_micro_batch of the packed layouts (default: the paper configs')")
    p.add_argument("--no-remat", dest="remat", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for name in a.config:
        for spec in a.lengths:
            for packing in a.packing:
                print(json.dumps(update_cost(name, spec, packing, a)), flush=True)


if __name__ == "__main__":
    main()
