"""The GRPO learner: rollout -> learner batch, log-probs of the responses, one optimizer update
per mini-batch on the device mesh.

Pieces (pure functions first, a thin shell last):

- `train_batch_from_samples` (host, numpy): the B prompts and the sampler's B*n responses -> the
  learner batch of N = B*n sequences (table below).
- `response_logprobs`: one forward over prompt + response, the LM head applied only to the R
  positions that predict response tokens (never `[N, T+R, V]` logits), then
  `grpo.token_logprobs` with the sampler's temperature.
- `make_optimizer` / `lr_schedule`: AdamW (torch semantics, decay on every trainable param) after a
  global-norm clip, linear warmup then constant or cosine; a frozen vision tower is a
  `set_to_zero` partition of `optax.multi_transform`, so it has no moments and never moves.
- `train_step`: split the mini-batch into micro-batches, accumulate gradients with the *global*
  token count (so the sum equals the full-batch token-mean loss), clip, update; a non-finite loss
  or gradient keeps params and optimizer state and counts a skipped step, all inside jit.
- `Learner`: builds the jitted step against a mesh with explicit in/out shardings from
  `pr1_jax.sharding` and donates the state; `global_batch` assembles per-process rows into
  global arrays.

The learner batch (N = B*n sequences, T = prompt length, R = max_new_tokens, L = T + R,
P = `num_patches` patch rows *per sequence*; row i is sample i % n of prompt i // n, as the
sampler lays them out):

=================  ======================  =======  ===============================================
key                shape                   dtype    meaning
=================  ======================  =======  ===============================================
input_ids          [N, L]                  int32    left-padded prompt, then the response (pad id
                                                    after the row's EOS)
attention_mask     [N, L]                  int32    prompt mask, then `response_mask`
positions          [3, N, L] (VLM) or      int32    prompt positions (M-RoPE rows) repeated n
                   [N, L] (text model)              times; response token k at n_valid + delta + k
                                                    on every row; 0 at padding (left and after EOS)
response_mask      [N, R]                  int32    1 on generated tokens (EOS included)
old_logprobs       [N, R]                  float32  behaviour log-probs (the sampler's)
advantages         [N]                     float32  per-sequence advantage (optional here; required
                                                    by `train_step`)
ref_logprobs       [N, R]                  float32  optional, reference policy (KL term)
vision             VisionInputs | None              per-sequence packed patches: every field has a
                                                    leading N axis (pixel_values [N, P, patch_dim],
                                                    perm/seg_full/seg_window [N, P], rot_pos
                                                    [N, P, 2], unperm [N, P // merge**2]); row i
                                                    holds the images of prompt i // n only
=================  ======================  =======  ===============================================

Why per-sequence vision rather than one packed block for the batch: every array then has the
sequence axis first, so micro-batching is a reshape and data sharding splits images with their
sequences; and the tower's attention is `[P, P]` per sequence instead of over all images of the
batch. The price: a prompt's images go through the tower once per sample (n times).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.causal_lm import QwenCausalLM
from models.config import ModelConfig
from models.positions import row_vision_arrays
from models.pretrained import abstract_params, as_dtype
from models.vision import VisionInputs
from pr1_jax.grpo import GRPOLossConfig, entropy_from_logits, grpo_loss, token_logprobs
from pr1_jax.multihost import allgather_json
from pr1_jax.sharding import param_shardings, sharding_for

Batch = dict[str, Any]

# The one batch array whose sequence axis is not axis 0 (M-RoPE positions [3, N, L]).
_POSITIONS = "positions"


# --------------------------------------------------------------------------- config / state


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Paper settings by default: AdamW lr 1e-6, betas (0.9, 0.999), weight decay 1e-3, warmup
    ratio 0.05, grad-norm clip 1.0, PPO clip 0.2, token-mean loss, no KL."""

    lr: float = 1e-6
    weight_decay: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.05
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    max_grad_norm: float = 1.0
    micro_batch_size: int | None = None  # sequences per micro-batch; None = the whole mini-batch
    temperature: float = 1.0  # the sampler's temperature (use 1.0 for greedy samples)
    loss: GRPOLossConfig = GRPOLossConfig()
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


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer updates applied (= optax's count)
    params: Any
    opt_state: Any
    skipped: jax.Array  # [] int32, steps skipped for a non-finite loss or gradient


def make_module(model_config: ModelConfig, cfg: LearnerConfig) -> QwenCausalLM:
    return QwenCausalLM(model_config, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
                        remat=cfg.remat)


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


def make_optimizer(cfg: LearnerConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) -> AdamW(schedule). With `freeze_vision`, the "visual"
    subtree is a `set_to_zero` partition: no moments, no update, no weight decay, and its
    (zero) gradient does not enter the clipping norm."""
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay),
    )
    if cfg.freeze_vision:
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, _labels)
    return tx


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      skipped=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------- host: learner batch


def train_batch_from_samples(config: ModelConfig, prompt_inputs: dict, sample_out, n: int,
                             pixel_values=None, image_grid_thw=None, num_patches: int | None = None,
                             advantages=None, ref_logprobs=None, example_valid=None) -> Batch:
    """Host side (numpy). The learner batch of the module docstring for N = B*n sequences.

    prompt_inputs: `Model.prepare_inputs` dict of the B prompts (input_ids, attention_mask,
      positions, rope_deltas; a per-row `vision` is reused, a packed one is not used).
    sample_out: the sampler's `SampleOutput` for these prompts with `n` samples each.
    pixel_values [patches, patch_dim], image_grid_thw [images, 3]: the prompts' images packed in
      order of appearance (row-major), as given to `prepare_inputs`; zero-grid rows (padding
      slots of the data pipeline) and rows past the real patches are ignored.
    num_patches: patch rows per *sequence* (a static size; a multiple of merge**2 that is at least
      the largest prompt's patch count; e.g. `DataConfig.patch_limit_per_record`). Default: the
      largest prompt's count.
    advantages: [N] optional; ref_logprobs: [N, R] optional.
    Images come from a per-row `prompt_inputs["vision"]` if there is one, else from pixel_values.
    example_valid: [B] bool optional; filler prompts get an all-zero response mask.
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
    batch = dict(
        input_ids=np.concatenate([rep(ids), tokens], axis=1),
        attention_mask=np.concatenate([rep(pmask), rmask], axis=1),
        positions=positions.astype(np.int32),
        response_mask=rmask,
        old_logprobs=np.where(rmask.astype(bool), old, 0.0).astype(np.float32),
        vision=None,
    )
    if advantages is not None:
        batch["advantages"] = np.asarray(advantages, np.float32).reshape(num)
    if ref_logprobs is not None:
        batch["ref_logprobs"] = np.asarray(ref_logprobs, np.float32).reshape(num, r)

    vision = prompt_inputs.get("vision")
    if vision is not None and np.ndim(vision.pixel_values) == 3:
        batch["vision"] = jax.tree.map(lambda x: rep(np.asarray(x)), vision)
        return batch
    if pixel_values is None:
        return batch
    if config.vision is None:
        raise ValueError(f"a {config.model_type} model takes no images")
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    fields = row_vision_arrays(ids, pmask, pixel_values, grids[grids.prod(-1) > 0], num_patches, config.vision,
                               image_token_id=config.image_token_id)
    batch["vision"] = VisionInputs(**{k: rep(v) for k, v in fields.items()})
    return batch


# --------------------------------------------------------------------------- forward


def response_logprobs(module: QwenCausalLM, params, batch: Batch, temperature: float = 1.0, *,
                      entropy_grad: bool = True):
    """(logp [N, R], entropy [N, R]) float32 of the response tokens under
    softmax(logits / temperature); only the hidden states at T-1 .. T+R-2 go through the LM head.
    Values at masked (non-response) positions are meaningless; mask them.
    entropy_grad=False: the entropy is computed from stop-gradient logits (a metric only)."""
    apply = functools.partial(module.apply, {"params": params})
    r = batch["response_mask"].shape[1]
    ids = batch["input_ids"]
    t = ids.shape[1] - r
    # Only the prompt's image tokens take visual features: the sampler fed generated ones as text.
    image_mask = (ids == module.cfg.image_token_id) & (jnp.arange(ids.shape[1]) < t)[None]
    h, _ = apply(ids, batch["positions"], batch["attention_mask"], batch.get("vision"),
                 image_mask=image_mask, method=QwenCausalLM.hidden_states)
    logits = apply(h[:, t - 1:t + r - 1], method=QwenCausalLM.logits)  # [N, R, V]
    logp = token_logprobs(logits, ids[:, t:], temperature)
    ent_in = logits if entropy_grad else jax.lax.stop_gradient(logits)
    return logp, entropy_from_logits(ent_in, temperature)


# --------------------------------------------------------------------------- the update


def _batch_axis(key: str, x) -> int:
    return 1 if key == _POSITIONS and x.ndim == 3 else 0


def map_batch(fn, batch: Batch) -> Batch:
    """fn(array, batch_axis) over every array of the batch (VisionInputs fields included)."""
    out = {}
    for k, v in batch.items():
        if v is None:
            out[k] = None
        elif isinstance(v, VisionInputs):
            out[k] = jax.tree.map(lambda x: fn(x, 0), v)
        else:
            out[k] = fn(v, _batch_axis(k, v))
    return out


def split_micro_batches(batch: Batch, num_micro: int, mesh: Mesh | None = None) -> Batch:
    """Every array gets a leading [num_micro] axis; micro-batch j holds rows j, j + num_micro, ...
    (strided, so that with the sequence axis sharded over the data axes each device keeps its own
    rows in every micro-batch). The summed micro-batch losses do not depend on the assignment."""
    def split(x, axis):
        shape = x.shape
        if shape[axis] % num_micro:
            raise ValueError(f"batch of {shape[axis]} sequences is not divisible into {num_micro} micro-batches")
        x = x.reshape(shape[:axis] + (shape[axis] // num_micro, num_micro) + shape[axis + 1:])
        x = jnp.moveaxis(x, axis + 1, 0)
        if mesh is not None:
            logical = [None] * x.ndim
            logical[axis + 1] = "batch"
            x = jax.lax.with_sharding_constraint(x, sharding_for(logical, x.shape, mesh))
        return x

    return map_batch(split, batch)


def _masked_params(params, cfg: LearnerConfig):
    if cfg.freeze_vision and "visual" in params:
        return {**params, "visual": jax.lax.stop_gradient(params["visual"])}
    return params


def micro_batch_loss(params, mb: Batch, cfg: LearnerConfig, module: QwenCausalLM, num_tokens, num_seqs):
    """Loss of one micro-batch normalised by the mini-batch's global counts (summable), and its
    metrics: (sums, maxes)."""
    ent_grad = cfg.loss.entropy_coef != 0.0
    logp, ent = response_logprobs(module, _masked_params(params, cfg), mb, cfg.temperature, entropy_grad=ent_grad)
    mask = mb["response_mask"].astype(bool)
    sampler_logp = mb["old_logprobs"]
    old = jax.lax.stop_gradient(logp) if cfg.recompute_old_logprobs else sampler_logp
    loss, metrics = grpo_loss(logp, old, mb.get("ref_logprobs"), mb["advantages"], mask, ent, cfg.loss,
                              num_tokens=num_tokens, num_seqs=num_seqs)
    diff = jnp.where(mask, jnp.abs(jax.lax.stop_gradient(logp) - sampler_logp), 0.0)
    metrics["logprob_diff_mean"] = jnp.sum(diff) / jnp.maximum(num_tokens, 1.0)
    ratio = jnp.exp(jnp.clip(jax.lax.stop_gradient(logp) - old, -20.0, 20.0))
    maxes = {"logprob_diff_max": jnp.max(diff), "ratio_max": jnp.max(jnp.where(mask, ratio, 0.0)),
             "neg_ratio_min": jnp.max(jnp.where(mask, -ratio, -jnp.inf))}
    return loss, (metrics, maxes)


def loss_and_grads(params, batch: Batch, cfg: LearnerConfig, module: QwenCausalLM, mesh: Mesh | None = None):
    """(grads, metrics) of the mini-batch token-mean loss, accumulated over micro-batches with
    `lax.scan`. Gradients are float32 and exactly (up to summation order) those of one pass."""
    mask = batch["response_mask"].astype(bool)
    num_tokens = jnp.sum(mask.astype(jnp.float32))
    num_seqs = jnp.sum(jnp.any(mask, axis=-1).astype(jnp.float32))
    n = mask.shape[0]
    micro = cfg.micro_batch_size or n
    if n % micro:
        raise ValueError(f"micro_batch_size={micro} does not divide the batch of {n} sequences")
    mbs = split_micro_batches(batch, n // micro, mesh)
    grad_fn = jax.value_and_grad(micro_batch_loss, has_aux=True)

    def body(carry, mb):
        g_acc, sums, maxes = carry
        (_, (m, mx)), g = grad_fn(params, mb, cfg, module, num_tokens, num_seqs)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        sums = jax.tree.map(jnp.add, sums, m)
        maxes = jax.tree.map(jnp.maximum, maxes, mx)
        return (g_acc, sums, maxes), None

    first = jax.tree.map(lambda x: x[0], mbs)
    m_shape, mx_shape = jax.eval_shape(lambda: micro_batch_loss(params, first, cfg, module, num_tokens, num_seqs)[1])
    init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape),
            jax.tree.map(lambda s: jnp.full(s.shape, -jnp.inf, s.dtype), mx_shape))
    (grads, sums, maxes), _ = jax.lax.scan(body, init, mbs)
    metrics = dict(sums)
    metrics["logprob_diff_max"] = maxes["logprob_diff_max"]
    metrics["ratio_max"] = maxes["ratio_max"]
    metrics["ratio_min"] = -maxes["neg_ratio_min"]
    metrics["num_tokens"] = num_tokens
    metrics["num_seqs"] = num_seqs
    return grads, metrics


def apply_update(state: TrainState, grads, metrics: dict, cfg: LearnerConfig, tx: optax.GradientTransformation,
                 lr_fn: Callable | None = None):
    """The optimizer half of `train_step`: (new_state, metrics + grad_norm, skipped, lr). A
    non-finite loss or gradient norm leaves params and opt_state as they were and increments
    `state.skipped` (selected with `jnp.where`, inside jit)."""
    metrics = dict(metrics)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
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
    if lr_fn is not None:
        metrics["lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
    return new_state, metrics


def train_step(state: TrainState, batch: Batch, cfg: LearnerConfig, module: QwenCausalLM,
               tx: optax.GradientTransformation, lr_fn: Callable | None = None, mesh: Mesh | None = None):
    """One optimizer update on a mini-batch (pure; jit it with everything but state/batch bound):
    `loss_and_grads` then `apply_update`.

    Returns (new_state, metrics): loss, pg_loss, clip_frac(_low/_high), approx_kl, ratio_mean,
    ratio_max, ratio_min, entropy, kl (with ref_logprobs), logprob_diff_mean/max (learner vs
    sampler log-probs of the old policy), grad_norm (before clipping), lr (of this update),
    num_tokens, num_seqs, skipped (1.0 when this step was skipped).
    """
    if "advantages" not in batch:
        raise KeyError("the learner batch needs 'advantages' [N] (train_batch_from_samples(advantages=...))")
    grads, metrics = loss_and_grads(state.params, batch, cfg, module, mesh)
    return apply_update(state, grads, metrics, cfg, tx, lr_fn)


# --------------------------------------------------------------------------- mesh shell


def batch_shardings(mesh: Mesh, batch: Batch) -> Batch:
    """Sequence axis over the data axes (`batch` rule), everything else replicated; a sequence
    count the data axes do not divide is replicated."""
    def one(x, axis):
        logical = [None] * x.ndim
        logical[axis] = "batch"
        return sharding_for(logical, x.shape, mesh)

    return map_batch(one, batch)


_SEQUENCE_KEYS = ("input_ids", "attention_mask", "positions")


def pad_sequences_left(batch: Batch, length: int) -> Batch:
    """The batch with its token axis (input_ids, attention_mask, positions) left-padded to
    `length` with masked tokens: the same sequences (they are left-padded already), longer."""
    out = dict(batch)
    for k in _SEQUENCE_KEYS:
        x = np.asarray(batch[k])
        out[k] = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(length - x.shape[-1], 0)])
    return out


def global_batch(mesh: Mesh, local_batch: Batch) -> Batch:
    """This process's rows -> global arrays sharded over the data axes. With one process the
    local batch is the global batch; with several, each passes its own consecutive slice of the
    sequences (e.g. from its data shard) and the global sequence count is the sum. Processes
    whose batches landed in different length buckets are left-padded to the longest."""
    if jax.process_count() > 1 and "input_ids" in local_batch:
        local_batch = pad_sequences_left(local_batch, max(allgather_json(int(local_batch["input_ids"].shape[1]))))

    def one(x, axis):
        x = np.asarray(x)
        logical = [None] * x.ndim
        logical[axis] = "batch"
        n_proc_rows = x.shape[axis] * jax.process_count()
        shape = x.shape[:axis] + (n_proc_rows,) + x.shape[axis + 1:]
        sharding = sharding_for(logical, shape, mesh)
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return map_batch(one, local_batch)


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

        learner = Learner(model.config, LearnerConfig(...), mesh, total_steps)
        state = learner.init_state(params)
        state, metrics = learner.step(state, learner.global_batch(local_batch))
    """

    def __init__(self, model_config: ModelConfig, cfg: LearnerConfig, mesh: Mesh, total_steps: int):
        self.cfg, self.mesh = cfg, mesh
        self.module = make_module(model_config, cfg)
        self.tx = make_optimizer(cfg, total_steps)
        self.lr_fn = lr_schedule(cfg, total_steps)
        boxed = abstract_params(self.module)
        self.param_shardings = param_shardings(boxed, mesh)
        abstract = nn.unbox(boxed)
        replicated = NamedSharding(mesh, P())
        opt_shardings = _opt_state_shardings(jax.eval_shape(self.tx.init, abstract), abstract,
                                             self.param_shardings, replicated)
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings,
                                          skipped=replicated)
        self._replicated = replicated
        self._init = jax.jit(functools.partial(init_state, tx=self.tx), out_shardings=self.state_shardings)
        self._steps: dict = {}
        self._logprobs: dict = {}

    def init_state(self, params) -> TrainState:
        params = jax.device_put(params, self.param_shardings)
        return self._init(params)

    def global_batch(self, local_batch: Batch) -> Batch:
        return global_batch(self.mesh, local_batch)

    def _key(self, batch):
        return jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch))

    def step(self, state: TrainState, batch: Batch):
        """(new_state, metrics); `state` is donated."""
        key = self._key(batch)
        if key not in self._steps:
            fn = functools.partial(train_step, cfg=self.cfg, module=self.module, tx=self.tx, lr_fn=self.lr_fn,
                                   mesh=self.mesh)
            self._steps[key] = jax.jit(fn, in_shardings=(self.state_shardings, batch_shardings(self.mesh, batch)),
                                       out_shardings=(self.state_shardings, self._replicated), donate_argnums=0)
        return self._steps[key](state, batch)

    def logprobs(self, params, batch: Batch):
        """(logp, entropy) [N, R] of the batch's responses under `params` (e.g. to recompute the
        old policy once per rollout, or a reference policy), sequence axis sharded over data."""
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "positions",
                                                          "response_mask", "vision")}
        key = self._key(batch)
        if key not in self._logprobs:
            out = sharding_for(("batch", None), batch["response_mask"].shape, self.mesh)
            fn = functools.partial(response_logprobs, self.module, temperature=self.cfg.temperature,
                                   entropy_grad=False)
            self._logprobs[key] = jax.jit(fn, in_shardings=(self.param_shardings, batch_shardings(self.mesh, batch)),
                                          out_shardings=(out, out))
        return self._logprobs[key](params, batch)
