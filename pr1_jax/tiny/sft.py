"""Supervised fine-tuning: maximise the log-likelihood of target tokens after a prompt.

Reuses the learner's batch layout (prompt left-padded, target right-padded, the same positions
and per-sequence images) and its `response_logprobs`, so SFT, GRPO and the sampler share one
definition of "the log-prob of a response". Used for the embedded default's warm starts (the
policy's output format, the judge's verdicts) and usable on its own for any prompt/target data.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np

from models.causal_lm import QwenCausalLM
from models.config import ModelConfig
from pr1_jax.grpo import masked_mean
from pr1_jax.learner import LearnerConfig, make_optimizer, response_logprobs
from pr1_jax.rollout import LearnerBatch, train_batch_from_samples


@dataclasses.dataclass(frozen=True)
class Targets:
    """Right-padded target ids in the sampler's output layout (what `train_batch_from_samples` reads)."""

    tokens: np.ndarray  # [B, R] int32
    mask: np.ndarray  # [B, R] int32
    logprobs: np.ndarray  # [B, R] float32 (unused by SFT)


def pad_targets(targets: Sequence[Sequence[int]], length: int, pad_id: int) -> Targets:
    """Targets longer than `length` are cut (the cut is visible in the mask count)."""
    tokens = np.full((len(targets), length), pad_id, np.int32)
    mask = np.zeros((len(targets), length), np.int32)
    for i, t in enumerate(targets):
        t = list(t)[:length]
        tokens[i, :len(t)] = t
        mask[i, :len(t)] = 1
    return Targets(tokens=tokens, mask=mask, logprobs=np.zeros((len(targets), length), np.float32))


def sft_batch(config: ModelConfig, prompt_inputs: dict, targets: Targets, pixel_values=None,
              image_grid_thw=None, num_patches: int | None = None) -> LearnerBatch:
    """The learner batch (see `pr1_jax.rollout`) for one target per prompt."""
    return train_batch_from_samples(config, prompt_inputs, targets, 1, pixel_values, image_grid_thw, num_patches)


def sft_loss(params, batch: LearnerBatch, module: QwenCausalLM):
    """Mean negative log-likelihood per target token, and the number of target tokens."""
    logp, _ = response_logprobs(module, params, batch, 1.0, entropy_grad=False)
    mask = batch.response_mask
    loss = -masked_mean(logp, mask)
    return loss, {"loss": loss, "tokens": mask.sum()}


class SFTTrainer:
    """AdamW (the learner's optimizer, with warmup) on `sft_loss`; one jitted step per shape."""

    def __init__(self, module: QwenCausalLM, total_steps: int, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.05, freeze_vision: bool = False):
        self.module = module
        cfg = LearnerConfig(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, max_grad_norm=1.0,
                            freeze_vision=freeze_vision)
        self.tx = make_optimizer(cfg, total_steps)
        self._step = jax.jit(functools.partial(self._update, module=module, tx=self.tx), donate_argnums=(0, 1))

    @staticmethod
    def _update(params, opt_state, batch, module, tx):
        (loss, metrics), grads = jax.value_and_grad(sft_loss, has_aux=True)(params, batch, module)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        return params, opt_state, metrics

    def init(self, params):
        return self.tx.init(params)

    def step(self, params, opt_state, batch: LearnerBatch):
        return self._step(params, opt_state, batch)


def token_ids(tokenizer, texts: Sequence[str], eos_id: int) -> list[list[int]]:
    """Target ids: each text tokenized as plain text, then the EOS the sampler stops on."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos_id] for t in texts]

