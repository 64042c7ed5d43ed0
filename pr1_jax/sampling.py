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

Work (`Sampler`): a step reads what is live, not the cap. The prompt's keys and values are stored
once per prompt and read once per group of n samples (`models.qwen2.SharedPrefixCache`: the
group's rows are the queries of one attention over the prompt, merged by log-sum-exp with each
row's attention over its own response). Responses grow in chunks of `CHUNK` slots: the decode
runs in segments of `CHUNK` steps (one compiled loop each), a segment reading only the chunks
filled so far. Between segments the host reads how many rows and groups are still live and the
rows are compacted (finished rows and groups dropped, the rest gathered within their shard of the
data axes) to a bucket of rows (`bucket`: quarter steps between powers of 2), so a finished row stops
costing reads a segment later. Compiled variants: one segment program per (live chunks, row
bucket, group bucket) met, a bounded set. `sample` is the whole-cache sampler in one program
(every row's copy of its prompt and all `max_new_tokens` slots read every step): the reference the
live sampler is tested against, and the baseline `bench/rollout_cost.py` measures.

Weights: the policy's params are split FSDP-style (`embed` over the `fsdp` mesh axis). A decode
step reads every weight, so a loop on FSDP-split weights all-gathers all of them over `fsdp`, at
every step or, where XLA hoists the gathers out of the loop (XLA:CPU does), once per segment;
priced per step, that all-gather over ICI, not HBM, bounds the paper run's decode
(`bench/projection.py`). With `SamplingConfig.gather_weights` (the default) the prefill gathers
the decode params once per sampler call and every segment reads them, held split over `tensor`
only (`pr1_jax.sharding.gather_layouts`).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from models.causal_lm import QwenCausalLM
from models.attention import SharedPrefixMask
from models.qwen2 import KVCache, SharedPrefixCache
from models.vision import VisionInputs
from pr1_jax import configlib
from pr1_jax.sharding import activation_sharding, batch_axis_size, gather_layouts, sharding_for

CHUNK = 128  # response slots added per decode segment; a segment runs this many steps


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
    # Hold the decode weights gathered over the `fsdp` mesh axis for the whole call (the module
    # docstring): no weight all-gather per decode step, for one copy of the text weights in the
    # compute dtype split over `tensor` only, per chip (the 7B in bf16 at tensor 4: 3.5 GiB) instead
    # of over fsdp x tensor. Off: the weights stay split, for models whose gathered copy does not
    # fit beside the KV cache. Nothing changes without a mesh or with fsdp = 1.
    gather_weights: bool = True

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
        scaled = logits if cfg.temperature == 1 else logits / cfg.temperature  # x / 1 == x: one pass less
        filtered = filter_logits(scaled, cfg.top_k, cfg.top_p)
        # A drawn token is never truncated: its filtered logit is its scaled one.
        tokens, picked, lse = draw(filtered, keys)
        if filtered is not scaled:  # the reported log-prob is of the policy before truncation
            lse = jax.nn.logsumexp(scaled, axis=-1)
    return tokens.astype(jnp.int32), picked - lse


@flax.struct.dataclass
class DecodeState:
    """The decode loop's carry for R rows and a budget of `new` tokens.

    step: [] int32; start: [] int32, the step of tokens[:, 0] (a segment's first); tokens: [R, new]
    int32; logprobs: [R, new] float32; done: [R] bool (the row has emitted an EOS); cache: the KV
    cache holding every token fed so far (`KVCache` or `SharedPrefixCache`); hidden: [R, E], the
    final hidden state of the last token fed, whose logits draw the token of `step` (carrying it
    rather than [R, V] logits keeps the vocabulary-wide arrays inside one step).
    """

    step: jax.Array
    start: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    done: jax.Array
    cache: KVCache | SharedPrefixCache
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
    return DecodeState(step=step + 1, start=state.start, tokens=state.tokens.at[:, step - state.start].set(tok),
                       logprobs=state.logprobs.at[:, step - state.start].set(logp),
                       done=state.done | jnp.isin(tok, jnp.asarray(cfg.eos_ids, jnp.int32)), cache=cache,
                       hidden=h[:, 0])


def sample(module: QwenCausalLM, params, input_ids, positions, attention_mask, vision: VisionInputs | None,
           rope_deltas, key, cfg: SamplingConfig, mesh: Mesh | None = None, prompt_ids=None) -> SampleOutput:
    """The whole-cache sampler (see the module docstring), a pure function (jit it with `cfg` and
    `mesh` static). Inputs as from `Model.prepare_inputs`:
    input_ids/attention_mask [B, T] left-padded, positions [3, B, T] or [B, T], rope_deltas [B].
    prompt_ids [B] int32: each prompt's index in the random streams (default: its row), so that
    sample j of prompt p draws from stream p * n + j however the batch was padded or split.
    With a mesh, the cache is sharded like the activations (batch over the data axes, KV heads
    over `tensor`) and so are the output rows; the model's activation constraints follow
    `pr1_jax.sharding.RULES`.
    vision: packed or per row (see `QwenCausalLM.hidden_states`)."""
    _check(cfg)
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
        row_keys = _row_keys(key, prompt_ids, b, n)
        init = DecodeState(step=jnp.zeros((), jnp.int32), start=jnp.zeros((), jnp.int32),
                           tokens=jnp.full((rows, new), cfg.pad_id, jnp.int32),
                           logprobs=jnp.zeros((rows, new), jnp.float32), done=jnp.zeros((rows,), bool), cache=cache,
                           hidden=hidden)
        decode_params = _decode_params(module, params, cfg, mesh)
        final = jax.lax.while_loop(lambda s: (s.step < new) & ~jnp.all(s.done),
                                   lambda s: decode_step(module, decode_params, s, row_keys, next_pos, cfg), init)
        return _output(final.tokens, final.logprobs, final.step, cfg, mesh)


def _output(tokens, logps, steps, cfg: SamplingConfig, mesh: Mesh | None) -> SampleOutput:
    """The sampler's result from its token and log-prob buffers [R, new] after `steps` steps."""
    new = tokens.shape[1]
    eos = jnp.asarray(cfg.eos_ids, jnp.int32)
    # A row's response runs up to and including its first EOS.
    is_eos = jnp.isin(tokens, eos) & (jnp.arange(new)[None] < steps)
    first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1) + 1, steps)
    mask = (jnp.arange(new)[None] < first_eos[:, None]).astype(jnp.int32)
    # Rows stay sharded like the prompts, so each process can read its own rows back.
    return SampleOutput(tokens=_constrain_rows(tokens, mesh), logprobs=_constrain_rows(logps, mesh),
                        mask=_constrain_rows(mask, mesh),
                        lengths=_constrain_rows(first_eos.astype(jnp.int32), mesh), steps=steps)


def _check(cfg: SamplingConfig):
    if not cfg.eos_ids or cfg.pad_id is None:
        raise ValueError("SamplingConfig needs eos_ids and pad_id (SamplingConfig.with_tokenizer resolves them)")


def _decode_params(module: QwenCausalLM, params, cfg: SamplingConfig, mesh: Mesh | None):
    """The weights the decode loop reads (`QwenCausalLM.decode_params`), gathered over `fsdp`
    with `cfg.gather_weights` (the module docstring)."""
    gather = cfg.gather_weights and mesh is not None
    return module.decode_params(params, gather_layouts(module, mesh) if gather else None)


def _row_keys(key, prompt_ids, b: int, n: int):
    """[B*n] keys: row p*n + j draws from stream prompt_ids[p]*n + j (the module docstring)."""
    if prompt_ids is None:
        prompt_ids = jnp.arange(b, dtype=jnp.int32)
    stream = (prompt_ids[:, None] * n + jnp.arange(n, dtype=jnp.int32)[None]).reshape(b * n)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(stream)


def _constrain_rows(x, mesh: Mesh | None):
    """Axis 0 (rows) over the data axes."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding_for(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh))


def _constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """The cache sharded like the activations: rows over the data axes, KV heads over `tensor`."""
    if mesh is None:
        return cache
    return cache.replace(k=_constrain_kv(cache.k, mesh), v=_constrain_kv(cache.v, mesh),
                         mask=_constrain_rows(cache.mask, mesh))


def _constrain_kv(xs, mesh: Mesh):
    """Per-layer KV buffers [rows, K, slots, D]: rows over the data axes, KV heads over `tensor`."""
    return tuple(jax.lax.with_sharding_constraint(x, sharding_for(("batch", "kv_heads", "length", None), x.shape, mesh))
                 for x in xs)


def bucket(count: int, cap: int) -> int:
    """The smallest of 1, 2, ..., 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (quarter steps between
    powers of 2) >= count, at most cap: the row and group counts of compacted segments. Four shapes
    per doubling keep a bucket's padding under 25%: on `bench/rollout_cost.py`'s lognormal rollout
    of 1,024 rows the segments read 1.27x the live rows' response KV (chunk rounding included),
    1.38x with powers of 2 and 1.5x them. A segment compiles anew anyway (its response grew a chunk)."""
    b = 1
    while b < count:
        b += max(1, (1 << (b.bit_length() - 1)) // 4)
    return min(b, cap)


@flax.struct.dataclass
class LiveRollout:
    """The live sampler between segments. Rows (R) and groups (G) are laid out in S blocks, one per
    shard of the data axes (see `SharedPrefixMask`); compaction keeps a row in its block.

    decode: the decode loop's carry (tokens / logprobs: the current segment's [R, CHUNK]; cache: a
    `SharedPrefixCache`); row: [R] int32, the row's index in its block of the output; keys: [R] its
    random stream; next_pos: [R] int32, the position of its first new token; tokens / logprobs:
    the output [B*n, max_new_tokens], filled segment by segment."""

    decode: DecodeState
    row: jax.Array
    keys: jax.Array
    next_pos: jax.Array
    tokens: jax.Array
    logprobs: jax.Array


def prefill(module: QwenCausalLM, params, input_ids, positions, attention_mask, vision: VisionInputs | None,
            rope_deltas, key, cfg: SamplingConfig, shards: int, mesh: Mesh | None = None, prompt_ids=None,
            chunk: int = CHUNK):
    """The live sampler's start (inputs as `sample`; jit with cfg, shards, mesh, chunk static): the
    prompts' prefill, their KV stored once per prompt, every row live with one empty chunk of
    response slots. shards: blocks of rows (divides the batch). Returns (decode params, LiveRollout)."""
    _check(cfg)
    with activation_sharding(mesh):
        b, t = input_ids.shape
        n, new = cfg.n, cfg.max_new_tokens
        h, cache = module.apply({"params": params}, input_ids, positions, attention_mask, vision, t,
                                method=QwenCausalLM.hidden_states)
        rows, chunk = b * n, min(chunk, new)
        index = jnp.arange(rows, dtype=jnp.int32)
        empty = jnp.zeros((rows, *cache.k[0].shape[1:2], chunk, cache.k[0].shape[3]), cache.k[0].dtype)
        layout = SharedPrefixMask(prompt_mask=cache.mask, group=(index // n) % (b // shards), member=index % n,
                                  index=jnp.zeros((), jnp.int32), width=n, shards=shards)
        live = SharedPrefixCache(prompt_k=cache.k, prompt_v=cache.v, k=(empty,) * len(cache.k),
                                 v=(empty,) * len(cache.v), layout=layout)
        state = DecodeState(step=jnp.zeros((), jnp.int32), start=jnp.zeros((), jnp.int32),
                            tokens=jnp.full((rows, chunk), cfg.pad_id, jnp.int32),
                            logprobs=jnp.zeros((rows, chunk), jnp.float32), done=jnp.zeros((rows,), bool),
                            cache=live, hidden=jnp.repeat(h[:, -1], n, axis=0))
        out = LiveRollout(decode=state, row=index % (rows // shards), keys=_row_keys(key, prompt_ids, b, n),
                          next_pos=jnp.repeat(attention_mask.sum(-1).astype(jnp.int32) + rope_deltas, n),
                          tokens=jnp.full((rows, new), cfg.pad_id, jnp.int32),
                          logprobs=jnp.zeros((rows, new), jnp.float32))
        return _decode_params(module, params, cfg, mesh), _constrain_live(out, mesh)


def segment(module: QwenCausalLM, decode_params, state: LiveRollout, cfg: SamplingConfig, mesh: Mesh | None = None):
    """Up to CHUNK decode steps (fewer when every row stops or the budget ends), their tokens
    written to the output. Returns (state, live rows per block [S], live groups per block [S],
    the loop's step [], every row stopped []), the counts replicated (every process reads them)."""
    with activation_sharding(mesh):
        # The segment's buffers start empty: columns past an early exit are written out as such.
        d = state.decode.replace(tokens=jnp.full_like(state.decode.tokens, cfg.pad_id),
                                 logprobs=jnp.zeros_like(state.decode.logprobs))
        chunk, new = d.tokens.shape[1], state.tokens.shape[1]
        end = jnp.minimum(d.start + chunk, new)
        d = jax.lax.while_loop(lambda s: (s.step < end) & ~jnp.all(s.done),
                               lambda s: decode_step(module, decode_params, s, state.keys, state.next_pos, cfg), d)
        layout = d.cache.layout
        s_, r = layout.shards, d.done.shape[0] // layout.shards
        cols = d.start + jnp.arange(chunk)

        def put(out, seg):  # a block's segment columns into its output rows (beyond the budget: dropped)
            per_block = lambda o, x, i: o.at[i[:, None], cols[None]].set(x, mode="drop")  # noqa: E731
            return jax.vmap(per_block)(out.reshape(s_, -1, new), seg.reshape(s_, r, chunk),
                                       state.row.reshape(s_, r)).reshape(out.shape)

        state = state.replace(decode=d, tokens=put(state.tokens, d.tokens), logprobs=put(state.logprobs, d.logprobs))
        live = ~d.done.reshape(s_, r)
        groups = _live_groups(live, layout).sum(-1)
        replicated = lambda x: x if mesh is None else jax.lax.with_sharding_constraint(  # noqa: E731
            x, sharding_for(None, x.shape, mesh))
        return (_constrain_live(state, mesh), replicated(live.sum(-1)), replicated(groups), d.step,
                jnp.all(d.done))


def _live_groups(live, layout: SharedPrefixMask):
    """[S, g] bool: the groups of each block with a live row (live [S, r])."""
    s_, r = live.shape
    g = layout.prompt_mask.shape[0] // s_
    return jax.vmap(lambda lv, i: jnp.zeros((g,), bool).at[i].max(lv, mode="drop"))(
        live, layout.group.reshape(s_, r))


def compact(state: LiveRollout, rows: int, groups: int, mesh: Mesh | None = None):
    """The next segment's state but its KV (jit with rows, groups, mesh static; `state`'s KV
    tuples empty): per block the first `rows` rows, live ones first (finished ones only as bucket
    padding: they stay stopped), and the first `groups` groups, those with a live row first.
    Returns (state, keep [S, rows], group_keep [S, groups]): the KV follows with `take_rows`, one
    buffer at a time."""
    d = state.decode
    layout = d.cache.layout
    s_ = layout.shards
    r, g = d.done.shape[0] // s_, layout.prompt_mask.shape[0] // s_
    keep = jnp.argsort(d.done.reshape(s_, r), axis=1, stable=True)[:, :rows]
    group_keep = jnp.argsort(~_live_groups(~d.done.reshape(s_, r), layout), axis=1, stable=True)[:, :groups]
    # A kept row's new group index; a row whose group is dropped gets `groups` (out of range).
    renumber = jax.vmap(lambda k: jnp.full((g,), groups, jnp.int32).at[k].set(jnp.arange(groups, dtype=jnp.int32)))(
        group_keep)
    pick = lambda x: take_rows(x, keep)  # noqa: E731
    group = pick(jax.vmap(lambda m, i: jnp.take(m, i, mode="fill", fill_value=groups))(
        renumber, layout.group.reshape(s_, r)).reshape(-1))
    layout = layout.replace(prompt_mask=take_rows(layout.prompt_mask, group_keep), group=group,
                            member=pick(layout.member))
    decode = DecodeState(step=d.step, start=d.step, tokens=pick(d.tokens), logprobs=pick(d.logprobs),
                         done=pick(d.done), cache=d.cache.replace(layout=layout), hidden=pick(d.hidden))
    out = state.replace(decode=decode, row=pick(state.row), keys=pick(state.keys), next_pos=pick(state.next_pos))
    return _constrain_live(out, mesh), keep, group_keep


def take_rows(x, index, grow: int = 0):
    """x [S * r, ...] in S blocks of rows -> [S * k, ...]: block i's rows index[i] ([S, k]); with
    grow, `grow` more (zero) slots on axis 2 (a KV buffer's response slots)."""
    s_ = index.shape[0]
    out = jax.vmap(lambda xs, i: jnp.take(xs, i, axis=0))(x.reshape(s_, -1, *x.shape[1:]), index)
    out = out.reshape(-1, *x.shape[1:])
    return jnp.pad(out, [(0, grow if a == 2 else 0) for a in range(x.ndim)]) if grow else out


def _constrain_live(state: LiveRollout, mesh: Mesh | None) -> LiveRollout:
    """Rows, groups and their KV over the data axes (KV heads over `tensor`), as `_constrain_cache`."""
    if mesh is None:
        return state
    d, c = state.decode, state.decode.cache
    cache = c.replace(prompt_k=_constrain_kv(c.prompt_k, mesh), prompt_v=_constrain_kv(c.prompt_v, mesh),
                      k=_constrain_kv(c.k, mesh), v=_constrain_kv(c.v, mesh))
    return state.replace(decode=d.replace(cache=cache, hidden=_constrain_rows(d.hidden, mesh)),
                         tokens=_constrain_rows(state.tokens, mesh), logprobs=_constrain_rows(state.logprobs, mesh))


def take_kv(x, index, grow: int, mesh: Mesh | None = None):
    """`take_rows` of one KV buffer, sharded as `_constrain_kv`."""
    out = take_rows(x, index, grow)
    return out if mesh is None else _constrain_kv((out,), mesh)[0]


def _without_kv(state: LiveRollout) -> tuple[LiveRollout, SharedPrefixCache]:
    """(the state with empty KV tuples, its cache)."""
    cache = state.decode.cache
    bare = cache.replace(prompt_k=(), prompt_v=(), k=(), v=())
    return state.replace(decode=state.decode.replace(cache=bare)), cache


class Sampler:
    """The live sampler (see the module docstring): its prefill compiles once per (batch, prompt
    length, patch count) shape and config, its segment and compaction programs once per shape met
    (live chunks, row and group buckets). One host read per segment decides the next one's shape."""

    def __init__(self, module: QwenCausalLM, cfg: SamplingConfig, mesh: Mesh | None = None, chunk: int = CHUNK):
        """chunk: response slots per segment (tests take small ones to run several segments)."""
        self.module, self.cfg, self.mesh = module, cfg, mesh
        self._prefill = jax.jit(lambda p, ids, pos, mask, vi, deltas, key, prompt_ids, cfg, shards: prefill(
            module, p, ids, pos, mask, vi, deltas, key, cfg, shards, mesh, prompt_ids, chunk), static_argnums=(8, 9))
        self._segment = jax.jit(lambda p, state, cfg: segment(module, p, state, cfg, mesh), static_argnums=2,
                                donate_argnums=1)
        self._compact = jax.jit(lambda state, rows, groups: compact(state, rows, groups, mesh), static_argnums=(1, 2))
        self._take = jax.jit(lambda x, index, grow: take_kv(x, index, grow, mesh), static_argnums=2)
        self._output = jax.jit(lambda state, cfg: _output(state.tokens, state.logprobs, state.decode.step, cfg, mesh),
                               static_argnums=1)

    def __call__(self, params, inputs: dict, key: jax.Array, cfg: SamplingConfig | None = None) -> SampleOutput:
        """inputs: the dict of `Model.prepare_inputs` (or the data pipeline's equivalent), optionally
        with `prompt_ids` (see `sample`)."""
        cfg = cfg or self.cfg
        b = inputs["input_ids"].shape[0]
        # Compaction stays within a shard of the data axes where the prompts divide over them.
        shards = batch_axis_size(self.mesh) if self.mesh is not None else 1
        shards = shards if b % shards == 0 else 1
        decode_params, state = self._prefill(params, inputs["input_ids"], inputs["positions"],
                                             inputs["attention_mask"], inputs["vision"], inputs["rope_deltas"], key,
                                             inputs.get("prompt_ids"), cfg, shards)
        rows, groups = b * cfg.n // shards, b // shards
        while True:
            state, live, live_groups, step, done = self._segment(decode_params, state, cfg)
            if bool(done) or int(step) >= cfg.max_new_tokens:
                return self._output(state, cfg)
            # The KV is gathered one buffer at a time, each old buffer dropped once its rows are
            # taken: compaction holds the KV once plus one new buffer (one program gathering it
            # all would hold the old and the new KV whole, twice the rollout's memory).
            state, cache = _without_kv(state)
            state, keep, group_keep = self._compact(state, bucket(int(np.max(live)), rows),
                                                    bucket(int(np.max(live_groups)), groups))
            chunk = state.decode.tokens.shape[1]
            old = [list(cache.prompt_k), list(cache.prompt_v), list(cache.k), list(cache.v)]
            del cache
            new = [tuple(self._take(xs.pop(0), index, grow) for _ in range(len(xs)))
                   for xs, index, grow in zip(old, (group_keep, group_keep, keep, keep), (0, 0, chunk, chunk))]
            full = state.decode.cache.replace(prompt_k=new[0], prompt_v=new[1], k=new[2], v=new[3])
            state = state.replace(decode=state.decode.replace(cache=full))
