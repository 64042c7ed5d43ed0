"""A run's metrics, as the trainer hands them over: the resolved config once, each step's and each
validation's metrics, the validation samples; on process 0 only, to every tracker of
`logging.backends` (`pr1_jax.trackers`)."""

from __future__ import annotations

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
