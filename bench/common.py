"""Shared pieces of the benchmarks: timings (medians, interleaved runs, torch thread choice),
reference models of a few sizes, and tables.

The comparison benchmarks (forward, sampler, judge) run ours and the reference in one process on
the same weights and print a ratio (reference time / our time, > 1 means we are faster);
grpo_step, memory and projection measure or project our own costs. Results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

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
