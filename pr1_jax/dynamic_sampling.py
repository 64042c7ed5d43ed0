"""DAPO's dynamic sampling: a step's batch of informative groups, filled from as many rollouts as it
takes (arXiv 2503.14476, section 3.2; `data.dynamic_sampling`).

A group (one prompt's n samples) whose metric is the same on every sample has zero advantage
under GRPO and Dr.GRPO alike: it moves the policy only through the loss's normalisers (its tokens
dilute a token-mean) and shrinks the batch's effective size as the policy gets better at a prompt.
`fill_step` drops such groups and rolls out further data batches until every process holds
`batch_size` informative groups, or `max_rollouts` rollouts have run.

The interface is small so that the trainer only wires it: `fill_step(first, more, produce, ...)`
with `produce(batch) -> (Rollout, scores, extra)` (one rollout of a data batch and its rewards:
the trainer's own step) and `more() -> batch | None` (the next data batch, None at the end).

Exact resume: `more` is called only once the processes have agreed that a further rollout will
run, so every batch drawn from the data iterator is rolled out in this step, and the checkpoint's
iterator state (taken between steps) resumes at the first batch no step has drawn. Informative
groups beyond the batch are discarded, as in DAPO and verl, not carried to the next step (they
would have to be checkpointed, and their samples are one policy update stale by then).

Several processes: each fills its own rows (its data shard, its rewards), and the decisions (one
more rollout? the data ran out?) are taken on values all-gathered from every process, so every
process runs the same number of rollouts (the sampler is a collective over the mesh) and builds a
batch of the same shape. A process already full rolls out with the others and discards the extra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from pr1_jax.data.batching import META_KEYS
from pr1_jax.data.config import DynamicSamplingConfig
from pr1_jax.multihost import allgather_json
from pr1_jax.rollout import Rollout
from pr1_jax.sharding import map_batch, pad_sequences_left

# produce(data batch) -> (its rollout, one score dict per sample, numeric extras such as timings)
Produce = Callable[[dict], tuple[Rollout, list[dict], dict]]


@dataclasses.dataclass
class Filled:
    """One step's groups: `rollout` and `scores` row-aligned (batch_size * n rows), `batch` the
    prompts' host fields (`META_KEYS` and example_valid: False for groups that fill a short step,
    which the learner masks out), `extra` produce's extras summed over the rollouts, `metrics`
    the filling's counts over all processes."""

    rollout: Rollout
    batch: dict
    scores: list[dict]
    extra: dict
    metrics: dict


def informative_groups(values: Sequence[float], n: int, valid: Sequence[bool]) -> np.ndarray:
    """[B] bool: the valid groups whose n values (row-major, group g = rows g*n .. g*n+n-1) are not
    all equal (max != min, exactly the rule that gives a group zero advantage in
    `grpo.group_advantages`)."""
    v = np.asarray(values, np.float64).reshape(-1, n)
    return (v.max(axis=1) != v.min(axis=1)) & np.asarray(valid, bool)


def _concat(parts: list):
    """Row arrays of several batches (prompt inputs or sample rows) joined on their batch axis."""
    axes = map_batch(lambda x, axis: axis, parts[0])
    return jax.tree.map(lambda axis, *xs: np.concatenate([np.asarray(x) for x in xs], axis=axis), axes, *parts)


def _take(batch, rows: np.ndarray):
    return map_batch(lambda x, axis: np.take(np.asarray(x), rows, axis=axis), batch)


def merge_groups(parts: Sequence[tuple[Rollout, dict, list[dict]]], groups: Sequence[tuple[int, int]]
                 ) -> tuple[Rollout, dict, list[dict]]:
    """(rollout, batch, scores) of the groups `(part, group)` of several rollouts, in that order.
    Prompts are left-padded to the longest part's length (the same sequences: positions and rope
    deltas do not depend on left padding). Needs per-row vision (or none): what a mesh's sampler
    takes."""
    n = parts[0][0].n
    for ro, _, _ in parts:
        vision = ro.prompt_inputs.get("vision")
        if vision is not None and np.ndim(vision.pixel_values) != 3:
            raise ValueError("dynamic sampling merges per-row images only (data.patch_limit_per_record)")
    length = max(np.shape(ro.prompt_inputs["input_ids"])[1] for ro, _, _ in parts)
    offsets = np.cumsum([0] + [len(b["example_valid"]) for _, b, _ in parts])
    prompts = np.array([offsets[p] + g for p, g in groups], np.int64)
    rows = (prompts[:, None] * n + np.arange(n)[None]).reshape(-1)

    inputs = _take(_concat([pad_sequences_left(ro.prompt_inputs, length) for ro, _, _ in parts]), prompts)
    samples = _take(_concat([ro.samples.replace(steps=None) for ro, _, _ in parts]), rows)
    samples = samples.replace(steps=np.asarray(max(int(ro.samples.steps) for ro, _, _ in parts)))
    texts = [t for ro, _, _ in parts for t in ro.texts]
    scores = [s for _, _, sc in parts for s in sc]
    keys = (*META_KEYS, "example_valid")
    flat = {k: [x for _, b, _ in parts for x in b[k]] for k in keys}
    batch = {k: [flat[k][i] for i in prompts] for k in keys}
    batch["example_valid"] = np.asarray(batch["example_valid"], bool)
    return (Rollout(prompt_inputs=inputs, samples=samples, texts=[texts[i] for i in rows], n=n), batch,
            [scores[i] for i in rows])


def fill_step(first: dict, more: Callable[[], dict | None], produce: Produce, cfg: DynamicSamplingConfig,
              allgather: Callable = allgather_json) -> Filled:
    """Roll out `first`, then further batches from `more`, until this step has len(first's
    example_valid) informative groups on every process, `cfg.max_rollouts` rollouts have run, or
    the data ran out on some process. Keeps the first informative groups in rollout order; a step
    still short is topped up with dropped groups marked invalid (no loss, no metrics).
    `allgather`: every process's value of a JSON-able argument (`multihost.allgather_json`)."""
    batch_size = len(first["example_valid"])
    parts, keep, extras = [], [], []
    batch = first
    while True:
        ro, scores, extra = produce(batch)
        valid = np.asarray(batch["example_valid"], bool)
        parts.append((ro, batch, scores))
        keep.append(informative_groups([s[cfg.metric] for s in scores], ro.n, valid))
        extras.append(extra)
        kept = int(sum(k.sum() for k in keep))
        if len(parts) >= cfg.max_rollouts or min(allgather(kept)) >= batch_size:
            break
        batch = more()
        if not all(allgather(batch is not None)):
            break  # a batch drawn on another process goes unused: the data ends there anyway

    informative = [(p, int(g)) for p, k in enumerate(keep) for g in np.flatnonzero(k)]
    dropped = [(p, int(g)) for p, k in enumerate(keep) for g in np.flatnonzero(~k)]
    short = max(batch_size - len(informative), 0)
    ro, step_batch, scores = merge_groups(parts, informative[:batch_size] + dropped[:short])
    step_batch["example_valid"][batch_size - short:] = False
    seen = [int(np.asarray(b["example_valid"], bool).sum()) for _, b, _ in parts]
    totals = np.sum(allgather([sum(seen) - len(informative), max(len(informative) - batch_size, 0), short]), axis=0)
    metrics = dict(rollouts_per_step=len(parts), groups_dropped=int(totals[0]), groups_surplus=int(totals[1]),
                   groups_short=int(totals[2]))
    summed = {k: sum(e.get(k, 0) for e in extras) for k in dict.fromkeys(k for e in extras for k in e)}
    return Filled(rollout=ro, batch=step_batch, scores=scores, extra=summed, metrics=metrics)
