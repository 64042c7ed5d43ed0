"""Jitted sampler: one prefill over the prompt batch (images included), then a compiled decode loop
over a preallocated KV cache. It reads the live policy params: no weight sync, no second engine.

Log-probabilities: for every sampled token we return `log softmax(logits / T)[token]`, the
temperature-scaled policy *before* top-k / top-p truncation (truncation only decides which token
is drawn). Greedy (T = 0) reports `log softmax(logits)[token]`. The GRPO ratio must use the same
definition: `pr1_jax.grpo.token_logprobs(logits, tokens, temperature)`.

Randomness: sample j of prompt p (row p * n + j of the output) draws its token at step s from
`fold_in(fold_in(key, p * n + j), s)`, where p is the prompt's row or its given `prompt_ids`
entry, so a sample's stream depends only on the seed and its index, not on the batch it was
generated with, how it was padded or split over processes, or how the prefill was shared.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from models.causal_lm import QwenCausalLM
from models.qwen2 import KVCache
from models.vision import VisionInputs
from pr1_jax import configlib
from pr1_jax.sharding import activation_sharding, sharding_for


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How responses are drawn; also the run config's `sampling` section.

    A row stops at any of `eos_ids`. In a run config they are given as token strings
    (`eos_tokens`) and resolved through the policy's tokenizer (`with_tokenizer`), as is
    `pad_id` (None = the tokenizer's pad token); code that has ids sets `eos_ids` directly.
    The learner scores responses at this temperature (1.0 for greedy samples)."""

    max_new_tokens: int = configlib.bounded(4096, ge=1)
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    temperature: float = configlib.bounded(1.0, ge=0)  # 0 = greedy
    top_p: float = configlib.bounded(1.0, gt=0, le=1)
    top_k: int = configlib.bounded(0, ge=0)  # 0 = off
    n: int = configlib.bounded(1, ge=1)  # samples per prompt, sharing one prefill
    eos_tokens: tuple[str, ...] = ("<|im_end|>",)

    @property
    def score_temperature(self) -> float:
        """The temperature whose log-probs the sampler reports and the learner must use."""
        return self.temperature or 1.0

    def with_tokenizer(self, tokenizer) -> "SamplingConfig":
        """`eos_ids` (when not set) from `eos_tokens`, `pad_id` (when None) from the tokenizer;
        a stop string that is not one token of this tokenizer is an error."""
        eos = self.eos_ids
        if not eos:
            ids = []
            for s in self.eos_tokens:
                i = tokenizer.convert_tokens_to_ids(s)
                if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != s:
                    raise ValueError(f"sampling.eos_tokens: {s!r} is not a token of the policy's tokenizer")
                ids.append(int(i))
            eos = tuple(ids)
        pad = tokenizer.pad_token_id if self.pad_id is None else self.pad_id
        if pad is None:
            raise ValueError("the policy's tokenizer has no pad token; set sampling.pad_id")
        return dataclasses.replace(self, eos_ids=eos, pad_id=int(pad))


@flax.struct.dataclass
class SampleOutput:
    """Row i = prompt i // n, sample i % n. Positions after a row's EOS hold pad_id, logprob 0."""

    tokens: jax.Array  # [B*n, max_new] int32
    logprobs: jax.Array  # [B*n, max_new] float32
    mask: jax.Array  # [B*n, max_new] int32, 1 on generated tokens (EOS included)
    lengths: jax.Array  # [B*n] int32
    steps: jax.Array  # [] int32, decode steps run (< max_new when every row stopped early)


def filter_logits(logits, top_k: int, top_p: float):
    """Mask (to -inf) tokens outside the top-k and outside the smallest top-p nucleus. [R, V]."""
    if top_k <= 0 and top_p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    keep = jnp.ones_like(sorted_logits, bool)
    if top_k > 0:
        keep &= jnp.arange(logits.shape[-1]) < top_k
    if top_p < 1.0:
        probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this token
        keep &= before < top_p
    # Threshold = the smallest kept logit; ties at the threshold are kept.
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def draw(logits, keys):
    """One token per row of softmax(logits) by inverse CDF with one uniform per row: logits [R, V]
    fp32 (every row with a finite maximum), keys [R] -> (tokens [R] int32, their logits [R],
    logsumexp(logits) [R]).

    Exact in distribution, like `jax.random.categorical`, but it reads the logits twice (the max,
    then sums of exp over blocks of the vocabulary) where a Gumbel-max draw generates R x V random
    numbers (with a 152k vocabulary, more bytes than the decoder's weights at 128 rows). The
    uniform falls in a block by the block sums' cumulative sum, then in a token of that block by the
    cumulative sum of the block's R x `block` entries, gathered again from the logits."""
    r, v = logits.shape
    block = _vocab_block(v)
    nb = -(-v // block)
    if nb * block != v:
        logits = jnp.pad(logits, ((0, 0), (0, nb * block - v)), constant_values=-jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    sums = jnp.exp(logits - m).reshape(r, nb, block).sum(-1)  # [R, nb]
    cum = jnp.cumsum(sums, axis=-1)
    u = jax.vmap(jax.random.uniform)(keys) * cum[:, -1]
    b = _first_above(cum, u, sums > 0)
    u = u - (jnp.take_along_axis(cum, b[:, None], axis=-1)[:, 0] - jnp.take_along_axis(sums, b[:, None], axis=-1)[:, 0])
    within = jax.vmap(lambda row, i: jax.lax.dynamic_slice_in_dim(row, i * block, block))(logits, b)
    p = jnp.exp(within - m)  # [R, block]
    i = _first_above(jnp.cumsum(p, axis=-1), u, p > 0)
    picked = jnp.take_along_axis(within, i[:, None], axis=-1)[:, 0]
    return (b * block + i).astype(jnp.int32), picked, m[:, 0] + jnp.log(cum[:, -1])


def _vocab_block(v: int) -> int:
    """A block size near sqrt(v) that divides v (no padded copy of the logits), else 1024."""
    target = max(1, int(v ** 0.5))
    best = max(d for d in range(1, 4 * target + 1) if v % d == 0)
    return best if best * 4 >= target else 1024


def _first_above(cum, u, positive):
    """Per row, the first index where cum [R, N] exceeds u [R]; never one with no mass (positive
    [R, N] False), which fp rounding at the top end could otherwise pick."""
    idx = jnp.sum(cum <= u[:, None], axis=-1)
    last = cum.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.minimum(idx, last)


def next_tokens(logits, keys, cfg: SamplingConfig):
    """logits [R, V] fp32, keys [R] -> (tokens [R], logprobs [R])."""
    if cfg.temperature == 0:
        tokens, picked, lse = jnp.argmax(logits, axis=-1), jnp.max(logits, axis=-1), jax.nn.logsumexp(logits, axis=-1)
    else:
        scaled = logits / cfg.temperature
        filtered = filter_logits(scaled, cfg.top_k, cfg.top_p)
        # A drawn token is never truncated: its filtered logit is its scaled one.
        tokens, picked, lse = draw(filtered, keys)
        if filtered is not scaled:  # the reported log-prob is of the policy before truncation
            lse = jax.nn.logsumexp(scaled, axis=-1)
    return tokens.astype(jnp.int32), picked - lse


@flax.struct.dataclass
class DecodeState:
    """The decode loop's carry for R rows and a budget of `new` tokens.

    step: [] int32; tokens: [R, new] int32; logprobs: [R, new] float32; done: [R] bool (the row
    has emitted an EOS); cache: the KV cache holding every token fed so far; hidden: [R, E], the
    final hidden state of the last token fed, whose logits draw the token of `step` (carrying it
    rather than [R, V] logits keeps the vocabulary-wide arrays inside one step).
    """

    step: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    done: jax.Array
    cache: KVCache
    hidden: jax.Array


def decode_step(module: QwenCausalLM, params, state: DecodeState, row_keys, next_pos, cfg: SamplingConfig
                ) -> DecodeState:
    """One iteration of the sampler's decode loop: the LM head on `state.hidden`, a token drawn per
    row and recorded, fed through the decoder on the cache. params: `module.decode_params(policy params)`;
    row_keys: [R] keys (a row's stream); next_pos: [R] int32, the position of each row's first
    new token (every M-RoPE row advances alike). Exposed so that `bench/decode_cost.py` compiles
    exactly what the rollout runs."""
    step = state.step
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
    logits = module.apply({"params": params}, state.hidden[:, None], method=QwenCausalLM.logits)[:, 0]
    tok, logp = next_tokens(logits.astype(jnp.float32), keys, cfg)
    tok = jnp.where(state.done, cfg.pad_id, tok)
    logp = jnp.where(state.done, 0.0, logp)
    rows = tok.shape[0]
    h, cache = module.apply({"params": params}, tok[:, None], (next_pos + step)[:, None],
                            jnp.ones((rows, 1), jnp.int32), state.cache, method=QwenCausalLM.decode)
    return DecodeState(step=step + 1, tokens=state.tokens.at[:, step].set(tok),
                       logprobs=state.logprobs.at[:, step].set(logp),
                       done=state.done | jnp.isin(tok, jnp.asarray(cfg.eos_ids, jnp.int32)), cache=cache,
                       hidden=h[:, 0])


def sample(module: QwenCausalLM, params, input_ids, positions, attention_mask, vision: VisionInputs | None,
           rope_deltas, key, cfg: SamplingConfig, mesh: Mesh | None = None, prompt_ids=None) -> SampleOutput:
    """Pure function (jit it with `cfg` and `mesh` static). Inputs as from `Model.prepare_inputs`:
    input_ids/attention_mask [B, T] left-padded, positions [3, B, T] or [B, T], rope_deltas [B].
    prompt_ids [B] int32: each prompt's index in the random streams (default: its row), so that
    sample j of prompt p draws from stream p * n + j however the batch was padded or split.
    With a mesh, the cache is sharded like the activations (batch over the data axes, KV heads
    over `tensor`) and so are the output rows; the model's activation constraints follow
    `pr1_jax.sharding.RULES`.
    vision: packed or per row (see `QwenCausalLM.hidden_states`)."""
    if not cfg.eos_ids or cfg.pad_id is None:
        raise ValueError("SamplingConfig needs eos_ids and pad_id (SamplingConfig.with_tokenizer resolves them)")
    with activation_sharding(mesh):
        b, t = input_ids.shape
        n, new = cfg.n, cfg.max_new_tokens
        h, cache = module.apply({"params": params}, input_ids, positions, attention_mask, vision, t + new,
                                method=QwenCausalLM.hidden_states)
        cache = _constrain_cache(cache, mesh)
        hidden = h[:, -1]
        if n > 1:
            # Without the constraint the repeated cache may come out replicated: every device would
            # decode all B*n rows.
            cache = _constrain_cache(cache.repeat(n), mesh)
            hidden = _constrain_rows(jnp.repeat(hidden, n, axis=0), mesh)
        rows = b * n
        # The first new token sits right after the prompt's real tokens on every M-RoPE row.
        next_pos = jnp.repeat(attention_mask.sum(-1).astype(jnp.int32) + rope_deltas, n)
        if prompt_ids is None:
            prompt_ids = jnp.arange(b, dtype=jnp.int32)
        stream = (prompt_ids[:, None] * n + jnp.arange(n, dtype=jnp.int32)[None]).reshape(rows)
        row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(stream)
        init = DecodeState(step=jnp.zeros((), jnp.int32), tokens=jnp.full((rows, new), cfg.pad_id, jnp.int32),
                           logprobs=jnp.zeros((rows, new), jnp.float32), done=jnp.zeros((rows,), bool), cache=cache,
                           hidden=hidden)
        decode_params = module.decode_params(params)
        final = jax.lax.while_loop(lambda s: (s.step < new) & ~jnp.all(s.done),
                                   lambda s: decode_step(module, decode_params, s, row_keys, next_pos, cfg), init)
        steps, tokens, logps = final.step, final.tokens, final.logprobs
        eos = jnp.asarray(cfg.eos_ids, jnp.int32)
        # A row's response runs up to and including its first EOS.
        is_eos = jnp.isin(tokens, eos) & (jnp.arange(new)[None] < steps)
        first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1) + 1, steps)
        mask = (jnp.arange(new)[None] < first_eos[:, None]).astype(jnp.int32)
        # Rows stay sharded like the prompts, so each process can read its own rows back.
        return SampleOutput(tokens=_constrain_rows(tokens, mesh), logprobs=_constrain_rows(logps, mesh),
                            mask=_constrain_rows(mask, mesh),
                            lengths=_constrain_rows(first_eos.astype(jnp.int32), mesh), steps=steps)


def _constrain_rows(x, mesh: Mesh | None):
    """Axis 0 (rows) over the data axes."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding_for(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh))


def _constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """The cache sharded like the activations: rows over the data axes, KV heads over `tensor`."""
    if mesh is None:
        return cache
    kv = sharding_for(("batch", "kv_heads", "length", None), cache.k[0].shape, mesh)
    constrain = lambda xs: tuple(jax.lax.with_sharding_constraint(x, kv) for x in xs)  # noqa: E731
    return cache.replace(k=constrain(cache.k), v=constrain(cache.v), mask=_constrain_rows(cache.mask, mesh))


class Sampler:
    """Compiles `sample` once per (batch, prompt length, patch count) shape and config."""

    def __init__(self, module: QwenCausalLM, cfg: SamplingConfig, mesh: Mesh | None = None):
        self.module, self.cfg = module, cfg
        self._fn = jax.jit(lambda p, ids, pos, mask, vi, deltas, key, prompt_ids, cfg: sample(
            module, p, ids, pos, mask, vi, deltas, key, cfg, mesh, prompt_ids), static_argnums=(8,))

    def __call__(self, params, inputs: dict, key: jax.Array, cfg: SamplingConfig | None = None) -> SampleOutput:
        """inputs: the dict of `Model.prepare_inputs` (or the data pipeline's equivalent), optionally
        with `prompt_ids` (see `sample`)."""
        return self._fn(params, inputs["input_ids"], inputs["positions"], inputs["attention_mask"],
                        inputs["vision"], inputs["rope_deltas"], key, inputs.get("prompt_ids"), cfg or self.cfg)
