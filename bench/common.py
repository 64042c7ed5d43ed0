"""Shared pieces of the benchmarks: timings (medians, interleaved runs, torch thread choice),
reference models of a few sizes, and tables.

The comparison benchmarks (forward, sampler, judge) run ours and the reference in one process on
the same weights and print a ratio (reference time / our time, > 1 means we are faster);
grpo_step, memory and projection measure or project our own costs. Results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


# Qwen2.5-VL's vision tower (the same at every size) and special token ids; the sizes differ in
# the text decoder, whose width the tower's merger projects to.
QWEN25VL_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, in_channels=3)
QWEN25VL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)


def qwen25vl_config(**text) -> dict:
    """A Qwen2.5-VL config dict (transformers' layout, model_type qwen2_5_vl) around the text
    decoder `text` (vocab, widths, layers, heads, tied embeddings): M-RoPE, rms eps and rope theta
    as the released checkpoints have them."""
    text = dict(rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                **text)
    return dict(model_type="qwen2_5_vl", **QWEN25VL_IDS, text_config=text,
                vision_config=dict(QWEN25VL_VISION, out_hidden_size=text["hidden_size"]))


# Qwen3-VL's vision tower as the released dense checkpoints (2B to 32B) have it, and a Qwen3-VL config
# around a text decoder; Qwen3-VL-8B-Instruct and the Qwen3-32B judge.
QWEN3VL_VISION = dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, hidden_act="gelu_pytorch_tanh",
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])


def qwen3vl_config(**text) -> dict:
    """A Qwen3-VL config dict (model_type qwen3_vl) around the text decoder `text`: interleaved
    M-RoPE [24, 20, 20], head_dim 128, rope theta 5e6 as the released checkpoints have them."""
    rope = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True, "rope_theta": 5e6}
    text = dict(rms_norm_eps=1e-6, head_dim=128, rope_parameters=rope, **text)
    return dict(model_type="qwen3_vl", **QWEN25VL_IDS, text_config=text,
                vision_config=dict(QWEN3VL_VISION, out_hidden_size=text["hidden_size"]))


QWEN3VL_8B = qwen3vl_config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
QWEN3_32B = dict(model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                 num_attention_heads=64, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                 tie_word_embeddings=False)

# The decode and update issues' model: a 1.5B-class text decoder (bench/decode_cost.py, accelerator.py).
QWEN25VL_1_5B = qwen25vl_config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)


def response_lengths(spec: str, count: int, cap: int, seed: int = 0) -> np.ndarray:
    """`cap` | `lognormal:median=M,sigma=S[,cap=C]` | `file:PATH` (a JSON list or whitespace-separated
    lengths, e.g. a run's response lengths; resampled to `count`) -> [count] int lengths in 1..C."""
    import numpy as np

    kind, _, args = spec.partition(":")
    rng = np.random.default_rng(seed)
    if kind == "file":
        text = Path(args).read_text()
        values = np.asarray(json.loads(text) if text.lstrip().startswith("[") else text.split(), dtype=np.int64)
        return np.clip(values if len(values) == count else rng.choice(values, count), 1, cap)
    kw = dict(a.split("=") for a in args.split(",") if a)
    cap = int(kw.get("cap", cap))
    if kind == "cap":
        return np.full(count, cap)
    if kind != "lognormal":
        raise ValueError(f"--lengths {spec!r}: cap | lognormal:median=M,sigma=S[,cap=C] | file:PATH")
    draws = rng.lognormal(math.log(float(kw["median"])), float(kw["sigma"]), count)
    return np.clip(np.round(draws), 1, cap).astype(np.int64)


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeats` runs after `warmup` runs (compiles excluded)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict:
    """{name: (median, min) wall seconds}, the functions run in turn (a, b, a, b, ...) after
    `warmup` runs each, so that load from other processes on a shared machine hits all of them
    alike. Compare medians; the minimum is the least disturbed run."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def fastest_torch_threads(fn: Callable[[], object], candidates=None, repeats: int = 2) -> int:
    """Sets torch's intra-op threads to whichever of `candidates` (default: 1 and all cores) runs
    fn() fastest, and returns it. On a loaded machine OpenMP's spin-waiting threads can make
    the all-cores setting many times slower than one thread; the reference gets its best."""
    import torch

    candidates = candidates or sorted({1, os.cpu_count() or 1})
    best = None
    for n in candidates:
        torch.set_num_threads(n)
        t = median_time(fn, repeats)
        if best is None or t < best[0]:
            best = (t, n)
    torch.set_num_threads(best[1])
    return best[1]


# Text decoder sizes (the vision tower and vocabulary stay those of tests/reference.py unless
# VISION names a size): tiny = the tests' model, small / medium = wider and deeper decoders.
SIZES = {
    "tiny": {},
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2),
    "medium": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2),
}
# Vision tower overrides per size (Qwen2-VL field names); sizes not listed keep the tests' tower.
VISION = {
    "medium": dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=4),
}


def checkpoint(arch: str, size: str, **over):
    """(transformers model, checkpoint dir) of a random model; sizes: see SIZES."""
    import reference

    text = SIZES[size]
    saved = dict(reference.TEXT)
    reference.TEXT.update(text)
    make_config = reference.tiny_config
    vision = VISION.get(size) if arch == "qwen2_vl" else None

    def config_with_vision(*a, **k):
        cfg = make_config(*a, **k)
        for key, value in (vision or {}).items():
            setattr(cfg.vision_config, key, value)
        return cfg

    reference.tiny_config = config_with_vision
    try:
        model = reference.hf_model(arch, **over)
    finally:
        reference.tiny_config = make_config
        reference.TEXT.clear()
        reference.TEXT.update(saved)
    path = Path(tempfile.mkdtemp(prefix=f"bench-{arch}-{size}-"))
    model.save_pretrained(path)
    return model, path


def param_count(module_or_params) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(module_or_params)))


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys}
    line = " | ".join(k.ljust(widths[k]) for k in keys)
    sep = "-|-".join("-" * widths[k] for k in keys)
    body = "\n".join(" | ".join(_fmt(r[k]).ljust(widths[k]) for k in keys) for r in rows)
    return f"{line}\n{sep}\n{body}"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
