"""Shared pieces of the benchmarks: medians of repeated timings and reference models.

Every benchmark runs ours and the reference in one process on the same weights and prints a
ratio (reference time / our time, > 1 means we are faster).
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


def checkpoint(arch: str, size: str, **over):
    """(transformers model, checkpoint dir) of a random model; sizes: tiny (tests) or small."""
    import reference

    sizes = {
        "tiny": {},
        "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2),
    }
    text = sizes[size]
    saved = dict(reference.TEXT)
    reference.TEXT.update(text)
    try:
        model = reference.hf_model(arch, **over)
    finally:
        reference.TEXT.clear()
        reference.TEXT.update(saved)
    path = Path(tempfile.mkdtemp(prefix=f"bench-{arch}-{size}-"))
    model.save_pretrained(path)
    return model, path


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys}
    line = " | ".join(k.ljust(widths[k]) for k in keys)
    sep = "-|-".join("-" * widths[k] for k in keys)
    body = "\n".join(" | ".join(_fmt(r[k]).ljust(widths[k]) for k in keys) for r in rows)
    return f"{line}\n{sep}\n{body}"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
