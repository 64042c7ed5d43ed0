"""Benchmark problems -> HF-exact prompt batches -> greedy responses from our sampler.

Each problem becomes the data pipeline's record and goes through its `ExampleProcessor` (the
tokenizer's chat template, transformers' image processor, the image-token expansion) and
`collate` (left padding to the smallest length bucket that holds the batch's longest prompt, a
static patch budget), so a benchmark compiles the sampler for at most `len(DataConfig.buckets)`
prompt shapes. Responses are decoded greedily (temperature 0) by `rollout`, on the mesh, up to
`max_new_tokens` or a stop token. A problem the pipeline cannot use (an unreadable image, a
prompt over `max_prompt_length` with `truncation: skip`) is a counted, logged skip, or an error
when `DataConfig.strict`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from models.pretrained import Model
from pr1_jax.data.batching import collate
from pr1_jax.data.config import DataConfig
from pr1_jax.data.processing import ExampleProcessor
from pr1_jax.data.records import BadRecordError
from pr1_jax.evaluation.benchmarks import Problem
from pr1_jax.rollout import Rollout, rollout
from pr1_jax.sampling import SamplingConfig, Sampler

log = logging.getLogger("pr1_jax")


def prompt_batches(problems: Sequence[Problem], config: DataConfig, tokenizer,
                   skips: collections.Counter) -> Iterator[dict]:
    """The data pipeline's batch dicts (`pr1_jax.data.batching`) of `config.batch_size` problems,
    in order; the last one padded with invalid rows. Skipped problems are counted in `skips`
    ({reason: count}) and logged."""
    proc = ExampleProcessor(config, tokenizer)
    examples = []
    for p in problems:
        try:
            examples.append(proc.process(p.record()))
        except BadRecordError as e:
            if config.strict:
                raise
            skips[e.reason] += 1
            log.warning("skipping problem %r: %s (%s)", p.id, e.reason, e.detail)
            continue
        if examples[-1].truncated_tokens:
            log.info("problem %r: %d prompt tokens cut (%s)", p.id, examples[-1].truncated_tokens, config.truncation)
        if len(examples) == config.batch_size:
            yield collate(examples, config, proc.pad_token_id)
            examples = []
    if examples:
        yield collate(examples, config, proc.pad_token_id)


def greedy_config(sampling: SamplingConfig, max_new_tokens: int, tokenizer) -> SamplingConfig:
    """`sampling`'s stop tokens, greedy, one response per prompt, `max_new_tokens` at most."""
    return dataclasses.replace(sampling, temperature=0.0, top_p=1.0, top_k=0, n=1,
                               max_new_tokens=max_new_tokens).with_tokenizer(tokenizer)


def generate(model: Model, params, tokenizer, problems: Sequence[Problem], config: DataConfig,
             sampling: SamplingConfig, mesh: Mesh | None, skips: collections.Counter
             ) -> Iterator[tuple[list[str], Rollout]]:
    """(ids, rollout) per batch: the batch's problem ids and its greedy `Rollout` (texts, tokens),
    filler rows dropped. `sampling` must be greedy (`greedy_config`)."""
    sampler = Sampler(model.module, sampling, mesh)
    for batch in prompt_batches(problems, config, tokenizer, skips):
        ro = rollout(model, params, sampler, tokenizer, batch, jax.random.key(0), mesh, config.patch_limit_per_record)
        valid = np.flatnonzero(np.asarray(batch["example_valid"], bool))
        ro = dataclasses.replace(ro, texts=[ro.texts[i] for i in valid],
                                 samples=jax.tree.map(lambda x: x[valid] if np.ndim(x) else x, ro.samples))
        yield [batch["record_id"][i] for i in valid], ro
