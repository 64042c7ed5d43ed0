"""Data batch -> policy inputs -> sampled responses (token ids and text) -> the learner's batch.

Shared by training (n samples at temperature 1) and evaluation (greedy, n = 1). The sampler runs
on global arrays over the whole mesh: with several processes each passes its own prompts (its
data shard) and gets its own rows back. `train_batch_from_samples` lays prompts and samples out
as the `LearnerBatch` that the update (`pr1_jax.learner`) and SFT read.

The learner batch (N = B*n sequences, T = prompt length, R = the response bucket: a length of
`response_bucket` that holds the batch's longest response, at most max_new_tokens; L = T + R;
row i is sample i % n of prompt i // n, as the sampler lays them out; G = B*c vision groups, c
copies of each prompt's images, `vision_copies`; P = `num_patches` patch rows per group):

=================  ======================  =======  ===============================================
field              shape                   dtype    meaning
=================  ======================  =======  ===============================================
input_ids          [N, L]                  int32    left-padded prompt, then the response (pad id
                                                    after the row's EOS)
attention_mask     [N, L]                  int32    prompt mask, then `response_mask`
positions          [3, N, L] (VLM) or      int32    prompt positions (M-RoPE rows) repeated n
                   [N, L] (text model)              times; response token k at n_valid + delta + k
                                                    on every row; 0 at padding (left and after EOS)
response_mask      [N, R]                  int32    1 on generated tokens (EOS included)
old_logprobs       [N, R]                  float32  behaviour log-probs (the sampler's)
advantages         [N]                     float32  per-sequence advantage (None until the rewards
                                                    are in; the update requires it)
ref_logprobs       [N, R]                  float32  None, or the reference policy's (KL term)
vision             VisionInputs | None              per-group packed patches: every field has a
                                                    leading G axis (pixel_values [G, P, patch_dim],
                                                    perm/seg_full/seg_window [G, P], rot_pos
                                                    [G, P, 2], unperm [G, P // merge**2]); group g
                                                    holds the images of prompt g // c, and rows
                                                    i with i // (N / G) == g read its features
=================  ======================  =======  ===============================================

Why per-group vision: the learner runs the tower once per group and shares the features among
the group's rows (`pr1_jax.learner`), so a prompt's images go through the tower c times, not n;
every array has its batch axis first, so data sharding splits the groups with their rows (group g
and rows g*N/G .. (g+1)*N/G - 1 land on the same device); and the tower's attention is [P, P] per
group instead of over all images of the batch. c = 1 when the data axes divide the prompts; more
(at most n: one group per row) only where they do not, so that the groups still shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import numpy as np
from jax.sharding import Mesh

from models.config import ModelConfig
from models.positions import row_vision_arrays
from models.pretrained import Model
from models.vision import VisionInputs
from pr1_jax.multihost import allgather_json, local_rows
from pr1_jax.sampling import SampleOutput, Sampler
from pr1_jax.sharding import batch_axis_size, global_batch, map_batch


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


@flax.struct.dataclass
class LearnerBatch:
    """The learner's batch: see the table in the module docstring. Host numpy or (sharded)
    device arrays; `pr1_jax.sharding.map_batch` visits its arrays with their sequence axis."""

    input_ids: Any
    attention_mask: Any
    positions: Any
    response_mask: Any
    old_logprobs: Any
    advantages: Any = None
    ref_logprobs: Any = None
    vision: VisionInputs | None = None

    @property
    def num_sequences(self) -> int:
        return self.response_mask.shape[0]

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]


def response_bucket(longest: int, buckets: Sequence[int], cap: int) -> int:
    """The learner batch's response length R: the smallest of `buckets` below `cap` (the sampler's
    max_new_tokens) that holds `longest` tokens, else `cap`. A few static lengths, so the update
    compiles once per bucket and pays for the step's longest response, not for the cap."""
    return min([b for b in buckets if longest <= b < cap] + [cap])


def vision_copies(prompts: int, n: int, shards: int) -> int:
    """c, the copies of each prompt's images in the learner batch: the fewest that divide n and
    make prompts * c a multiple of `shards` (the data shards this process's rows are split over),
    so that the groups shard with their rows; 1 when `shards` divides the prompts (every prompt's
    tower runs once), n (one group per row) when no divisor of n does."""
    return next((c for c in range(1, n + 1) if n % c == 0 and prompts * c % shards == 0), n)


def train_batch_from_samples(config: ModelConfig, prompt_inputs: dict, sample_out, n: int,
                             pixel_values=None, image_grid_thw=None, num_patches: int | None = None,
                             advantages=None, example_valid=None, response_length: int | None = None,
                             shards: int = 1) -> LearnerBatch:
    """Host side (numpy). The learner batch of the module docstring for N = B*n sequences.

    prompt_inputs: `Model.prepare_inputs` dict of the B prompts (input_ids, attention_mask,
      positions, rope_deltas; a per-row `vision` is reused, a packed one is not used).
    sample_out: the sampler's `SampleOutput` for these prompts with `n` samples each (or any
      object with its tokens / mask / logprobs fields).
    pixel_values [patches, patch_dim], image_grid_thw [images, 3]: the prompts' images packed in
      order of appearance (row-major), as given to `prepare_inputs`; zero-grid rows (padding
      slots of the data pipeline) and rows past the real patches are ignored.
    num_patches: patch rows per group (a static size; a multiple of merge**2 that is at least
      the largest prompt's patch count; e.g. `DataConfig.patch_limit_per_record`). Default: the
      largest prompt's count.
    advantages: [N] optional.
    Images come from a per-row `prompt_inputs["vision"]` if there is one, else from pixel_values.
    example_valid: [B] bool optional; filler prompts get an all-zero response mask.
    response_length: R (e.g. `response_bucket` of the longest response over all processes);
      default the sampler's max_new_tokens. Shorter than a response or longer than that: ValueError.
    shards: the data shards this process's rows are split over (`vision_copies`).
    """
    ids = np.asarray(prompt_inputs["input_ids"]).astype(np.int32)
    pmask = np.asarray(prompt_inputs["attention_mask"]).astype(np.int32)
    ppos = np.asarray(prompt_inputs["positions"]).astype(np.int32)
    deltas = np.asarray(prompt_inputs["rope_deltas"]).astype(np.int32)
    tokens = np.asarray(sample_out.tokens).astype(np.int32)
    rmask = np.asarray(sample_out.mask).astype(np.int32)
    old = np.asarray(sample_out.logprobs).astype(np.float32)
    b, t = ids.shape
    num, r = tokens.shape
    if num != b * n:
        raise ValueError(f"{num} samples for {b} prompts x n={n}")
    if response_length is not None:
        longest = int(rmask.sum(-1).max(initial=0))
        if not longest <= response_length <= r:
            raise ValueError(f"response_length={response_length}: must hold the longest response ({longest} tokens) "
                             f"and be at most the sampler's {r}")
        r = response_length
        tokens, rmask, old = tokens[:, :r], rmask[:, :r], old[:, :r]
    if example_valid is not None:
        rmask = rmask * np.repeat(np.asarray(example_valid).astype(np.int32), n)[:, None]

    rep = lambda x, axis=0: np.repeat(x, n, axis=axis)  # noqa: E731
    n_valid = rep(pmask.sum(-1))
    resp_pos = (n_valid + rep(deltas))[:, None] + np.arange(r)[None]
    resp_pos = np.where(rmask.astype(bool), resp_pos, 0).astype(np.int32)
    if ppos.ndim == 3:
        positions = np.concatenate([rep(ppos, 1), np.broadcast_to(resp_pos[None], (3, num, r))], axis=2)
    else:
        positions = np.concatenate([rep(ppos), resp_pos], axis=1)

    copies = vision_copies(b, n, shards)
    vision = prompt_inputs.get("vision")
    if vision is not None and np.ndim(vision.pixel_values) == 3:
        vision = jax.tree.map(lambda x: np.repeat(np.asarray(x), copies, axis=0), vision)
    elif pixel_values is not None:
        if config.vision is None:
            raise ValueError(f"a {config.model_type} model takes no images")
        grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
        fields = row_vision_arrays(ids, pmask, pixel_values, grids[grids.prod(-1) > 0], num_patches, config.vision,
                                   image_token_id=config.image_token_id)
        vision = VisionInputs(**{k: np.repeat(v, copies, axis=0) for k, v in fields.items()})
    else:
        vision = None
    return LearnerBatch(
        input_ids=np.concatenate([rep(ids), tokens], axis=1),
        attention_mask=np.concatenate([rep(pmask), rmask], axis=1),
        positions=positions.astype(np.int32),
        response_mask=rmask,
        old_logprobs=np.where(rmask.astype(bool), old, 0.0).astype(np.float32),
        advantages=None if advantages is None else np.asarray(advantages, np.float32).reshape(num),
        vision=vision,
    )
