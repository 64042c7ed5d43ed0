"""The GRPO learner: log-probs of the responses and one optimizer update per mini-batch on the
device mesh. It reads the `LearnerBatch` that `pr1_jax.rollout.train_batch_from_samples` lays out.

Pieces (pure functions first, a thin shell last):

- `image_features` / `response_logprobs`: the vision tower once per vision group (a prompt's
  images, shared by its samples: the batch's layout in `pr1_jax.rollout`), then one forward over
  prompt + response, the LM head applied only to the R positions that predict response tokens
  (never `[N, T+R, V]` logits), then `grpo.token_logprobs` at the sampler's temperature
  (`SamplingConfig.score_temperature`).
- `packed_logprobs`: the same for a `pr1_jax.packing.PackedBatch` (rows of a token budget holding
  whole GRPO groups, each prompt once with its responses as branches): every slot's log-prob from
  the hidden state of its `sources` slot, the image tokens' features gathered from the groups'.
  `batch_logprobs` picks the one the batch's layout needs.
- `make_optimizer` / `lr_schedule`: AdamW (torch semantics, decay on every trainable param) after a
  global-norm clip, linear warmup then constant or cosine; a frozen vision tower is a
  `set_to_zero` partition of `optax.multi_transform`, so it has no moments and never moves. The
  update's schedule counts update attempts, skipped ones too (`apply_update`).
- `train_step`: the tower's features for the whole mini-batch, then the micro-batches, each
  taking its rows' features (`micro_features`); gradients accumulated with the *global* token
  count (so the sum equals the full-batch token-mean loss), the features' gradient sent back
  through the tower once; clip, update; a non-finite loss or gradient keeps params and optimizer
  state and counts a skipped step, all inside jit.
- `Learner`: builds the jitted step against a mesh with explicit in/out shardings from
  `pr1_jax.sharding`, traced inside its activation rules, and donates the state.
- LoRA (`learner.lora`, `pr1_jax.lora`): the state's params are the adapters, the frozen base
  (compute dtype, vision tower included) is the step's third argument; the loss differentiates
  the adapters only, so the gradients, the moments and the checkpoints are the adapters'.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.causal_lm import QwenCausalLM
from models.config import ModelConfig
from models.pretrained import abstract_params, as_dtype
from models.vision import VisionInputs
from pr1_jax import configlib, lora
from pr1_jax.grpo import GRPOLossConfig, entropy_from_logits, grpo_loss, token_logprobs
from pr1_jax.packing import PackedBatch, PackingMode
from pr1_jax.rollout import LearnerBatch
from pr1_jax.sharding import (activation_sharding, batch_axis_size, batch_sharding, batch_shardings, map_batch,
                              param_shardings)


# --------------------------------------------------------------------------- config / state


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """The reference run's optimizer by default: AdamW lr 1e-6, betas (0.9, 0.999), weight decay
    1e-3, warmup ratio 0.05, grad-norm clip 1.0; token-mean loss, no KL. The loss defaults are plain
    PPO clip 0.2 with the sampler's log-probs; the paper configs set the reference's clip-higher
    0.3, dual clip 3.0 and recomputed old log-probs (docs/FIDELITY.md)."""

    lr: float = configlib.bounded(1e-6, gt=0)
    weight_decay: float = configlib.bounded(1e-3, ge=0)
    b1: float = configlib.bounded(0.9, ge=0, le=1)
    b2: float = configlib.bounded(0.999, ge=0, le=1)
    eps: float = configlib.bounded(1e-8, gt=0)
    warmup_ratio: float = configlib.bounded(0.05, ge=0, le=1)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = configlib.bounded(0.0, ge=0, le=1)  # cosine floor, as a fraction of lr
    max_grad_norm: float = configlib.bounded(1.0, gt=0)
    micro_batch_size: int | None = configlib.bounded(None, ge=1)  # sequences per micro-batch; None = the whole mini-batch
    # The update's layout (`pr1_jax.packing`): "off", one padded row per sequence (prompt + the
    # response bucket); "groups", rows of max_tokens_per_micro_batch tokens holding whole GRPO
    # groups, each prompt once with its samples' responses as branches; "sequences", the same
    # rows holding prompt + response per sequence. Packed, a micro-batch is one row per data
    # shard (micro_batch_size is not read) and their number follows from the step's tokens.
    # The attention of a packed row runs in blocks of `models.attention.pair_block` slots (128,
    # or the largest power of 2 dividing the budget): a multiple of 8 is required, of 128 best.
    packing: PackingMode = "off"
    max_tokens_per_micro_batch: int | None = configlib.bounded(None, ge=1)  # tokens per device per micro-batch (packed)
    # The response lengths the update compiles for: each step pads its responses to the smallest
    # that holds the longest one (over all processes), or to the sampler's max_new_tokens; those
    # at or above it are ignored (`pr1_jax.rollout.response_bucket`).
    response_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 3072)
    loss: GRPOLossConfig = GRPOLossConfig()
    # Group advantages: grpo = (r - mean) / (std + eps); drgrpo = r - mean (Dr.GRPO, no std
    # division, which up-weights groups of near-equal rewards). `grpo.group_advantages`.
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    freeze_vision: bool = False
    remat: bool = False
    dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators)
    param_dtype: str = "float32"
    # Use the current params' log-probs (computed in the same forward, no extra pass) as the old
    # policy instead of the sampler's: ratio == 1 exactly. Right when a rollout gets exactly one
    # update; with several mini-batch updates per rollout, recompute once with
    # `Learner.logprobs` before the first of them instead. Either way the step reports how far
    # the sampler's log-probs are from the learner's.
    recompute_old_logprobs: bool = False
    # LoRA (`pr1_jax.lora`): rank > 0 trains adapters on the decoder's projections only; the base
    # weights are frozen in `dtype` and the vision tower with them; adapters and their Adam
    # moments are float32 and are all a checkpoint holds.
    lora: lora.LoraConfig = lora.LoraConfig()

    def __post_init__(self):
        if self.packing not in ("off", "groups", "sequences"):
            raise ValueError(f"packing {self.packing!r}: expected off, groups or sequences")
        if self.packing != "off" and not self.max_tokens_per_micro_batch:
            raise ValueError(f"packing {self.packing!r} needs max_tokens_per_micro_batch (tokens per device per "
                             "micro-batch, at least the longest prompt + max_new_tokens)")
        if self.packing != "off" and self.max_tokens_per_micro_batch % 8:
            # Blocks of 1 to 4 slots would make the block pairs ~ the square's slot count.
            raise ValueError(f"max_tokens_per_micro_batch={self.max_tokens_per_micro_batch}: packed rows' attention "
                             "runs in blocks of up to 128 slots; use a multiple of 8 (of 128 for long rows)")
        # A packed row holds many sequences: the per-row sequence reductions of the other
        # aggregations and of GSPO's ratio would mix them.
        if self.packing != "off" and (self.loss.loss_agg != "token-mean" or self.loss.policy == "gspo"):
            raise ValueError(f"packing {self.packing!r} takes loss.loss_agg=token-mean with the ppo or cispo policy "
                             f"loss, not {self.loss.loss_agg} / {self.loss.policy} (packing: off takes every one)")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer updates applied (= optax's count)
    params: Any
    opt_state: Any
    skipped: jax.Array  # [] int32, steps skipped for a non-finite loss or gradient


def make_module(model_config: ModelConfig, cfg: LearnerConfig, attention: str = "auto",
                adapters: bool = True) -> QwenCausalLM:
    """attention: the run's `model.attention` (one setting for the policy's sampler and learner).
    With `learner.lora` on, the module has its adapters unless `adapters` is False (the policy's
    own architecture: what merged params, the base or a reference policy apply to)."""
    return QwenCausalLM(model_config, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
                        remat=cfg.remat, attention=attention,
                        lora=cfg.lora if cfg.lora.enabled and adapters else None)


# --------------------------------------------------------------------------- optimizer


def lr_schedule(cfg: LearnerConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup from 0 over int(warmup_ratio * total_steps) updates (HF / verl semantics: the
    first update of a warmup runs at lr 0), then constant or cosine down to min_lr_ratio * lr."""
    warmup = int(cfg.warmup_ratio * total_steps)
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}")

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        if cfg.schedule == "constant":
            after = jnp.float32(1.0)
        else:
            progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
            after = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return cfg.lr * jnp.where(step < warmup, step / max(warmup, 1), after)

    return fn


def _labels(params):
    """'frozen' for the vision tower, 'trainable' for everything else."""
    return {k: jax.tree.map(lambda _: "frozen" if k == "visual" else "trainable", v) for k, v in params.items()}


def make_optimizer(cfg: LearnerConfig, total_steps: int,
                   learning_rate: float | Callable | None = None) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) -> AdamW(learning_rate: a constant or a schedule of
    optax's count of applied updates; default `lr_schedule(cfg, total_steps)`). With
    `freeze_vision`, the "visual" subtree is a `set_to_zero` partition: no moments, no update, no
    weight decay, and its (zero) gradient does not enter the clipping norm. `apply_update` takes
    it with learning_rate 1.0 and scales the update by its own schedule."""
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(lr_schedule(cfg, total_steps) if learning_rate is None else learning_rate, b1=cfg.b1, b2=cfg.b2,
                    eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
    if cfg.freeze_vision:
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, _labels)
    return tx


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      skipped=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------- forward


def image_features(module: QwenCausalLM, params, vision: VisionInputs):
    """[G, M, E] visual tokens of the batch's G vision groups (M = P // merge**2), compute dtype."""
    return module.apply({"params": params}, vision, method=QwenCausalLM.image_features)


def rows_per_group(batch: LearnerBatch) -> int:
    """N / G: the rows that read each vision group's features (n / copies, see the batch table)."""
    n, g = batch.num_sequences, batch.vision.pixel_values.shape[0]
    if n % g:
        raise ValueError(f"{n} sequences do not split into {g} vision groups")
    return n // g


def response_logprobs(module: QwenCausalLM, params, batch: LearnerBatch, temperature: float = 1.0, *,
                      entropy_grad: bool = True, features=None, rng=None):
    """(logp [N, R], entropy [N, R]) float32 of the response tokens under
    softmax(logits / temperature); only the hidden states at T-1 .. T+R-2 go through the LM head.
    Values at masked (non-response) positions are meaningless; mask them.
    entropy_grad=False: the entropy is computed from stop-gradient logits (a metric only).
    features: [N, M, E] every row's visual tokens; default `image_features` of `batch.vision`,
    once per group, repeated to the group's rows (then `params` need no vision tower).
    rng: the LoRA adapters' dropout key (the update's; None: no dropout)."""
    apply = _applier(module, params, rng)
    if features is None and batch.vision is not None:
        features = jnp.repeat(image_features(module, params, batch.vision), rows_per_group(batch), axis=0)
    r = batch.response_mask.shape[1]
    ids = batch.input_ids
    t = ids.shape[1] - r
    # Only the prompt's image tokens take visual features: the sampler fed generated ones as text.
    image_mask = (ids == module.cfg.image_token_id) & (jnp.arange(ids.shape[1]) < t)[None]
    h, _ = apply(ids, batch.positions, batch.attention_mask, image_mask=image_mask, features=features,
                 method=QwenCausalLM.hidden_states)
    logits = apply(h[:, t - 1:t + r - 1], method=QwenCausalLM.logits)  # [N, R, V]
    logp = token_logprobs(logits, ids[:, t:], temperature)
    ent_in = logits if entropy_grad else jax.lax.stop_gradient(logits)
    return logp, entropy_from_logits(ent_in, temperature)


def packed_logprobs(module: QwenCausalLM, params, batch: PackedBatch, temperature: float = 1.0, *,
                    entropy_grad: bool = True, features=None, rng=None):
    """(logp [W, L], entropy [W, L]) float32 of every token of the packed rows (`pr1_jax.packing`)
    from the hidden state of its `sources` slot; meaningful at `response_mask` only.
    features: [G, M, E] the vision groups' visual tokens (default `image_features` of
    `batch.vision`); each row's image tokens take theirs through `image_index`. rng: see
    `response_logprobs`."""
    apply = _applier(module, params, rng)
    if features is None and batch.vision is not None:
        features = image_features(module, params, batch.vision)
    ids = batch.input_ids
    rows = None
    if features is not None:
        rows = jnp.take(features.reshape(-1, features.shape[-1]), batch.image_index, axis=0)  # [W, L, E]
    # Prompt tokens only (`sequence` -1 there): a generated image token was fed as text.
    image_mask = (ids == module.cfg.image_token_id) & (batch.sequence < 0) & batch.attention_mask.astype(bool)
    h, _ = apply(ids, batch.positions, batch.attention_mask, image_mask=image_mask, features=rows,
                 branches=batch.branches, groups=batch.groups, pairs=batch.pairs,
                 method=QwenCausalLM.hidden_states)
    h = jnp.take_along_axis(h, batch.sources[..., None], axis=1)
    logits = apply(h, method=QwenCausalLM.logits)  # [W, L, V]
    logp = token_logprobs(logits, ids, temperature)
    ent_in = logits if entropy_grad else jax.lax.stop_gradient(logits)
    return logp, entropy_from_logits(ent_in, temperature)


def batch_logprobs(module: QwenCausalLM, params, batch, temperature: float = 1.0, *, entropy_grad: bool = True,
                   features=None, rng=None):
    """`response_logprobs` of a per-sequence `LearnerBatch`, `packed_logprobs` of a `PackedBatch`
    (features: the rows' [N, M, E] resp. the groups' [G, M, E])."""
    fn = packed_logprobs if isinstance(batch, PackedBatch) else response_logprobs
    return fn(module, params, batch, temperature, entropy_grad=entropy_grad, features=features, rng=rng)


def _applier(module: QwenCausalLM, params, rng):
    """`module.apply` on `params`, with the adapters' dropout stream when `rng` is given."""
    return functools.partial(module.apply, {"params": params}, rngs=None if rng is None else {"dropout": rng})


def sequence_count(batch) -> jax.Array:
    """Sequences with at least one response token (float32 scalar)."""
    mask = batch.response_mask.astype(bool)
    if not isinstance(batch, PackedBatch):
        return jnp.sum(jnp.any(mask, axis=-1).astype(jnp.float32))
    seq = batch.sequence
    starts = mask & (seq != jnp.pad(seq[:, :-1], ((0, 0), (1, 0)), constant_values=-1))
    return jnp.sum(starts.astype(jnp.float32))


# --------------------------------------------------------------------------- the update


def split_micro_batches(batch: LearnerBatch, num_micro: int, mesh: Mesh | None = None) -> LearnerBatch:
    """Every array gets a leading [num_micro] axis; micro-batch j holds rows j, j + num_micro, ...
    (strided, so that with the sequence axis sharded over the data axes each device keeps its own
    rows in every micro-batch). The summed micro-batch losses do not depend on the assignment.
    Row arrays only: the vision groups are not split (`micro_features` serves their features)."""
    if batch.vision is not None:
        raise ValueError("split the rows without the vision groups (batch.replace(vision=None))")

    def split(x, axis):
        shape = x.shape
        if shape[axis] % num_micro:
            raise ValueError(f"batch of {shape[axis]} sequences is not divisible into {num_micro} micro-batches")
        x = x.reshape(shape[:axis] + (shape[axis] // num_micro, num_micro) + shape[axis + 1:])
        x = jnp.moveaxis(x, axis + 1, 0)
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.shape, axis + 1))
        return x

    return map_batch(split, batch)


def micro_features(features, j, num_micro: int, rows_per_group: int):
    """The visual tokens [N / num_micro, M, E] of micro-batch j's rows (rows j, j + num_micro, ...
    of `split_micro_batches`; row i reads group i // rows_per_group) from the groups' [G, M, E].
    Where one of num_micro and rows_per_group divides the other this is a reshape that leaves
    every device's groups where they are: each micro-batch takes rows_per_group / num_micro rows
    of every group, or one row of every (num_micro / rows_per_group)-th group. Else a gather."""
    k = rows_per_group
    if k % num_micro == 0:
        return jnp.repeat(features, k // num_micro, axis=0)
    if num_micro % k == 0:
        grouped = features.reshape((-1, num_micro // k) + features.shape[1:])
        return jax.lax.dynamic_index_in_dim(grouped, j // k, axis=1, keepdims=False)
    rows = features.shape[0] * k // num_micro
    return jnp.take(features, (j + num_micro * jnp.arange(rows)) // k, axis=0)


def micro_batch_loss(params, mb: LearnerBatch, cfg: LearnerConfig, module: QwenCausalLM, num_tokens, num_seqs,
                     temperature: float = 1.0, features=None, rng=None):
    """Loss of one micro-batch normalised by the mini-batch's global counts (summable), and its
    metrics: (sums, maxes). features, rng: see `batch_logprobs`."""
    ent_grad = cfg.loss.entropy_coef != 0.0
    logp, ent = batch_logprobs(module, params, mb, temperature, entropy_grad=ent_grad, features=features, rng=rng)
    mask = mb.response_mask.astype(bool)
    sampler_logp = mb.old_logprobs
    old = jax.lax.stop_gradient(logp) if cfg.recompute_old_logprobs else sampler_logp
    loss, metrics = grpo_loss(logp, old, mb.ref_logprobs, mb.advantages, mask, ent, cfg.loss,
                              num_tokens=num_tokens, num_seqs=num_seqs)
    diff = jnp.where(mask, jnp.abs(jax.lax.stop_gradient(logp) - sampler_logp), 0.0)
    metrics["logprob_diff_mean"] = jnp.sum(diff) / jnp.maximum(num_tokens, 1.0)
    ratio = jnp.exp(jnp.clip(jax.lax.stop_gradient(logp) - old, -20.0, 20.0))
    maxes = {"logprob_diff_max": jnp.max(diff), "ratio_max": jnp.max(jnp.where(mask, ratio, 0.0)),
             "neg_ratio_min": jnp.max(jnp.where(mask, -ratio, -jnp.inf))}
    return loss, (metrics, maxes)


def loss_and_grads(params, batch: LearnerBatch, cfg: LearnerConfig, module: QwenCausalLM, mesh: Mesh | None = None,
                   temperature: float = 1.0, base=None, rng=None):
    """(grads, metrics) of the mini-batch token-mean loss, accumulated over micro-batches with
    `lax.scan`. Gradients are float32 and exactly (up to summation order) those of one pass.
    A per-sequence batch splits into micro-batches of `micro_batch_size` sequences, a packed one
    into micro-batches of one row per data shard (token-mean loss only: a packed row holds no
    per-sequence axis to average over).

    The vision tower runs once per vision group, before the scan and sharded with the groups;
    each micro-batch reads its rows' features (`micro_features`); the features' gradient,
    summed over the scan, goes back through the tower once (`jax.vjp`). With `freeze_vision` the
    features are constants: no backward through the tower at all.

    LoRA: `params` are the adapters and `base` the frozen params (`pr1_jax.lora.split`); the
    gradients are the adapters', the tower's features constants. rng: the adapters' dropout key,
    folded with the micro-batch's index."""
    mask = batch.response_mask.astype(bool)
    num_tokens = jnp.sum(mask.astype(jnp.float32))
    num_seqs = sequence_count(batch)
    packed = isinstance(batch, PackedBatch)
    n = mask.shape[0]
    if packed:
        if cfg.loss.loss_agg != "token-mean":
            raise ValueError(f"packed rows take the token-mean loss, not {cfg.loss.loss_agg!r} (packing: off)")
        # One row per data shard in each micro-batch (`pr1_jax.packing`).
        micro = 1 if mesh is None else min(batch_axis_size(mesh), n)
    else:
        micro = cfg.micro_batch_size or n
    if n % micro:
        raise ValueError(f"micro-batches of {micro} rows do not divide the batch of {n} rows")
    num_micro = n // micro
    mbs = split_micro_batches(batch.replace(vision=None), num_micro, mesh)
    if base is None:
        text, policy, frozen = {k: v for k, v in params.items() if k != "visual"}, (lambda t: t), cfg.freeze_vision
    else:
        base_text = {k: v for k, v in base.items() if k != "visual"}
        text, policy, frozen = params, functools.partial(lora.join, base_text), True
    vision_params = params if base is None else base
    on_groups = (lambda x: x) if mesh is None else (
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.shape)))
    feats = pull = None
    k = 1 if batch.vision is None or packed else rows_per_group(batch)
    if batch.vision is not None:
        if frozen:
            feats = jax.lax.stop_gradient(image_features(module, vision_params, batch.vision))
        else:
            feats, pull = jax.vjp(lambda v: image_features(module, {**params, "visual": v}, batch.vision),
                                  params["visual"])
        feats = on_groups(feats)

    def loss_fn(text, feats, mb, j):
        # Packed rows gather their images' features from all groups (`packed_logprobs`).
        rows = feats if feats is None or packed else micro_features(feats, j, num_micro, k)
        key = None if rng is None else jax.random.fold_in(rng, j)
        return micro_batch_loss(policy(text), mb, cfg, module, num_tokens, num_seqs, temperature, features=rows,
                                rng=key)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def body(carry, xs):
        g_acc, f_acc, sums, maxes = carry
        (_, (m, mx)), (g, g_feats) = grad_fn(text, feats, *xs)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        if pull is not None:  # frozen: the features' gradient is dead code, XLA drops it
            f_acc = f_acc + g_feats.astype(jnp.float32)
        sums = jax.tree.map(jnp.add, sums, m)
        maxes = jax.tree.map(jnp.maximum, maxes, mx)
        return (g_acc, f_acc, sums, maxes), None

    first = jax.tree.map(lambda x: x[0], mbs)
    m_shape, mx_shape = jax.eval_shape(lambda: loss_fn(text, feats, first, 0)[1])
    zeros = lambda tree: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), tree)  # noqa: E731
    init = (zeros(text), None if pull is None else on_groups(zeros(feats)),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape),
            jax.tree.map(lambda s: jnp.full(s.shape, -jnp.inf, s.dtype), mx_shape))
    (grads, f_acc, sums, maxes), _ = jax.lax.scan(body, init, (mbs, jnp.arange(num_micro)))
    if "visual" in params:
        visual = zeros(params["visual"]) if pull is None else pull(f_acc.astype(feats.dtype))[0]
        grads = {**grads, "visual": jax.tree.map(lambda g: g.astype(jnp.float32), visual)}
    metrics = dict(sums)
    metrics["logprob_diff_max"] = maxes["logprob_diff_max"]
    metrics["ratio_max"] = maxes["ratio_max"]
    metrics["ratio_min"] = -maxes["neg_ratio_min"]
    metrics["num_tokens"] = num_tokens
    metrics["num_seqs"] = num_seqs
    return grads, metrics


def apply_update(state: TrainState, grads, metrics: dict, cfg: LearnerConfig, tx: optax.GradientTransformation,
                 lr_fn: Callable):
    """The optimizer half of `train_step`: (new_state, metrics + grad_norm, skipped, lr). A
    non-finite loss or gradient norm leaves params and opt_state as they were and increments
    `state.skipped` (selected with `jnp.where`, inside jit).

    `tx`: `make_optimizer(..., learning_rate=1.0)`; the update is scaled by `lr_fn` of the
    attempts so far (`step + skipped`): the reference steps its LR scheduler after every update
    call, a skipped one too, while Adam's own count (its bias correction) stays at the applied
    updates, as torch's optimizer step does."""
    metrics = dict(metrics)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    lr = jnp.asarray(lr_fn(state.step + state.skipped), jnp.float32)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: lr.astype(u.dtype) * u, updates)
    params = optax.apply_updates(state.params, updates)
    if cfg.freeze_vision and "visual" in params:
        params = {**params, "visual": state.params["visual"]}  # bit-identical, whatever 0-updates do
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    new_state = TrainState(
        step=state.step + ok.astype(jnp.int32),
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = (~ok).astype(jnp.float32)
    metrics["lr"] = lr
    return new_state, metrics


DROPOUT_SEED = 0x10A  # the adapters' dropout stream (any fixed key: the masks only need to differ per update)


def train_step(state: TrainState, batch: LearnerBatch, cfg: LearnerConfig, module: QwenCausalLM,
               tx: optax.GradientTransformation, lr_fn: Callable, mesh: Mesh | None = None,
               temperature: float = 1.0, base=None):
    """One optimizer update on a mini-batch (pure; jit it with everything but state/batch/base
    bound): `loss_and_grads` then `apply_update`, traced inside the mesh's activation rules.
    `temperature`: the sampler's (`score_temperature`). LoRA: `state.params` are the adapters,
    `base` the frozen params; the adapters' dropout key is fixed by the update's attempt count
    (`step + skipped`), so a resumed run draws the masks it would have drawn.

    Returns (new_state, metrics): loss, pg_loss, clip_frac(_low/_high/_dual) and the reference's
    pg_clipfrac_higher/lower (`grpo.policy_loss`), approx_kl, ratio_mean,
    ratio_max, ratio_min, entropy, kl (with ref_logprobs), logprob_diff_mean/max (learner vs
    sampler log-probs of the old policy), grad_norm (before clipping), lr (of this update),
    num_tokens, num_seqs, skipped (1.0 when this step was skipped).
    """
    if batch.advantages is None:
        raise ValueError("the learner batch needs advantages [N] (train_batch_from_samples(advantages=...))")
    rng = None
    if base is not None and cfg.lora.dropout:
        rng = jax.random.fold_in(jax.random.key(DROPOUT_SEED), state.step + state.skipped)
    with activation_sharding(mesh):
        grads, metrics = loss_and_grads(state.params, batch, cfg, module, mesh, temperature, base, rng)
        return apply_update(state, grads, metrics, cfg, tx, lr_fn)


# --------------------------------------------------------------------------- mesh shell


def _dict_path(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _opt_state_shardings(opt_abstract, abstract_params_tree, shardings, replicated):
    """Shardings for an optimizer state: a leaf whose dict-key path ends with a param's path and
    has its shape (Adam's moments, under any optax wrapper) is placed like that param; the rest
    (counts, scalars) is replicated."""
    by_path = {_dict_path(kp): (x.shape, s) for (kp, x), s in
               zip(jax.tree_util.tree_flatten_with_path(abstract_params_tree)[0], jax.tree.leaves(shardings))}

    def one(kp, leaf):
        path = _dict_path(kp)
        for i in range(len(path)):
            hit = by_path.get(path[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_abstract)


class Learner:
    """The jitted, mesh-placed GRPO update.

        learner = Learner(model.config, LearnerConfig(...), mesh, total_steps, temperature)
        state = learner.init_state(params)
        state, metrics = learner.step(state, sharding.global_batch(mesh, local_batch))
        sampler(learner.policy_params(state), ...)

    temperature: the sampler's (`SamplingConfig.score_temperature`): the log-probs of the update,
    of a recomputed old policy and of the reference policy all use it. attention: the run's
    `model.attention` (`models.attention`).

    LoRA (`cfg.lora.rank > 0`): `init_state` keeps the params it is given as the frozen base, in
    the compute dtype, on the learner (`base`), and the state's params are fresh adapters
    (`pr1_jax.lora.init_adapters` with `seed`); `policy_params` merges them into the base once per
    call, which the sampler and the reference log-probs apply with the plain module.
    """

    def __init__(self, model_config: ModelConfig, cfg: LearnerConfig, mesh: Mesh, total_steps: int,
                 temperature: float = 1.0, attention: str = "auto", seed: int = 0):
        self.cfg, self.mesh, self.temperature, self.seed = cfg, mesh, temperature, seed
        self.module = make_module(model_config, cfg, attention)
        self.policy_module = make_module(model_config, cfg, attention, adapters=False)
        self.lora = cfg.lora if cfg.lora.enabled else None
        self.tx = make_optimizer(cfg, total_steps, learning_rate=1.0)
        self.lr_fn = lr_schedule(cfg, total_steps)
        boxed = abstract_params(self.module)
        self.base = None
        if self.lora is None:
            self.param_shardings = self.policy_shardings = param_shardings(boxed, mesh)
        else:
            boxed_base, boxed = lora.split(boxed)
            self.policy_shardings = param_shardings(boxed_base, mesh)
            self.param_shardings = param_shardings(boxed, mesh)
        abstract = nn.unbox(boxed)
        replicated = NamedSharding(mesh, P())
        opt_shardings = _opt_state_shardings(jax.eval_shape(self.tx.init, abstract), abstract,
                                             self.param_shardings, replicated)
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings,
                                          skipped=replicated)
        self._replicated = replicated
        self._init = jax.jit(functools.partial(init_state, tx=self.tx), out_shardings=self.state_shardings)
        if self.lora is not None:
            self._adapters = jax.jit(functools.partial(lora.init_adapters, abstract=abstract),
                                     out_shardings=self.param_shardings)
            self._base = jax.jit(lambda p: jax.tree.map(lambda a: a.astype(as_dtype(cfg.dtype)), p),
                                 out_shardings=self.policy_shardings)
            self._merge = jax.jit(functools.partial(lora.merge, cfg=self.lora), out_shardings=self.policy_shardings)
        self._steps: dict = {}
        self._logprobs: dict = {}

    def init_state(self, params) -> TrainState:
        """The state of a run starting from `params` (the policy's, without adapters). LoRA: they
        become the frozen `base`, and the state holds fresh adapters."""
        if self.lora is None:
            return self._init(jax.device_put(params, self.param_shardings))
        self.base = self._base(jax.device_put(params, self.policy_shardings))
        return self._init(self._adapters(jax.random.key(self.seed)))

    def policy_params(self, state: TrainState):
        """The policy's params as the plain module (`policy_module`) applies them: the state's, or
        with LoRA the base with the adapters merged (once per call; `pr1_jax.lora` says why)."""
        return state.params if self.lora is None else self._merge(self.base, state.params)

    def _key(self, batch):
        return jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch))

    def step(self, state: TrainState, batch: LearnerBatch):
        """(new_state, metrics); `state` is donated."""
        base = () if self.lora is None else (self.base,)
        return self.jitted_step(batch)(state, batch, *base)

    def jitted_step(self, batch: LearnerBatch):
        """The jitted update for the shapes of `batch` (arrays or `jax.ShapeDtypeStruct`s: benches
        lower and compile it on abstract inputs), one per shape: (state, batch) -> (state,
        metrics), and with LoRA (state, batch, base)."""
        key = self._key(batch)
        if key not in self._steps:
            fn = functools.partial(train_step, cfg=self.cfg, module=self.module, tx=self.tx, lr_fn=self.lr_fn,
                                   mesh=self.mesh, temperature=self.temperature)
            shardings = (self.state_shardings, batch_shardings(self.mesh, batch))
            if self.lora is not None:
                fn = functools.partial(lambda step, state, batch, base: step(state, batch, base=base), fn)
                shardings += (self.policy_shardings,)
            self._steps[key] = jax.jit(fn, in_shardings=shardings,
                                       out_shardings=(self.state_shardings, self._replicated), donate_argnums=0)
        return self._steps[key]

    def logprobs(self, params, batch: LearnerBatch):
        """(logp, entropy) of the batch's responses under `params` (the plain module's, e.g. to
        recompute the old policy once per rollout from `policy_params`, or a reference policy),
        rows sharded over data: [N, R] of a per-sequence batch, [W, L] of a packed one (the layout
        its own fields take)."""
        batch = batch.replace(old_logprobs=None, advantages=None, ref_logprobs=None)  # not read
        key = self._key(batch)
        if key not in self._logprobs:
            out = batch_sharding(self.mesh, batch.response_mask.shape)

            def fn(params, batch):
                with activation_sharding(self.mesh):
                    return batch_logprobs(self.policy_module, params, batch, self.temperature, entropy_grad=False)

            self._logprobs[key] = jax.jit(fn, in_shardings=(self.policy_shardings, batch_shardings(self.mesh, batch)),
                                          out_shardings=(out, out))
        return self._logprobs[key](params, batch)
