"""`python -m pr1_jax.evaluate (--checkpoint RUN_DIR[/STEP] | --model HF_DIR) --data PATH... --out R.jsonl`

Greedy accuracy (and format, n-gram penalty) of a policy on a dataset, one JSON line per sample
(`id`, `answer`, `response`, reward terms) so two runs can be compared with `pr1_jax.mcnemar`.
With --checkpoint the run's data settings (columns, tokenizer, pixel limits) are the starting
point; `key=value` arguments override DataConfig fields (e.g. `problem_column=question`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import jax
import numpy as np

from models.pretrained import load_pretrained
from pr1_jax import configlib
from pr1_jax.checkpoint import CheckpointRestoreError
from pr1_jax.data.config import DataConfig
from pr1_jax.data.pipeline import make_iterator
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.export import load_run_policy, quiet_logging
from pr1_jax.rewards import RewardConfig, RewardScorer, combine_batch, mean_metrics
from pr1_jax.rollout import rollout
from pr1_jax.sampling import SamplingConfig, Sampler

log = logging.getLogger("pr1_jax")


def evaluate(model, tokenizer, data: DataConfig, out: Path, max_new_tokens: int, reward: RewardConfig) -> dict:
    """Writes `out` (JSONL, one sample per line) and returns the mean metrics."""
    sampler = Sampler(model.module, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0
                                                   ).with_tokenizer(tokenizer))
    data = dataclasses.replace(data, shuffle=False, num_epochs=1, drop_remainder=False, shard_index=0, shard_count=1)
    rows, all_scores = [], []
    it = make_iterator(data, tokenizer)
    with RewardScorer(reward) as scorer:
        for batch in it:
            texts = rollout(model, model.params, sampler, tokenizer, batch, jax.random.key(0),
                            patches_per_row=data.patch_limit_per_record).texts
            valid = np.asarray(batch["example_valid"], bool)
            recs = [dict(response=t, ground_truth=a) for t, a, v in zip(texts, batch["answer"], valid) if v]
            # No judge here: the visual term is left out of these scores and of `overall`.
            scores = combine_batch(scorer.submit(recs).result().terms, None, reward.weights)
            all_scores += scores
            ids = [i for i, v in zip(batch["record_id"], valid) if v]
            for rid, rec, s in zip(ids, recs, scores):
                rows.append(dict(id=rid, answer=rec["ground_truth"], response=rec["response"],
                                 **{k: v for k, v in s.items() if k not in ("has_visual", "visual")}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = mean_metrics(all_scores) if all_scores else {}
    summary.update(samples=len(rows), skipped=sum(it.skip_counts.values()))
    return summary


def main(argv: list[str] | None = None) -> int:
    quiet_logging()
    p = argparse.ArgumentParser(prog="python -m pr1_jax.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="RUN_DIR (latest step) or RUN_DIR/STEP of a pr1_jax.train run")
    src.add_argument("--model", help="a Hugging Face checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's or the run's)")
    p.add_argument("--data", nargs="+", required=True, help="parquet / JSONL files or directories")
    p.add_argument("--out", required=True, help="per-sample results (JSONL)")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("overrides", nargs="*", help="DataConfig field=value")
    args = p.parse_args(argv)
    try:
        if args.checkpoint:
            cfg, _, model = load_run_policy(args.checkpoint)
            data, reward = cfg.data, cfg.reward
            tok_dir = args.tokenizer or cfg.model.tokenizer or cfg.model.policy
        else:
            model = load_pretrained(args.model)
            data, reward = DataConfig(), RewardConfig()
            tok_dir = args.tokenizer or args.model
        base = dataclasses.replace(data, paths=tuple(args.data), tokenizer_path=tok_dir, batch_size=args.batch_size)
        data = configlib.load(DataConfig, None, args.overrides, base=base)
        summary = evaluate(model, load_tokenizer(tok_dir), data, Path(args.out), args.max_new_tokens, reward)
    except (CheckpointRestoreError, configlib.ConfigError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
