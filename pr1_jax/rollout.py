"""Data batch -> policy inputs -> sampled responses (token ids and text).

Shared by training (n samples at temperature 1) and evaluation (greedy, n = 1).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from models.pretrained import Model
from pr1_jax.sampling import SampleOutput, Sampler


@dataclasses.dataclass
class Rollout:
    prompt_inputs: dict  # `Model.prepare_inputs` of the batch's prompts (host numpy)
    pixel_values: np.ndarray | None  # [P, patch_dim] packed, as in the data batch
    image_grid_thw: np.ndarray | None  # [images, 3], real images only
    samples: SampleOutput  # device arrays, row i = prompt i // n
    texts: list[str]  # decoded responses (special tokens kept out), row-aligned with samples
    n: int


def policy_inputs(model: Model, batch: dict) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """A data-pipeline batch (see `pr1_jax.data.batching`) -> `prepare_inputs` dict for the policy.

    The pipeline's zero rows of `image_grid_thw` are padding slots and are dropped; pixel rows keep
    their static count so the vision tower compiles once."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not model.config.is_vlm or not np.any(batch.get("image_valid", False)):
        return model.prepare_inputs(ids, mask), None, None
    grids = np.asarray(batch["image_grid_thw"])[np.asarray(batch["image_valid"], bool)]
    pv = np.asarray(batch["pixel_values"])
    return model.prepare_inputs(ids, mask, pv, grids, num_patches=pv.shape[0]), pv, grids


def decode(tokenizer, samples: SampleOutput) -> list[str]:
    """Response texts: tokens up to each row's length, EOS and other special tokens dropped."""
    tokens = np.asarray(samples.tokens)
    lengths = np.asarray(samples.lengths)
    return tokenizer.batch_decode([t[:n].tolist() for t, n in zip(tokens, lengths)], skip_special_tokens=True)


def rollout(model: Model, params, sampler: Sampler, tokenizer, batch: dict, key: jax.Array) -> Rollout:
    inputs, pv, grids = policy_inputs(model, batch)
    samples = sampler(params, inputs, key)
    return Rollout(prompt_inputs=inputs, pixel_values=pv, image_grid_thw=grids, samples=samples,
                   texts=decode(tokenizer, samples), n=sampler.cfg.n)
