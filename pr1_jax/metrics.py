"""Metrics sinks of a run: the console (one progress line per step), `metrics.jsonl` in the run
directory (one JSON object per step or validation), and TensorBoard event files. Only process 0
writes."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax

log = logging.getLogger("pr1_jax")

# Shown on the console progress line, in this order, when present.
_CONSOLE = ("overall", "accuracy", "format", "visual", "response_len", "loss", "grad_norm", "kl", "sec_step")


def _plain(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, total_steps: int | None):
        self.total = total_steps
        self.enabled = jax.process_index() == 0
        self._t0 = time.perf_counter()
        self._jsonl = self._tb = None
        if self.enabled:
            path = Path(run_dir)
            path.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(path / "metrics.jsonl", "a", buffering=1)
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # TensorBoard is optional; JSONL always works
                log.warning("tensorboardX is not installed; metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(path / "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        flat = {k: _plain(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **flat}) + "\n")
        if self._tb is not None:
            for k, v in flat.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        shown = " ".join(f"{k} {flat[k]:.3g}" for k in _CONSOLE if isinstance(flat.get(k), float))
        log.info("%s %s", self._progress(step, prefix), shown)

    def _progress(self, step: int, prefix: str) -> str:
        if prefix != "train" or not self.total:
            return f"[{prefix} @ step {step}]"
        frac = min(step / self.total, 1.0)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(frac, 1e-9) * (1 - frac) if step else 0.0
        return f"[{bar}] {step}/{self.total} {elapsed:.0f}s eta {eta:.0f}s"

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
