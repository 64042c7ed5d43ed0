"""`python -m pr1_jax.export --checkpoint RUN_DIR[/STEP] --out HF_DIR`

Writes the trained policy as a Hugging Face checkpoint that `transformers` loads unchanged:
safetensors (hub key layout) + the base model's config.json, plus the tokenizer / processor files
copied from the base model directory. Only the params are read from the Orbax checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import flax.linen as nn

from models.causal_lm import QwenCausalLM
from models.config import load_config
from models.pretrained import Model, abstract_params, as_dtype
from models.weights import copy_side_files
from pr1_jax import configlib
from pr1_jax.checkpoint import Checkpointer, CheckpointRestoreError
from pr1_jax.config import TrainConfig

log = logging.getLogger("pr1_jax")


def locate(checkpoint: str | Path) -> tuple[Path, int | None]:
    """RUN_DIR -> (RUN_DIR, latest); RUN_DIR/STEP or RUN_DIR/checkpoints/STEP -> (RUN_DIR, STEP)."""
    path = Path(checkpoint)
    if (path / "checkpoints").is_dir():
        return path, None
    if path.name.isdigit():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        if (run / "checkpoints").is_dir():
            return run, int(path.name)
    raise CheckpointRestoreError(f"{path}: not a run directory (no checkpoints/ inside) or RUN_DIR/STEP")


def load_run_policy(checkpoint: str | Path):
    """(the run's TrainConfig, step or None for latest, the trained policy as a `Model`)."""
    run, step = locate(checkpoint)
    cfg = configlib.load(TrainConfig, run / "config.yaml")
    model_cfg = load_config(cfg.model.policy)
    module = QwenCausalLM(model_cfg, param_dtype=as_dtype(cfg.learner.param_dtype))
    params = Checkpointer(run / "checkpoints").restore_params(nn.unbox(abstract_params(module)), step)
    return cfg, step, Model(model_cfg, params)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    cfg, step, model = load_run_policy(checkpoint)
    base = Path(cfg.model.policy)
    out = Path(out)
    model.save_pretrained(out)
    copy_side_files({base, Path(cfg.model.tokenizer or base)}, out)
    log.info("exported %s (step %s) to %s", checkpoint, step if step is not None else "latest", out)
    return out


def quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    quiet_logging()
    p = argparse.ArgumentParser(prog="python -m pr1_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN_DIR (latest step) or RUN_DIR/STEP")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    args = p.parse_args(argv)
    try:
        export(args.checkpoint, args.out)
    except (CheckpointRestoreError, configlib.ConfigError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
