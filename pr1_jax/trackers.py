"""Where a run's metrics go: `logging.backends`, any of console, jsonl, tensorboard, wandb, mlflow.

Every backend is a `Tracker`: it takes the resolved config once (as the run's params), each step's
or validation's metrics, and the validation samples as a table. `pr1_jax.metrics.MetricsLogger`
opens them on process 0 and feeds them all.

* console: one progress line per step or validation, and the first validation sample.
* jsonl: `metrics.jsonl` (one object per step or validation) and `val_samples.jsonl` (one object per
  logged sample) in the run directory.
* tensorboard: scalars under `train/` and `val/`, the config and the samples as text, in
  `run_dir/tensorboard`.
* wandb (extra `pr1-jax[wandb]`): a Weights & Biases run, its files under the run directory; the
  mode (online, offline) is `logging.wandb_mode` or wandb's own settings (WANDB_MODE).
* mlflow (extra `pr1-jax[mlflow]`): an MLflow run at `logging.mlflow_tracking_uri` (or
  MLFLOW_TRACKING_URI; one of them is required); the config as flattened params and `config.yaml`, the samples
  as `val_samples/step_NNNNNN.json` tables (MLflow's table layout: columns and data).

A resumed run (same run directory) goes on in the same wandb / MLflow run: their ids are kept in
`run_dir/trackers.json`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Literal

import yaml

log = logging.getLogger("pr1_jax")

Backend = Literal["console", "jsonl", "tensorboard", "wandb", "mlflow"]

# The package each backend imports, and what installs it (for wandb and MLflow, an extra of ours).
_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "wandb": ("wandb", "pr1-jax[wandb]"),
             "mlflow": ("mlflow", "pr1-jax[mlflow]")}

# Shown on the console progress line, in this order, when present.
_CONSOLE = ("overall", "accuracy", "format", "visual", "response_len", "loss", "grad_norm", "kl", "sec_step")


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """The `logging` section. A backend whose package is missing is an error here, at start-up,
    naming the extra that installs it."""

    backends: tuple[Backend, ...] = ("console", "jsonl", "tensorboard")
    project: str = "pr1-jax"  # the wandb project and the MLflow experiment
    run_name: str | None = None  # default: the run directory's name
    val_samples: int = 8  # validation samples logged as a table at each validation (0: none)
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None  # None: wandb's settings
    wandb_tags: tuple[str, ...] = ()
    mlflow_tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI

    def __post_init__(self):
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backends: {list(self.backends)} names one twice")
        if self.val_samples < 0:
            raise ValueError("val_samples must be >= 0")
        for backend in self.backends:
            package, install = _PACKAGES.get(backend, (None, None))
            if package and importlib.util.find_spec(package) is None:
                raise ValueError(f"backends: {backend} needs the {package} package: pip install '{install}'")
        # MLflow's fallback store differs between versions (./mlruns; sqlite, which its client-only
        # package cannot open), so where the runs go is said, and a run does not fail past start-up.
        if "mlflow" in self.backends and not (self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            raise ValueError("backends: mlflow needs a tracking server or store: set mlflow_tracking_uri "
                             "(http://HOST:PORT, sqlite:///PATH.db, ...) or MLFLOW_TRACKING_URI")


class Tracker:
    """One place metrics go. Every method but `log_metrics` does nothing unless overridden."""

    def log_config(self, config: dict) -> None:
        pass

    def log_metrics(self, step: int, split: str, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_samples(self, step: int, rows: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


class Console(Tracker):
    def __init__(self, total_steps: int | None):
        self.total = total_steps
        self._t0 = time.perf_counter()

    def log_metrics(self, step, split, metrics):
        shown = " ".join(f"{k} {metrics[k]:.3g}" for k in _CONSOLE if k in metrics)
        log.info("%s %s", self._progress(step, split), shown)

    def log_samples(self, step, rows):
        if rows:  # what the policy writes now, to read beside the numbers
            r = rows[0]
            log.info("val sample %s (answer %s): %r", r["record_id"], r["answer"], r["response"])

    def _progress(self, step: int, split: str) -> str:
        if split != "train" or not self.total:
            return f"[{split} @ step {step}]"
        frac = min(step / self.total, 1.0)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(frac, 1e-9) * (1 - frac) if step else 0.0
        return f"[{bar}] {step}/{self.total} {elapsed:.0f}s eta {eta:.0f}s"


def _json_number(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)  # JSON has no NaN / inf


class Jsonl(Tracker):
    def __init__(self, run_dir: Path):
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._samples = open(run_dir / "val_samples.jsonl", "a", buffering=1)

    def log_metrics(self, step, split, metrics):
        flat = {k: _json_number(v) for k, v in metrics.items()}
        self._metrics.write(json.dumps({"step": step, "split": split, **flat}) + "\n")

    def log_samples(self, step, rows):
        for row in rows:
            self._samples.write(json.dumps({"step": step, **row}) + "\n")

    def close(self):
        self._metrics.close()
        self._samples.close()


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")  # one table row per sample


def _markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows])


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log_config(self, config):
        self._writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log_metrics(self, step, split, metrics):
        for k, v in metrics.items():
            if math.isfinite(v):  # tensorboardX warns on every NaN; metrics.jsonl and the console show them
                self._writer.add_scalar(f"{split}/{k}", v, step)

    def log_samples(self, step, rows):
        if rows:
            self._writer.add_text("val/samples", _markdown(rows), step)

    def close(self):
        self._writer.close()


class _RunIds:
    """`run_dir/trackers.json`: the wandb / MLflow run id of this run directory, so that a resumed
    run logs into the run it started."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "trackers.json"

    def get(self, backend: str) -> str | None:
        return json.loads(self.path.read_text()).get(backend) if self.path.exists() else None

    def set(self, backend: str, run_id: str) -> None:
        ids = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.path.write_text(json.dumps({**ids, backend: run_id}))


class Wandb(Tracker):
    def __init__(self, cfg: TrackerConfig, run_dir: Path, name: str):
        import wandb

        ids = _RunIds(run_dir)
        self._wandb = wandb
        self._run = wandb.init(project=cfg.project, entity=cfg.wandb_entity, name=name, dir=str(run_dir),
                               mode=cfg.wandb_mode, tags=list(cfg.wandb_tags), id=ids.get("wandb"), resume="allow")
        ids.set("wandb", self._run.id)

    def log_config(self, config):
        self._run.config.update(config, allow_val_change=True)

    def log_metrics(self, step, split, metrics):
        self._run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def log_samples(self, step, rows):
        if rows:
            table = self._wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
            self._run.log({"val/samples": table}, step=step)

    def close(self):
        self._run.finish()


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and string values (MLflow params are flat strings)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


class Mlflow(Tracker):
    _MAX_PARAM = 6000  # MLflow's limit on a param value's length

    def __init__(self, cfg: TrackerConfig, run_dir: Path, name: str):
        from mlflow.tracking import MlflowClient

        # The client API, not mlflow's module-level active run, so that nothing global changes.
        self._client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
        ids = _RunIds(run_dir)
        run_id = ids.get("mlflow")
        if run_id is None:
            experiment = self._client.get_experiment_by_name(cfg.project)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(cfg.project)
            run_id = self._client.create_run(experiment_id, run_name=name).info.run_id
            ids.set("mlflow", run_id)
        else:
            self._client.update_run(run_id, status="RUNNING")
        self._run_id = run_id

    def log_config(self, config):
        from mlflow.entities import Param

        # A param, once logged, cannot change: a resumed run with another setting keeps the first
        # value in params, says so here, and has its own config in config.yaml.
        logged = self._client.get_run(self._run_id).data.params
        params = {k: v[: self._MAX_PARAM] for k, v in flatten(config).items()}
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("mlflow: params %s differ from the run's first values, which they keep", changed)
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        if new:
            self._client.log_batch(self._run_id, params=new)
        self._client.log_dict(self._run_id, config, "config.yaml")

    def log_metrics(self, step, split, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(f"{split}/{k}", v, now, step) for k, v in metrics.items()])

    def log_samples(self, step, rows):
        if rows:
            table = {"columns": list(rows[0]), "data": [list(r.values()) for r in rows]}
            self._client.log_dict(self._run_id, table, f"val_samples/step_{step:06d}.json")

    def close(self):
        self._client.set_terminated(self._run_id)


def open_trackers(cfg: TrackerConfig, run_dir: str | Path, total_steps: int | None) -> list[Tracker]:
    """The configured backends, opened (a wandb / MLflow run started or resumed)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = cfg.run_name or run_dir.resolve().name
    make = {"console": lambda: Console(total_steps), "jsonl": lambda: Jsonl(run_dir),
            "tensorboard": lambda: TensorBoard(run_dir), "wandb": lambda: Wandb(cfg, run_dir, name),
            "mlflow": lambda: Mlflow(cfg, run_dir, name)}
    return [make[backend]() for backend in cfg.backends]
