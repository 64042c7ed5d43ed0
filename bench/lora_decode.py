"""The sampler with LoRA: base + unmerged adapters in every decode step, or the adapters merged
into the base once per step (`pr1_jax.lora.merge`) and the plain decode step. XLA's cost analysis
on CPU of both, at the decode issue's 1.5B-class Qwen2.5-VL (`bench/decode_cost.py`):

    python bench/lora_decode.py --rows 16 --rank 64 --json   # ~2 min on 2 cores

Per decode step: `bytes_accessed` and `flops` (loops counted per iteration, `decode_cost.HloCosts`)
merged and unmerged, and the same per decode segment (`pr1_jax.sampling.CHUNK` steps); the merge
once: its bytes and flops; `break_even_steps`, the decode steps after which the unmerged path has
moved more extra bytes than one merge moves. A rollout decodes up to `sampling.max_new_tokens`
steps (hundreds), so merging pays when that is above break-even.
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

from decode_cost import QWEN25VL_1_5B, HloCosts, decode_cost  # noqa: E402


def merge_cost(config: dict, cfg, dtype: str) -> dict:
    """Bytes and flops of one `lora.merge` of the text decoder's adapters into `dtype` base params."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from models import abstract_params, config_from_dict
    from models.causal_lm import QwenCausalLM
    from pr1_jax import lora

    dt = jnp.dtype(dtype)
    module = QwenCausalLM(config_from_dict(config), dtype=dt, param_dtype=dt, lora=cfg)
    base, adapters = lora.split(nn.unbox(abstract_params(module)))
    adapters = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), adapters)
    merge = jax.jit(functools.partial(lora.merge, cfg=cfg), donate_argnums=0)  # the base's buffers reused in place
    costs = HloCosts(merge.lower(base, adapters).compile().as_text(), jax.devices()[0].client)
    return dict(merge_bytes=int(costs.bytes_accessed()), merge_flops=int(costs.cost("flops")))


def lora_decode(rows: int, cache_len: int, dtype: str, rank: int) -> dict:
    from pr1_jax.lora import LoraConfig
    from pr1_jax.sampling import CHUNK

    cfg = LoraConfig(rank=rank, alpha=2.0 * rank)
    merged = decode_cost(QWEN25VL_1_5B, rows, cache_len, dtype)
    unmerged = decode_cost(QWEN25VL_1_5B, rows, cache_len, dtype, lora=cfg)
    merge = merge_cost(QWEN25VL_1_5B, cfg, dtype)
    extra = unmerged["bytes_accessed"] - merged["bytes_accessed"]
    return dict(rows=rows, cache_len=cache_len, dtype=dtype, rank=rank,
                step_bytes_merged=merged["bytes_accessed"], step_bytes_unmerged=unmerged["bytes_accessed"],
                step_flops_merged=merged["flops"], step_flops_unmerged=unmerged["flops"],
                step_kernels_merged=merged["kernels"], step_kernels_unmerged=unmerged["kernels"],
                segment_bytes_merged=CHUNK * merged["bytes_accessed"],
                segment_bytes_unmerged=CHUNK * unmerged["bytes_accessed"], **merge,
                break_even_steps=round(merge["merge_bytes"] / extra, 1) if extra > 0 else None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[16])
    p.add_argument("--cache-len", type=int, default=522, help="KV cache slots (prompt + new tokens)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON line per row count")
    a = p.parse_args()
    results = []
    for rows in a.rows:
        results.append(lora_decode(rows, a.cache_len, a.dtype, a.rank))
        if a.json:
            print(json.dumps(results[-1]), flush=True)
    if not a.json:
        from common import table

        print(table(results))


if __name__ == "__main__":
    main()
