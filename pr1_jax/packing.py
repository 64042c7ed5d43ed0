"""The learner's packed layout: the real tokens of a step's learner batch laid out in rows of a
token budget, so that the update pays for the tokens that carry information, not for the longest
response times the batch.

Host side (numpy), from the per-sequence `LearnerBatch` of `pr1_jax.rollout` (any response
bucket: its padding is dropped here). Two modes (`LearnerConfig.packing`):

- "groups": a chunk is one prompt followed by its samples' responses as branches (each response
  attends to the prompt and to itself, `models.qwen2.Qwen2Decoder`'s branches), so the prompt's
  tokens are computed once per group; a group that does not fit one row's free space is split
  into several chunks, each with its own copy of the prompt.
- "sequences": a chunk is one prompt and one response (the prompt repeated per sample), plain
  segments: the layout verl / MaxText pack, and the one TPU splash attention runs (no shared keys).

Chunks fill rows of `row_tokens` tokens best-fit (`place`; a token of one chunk never sees
another chunk's: `groups` ids). A token sees its prompt and its own response so far, a few
contiguous ranges of the row: the attention computes only the blocks of
`models.attention.pair_block(row_tokens)` slots that hold them (`block_pairs`, the batch's
`pairs`; P = `micro_bucket` of the most pairs a row needs), not the row's whole causal square.
The rows are dealt to the data shards in turn and each shard gets the same number of rows
(`plan`: a bounded set of counts, `micro_bucket`), so the update compiles for few shapes;
micro-batch j of the update takes row j of every shard (`pr1_jax.learner.split_micro_batches`),
i.e. `row_tokens` tokens per device per micro-batch.

The packed batch (W rows = micro-batches x shards, L = row_tokens; host numpy, every array's
batch axis first but positions'):

=================  ======================  =======  ===============================================
field              shape                   dtype    meaning
=================  ======================  =======  ===============================================
input_ids          [W, L]                  int32    chunks one after the other, 0 after the last
attention_mask     [W, L]                  int32    1 on real tokens
positions          [3, W, L] or [W, L]     int32    each token's position in its own sequence (the
                                                    per-sequence batch's), 0 on padding
groups             [W, L]                  int32    chunk id within the row (1, 2, ...), 0 padding
branches           [W, L]                  int32    0 on the prompt, k on the chunk's k-th response
                                                    ("groups"; None with "sequences": plain segments)
sources            [W, L]                  int32    the row slot whose hidden state predicts this
                                                    token (the previous slot, or the prompt's last
                                                    for a response's first token)
response_mask      [W, L]                  int32    1 on response tokens (the loss's tokens)
old_logprobs       [W, L]                  float32  the sampler's log-probs, 0 elsewhere
advantages         [W, L]                  float32  the sequence's advantage on its tokens (or None)
ref_logprobs       [W, L]                  float32  None, or the reference policy's (KL term)
sequence           [W, L]                  int32    the token's row in the per-sequence batch
                                                    (this process's), -1 on prompts and padding
image_index        [W, L]                  int32    slot k: index into the [G * M] flattened
                                                    features of the row's k-th image token
pairs              [W, P, 2]               int32    the (query block, key block) pairs holding
                                                    every token's keys (`block_pairs`), padded
                                                    with (L // block, 0)
vision             VisionInputs | None              the per-sequence batch's G vision groups as
                                                    they are (the tower runs once per group)
=================  ======================  =======  ===============================================
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import flax.struct
import numpy as np

from models.attention import pair_block
from models.config import ModelConfig
from models.vision import VisionInputs

PackingMode = Literal["groups", "sequences", "off"]


@flax.struct.dataclass
class PackedBatch:
    input_ids: Any
    attention_mask: Any
    positions: Any
    groups: Any
    sources: Any
    response_mask: Any
    old_logprobs: Any
    sequence: Any
    image_index: Any
    pairs: Any
    branches: Any = None
    advantages: Any = None
    ref_logprobs: Any = None
    vision: VisionInputs | None = None

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


def micro_bucket(k: int) -> int:
    """k rounded up to a number with at most 4 significant bits (1..16, 18, 20, ..., 32, 36, ...):
    at most 1/8 more micro-batches than needed, and 8 compiled counts per doubling."""
    if k <= 16:
        return max(k, 1)
    step = 1 << (k.bit_length() - 4)
    return -(-k // step) * step


def place(prompt_lengths, response_lengths, n: int, mode: PackingMode, row_tokens: int
          ) -> list[list[tuple[int, list[int]]]]:
    """The rows: each a list of chunks (prompt b, [its sequences' rows i]) of at most row_tokens
    tokens in all. Best fit, groups largest first and each group's responses longest first: a
    response joins a row that holds its prompt already ("groups"), else the fullest row with room
    for it and a copy of its prompt, else a new row. Responses of length 0 (filler prompts, rows
    skipped) carry no loss and are left out, and so is a prompt with none."""
    rows: list[list[tuple[int, list[int]]]] = []
    free: list[int] = []
    totals = [prompt_lengths[b] + sum(response_lengths[b * n:(b + 1) * n]) for b in range(len(prompt_lengths))]
    for b in sorted(range(len(prompt_lengths)), key=lambda b: -totals[b]):
        p = int(prompt_lengths[b])
        held: dict[int, list[int]] = {}  # row -> this prompt's chunk there
        for i in sorted(range(b * n, (b + 1) * n), key=lambda i: -response_lengths[i]):
            m = int(response_lengths[i])
            if m == 0:
                continue
            if p + m > row_tokens:
                raise ValueError(f"max_tokens_per_micro_batch={row_tokens} cannot hold prompt {b} ({p} tokens) "
                                 f"and its response of {m}")
            shared = [r for r in held if free[r] >= m] if mode == "groups" else []
            if shared:
                r = min(shared, key=lambda r: free[r])
                held[r].append(i)
                free[r] -= m
                continue
            fits = [r for r, f in enumerate(free) if f >= p + m]
            if fits:
                r = min(fits, key=lambda r: free[r])
            else:
                rows.append([])
                free.append(row_tokens)
                r = len(rows) - 1
            rows[r].append((b, [i]))
            held[r] = rows[r][-1][1]
            free[r] -= p + m
    return rows


def row_chunks(row, prompt_lengths, response_lengths) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """Where `pack` lays out a row of `place`: per chunk ((prompt start, end), [(start, end) of
    each response]), slots of the row, the chunks one after the other."""
    at, out = 0, []
    for b, seqs in row:
        prompt = (at, at + int(prompt_lengths[b]))
        at = prompt[1]
        responses = []
        for i in seqs:
            responses.append((at, at + int(response_lengths[i])))
            at = responses[-1][1]
        out.append((prompt, responses))
    return out


def block_pairs(chunks, block: int) -> np.ndarray:
    """[P, 2] int32, sorted: the (query block, key block) pairs of blocks of `block` slots that
    hold every (token, key it sees) of a row laid out as `chunks` (`row_chunks`): a prompt token
    sees its prompt up to itself, a response token its prompt and its response up to itself."""
    pairs = set()

    def span(a, b):  # the blocks of slots a .. b - 1
        return range(a // block, (b - 1) // block + 1)

    for prompt, responses in chunks:
        for (start, end), shared in [(prompt, None)] + [(r, prompt) for r in responses]:
            if end <= start:
                continue
            for qb in span(start, end):
                seen = list(span(start, min(end, (qb + 1) * block)))
                if shared is not None:
                    seen += span(*shared)
                pairs.update((qb, kb) for kb in seen)
    return np.array(sorted(pairs), np.int32).reshape(-1, 2)


def _lengths(batch):
    r = batch.response_mask.shape[1]
    t = batch.input_ids.shape[1] - r
    prompt_mask = np.asarray(batch.attention_mask)[:, :t].astype(bool)
    return t, prompt_mask, np.asarray(batch.response_mask).astype(bool).sum(-1)


class Plan(NamedTuple):
    """A batch's packing (`plan`): the rows of `place`, each row's `block_pairs`, and the counts the
    update compiles for: micro-batches (`micro_bucket` of the rows per shard) and block pairs per
    row (`micro_bucket` of the most a row needs). With several processes, `pack` takes the largest
    counts of them all."""

    rows: list[list[tuple[int, list[int]]]]
    pairs: list[np.ndarray]
    num_micro: int
    num_pairs: int


def layout(prompt_lengths, response_lengths, n: int, mode: PackingMode, row_tokens: int
           ) -> tuple[list[list[tuple[int, list[int]]]], list[np.ndarray]]:
    """(the rows of `place`, each row's `block_pairs` in blocks of `pair_block(row_tokens)`)."""
    rows = place(prompt_lengths, response_lengths, n, mode, row_tokens)
    block = pair_block(row_tokens)
    return rows, [block_pairs(row_chunks(row, prompt_lengths, response_lengths), block) for row in rows]


def plan(batch, n: int, mode: PackingMode, row_tokens: int, shards: int = 1) -> Plan:
    """The `Plan` of a per-sequence batch for `shards` data shards."""
    _, prompt_mask, resp_len = _lengths(batch)
    rows, pairs = layout(prompt_mask[::n].sum(-1), resp_len, n, mode, row_tokens)
    return Plan(rows, pairs, micro_bucket(-(-len(rows) // shards)), micro_bucket(max(map(len, pairs), default=1)))


def pack(config: ModelConfig, batch, n: int, mode: PackingMode, row_tokens: int, shards: int = 1,
         num_micro: int | None = None, first_group: int = 0, num_pairs: int | None = None,
         planned: Plan | None = None) -> PackedBatch:
    """The packed batch (module docstring) of a per-sequence `LearnerBatch` of B prompts x n
    samples, for `shards` data shards of this process's rows. num_micro: rows per shard, num_pairs:
    block pairs per row (default this batch's `plan`; pass the largest over processes so that
    every process packs the same shape). first_group: the global index of this process's first
    vision group (multi-host: the global batch stacks the processes' groups). planned: this
    batch's `plan`, where the caller made it already."""
    if mode not in ("groups", "sequences"):
        raise ValueError(f"packing {mode!r}: pack takes 'groups' or 'sequences'")
    rows, row_pairs, need, need_pairs = plan(batch, n, mode, row_tokens, shards) if planned is None else planned
    num_micro = need if num_micro is None else num_micro
    num_pairs = need_pairs if num_pairs is None else num_pairs
    if num_micro < -(-len(rows) // shards):
        raise ValueError(f"num_micro={num_micro} rows per shard cannot hold this batch's {len(rows)} rows")
    t, prompt_mask, resp_len = _lengths(batch)
    prompt_len = prompt_mask[::n].sum(-1)
    ids, pos = np.asarray(batch.input_ids), np.asarray(batch.positions)
    rmask = np.asarray(batch.response_mask).astype(bool)
    old = np.asarray(batch.old_logprobs)
    adv = None if batch.advantages is None else np.asarray(batch.advantages)
    ref = None if batch.ref_logprobs is None else np.asarray(batch.ref_logprobs)
    num = rmask.shape[0]
    groups_total = 1 if batch.vision is None else batch.vision.pixel_values.shape[0]
    per_group = 0 if batch.vision is None else batch.vision.unperm.shape[1]  # features per group (M)
    w, length = num_micro * shards, row_tokens
    zeros = lambda dtype: np.zeros((w, length), dtype)  # noqa: E731
    out = dict(input_ids=zeros(np.int32), attention_mask=zeros(np.int32), groups=zeros(np.int32),
               branches=zeros(np.int32), sources=zeros(np.int32), response_mask=zeros(np.int32),
               old_logprobs=zeros(np.float32), sequence=np.full((w, length), -1, np.int32),
               image_index=zeros(np.int32), advantages=None if adv is None else zeros(np.float32),
               ref_logprobs=None if ref is None else zeros(np.float32))
    positions = np.zeros(pos.shape[:-2] + (w, length), np.int32)
    out["pairs"] = np.tile(np.array([length // pair_block(length), 0], np.int32), (w, num_pairs, 1))
    for k, (row, pairs) in enumerate(zip(rows, row_pairs)):
        r = (k % shards) * num_micro + k // shards  # rows dealt to the shards in turn
        images, chunks = [], row_chunks(row, prompt_len, resp_len)
        if len(pairs) > num_pairs:
            raise ValueError(f"num_pairs={num_pairs} cannot hold row {k}'s {len(pairs)} block pairs")
        out["pairs"][r, :len(pairs)] = pairs
        for g, ((b, seqs), ((at, prompt_end), spans)) in enumerate(zip(row, chunks), start=1):
            first = b * n
            keep = np.flatnonzero(prompt_mask[first])
            sl = slice(at, prompt_end)
            out["input_ids"][r, sl] = ids[first, keep]
            positions[..., r, sl] = pos[..., first, keep]
            out["groups"][r, sl] = g
            out["sources"][r, sl] = np.arange(at - 1, prompt_end - 1)
            group = first_group + first * groups_total // num
            images.extend(group * per_group + np.arange(int((ids[first, keep] == config.image_token_id).sum())))
            for branch, (i, (at, end)) in enumerate(zip(seqs, spans), start=1):
                m = end - at
                sl = slice(at, end)
                out["input_ids"][r, sl] = ids[i, t:t + m]
                positions[..., r, sl] = pos[..., i, t:t + m]
                out["groups"][r, sl] = g
                out["branches"][r, sl] = branch
                out["sources"][r, sl] = np.concatenate([[prompt_end - 1], np.arange(at, end - 1)])
                out["response_mask"][r, sl] = 1
                out["old_logprobs"][r, sl] = old[i, :m]
                out["sequence"][r, sl] = i
                if adv is not None:
                    out["advantages"][r, sl] = adv[i]
                if ref is not None:
                    out["ref_logprobs"][r, sl] = ref[i, :m]
        prompt, spans = chunks[-1]
        out["attention_mask"][r, :(spans[-1] if spans else prompt)[1]] = 1
        out["image_index"][r, :len(images)] = images
    out["sources"] = np.maximum(out["sources"], 0)
    if mode == "sequences":
        out["branches"] = None
    return PackedBatch(positions=positions, vision=batch.vision, **out)


def unpack(packed: PackedBatch, values, shape: tuple[int, int]) -> np.ndarray:
    """Per-token values [W, L] of the packed batch's responses back in the per-sequence layout
    [N, R] (0 past each response): to compare the two layouts, or to hand packed log-probs to a
    consumer of the per-sequence batch."""
    seq = np.asarray(packed.sequence)
    resp = np.asarray(packed.response_mask).astype(bool)
    values = np.asarray(values)
    out = np.zeros(shape, values.dtype)
    rows, cols = np.nonzero(resp)
    order = np.lexsort((cols, rows))  # row-major: a sequence's tokens come in order
    rows, cols = rows[order], cols[order]
    index = np.zeros(shape[0], np.int64)
    for r, c in zip(rows, cols):
        i = seq[r, c]
        out[i, index[i]] = values[r, c]
        index[i] += 1
    return out
