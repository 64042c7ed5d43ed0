"""GRPO math in pure JAX: advantages (GRPO, Dr.GRPO), log-probs, the policy surrogates (PPO clip,
GSPO, CISPO), loss aggregation, KL / entropy terms. docs/ALGORITHMS.md gives each formula's source.

Everything here is model-agnostic: the learner computes ``logits`` with whatever model it
has, then calls :func:`token_logprobs` / :func:`entropy_from_logits` and :func:`grpo_loss`.
All functions are jit-friendly; arguments documented as *static* (``group_size``,
``loss_agg``, ``policy``, ``norm_length``, ``kind``, the :class:`GRPOLossConfig`) must be Python
values, not tracers.

Conventions
-----------
* Shapes use ``B`` (sequences in the (micro-)batch), ``G`` (samples per prompt),
  ``T`` (response length, padded), ``V`` (vocabulary).
* ``mask`` is ``[B, T]`` bool (or 0/1 numbers); ``True`` marks a real response token
  that takes part in the loss. Padding / prompt positions may hold arbitrary values
  (``-inf``, ``nan``, huge numbers) in ``logp`` / ``old_logp`` / ``ref_logp`` /
  ``entropy``: they are replaced with zeros *before* any arithmetic via ``jnp.where``,
  so they affect neither the loss nor its gradient (the gradient there is exactly 0).
* All math is done in float32 regardless of input dtype.
* Rollout layout for rewards: groups are contiguous, i.e. flat index ``b * G + g`` is
  sample ``g`` of prompt ``b`` (the sampler repeats each prompt ``G`` times in a row).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGGS = typing.get_args(LossAgg)
PolicyLoss = Literal["ppo", "gspo", "cispo"]
POLICY_LOSSES = typing.get_args(PolicyLoss)
KLKind = Literal["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"]

# verl clamps log(ratio) before exp() (core_algos.compute_policy_loss) and the k3
# estimator (core_algos.kl_penalty "low_var_kl"); we use the same constants.
LOG_RATIO_CLAMP = 20.0
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0
# verl's GSPO clamps the per-token log sequence ratio from above only (compute_policy_loss_gspo).
GSPO_LOG_RATIO_MAX = 10.0

__all__ = [
    "GRPOLossConfig",
    "agg_loss",
    "entropy_from_logits",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "policy_loss",
    "token_logprobs",
]


# --------------------------------------------------------------------------- helpers


def _f32(x) -> Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _bool_mask(mask) -> Array:
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
    """Sum of ``x`` over positions where ``mask`` is true (NaN/inf elsewhere are ignored).

    x: [...] float, mask: broadcastable to x. Returns float32, reduced over ``axis``.
    """
    mask = _bool_mask(mask)
    return jnp.sum(jnp.where(mask, _f32(x), 0.0), axis=axis)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """Mean of ``x`` over positions where ``mask`` is true.

    x: [...] float, mask: broadcastable to x (bool or 0/1). ``axis=None`` reduces over all
    elements. Values at masked-out positions are never read arithmetically (``jnp.where``),
    so ``-inf``/``nan`` there are harmless. A slice with no valid element yields 0
    (the denominator is clamped to >= 1), not NaN.
    """
    mask = _bool_mask(mask)
    x = _f32(x)
    num = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
    den = jnp.sum(jnp.broadcast_to(mask, x.shape).astype(jnp.float32), axis=axis)
    return num / jnp.maximum(den, 1.0)


def agg_loss(
    loss_mat: Array,
    mask: Array,
    loss_agg: LossAgg = "token-mean",
    *,
    num_tokens: Array | float | None = None,
    num_seqs: Array | float | None = None,
    norm_length: int | None = None,
) -> Array:
    """Aggregate a per-token loss ``loss_mat [B, T]`` into a scalar (``l`` the loss, ``m`` the mask,
    ``N = num_tokens``, ``S = num_seqs``, ``|o_i|`` the valid tokens of sequence ``i``):

    * ``"token-mean"``: ``sum_i sum_t m l / N``. Every response token of the step weighs the
      same (DAPO; verl's default).
    * ``"seq-mean-token-mean"``: ``sum_i (sum_t m l / |o_i|) / S``. Every sequence weighs the
      same (the GRPO paper's 1/G sum_i 1/|o_i| sum_t; GSPO).
    * ``"seq-mean-token-sum"``: ``sum_i sum_t m l / S``. A sequence weighs its length.
    * ``"seq-mean-token-sum-norm"``: ``sum_i sum_t m l / (S * norm_length)`` (Dr.GRPO: the
      per-sequence 1/|o_i| replaced by one constant, the response cap, so that neither length
      nor batch composition rescales a token's gradient). verl's mode of this name divides by
      ``norm_length`` only (no ``1/S``): a constant factor of the batch size away.

    ``num_tokens`` defaults to this batch's ``mask.sum()``, ``num_seqs`` to its number of
    sequences with at least one valid token (both clamped >= 1); ``norm_length`` is required by
    ``seq-mean-token-sum-norm`` only.

    Gradient accumulation: when a step is split into micro-batches (or rows over devices), pass
    the *whole step's* ``num_tokens`` / ``num_seqs``; every mode is then a sum of per-row terms
    over fixed normalisers, so the micro-batch losses (and their gradients) **sum** exactly to
    the one-pass loss.
    """
    mask = _bool_mask(mask)
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGGS}")
    if loss_agg == "token-mean":
        if num_tokens is None:
            num_tokens = jnp.sum(mask.astype(jnp.float32))
        return masked_sum(loss_mat, mask) / jnp.maximum(_f32(num_tokens), 1.0)
    if num_seqs is None:
        num_seqs = jnp.sum(jnp.any(mask, axis=-1).astype(jnp.float32))
    seqs = jnp.maximum(_f32(num_seqs), 1.0)
    if loss_agg == "seq-mean-token-mean":
        return jnp.sum(masked_mean(loss_mat, mask, axis=-1)) / seqs
    if loss_agg == "seq-mean-token-sum":
        return masked_sum(loss_mat, mask) / seqs
    if norm_length is None or norm_length < 1:
        raise ValueError(f"seq-mean-token-sum-norm needs norm_length >= 1 (the response cap), got {norm_length}")
    return masked_sum(loss_mat, mask) / (seqs * float(norm_length))


# --------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Array,
    group_size: int | None = None,
    *,
    mean_only: bool = False,
    eps: float = 1e-6,
) -> Array:
    """GRPO group-normalised advantages, one scalar per sampled response.

    rewards: ``[B*G]`` (groups contiguous, see module doc) or ``[B, G]``.
    group_size: ``G`` (static). Required for 1-D input; for 2-D input it defaults to
      ``rewards.shape[1]`` and must match it if given.
    Returns float32 advantages with the same shape as ``rewards``:

    * default: ``(r - mean_g) / (std_g + eps)`` with the **unbiased** std (ddof=1, like
      ``torch.std``), as in verl's ``compute_grpo_outcome_advantage``.
    * ``mean_only=True`` (Dr.GRPO, verl ``norm_adv_by_std_in_grpo=False``): ``r - mean_g``.

    Degenerate groups:
    * A group whose rewards are all identical gets exactly 0 advantage (checked with
      ``max == min``, so float rounding in the mean cannot leak tiny ``1e-9 / eps`` values).
    * ``group_size == 1``: the unbiased std of one sample is undefined (0/0). We define the
      advantage as 0 (a lone sample has no group baseline to compare against, and this is
      also what ``r - mean`` gives); never NaN.
    """
    r = _f32(rewards)
    if r.ndim == 2:
        if group_size is not None and group_size != r.shape[1]:
            raise ValueError(f"group_size={group_size} does not match rewards.shape={r.shape}")
        g = r.shape[1]
        rg = r
    elif r.ndim == 1:
        if group_size is None:
            raise ValueError("group_size is required for 1-D rewards")
        g = int(group_size)
        if g < 1 or r.shape[0] % g != 0:
            raise ValueError(f"rewards of length {r.shape[0]} cannot be split into groups of {g}")
        rg = r.reshape(-1, g)
    else:
        raise ValueError(f"rewards must be [B*G] or [B, G], got shape {r.shape}")

    if g == 1:
        return jnp.zeros_like(r)

    mean = jnp.mean(rg, axis=1, keepdims=True)
    centred = rg - mean
    constant = jnp.max(rg, axis=1, keepdims=True) == jnp.min(rg, axis=1, keepdims=True)
    if mean_only:
        adv = centred
    else:
        std = jnp.sqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / (g - 1))
        adv = centred / (std + eps)
    adv = jnp.where(constant, 0.0, adv)
    return adv.reshape(r.shape)


# --------------------------------------------------------------------------- logits -> per-token


def _scaled_logits(logits: Array, temperature) -> Array:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _f32(logits) / _f32(temperature)


def token_logprobs(logits: Array, tokens: Array, temperature: float | Array = 1.0) -> Array:
    """Log-probability of ``tokens`` under ``softmax(logits / temperature)``.

    logits: ``[B, T, V]`` (any float dtype; upcast to float32 first), ``logits[:, t]`` must be
      the logits that *predict* ``tokens[:, t]`` (i.e. the caller has already shifted the
      model output by one position).
    tokens: ``[B, T]`` int. Out-of-range ids (e.g. ``-100`` padding) are clipped into
      ``[0, V)``; such positions must be masked out by the caller.
    temperature: python float or scalar array, > 0.

    Returns ``[B, T]`` float32: ``log_softmax(float32(logits) / temperature)[..., tokens]``.

    Temperature convention: the sampler draws from ``softmax(logits / temperature)``, so the
    behaviour policy's log-probs are those of the *tempered* distribution. The learner must
    call this with the same ``temperature`` for ``logp``, ``old_logp`` (and ``ref_logp``) so
    that ``ratio = exp(logp - old_logp)`` compares the same distribution family (as verl
    does: ``logits.div_(temperature)`` before ``log_softmax``).
    """
    z = _scaled_logits(logits, temperature)  # [B, T, V]
    lse = jax.nn.logsumexp(z, axis=-1)  # [B, T]
    tok = jnp.take_along_axis(z, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1, mode="clip")
    return tok[..., 0] - lse


def entropy_from_logits(logits: Array, temperature: float | Array = 1.0) -> Array:
    """Per-token entropy of ``softmax(logits / temperature)``.

    logits: ``[..., V]``; returns ``[...]`` float32:
    ``H = logsumexp(z) - sum(softmax(z) * z)`` with ``z = float32(logits) / temperature``
    (same temperature convention as :func:`token_logprobs`).
    """
    z = _scaled_logits(logits, temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jax.nn.softmax(z, axis=-1)
    return lse - jnp.sum(p * z, axis=-1)


# --------------------------------------------------------------------------- losses


def kl_penalty(logp: Array, ref_logp: Array, kind: KLKind = "low_var_kl") -> Array:
    """Per-token estimator of KL(pi || pi_ref) from sampled-token log-probs (verl ``kl_penalty``).

    logp, ref_logp: ``[B, T]``; returns ``[B, T]`` float32 (no masking: mask via the caller,
    e.g. :func:`grpo_loss`, which zeroes padding *before* calling this).

    * ``"k1"`` / ``"kl"``: ``logp - ref_logp``
    * ``"abs"``: ``|logp - ref_logp|``
    * ``"k2"`` / ``"mse"``: ``0.5 * (logp - ref_logp)**2``
    * ``"k3"`` / ``"low_var_kl"``: with ``d = clip(ref_logp - logp, -20, 20)``,
      ``clip(exp(d) - d - 1, -10, 10)`` (Schulman's k3; clamps as in verl).
    """
    logp = _f32(logp)
    ref_logp = _f32(ref_logp)
    if kind in ("k1", "kl"):
        return logp - ref_logp
    if kind == "abs":
        return jnp.abs(logp - ref_logp)
    if kind in ("k2", "mse"):
        return 0.5 * jnp.square(logp - ref_logp)
    if kind in ("k3", "low_var_kl"):
        d = jnp.clip(ref_logp - logp, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(d) - d - 1.0, -K3_VALUE_CLAMP, K3_VALUE_CLAMP)
    raise ValueError(f"unknown kl kind {kind!r}")


def _check_dual_clip(c) -> None:
    # c <= 1 would cap the loss below its unclipped value at ratio 1: not a bound on outliers
    # but a different objective.
    if c is not None and c != 0 and not c > 1:
        raise ValueError(f"dual_clip must be None or 0 (off) or > 1, got {c}")


def _sanitize(x: Array, mask: Array) -> Array:
    """float32 ``x`` with masked-out positions replaced by 0 (value and gradient)."""
    return jnp.where(mask, _f32(x), 0.0)


def _check_policy(policy, dual_clip) -> None:
    if policy not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {policy!r}; expected one of {POLICY_LOSSES}")
    # The dual clip bounds PPO's surrogate; GSPO and CISPO define no such bound, and silently
    # ignoring a configured one would misreport the objective that runs.
    if policy != "ppo" and dual_clip:
        raise ValueError(f"dual_clip is a PPO clip; set it to None (or 0) for policy {policy!r}")


def policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    policy: PolicyLoss = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    loss_agg: LossAgg = "token-mean",
    num_tokens: Array | float | None = None,
    num_seqs: Array | float | None = None,
    norm_length: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The policy-gradient term: PPO clip (GRPO / DAPO clip-higher, optional dual clip), GSPO or
    CISPO.

    logp: ``[B, T]`` current-policy log-probs of the sampled tokens (differentiable).
    old_logp: ``[B, T]`` behaviour-policy log-probs (treated as constants: wrapped in
      ``stop_gradient``).
    advantages: ``[B]`` per-sequence (broadcast over ``T``) or ``[B, T]`` per-token.
    mask: ``[B, T]`` valid response tokens.
    policy: ``"ppo"``, ``"gspo"`` or ``"cispo"`` (below).
    clip_low / clip_high: the policy's clip range ``[1 - clip_low, 1 + clip_high]`` (asymmetric
      "clip-higher" when ``clip_high > clip_low``).
    dual_clip: ``c > 1`` bounds the loss of a negative-advantage token by ``-A * c`` (dual-clip
      PPO, arXiv 1912.09729): a token whose ratio has grown far past 1 while A < 0 no longer
      pushes an unbounded gradient. ``None`` or 0 disables it. PPO only.
    loss_agg, num_tokens, num_seqs, norm_length: see :func:`agg_loss`. For gradient
      accumulation pass the whole step's ``num_tokens`` / ``num_seqs`` and *sum* the
      micro-batch losses (every policy's per-token term depends on its own row only).

    Per token, ``lr = logp - old_logp``:

    * ``ppo``: ``r = exp(clip(lr, -20, 20))`` (the clamp as verl, so ``exp`` cannot
      overflow), ``pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``; with
      ``dual_clip = c``, where ``A < 0``: ``pg = min(pg, -A c)``.
    * ``gspo`` (arXiv 2507.18071): the sequence ratio ``s_i = exp(mean_t lr)`` (the length-
      normalised likelihood ratio), applied per token as ``s_it = sg(s_i) * pi / sg(pi)``, i.e.
      ``exp(min(logp - sg(logp) + sg(log s_i), 10))`` (verl's clamp): its value is ``s_i``, its
      gradient that of ``s_i * logp``, so a whole sequence is clipped or not; then PPO's
      ``max(-A s, -A clip(s))`` with GSPO's own (much tighter) range.
    * ``cispo`` (MiniMax-M1, arXiv 2506.13585): ``pg = -A * sg(clip(r, 1 - clip_low,
      1 + clip_high)) * logp``: the importance weight is clipped and detached instead of the
      update, so every token keeps a gradient ``-A * w`` (PPO zeroes a clipped token's).

    Returns ``(loss, metrics)``; metrics (all stop-gradient, float32 scalars):
      ``pg_loss`` (== loss), ``clip_frac`` (fraction of valid tokens where the clip is active:
      ppo / gspo: the clipped term is taken, no gradient; cispo: the weight is clipped),
      ``clip_frac_low`` (ppo / gspo: ``r < 1-clip_low`` and ``A < 0``; cispo: ``r < 1-clip_low``),
      ``clip_frac_high`` (``r > 1+clip_high``, and ``A > 0`` for ppo / gspo), ``clip_frac_dual``
      (the dual clip is active: ``A < 0`` and ``max(-A r, -A clip(r)) > -A c``; no gradient
      either; 0 when off), ``approx_kl`` (mean of ``old_logp - logp``), ``ratio_mean`` (of the
      ratio the policy uses: gspo's is the sequence ratio on each token); and the reference
      run's names (verl ``core_algos.compute_policy_loss``) for two of them:
      ``pg_clipfrac_higher`` (== clip_frac: its "clipped to a higher loss") and
      ``pg_clipfrac_lower`` (== clip_frac_dual).
      Token-level metrics are divided by ``num_tokens`` when given (else the local valid-token
      count), so with the global ``num_tokens`` they also sum across micro-batches.
    """
    _check_dual_clip(dual_clip)
    _check_policy(policy, dual_clip)
    mask = _bool_mask(mask)
    logp = _sanitize(logp, mask)
    old_logp = _sanitize(jax.lax.stop_gradient(old_logp), mask)
    adv = _f32(jax.lax.stop_gradient(advantages))
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.where(mask, jnp.broadcast_to(adv, mask.shape), 0.0)

    if policy == "gspo":
        seq_log_ratio = jax.lax.stop_gradient(masked_mean(logp - old_logp, mask, axis=-1))
        log_ratio = jnp.minimum(logp - jax.lax.stop_gradient(logp) + seq_log_ratio[:, None], GSPO_LOG_RATIO_MAX)
    else:
        log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    dual_active = jnp.zeros(mask.shape, bool)
    if policy == "cispo":
        pg = -adv * jax.lax.stop_gradient(clipped_ratio) * logp
        below, above = ratio < 1.0 - clip_low, ratio > 1.0 + clip_high
        clip_active = below | above
    else:
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * clipped_ratio
        pg = jnp.maximum(pg_unclipped, pg_clipped)
        clip_active = pg_clipped > pg_unclipped
        below = (ratio < 1.0 - clip_low) & (adv < 0)
        above = (ratio > 1.0 + clip_high) & (adv > 0)
        if dual_clip:
            pg_dual = -adv * dual_clip
            dual_active = (adv < 0) & (pg > pg_dual)
            pg = jnp.where(dual_active, pg_dual, pg)

    loss = agg_loss(pg, mask, loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)

    if num_tokens is None:
        tok_den = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    else:
        tok_den = jnp.maximum(_f32(num_tokens), 1.0)

    def tok_mean(x):
        return jax.lax.stop_gradient(masked_sum(_f32(x), mask) / tok_den)

    clip_frac = tok_mean(clip_active)
    clip_frac_dual = tok_mean(dual_active)
    metrics = {
        "pg_loss": jax.lax.stop_gradient(loss),
        "clip_frac": clip_frac,
        "clip_frac_low": tok_mean(below),
        "clip_frac_high": tok_mean(above),
        "clip_frac_dual": clip_frac_dual,
        "pg_clipfrac_higher": clip_frac,
        "pg_clipfrac_lower": clip_frac_dual,
        "approx_kl": tok_mean(old_logp - logp),
        "ratio_mean": tok_mean(ratio),
    }
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """Static (hashable) configuration of :func:`grpo_loss`.

    policy: ``"ppo"`` (GRPO / DAPO), ``"gspo"`` or ``"cispo"`` (see :func:`policy_loss`).
    clip_low / clip_high: PPO ratio clip ``[1 - clip_low, 1 + clip_high]``.
    dual_clip: ``c > 1`` caps a negative-advantage token's loss at ``-A * c``; None or 0: off
      (see :func:`policy_loss`). The reference run: 0.2 / 0.3 / 3.0. PPO only.
    gspo_clip_low / gspo_clip_high: GSPO's sequence-ratio clip range (the paper's 3e-4 / 4e-4:
      a length-normalised ratio moves far less than a token's).
    cispo_clip_low / cispo_clip_high: CISPO's importance-weight clip range. MiniMax-M1 tunes the
      upper bound only and leaves no lower one (1.0: the weight is clipped at 0, i.e. never);
      0.28 is DAPO's clip-higher value, a starting point.
    loss_agg: see :func:`agg_loss` (used for pg, KL and entropy).
    norm_length: ``seq-mean-token-sum-norm``'s constant (Dr.GRPO's generation budget); None:
      the sampler's ``max_new_tokens`` (the trainer fills it in, :meth:`with_norm_length`).
    kl_coef: weight of the KL-to-reference loss term (0 disables it; then ``ref_logp`` may
      be ``None``).
    kl_kind: estimator for :func:`kl_penalty`.
    entropy_coef: weight of the entropy *bonus* (loss -= entropy_coef * entropy).
    """

    policy: PolicyLoss = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    gspo_clip_low: float = 3e-4
    gspo_clip_high: float = 4e-4
    cispo_clip_low: float = 1.0
    cispo_clip_high: float = 0.28
    loss_agg: LossAgg = "token-mean"
    norm_length: int | None = None
    kl_coef: float = 0.0
    kl_kind: KLKind = "low_var_kl"
    entropy_coef: float = 0.0

    def __post_init__(self):
        _check_dual_clip(self.dual_clip)
        _check_policy(self.policy, self.dual_clip)
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"unknown loss_agg {self.loss_agg!r}; expected one of {LOSS_AGGS}")
        if self.norm_length is not None and self.norm_length < 1:
            raise ValueError(f"norm_length must be None or >= 1, got {self.norm_length}")

    @property
    def clip_range(self) -> tuple[float, float]:
        """(low, high) of the configured policy's clip."""
        return {"ppo": (self.clip_low, self.clip_high), "gspo": (self.gspo_clip_low, self.gspo_clip_high),
                "cispo": (self.cispo_clip_low, self.cispo_clip_high)}[self.policy]

    def with_norm_length(self, max_new_tokens: int) -> GRPOLossConfig:
        """This config with ``norm_length`` defaulted to the sampler's response cap."""
        if self.norm_length is not None:
            return self
        return dataclasses.replace(self, norm_length=int(max_new_tokens))


def grpo_loss(
    logp: Array,
    old_logp: Array,
    ref_logp: Array | None,
    advantages: Array,
    mask: Array,
    entropy: Array | None = None,
    cfg: GRPOLossConfig = GRPOLossConfig(),
    num_tokens: Array | float | None = None,
    num_seqs: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Full GRPO objective: ``pg + kl_coef * kl - entropy_coef * entropy`` (``pg`` of
    ``cfg.policy``, every term aggregated by ``cfg.loss_agg``).

    logp, old_logp, ref_logp: ``[B, T]`` (``ref_logp`` may be ``None`` when
      ``cfg.kl_coef == 0``; ``ref_logp`` is treated as constant).
    advantages: ``[B]`` or ``[B, T]``; mask: ``[B, T]``.
    entropy: optional ``[B, T]`` per-token entropy (e.g. :func:`entropy_from_logits` of the
      current logits; differentiable). Needed when ``cfg.entropy_coef != 0``.
    num_tokens / num_seqs: global normalisers for gradient accumulation (see
      :func:`agg_loss`); all terms use the same aggregation, so summed micro-batch losses
      equal the full mini-batch loss.

    Returns ``(loss, metrics)`` with metrics ``loss`` and those of :func:`policy_loss`, plus
    ``kl`` when ``ref_logp`` is given and ``entropy`` when ``entropy`` is given (aggregated like
    the loss).
    """
    mask = _bool_mask(mask)
    pg, metrics = policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        policy=cfg.policy,
        clip_low=cfg.clip_range[0],
        clip_high=cfg.clip_range[1],
        dual_clip=cfg.dual_clip,
        loss_agg=cfg.loss_agg,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        norm_length=cfg.norm_length,
    )
    loss = pg

    def agg(x):
        return agg_loss(x, mask, cfg.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=cfg.norm_length)

    if cfg.kl_coef != 0.0 and ref_logp is None:
        raise ValueError("cfg.kl_coef != 0 requires ref_logp")
    if ref_logp is not None:
        kl_tok = kl_penalty(
            _sanitize(logp, mask), _sanitize(jax.lax.stop_gradient(ref_logp), mask), cfg.kl_kind
        )
        kl = agg(kl_tok)
        metrics["kl"] = jax.lax.stop_gradient(kl)
        if cfg.kl_coef != 0.0:
            loss = loss + cfg.kl_coef * kl

    if cfg.entropy_coef != 0.0 and entropy is None:
        raise ValueError("cfg.entropy_coef != 0 requires entropy")
    if entropy is not None:
        ent = agg(_sanitize(entropy, mask))
        metrics["entropy"] = jax.lax.stop_gradient(ent)
        if cfg.entropy_coef != 0.0:
            loss = loss - cfg.entropy_coef * ent

    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics
