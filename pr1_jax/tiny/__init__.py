"""The embedded default: what `python -m pr1_jax.train` runs with no arguments, on a CPU.

A synthetic visual task (`synthetic`), a tokenizer and tiny random-weight models of the real
architectures written as Hugging Face directories (`assets`), their warm starts, the stand-ins
for "Instruct" checkpoints (`warm_start`, on the SFT trainer of `sft`). `prepare_run` builds all
of it in the run directory (reused when present) and points the run's config at it; from there
the run takes exactly the path of a real one. Nothing in the core imports this package.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from pr1_jax.config import TrainConfig
from pr1_jax.judge import Judge
from pr1_jax.tiny import synthetic
from pr1_jax.tiny.assets import TinyAssets, build_tiny_assets, judge_prompt_config
from pr1_jax.tiny.warm_start import judge_accuracy, warm_start_judge, warm_start_policy

__all__ = ["TinyAssets", "build_tiny_assets", "judge_prompt_config", "prepare_run"]

log = logging.getLogger("pr1_jax")


def prepare_run(cfg: TrainConfig) -> TrainConfig:
    """Builds the synthetic task, tokenizer and models in `cfg.run_dir`, warm-starts both models
    (`cfg.tiny` settings; `judge_steps=0`: no judge), logs the judge's verdict accuracy on held-out
    pairs, and returns the config pointed at them (data, validation, policy, judge, tokenizers)."""
    t, root = cfg.tiny, Path(cfg.run_dir)
    t0 = time.perf_counter()
    assets = build_tiny_assets(root, seed=t.seed, architecture=t.architecture)
    log.info("tiny assets (task, tokenizer, random-weight models) in %.0f s -> %s", time.perf_counter() - t0,
             Path(assets.policy).parent)
    policy = warm_start_policy(assets, root / "warm_start" / "policy", steps=t.policy_steps,
                               batch_size=t.policy_batch_size, lr=t.policy_lr, seed=t.seed, p_state=t.policy_p_state,
                               p_true=t.policy_p_true)
    judge = None
    if t.judge_steps:
        judge = warm_start_judge(assets, root / "warm_start" / "judge", cfg.judge, steps=t.judge_steps,
                                 batch_size=t.judge_batch_size, lr=t.judge_lr, seed=t.seed)
        held_out = synthetic.judge_pairs(np.random.default_rng([t.seed, 99]), t.judge_eval_pairs)
        acc = judge_accuracy(Judge.load(judge, cfg.judge, tokenizer_path=assets.tokenizer, dtype="float32"), held_out)
        log.info("judge verdict accuracy on %d held-out synthetic pairs: %.3f", len(held_out), acc)
    else:  # no judge: the run is then one without the visual reward, which nothing measures
        log.info("tiny.judge_steps=0: no judge (reward.weights.visual must be 0)")
    data = dataclasses.replace(cfg.data, paths=(assets.train,), tokenizer_path=assets.tokenizer)
    return dataclasses.replace(
        cfg, data=data, val_paths=(assets.val,),
        model=dataclasses.replace(cfg.model, policy=str(policy), judge=judge and str(judge),
                                  tokenizer=assets.tokenizer, judge_tokenizer=judge and assets.tokenizer))
