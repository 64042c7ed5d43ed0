"""Attention for the decoder and the vision towers: one entry point, one description of the mask,
and the implementations the models' `attention` setting chooses from.

    out = attend(q, k, v, mask, implementation, dtype)   # [B, H, T, D]

q: [B, H, T, D]; k, v: [B, K, S, D], H a multiple of K (grouped-query: query head h reads KV head
h // (H // K)). Heads-major, the layout of the decode KV cache (`models.qwen2.KVCache`), so a
decode step reads the cache where it lies. Scores are scaled by 1/sqrt(D).

`AttentionMask` says which keys each query sees with per-token vectors rather than a dense
[T, S] tensor: query t (cache slot `q_offset + t`) sees key s when their segment ids are equal
or the key is `kv_shared` (and, with `q_group` / `kv_group`, of the query's group), and, if
`causal`, when s <= q_offset + t. Every mask the models use is of this form: left / right padding
(segment 0 = padding, 1 = tokens; a padding query sees padding, so no row is empty), the judge's
prefix-sharing branches (segment = branch, the shared prefix visible to all), the learner's packed
rows (several GRPO groups in a row: segment = (group, branch), a group's prompt visible to its own
samples only), Qwen2-VL frames and Qwen2.5-VL windows (segment = frame or window), the filled
slots of a KV cache.

The sampler's decode (`attend_shared_prefix`, `SharedPrefixMask`) reads a group's prompt keys once
for the group's samples and each sample's own response keys, in two parts merged by their
log-sum-exp (`attend_part`, `merge_parts`); it is "xla" whatever the setting, as every decode step.

Implementations:
- "xla": fp32 scores [B, K, G, T, S] and softmax, the way transformers' eager path computes them
  (the parity path on CPU; decode steps always take it: at T = 1 its scores are a sliver next to
  the cache it reads). The mask is compared from the vectors inside the softmax fusion. A causal
  self-attention over a long row (the learner's packed rows) runs in query blocks of
  `CAUSAL_BLOCK`, each over the keys up to its own end: the keys above the diagonal are never
  scored (about half the FLOPs and score memory of the square at 8 blocks), and since their
  softmax weight is exactly 0 the result is the same. A mask with `pairs` (the learner's packed
  rows: a token sees its prompt and its own response, a few blocks of a long row) computes only
  those (query block, key block) pairs (`_block_sparse`), on every backend when the mask has
  shared keys (splash and cuDNN's lengths cannot express a groups mask).
- "cudnn": cuDNN's fused flash attention (GPU, bf16 / fp16), the kernel behind
  `jax.nn.dot_product_attention(implementation="cudnn")`: no [T, S] scores in memory; causality
  in the kernel. Padding at the end of each row (`AttentionMask.lengths`, what the decoder makes
  of its padding: `padding_last`) enters as per-row lengths, nothing O(T x S); other masks
  (frames and windows of the vision towers, the judge's branches) as one additive bias
  [B, 1, T, S] in the compute dtype. The bias takes no gradient, odd lengths are padded to even
  ones (cuDNN's backward takes no other), and the masked value is JAX's own for cuDNN (-2^41 in
  bf16: cuDNN mis-subtracts two dtype minima).
- "pallas": splash attention (TPU, `jax.experimental.pallas.ops.tpu.splash_attention`): causal
  masks and segment ids in the kernel, no O(T x S) tensor at all. Masks with shared keys (the
  judge's prefix) are not segment masks: they take "xla". On CPU the kernel runs in Pallas'
  interpreter (tests); on a GPU it is refused.
- "auto": "cudnn" on GPUs for bf16 / fp16 compute, "pallas" on TPUs (on one chip, or on several
  inside `models.layers.activation_sharding`), "xla" otherwise: never an interpreter.

An explicit setting the backend or the compute dtype cannot run ("cudnn" off a GPU or in fp32,
"pallas" on a GPU) is an error when the model is first traced (at start-up), naming it.

Under a mesh context with logical axis rules (`models.layers.activation_sharding`), the splash
kernel runs per shard (batch over the rules' `batch` axes, heads over `q_heads` / `kv_heads`).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

from models.layers import logical_spec

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
_SPLASH_BLOCK = 128  # splash's default block sizes; sequences and head dims are padded to it
# The additive mask value of JAX's cuDNN path (`get_large_negative_number` there): cuDNN gets the
# difference of two dtype minima wrong, so the masked value stays far above them.
_CUDNN_MASKED = {jnp.dtype(jnp.bfloat16): -2.0 ** 41, jnp.dtype(jnp.float16): -2.0 ** 15}
CAUSAL_BLOCK = 1024  # query block of the "xla" path's causal rows of at least 2 blocks
PAIR_BLOCK = 128  # query and key block of the block-sparse path (`AttentionMask.pairs`)


def pair_block(length: int) -> int:
    """The block of `AttentionMask.pairs` for rows of `length` slots: PAIR_BLOCK, or the largest
    power of 2 below it that divides `length`."""
    return math.gcd(length, PAIR_BLOCK)


def resolve(setting: str, dtype) -> str:
    """The implementation `setting` stands for on the default backend, for compute `dtype`;
    a setting that cannot run there is a ValueError naming it."""
    if setting not in IMPLEMENTATIONS:
        raise ValueError(f"attention {setting!r}: expected one of {IMPLEMENTATIONS}")
    backend, half = jax.default_backend(), jnp.dtype(dtype) in _CUDNN_MASKED
    if setting == "cudnn" and (backend != "gpu" or not half):
        raise ValueError(f"model.attention 'cudnn' runs on GPUs with bfloat16 / float16 compute, not with "
                         f"{jnp.dtype(dtype).name} on {backend}: use 'auto' or 'xla'")
    if setting == "pallas" and backend == "gpu":
        raise ValueError("model.attention 'pallas' is TPU splash attention (on a GPU it would run in Pallas' "
                         "interpreter): use 'auto', 'cudnn' or 'xla'")
    if setting != "auto":
        return setting
    if backend == "gpu" and half:
        return "cudnn"
    # GSPMD cannot split a Pallas kernel: on several chips it runs per shard, which needs the mesh
    # of `activation_sharding`; without it the XLA path is the safe choice.
    if backend == "tpu" and (not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1):
        return "pallas"
    return "xla"


@flax.struct.dataclass
class AttentionMask:
    """Which keys each query sees (see the module docstring).

    q_segment: [B, T] int32; kv_segment: [B, S] int32; kv_shared: [B, S] bool or None;
    q_group: [B, T] / kv_group: [B, S] int32 or None: a shared key is seen only by the queries of
    its group (None: by every query); q_offset: [] int32, the cache slot of query 0; causal:
    static. lengths: [B] int32 or None,
    set (by `right_padded`) where the segments are padding at the end of each row, the form
    cuDNN takes without a bias. bias: [B, 1, T, S] in the compute dtype (0 or the masked value),
    only when `prepare` made it for "cudnn".
    pairs: [B, P, 2] int32 or None: a self-attention (S = T) over rows whose visible keys lie in
    few blocks (the learner's packed rows): the (query block, key block) pairs, blocks of
    `pair_block(T)` slots, that hold every visible (query, key); a pair whose query block is
    T // block or more is padding. With pairs the "xla" path and every mask with shared keys
    compute only those blocks (`_block_sparse`).
    """

    q_segment: jax.Array
    kv_segment: jax.Array
    kv_shared: jax.Array | None = None
    q_group: jax.Array | None = None
    kv_group: jax.Array | None = None
    q_offset: jax.Array | int = 0
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    lengths: jax.Array | None = None
    bias: jax.Array | None = None
    pairs: jax.Array | None = None

    @classmethod
    def right_padded(cls, lengths, t: int, causal: bool) -> "AttentionMask":
        """Row b's first lengths[b] of t slots are tokens (segment 1), the rest padding (0)."""
        segment = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.int32)
        return cls(q_segment=segment, kv_segment=segment, causal=causal, lengths=lengths.astype(jnp.int32))

    def dense(self) -> jax.Array:
        """[B, T, S] bool."""
        allowed = self.q_segment[:, :, None] == self.kv_segment[:, None, :]
        if self.kv_shared is not None:
            shared = self.kv_shared[:, None, :]
            if self.q_group is not None:
                shared &= self.q_group[:, :, None] == self.kv_group[:, None, :]
            allowed |= shared
        if self.causal:
            t, s = self.q_segment.shape[1], self.kv_segment.shape[1]
            allowed &= jnp.arange(s)[None, None, :] <= (self.q_offset + jnp.arange(t))[None, :, None]
        return allowed

    def prepare(self, implementation: str, dtype) -> "AttentionMask":
        """The mask with what `implementation` needs computed once (call it outside a layer loop)."""
        if implementation != "cudnn" or self.lengths is not None:
            return self
        bias = jnp.where(self.dense(), 0.0, _CUDNN_MASKED[jnp.dtype(dtype)]).astype(dtype)[:, None]
        return self.replace(bias=bias)


def padding_last(valid):
    """valid: [B, T] bool -> order [B, T] int32, a stable permutation of each row putting its tokens
    first and its padding last. Every layer but attention acts per token, and a causal mask over
    padding is, on the tokens, the causal mask of the tokens alone, so a decoder may run on rows
    taken in this order with `AttentionMask.right_padded(valid.sum(1), ...)` and put the outputs
    back (`jnp.argsort(order)`): exact for the tokens, any padding pattern."""
    return jnp.argsort(~valid, axis=1, stable=True).astype(jnp.int32)


def attend(q, k, v, mask: AttentionMask, implementation: str, dtype):
    """q [B, H, T, D], k / v [B, K, S, D] -> [B, H, T, D] in `dtype`. `implementation` resolved
    (not "auto"); see the module docstring."""
    if mask.pairs is not None and (implementation == "xla" or mask.kv_shared is not None):
        return _block_sparse(q, k, v, mask, dtype)
    if implementation == "pallas" and mask.kv_shared is None:
        return _splash(q, k, v, mask).astype(dtype)
    if implementation == "cudnn":
        return _cudnn(q, k, v, mask, dtype)
    return _xla(q, k, v, mask, dtype)


def _xla(q, k, v, mask: AttentionMask, dtype):
    t, s = q.shape[2], k.shape[2]
    if not (mask.causal and t == s and t % CAUSAL_BLOCK == 0 and t >= 2 * CAUSAL_BLOCK
            and isinstance(mask.q_offset, int) and mask.q_offset == 0):
        return attend_part(q, k, v, mask.dense()[:, None, None], dtype)[0]
    outs = []
    for start in range(0, t, CAUSAL_BLOCK):
        end = start + CAUSAL_BLOCK
        part = mask.replace(q_segment=mask.q_segment[:, start:end], kv_segment=mask.kv_segment[:, :end],
                            kv_shared=None if mask.kv_shared is None else mask.kv_shared[:, :end],
                            q_group=None if mask.q_group is None else mask.q_group[:, start:end],
                            kv_group=None if mask.kv_group is None else mask.kv_group[:, :end], q_offset=start)
        outs.append(attend_part(q[:, :, start:end], k[:, :, :end], v[:, :, :end], part.dense()[:, None, None],
                                dtype)[0])
    return jnp.concatenate(outs, axis=2)


def _block_sparse(q, k, v, mask: AttentionMask, dtype):
    """Self-attention over the block pairs of `mask.pairs` only: per pair the scores of a query
    block against a key block ([B, K, G, P, blk, blk], fp32), the mask inside it from the per-token
    vectors (`dense` of the pair's slots), and the softmax across a query's pairs with their
    row maxima and sums scattered to the query blocks; the values' products likewise, divided by
    the sum at the end. Exact: a key outside every pair has weight 0. FLOPs and score memory are
    P x blk^2 per head instead of T^2 (a packed row's groups and branches leave most blocks empty);
    a query that sees no key (padding) gets 0, not NaN."""
    b, h, t, d = q.shape
    kh = k.shape[1]
    blk = pair_block(t)
    nq = t // blk
    qi, ki = mask.pairs[..., 0], mask.pairs[..., 1]  # [B, P]
    live = qi < nq
    qc = jnp.minimum(qi, nq - 1)

    def take(x, i, axis):  # per row: x [B, ..., N (at axis + 1), ...] at the pairs' blocks i [B, P]
        return jax.vmap(lambda y, j: jnp.take(y, j, axis=axis))(x, i)

    def blocks(x, i):  # [B, T] -> [B * P, blk] of the pairs' blocks
        return None if x is None else take(x.reshape(b, nq, blk), i, 0).reshape(-1, blk)

    inner = AttentionMask(q_segment=blocks(mask.q_segment, qc), kv_segment=blocks(mask.kv_segment, ki),
                          kv_shared=blocks(mask.kv_shared, ki), q_group=blocks(mask.q_group, qc),
                          kv_group=blocks(mask.kv_group, ki)).dense().reshape(b, -1, blk, blk)
    if mask.causal:
        inner &= (qi[..., None, None] * blk + jnp.arange(blk)[:, None]) >= (ki[..., None, None] * blk + jnp.arange(blk))
    allowed = (inner & live[..., None, None])[:, None, None]  # [B, 1, 1, P, blk, blk]
    qb = q.reshape(b, kh, h // kh, nq, blk, d)
    kb, vb = (x.reshape(b, kh, nq, blk, d) for x in (k, v))
    qg = take(qb, qc, 2)  # [B, K, G, P, blk, D]
    kg, vg = (take(x, ki, 1) for x in (kb, vb))  # [B, K, P, blk, D]
    low = jnp.finfo(jnp.float32).min
    scores = jnp.einsum("bkgpqd,bkpsd->bkgpqs", qg, kg, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(allowed, scores, low)
    scatter = lambda init, x, op: jax.vmap(  # noqa: E731  (per row: pairs' [K, G, P, ...] onto query blocks)
        lambda z, u, i: getattr(z.at[:, :, i], op)(u, mode="drop"))(init, x, qi)
    shape = (b, kh, h // kh, nq, blk)
    top = jax.lax.stop_gradient(scatter(jnp.full(shape, low), scores.max(-1), "max"))
    top = take(top, qc, 2)  # [B, K, G, P, blk]
    weights = jnp.where(allowed, jnp.exp(scores - top[..., None]), 0.0)
    total = scatter(jnp.zeros(shape, jnp.float32), weights.sum(-1), "add")
    out = jnp.einsum("bkgpqs,bkpsd->bkgpqd", weights.astype(dtype), vg.astype(dtype),
                     preferred_element_type=jnp.float32)
    out = scatter(jnp.zeros(shape + (d,), jnp.float32), out, "add")
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    return out.reshape(b, h, t, d).astype(dtype)


def attend_part(q, k, v, allowed, dtype):
    """Attention of q over one set of keys, with what it takes to merge it with attention over
    other, disjoint sets of keys (`merge_parts`): a prompt's keys read once for a group's
    samples and each sample's own keys, or a cache read in chunks.

    q [B, H, T, D]; k, v [B, K, S, D]; allowed: bool, broadcastable to [B, K, G, T, S] (G = H // K,
    query head k * G + g). Returns (out [B, H, T, D] in `dtype`, softmax-normalised over this
    part's keys; lse [B, H, T] float32, the log-sum-exp of the scaled scores). Scores and softmax
    in fp32 as transformers' eager path; a query that sees no key here gets a finite lse about
    float32's minimum, which takes no weight next to a part where it sees one."""
    b, h, t, d = q.shape
    kh = k.shape[1]
    q = q.reshape(b, kh, h // kh, t, d)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v.astype(dtype)).reshape(b, h, t, d)
    # Unused (and dropped by XLA) where the caller takes `out` alone, as `_xla` does.
    return out, jax.nn.logsumexp(scores, axis=-1).reshape(b, h, t)


def merge_parts(parts, dtype):
    """The attention over the union of disjoint key sets from each set's `attend_part`
    (out [..., D], lse [...]) pairs: sum_i out_i * exp(lse_i - lse), lse = logsumexp_i lse_i.
    Exact up to rounding; one part is returned as it is."""
    if len(parts) == 1:
        return parts[0][0].astype(dtype)
    lse = jnp.stack([p[1] for p in parts])
    weights = jnp.exp(lse - jnp.max(lse, axis=0))
    weights = weights / jnp.sum(weights, axis=0)
    return sum(p[0].astype(jnp.float32) * w[..., None] for p, w in zip(parts, weights)).astype(dtype)


@flax.struct.dataclass
class SharedPrefixMask:
    """What a decode step over a `models.qwen2.SharedPrefixCache` sees: a group's prompt keys,
    stored once for the group's samples, and each row's own response keys written so far.

    Rows and groups are laid out per shard, `shards` blocks of rows [S, r] and of groups [S, g]
    (flattened to R = S * r and G = S * g), and a row's group is in its own block: the scatter of
    queries to groups and back never crosses a shard of a data-parallel mesh.
    prompt_mask: [G, T] bool, the prompt slots holding real tokens; group: [R] int32, the row's
    group within its block (>= g for a row whose group was dropped: a finished row kept as bucket
    padding); member: [R] int32, the row's query slot in its group (0 .. width - 1, unique within
    a group); index: [] int32, the response slot the step writes (the same for every row: all rows
    start their responses together). width, shards: static."""

    prompt_mask: jax.Array
    group: jax.Array
    member: jax.Array
    index: jax.Array
    width: int = flax.struct.field(pytree_node=False, default=1)
    shards: int = flax.struct.field(pytree_node=False, default=1)


def attend_shared_prefix(q, prompt_k, prompt_v, k, v, mask: SharedPrefixMask, dtype):
    """One decode query per row over its group's prompt keys and its own response keys so far.

    q [R, H, 1, D]; prompt_k / prompt_v [G, K, T, D]; k / v [R, K, S, D] (slots > mask.index are not
    read into the result). The prompt part runs per group with the group's rows as its queries
    ([G, H, width, D]: each prompt key read once per group, not once per row), the response part per
    row; `merge_parts` joins them. -> [R, H, 1, D] in `dtype`."""
    r, h, _, d = q.shape
    s, w = mask.shards, mask.width
    g = prompt_k.shape[0] // s
    slot = (mask.group * w + mask.member).reshape(s, r // s)
    per_shard = q[:, :, 0].reshape(s, r // s, h, d)
    grouped = jax.vmap(lambda x, i: jnp.zeros((g * w, h, d), x.dtype).at[i].set(x, mode="drop"))(per_shard, slot)
    grouped = grouped.reshape(s * g, w, h, d).transpose(0, 2, 1, 3)
    out, lse = attend_part(grouped, prompt_k, prompt_v, mask.prompt_mask[:, None, None, None, :], dtype)
    back = lambda x, i: jnp.take(x, i, axis=0, mode="fill", fill_value=0)  # noqa: E731
    out = jax.vmap(back)(out.transpose(0, 2, 1, 3).reshape(s, g * w, h, d), slot).reshape(r, h, 1, d)
    lse = jax.vmap(back)(lse.transpose(0, 2, 1).reshape(s, g * w, h), slot).reshape(r, h, 1)
    own = attend_part(q, k, v, (jnp.arange(k.shape[2]) <= mask.index)[None, None, None, None, :], dtype)
    return merge_parts([(out, lse), own], dtype)


def _cudnn(q, k, v, mask: AttentionMask, dtype):
    mask = mask.prepare("cudnn", dtype) if mask.bias is None else mask
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    t, s = q.shape[2], k.shape[2]
    bias = mask.bias
    if t % 2 or s % 2:
        # cuDNN's backward takes even lengths only: one more query (its row is dropped) and one
        # more key, masked by the bias for every query, or outside every row's length.
        q = jnp.pad(q, ((0, 0), (0, 0), (0, t % 2), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, s % 2), (0, 0))) for x in (k, v))
        if bias is not None:
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, t % 2), (0, 0)))
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, s % 2)), constant_values=_CUDNN_MASKED[jnp.dtype(dtype)])
    return _cudnn_fused(q, k, v, bias, mask.lengths, mask.causal)[:, :, :t]


def _cudnn_fused(q, k, v, bias, lengths, causal: bool):
    """cuDNN flash attention on q [B, H, T, D], k / v [B, K, S, D] (its BNTH layout: no transposes).

    Called below `jax.nn.dot_product_attention` (JAX's internal `_dot_product_attention`, checked
    by the lowering tests in tests/test_accelerator_lowering.py) for one reason: the public
    function always asks the backward for the bias's gradient, a [B, 1, T, S] tensor per layer
    that nothing reads (and that older JAX refuses for B > 1); here the bias is a constant.
    Lengths (per row, queries and keys alike) and causality are cuDNN mask types."""
    kinds = cudnn_fmha.MaskType
    padded = lengths is not None
    mask_type = {(False, False): kinds.NO_MASK, (True, False): kinds.CAUSAL,
                 (False, True): kinds.PADDING, (True, True): kinds.PADDING_CAUSAL}[(causal, padded)]
    unused = jnp.zeros(0, q.dtype)
    return cudnn_fmha._dot_product_attention(
        q, k, v, unused if bias is None else bias, lengths if padded else unused, lengths if padded else unused,
        unused, unused, unused, unused,  # segment offsets and page tables: not used
        # scale, dropout seed and rate, (has a bias, returns its gradient), mask type, layout,
        # sliding window, cuDNN version, return the softmax residual
        q.shape[-1] ** -0.5, 0, 0.0, (bias is not None, False), mask_type, cudnn_fmha.AttentionLayout.BNTH.value,
        None, cudnn_fmha.check_cudnn_version(), False)


def _splash(q, k, v, mask: AttentionMask):
    """Splash attention on [B, H, T, D] / [B, K, S, D]; per shard under a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return _splash_local(q, k, v, mask.q_segment, mask.kv_segment, mask.causal)
    spec = functools.partial(logical_spec, mesh=mesh, rules=rules)
    q_spec = spec(("batch", "q_heads", None, None), q.shape)
    kv_spec = spec(("batch", "kv_heads", None, None), k.shape)
    # GQA groups must stay whole on a shard: heads split only where both head counts divide.
    if (q_spec[1] is None) != (kv_spec[1] is None):
        q_spec, kv_spec = (jax.sharding.PartitionSpec(s[0], None, None, None) for s in (q_spec, kv_spec))
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    fn = functools.partial(_splash_local, causal=mask.causal)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, mask.q_segment, mask.kv_segment)


def _splash_local(q, k, v, q_segment, kv_segment, causal: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, h, t, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = h // kh
    # Blocks of 128 along T, S and D: padded queries and keys get segment -1 (they see each other
    # only), zero-padded head dims leave q.k and the sliced output unchanged.
    tp, sp, dp = (-(-n // _SPLASH_BLOCK) * _SPLASH_BLOCK for n in (t, s, d))

    def pad(x, n, axis):
        return jnp.pad(x, [(0, n - x.shape[axis]) if i == axis else (0, 0) for i in range(x.ndim)])

    q = pad(pad(q * (d ** -0.5), tp, 2), dp, 3).reshape(b, kh, g, tp, dp)
    k, v = (pad(pad(x, sp, 2), dp, 3) for x in (k, v))
    q_seg = jnp.pad(q_segment, ((0, 0), (0, tp - t)), constant_values=-1)
    kv_seg = jnp.pad(kv_segment, ((0, 0), (0, sp - s)), constant_values=-1)
    base = sm.CausalMask((tp, sp)) if causal else sm.FullMask((tp, sp))
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([base] * g),
                                              interpret=jax.default_backend() != "tpu")
    one_group = lambda qg, kg, vg, seg: kernel(qg, kg, vg, segment_ids=seg)  # noqa: E731
    per_row = jax.vmap(one_group, in_axes=(0, 0, 0, None))  # over KV heads
    out = jax.vmap(per_row)(q, k, v, sk.SegmentIds(q=q_seg, kv=kv_seg))
    return out.reshape(b, h, tp, dp)[:, :, :t, :d]

