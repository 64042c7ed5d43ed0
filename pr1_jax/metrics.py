"""A run's metrics, as the trainer hands them over: the resolved config once, each step's and each
validation's metrics, the validation samples; on process 0 only, to every tracker of
`logging.backends` (`pr1_jax.trackers`)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import jax

from pr1_jax.trackers import TrackerConfig, open_trackers


class MetricsLogger:
    def __init__(self, run_dir: str | Path, total_steps: int | None, cfg: TrackerConfig = TrackerConfig(),
                 config: dict | None = None):
        """config: the run's resolved config, logged as its params."""
        self.enabled = jax.process_index() == 0
        self._trackers = open_trackers(cfg, run_dir, total_steps) if self.enabled else []
        if config is not None:
            for tracker in self._trackers:
                tracker.log_config(config)

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        numbers = {k: float(v) for k, v in metrics.items()}
        for tracker in self._trackers:
            tracker.log_metrics(step, prefix, numbers)

    def write_samples(self, step: int, rows: list[dict]) -> None:
        """Validation samples, one dict per sample with the same keys (the table's columns)."""
        for tracker in self._trackers:
            tracker.log_samples(step, rows)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()


class PhaseTimes:
    """Wall seconds a run spends in each phase (start-up, validation, train steps, checkpoints),
    for the one line its log ends with: where a run's time went, from its own log.

        times = PhaseTimes()
        with times("validation"):
            ...
        log.info("%s", times.summary())
    """

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds.setdefault(phase, []).append(seconds)

    @property
    def total(self) -> float:
        return sum(sum(xs) for xs in self.seconds.values())

    def summary(self) -> str:
        """e.g. "time: start-up 52 s; validation 21 s (7 x, the first 6 s); train step 150 s (90 x,
        the first 11 s, then 1.56 s each); 223 s in all" (phases in the order first seen)."""
        parts = []
        for phase, xs in self.seconds.items():
            part = f"{phase} {sum(xs):.0f} s"
            if len(xs) > 1:
                part += f" ({len(xs)} x, the first {xs[0]:.0f} s, then {sum(xs[1:]) / (len(xs) - 1):.2f} s each)"
            parts.append(part)
        return "time: " + "; ".join(parts) + f"; {self.total:.0f} s in all"
