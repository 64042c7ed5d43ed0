"""Data batch -> policy inputs -> sampled responses (token ids and text).

Shared by training (n samples at temperature 1) and evaluation (greedy, n = 1). The sampler runs
on global arrays over the whole mesh: with several processes each passes its own prompts (its
data shard) and gets its own rows back.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from models.pretrained import Model
from pr1_jax.learner import global_batch, map_batch
from pr1_jax.multihost import allgather_json, local_rows
from pr1_jax.sampling import SampleOutput, Sampler
from pr1_jax.sharding import batch_axis_size


@dataclasses.dataclass
class Rollout:
    prompt_inputs: dict  # `Model.prepare_inputs` of this process's prompts (host numpy)
    samples: SampleOutput  # this process's rows (host numpy), row i = prompt i // n
    texts: list[str]  # decoded responses (special tokens kept out), row-aligned with samples
    n: int


def policy_inputs(model: Model, batch: dict, patches_per_row: int | None = None
                  ) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """A data-pipeline batch (see `pr1_jax.data.batching`) -> `prepare_inputs` dict for the policy.

    The pipeline's zero rows of `image_grid_thw` are padding slots and are dropped. Images are
    packed with the batch's static patch count, or, with `patches_per_row` (e.g.
    `DataConfig.patch_limit_per_record`), laid out per row (`prepare_inputs(per_row=True)`);
    either way the vision tower compiles once."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not model.config.is_vlm or not np.any(batch.get("image_valid", False)):
        return model.prepare_inputs(ids, mask), None, None
    grids = np.asarray(batch["image_grid_thw"])[np.asarray(batch["image_valid"], bool)]
    pv = np.asarray(batch["pixel_values"])
    if patches_per_row is not None:
        return model.prepare_inputs(ids, mask, pv, grids, num_patches=patches_per_row, per_row=True), pv, grids
    return model.prepare_inputs(ids, mask, pv, grids, num_patches=pv.shape[0]), pv, grids


def decode(tokenizer, samples: SampleOutput) -> list[str]:
    """Response texts: tokens up to each row's length, EOS and other special tokens dropped."""
    tokens = np.asarray(samples.tokens)
    lengths = np.asarray(samples.lengths)
    return tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens, lengths)], skip_special_tokens=True)


def sample_rows(sampler: Sampler, params, inputs: dict, key: jax.Array, mesh: Mesh | None = None) -> SampleOutput:
    """The sampler on this process's prompt rows (host numpy; per-row vision when there is a
    mesh); returns this process's sample rows as host numpy.

    With a mesh the prompts of all processes become one global batch sharded over the data axes.
    Each process's rows are padded (repeating its last prompt) to a multiple of its share of the
    data axes, so that any batch size shards; the padding's samples are dropped. Every prompt
    keeps the random stream of its index in the unpadded global batch (`prompt_ids`), so the
    samples do not depend on the padding or on the number of processes."""
    if mesh is None:
        return jax.tree.map(np.asarray, sampler(params, inputs, key))
    vision = inputs.get("vision")
    if vision is not None and np.ndim(vision.pixel_values) != 3:
        raise ValueError("on a mesh the sampler takes per-row images (policy_inputs(..., patches_per_row))")
    b = inputs["input_ids"].shape[0]
    counts = allgather_json(b)
    share = max(batch_axis_size(mesh) // jax.process_count(), 1)
    padded = -(-max(counts) // share) * share
    start, total = sum(counts[:jax.process_index()]), sum(counts)
    prompt_ids = np.concatenate([start + np.arange(b), total + start + np.arange(padded - b)]).astype(np.int32)
    rows = map_batch(lambda x, axis: np.concatenate(
        [x, np.repeat(np.take(x, [b - 1], axis=axis), padded - b, axis=axis)], axis=axis), inputs)
    out = sampler(params, global_batch(mesh, {**rows, "prompt_ids": prompt_ids}), key)
    local = jax.tree.map(lambda x: local_rows(x)[:b * sampler.cfg.n], out.replace(steps=None))
    return local.replace(steps=np.asarray(out.steps.addressable_data(0)))  # replicated scalar


def rollout(model: Model, params, sampler: Sampler, tokenizer, batch: dict, key: jax.Array,
            mesh: Mesh | None = None, patches_per_row: int | None = None) -> Rollout:
    inputs, _, _ = policy_inputs(model, batch, patches_per_row)
    samples = sample_rows(sampler, params, inputs, key, mesh)
    return Rollout(prompt_inputs=inputs, samples=samples, texts=decode(tokenizer, samples), n=sampler.cfg.n)
