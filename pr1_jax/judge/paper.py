"""The paper's judge (`JudgeConfig.prompt = "paper"`): the reference's few-shot prompt, one question
per response, and its `<infoK>` verdicts read in-graph by a constrained decode.

The reference (Perception-R1, `verl/utils/reward_score/math_with_visual.py`) sends the judge, for
every response whose record has annotations, the messages

    system  judge_system_prompt    the task and three worked examples (~1.3k Qwen2 tokens)
    user    judge_user_template.format(visual_key_info=<the record's annotation string as stored>,
                                       response=<the decoded response>)

(texts in `pr1_jax/reference/perception_r1_prompts.json`), generates greedily (<= 512 tokens) and
parses `<info1>1</info1>\\n<info2>0</info2>...`: each tag's text as a float clamped to [0, 1] (0 if
not a number), reward = sum / (number of tags + 1e-6).

The prompt here: the same messages, rendered by the judge tokenizer's chat template with the
generation prompt. The user turn is `str.format` of the template, as the reference's (braces in
the annotation string or the response are text). The annotation string is the record's stored
text, verbatim (`Record.annotations_text`); a record that stored a list (JSONL sources) would
reach the reference's `format` as a Python list repr (`['AB = 3.', ...]`, no tags for the judge to
answer in), so it is given in the paper's storage format instead
(`pr1_jax.data.annotations.to_tagged_text`). K, the tags read, is the number of annotations
`parse_annotations` finds in that string (at most `JudgeConfig.max_annotations`). Token ids:

    system_ids                                        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n
    plain(user text) + tail_ids + segment 1           {user text}<|im_end|>\\n<|im_start|>assistant\\n<info1>

The system turn (up to the user content) is tokenized once; the user text in one piece, with
`split_special_tokens=True`: token for token the reference's tokenization of the rendered prompt
(the boundaries are turn markers, which BPE never merges across; the prompt test checks it),
except where a response holds special-token text such as "<|im_end|>": the reference's judge
would read a turn marker there, ours reads text, so a policy cannot close the judge's turn.

The verdicts: the answer skeleton `<info1>d</info1>\\n<info2>d</info2>\\n...<infoK>d` is forced
token by token, segment k being the text before digit k (`<info1>`, then `</info{k-1}>\\n<info{k}>`),
and each digit d is chosen between the "0" and "1" tokens by their logits, as the judge would
write it greedily (hard: "1" iff its logit is larger, a tie is "0" like greedy argmax, which takes
the lower id; soft: P("1") renormalised over {"0", "1"}). The chosen digit (always the hard
choice: the judge decodes greedily) is fed back, so digit k is read after the judge's own
earlier verdicts. The construction checks that "0" and "1" are single tokens and that the
tokenizer splits the skeleton text into exactly these segments and digits (Qwen2's pre-tokenizer
makes every digit its own piece). Reward = sum of the K verdicts / (K + 1e-6), clamped to [0, 1].

What the constraint changes against the reference's free generation, for a judge that would
- write something else at a digit ("0.5", " 1", "yes", text): the reference reads 0.5 / 1 / 0
  (not a number), ours the likelier of "0" and "1" at that point;
- skip, repeat, reorder or add tags, or stop before K: the reference averages over the tags
  its regex finds (`<info1>`, `<info2>`, ... until the first index missing, each read at its last
  occurrence); ours always reads exactly K, in order;
- write text before the tags (e.g. "Judgement: ", the lead-in of the prompt's own examples, or
  reasoning): ours forces `<info1>` right after the generation prompt, so the digits are read in a
  context without that text.
When the judge's greedy text is the skeleton, both ways give the same verdicts, digit for digit
(tests/test_judge_paper.py measures how often a tiny judge's generations follow it).

Cost. The system turn is the same for every response: each device call prefills it once (one
row), repeats its KV cache to the rows (the cache buffers the rows need anyway), and each row
computes only its own tokens, attending to that prefix; then K - 1 cache extensions of one
segment each ([previous digit, segment k], left-padded to the longest: C <= 11 tokens for
K <= 16 with Qwen2's tokenizer). The LM head reads only the two digit columns. The rows' own tokens go
through the decoder's cache path (`QwenCausalLM.decode`, "xla" attention: scores
[B, H, T, S + T + (K - 1) C] per layer), the system turn through the prefill path.

Limits: a response is cut (keeping its start) to `max_response_tokens` and so that its row fits
the largest length bucket, counted as truncated. The annotation string is the record's and is
quoted whole: one that does not fit the largest bucket even with an empty response is not judged
(its annotations counted as dropped; reward 0, has_visual False), and annotations beyond the
largest annotation bucket stay in the quoted string but are not read (counted as dropped).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from models.causal_lm import QwenCausalLM
from models.qwen2 import KVCache
from pr1_jax.data.annotations import parse_annotations, to_tagged_text
from pr1_jax.judge.common import (JudgeConfig, JudgeOutput, answer_pair, judge_output, plan_chunks,
                                  render_chat, resolve_token_ids, tokenize)
from pr1_jax.reference import prompts
from pr1_jax.sharding import activation_sharding, sharding_for

REFERENCE_EPS = 1e-6  # the reference's sum / (count + 1e-6)
DIGITS = ("0", "1")

_KEY_INFO_SENTINEL = "\uE000PR1_JUDGE_KEY_INFO\uE001"
_RESPONSE_SENTINEL = "\uE000PR1_JUDGE_RESPONSE\uE001"
_USER_SENTINEL = "\uE000PR1_JUDGE_USER\uE001"


# ---- prompt and skeleton -----------------------------------------------------------------------

def reference_reward(text: str) -> float:
    """The reference's reading of a judge's generated text (`judge_output_pattern` in the prompts
    file): `<info1>`, `<info2>`, ... until the first index missing, each tag's text at its last
    occurrence as a float clamped to [0, 1] (0 if not a number); sum / (count + 1e-6). What our
    in-graph verdicts are checked against (tests, bench/judge.py); training never parses text."""
    scores, idx = [], 1
    while (m := re.search(rf".*<info{idx}>(.+?)</info{idx}>", text, flags=re.MULTILINE | re.DOTALL)) is not None:
        try:
            score = float(m.group(1))
        except ValueError:
            score = 0.0
        scores.append(max(0.0, min(1.0, score)))
        idx += 1
    return sum(scores) / (len(scores) + REFERENCE_EPS)


def skeleton_text(digits: Sequence[str], close: bool = True) -> str:
    """The judge's answer in the reference's format: `<info1>d1</info1>\\n<info2>d2</info2>...`
    (without the last closing tag when `close` is False: where the forced decode stops)."""
    text = "\n".join(f"<info{k}>{d}</info{k}>" for k, d in enumerate(digits, start=1))
    return text if close else text[:-len(f"</info{len(digits)}>")]


def segment_text(k: int) -> str:
    """The skeleton text before digit k (1-based)."""
    return "<info1>" if k == 1 else f"</info{k - 1}>\n<info{k}>"


def key_info(annotations) -> tuple[str, list[str]]:
    """(the annotation string the judge is shown, the annotations in it) of one record's
    annotations as given to the judge: the stored text, or a list (see the module docstring)."""
    if isinstance(annotations, str):
        return annotations, parse_annotations(annotations)
    items = list(annotations or [])
    return to_tagged_text(items), items


@dataclasses.dataclass(frozen=True)
class PaperPrompt:
    """The constant pieces of the paper judge's prompt and answer (see the module docstring).

    system_ids: the chat template up to the user content (shared by every row);
    user_parts: the user template's text before {visual_key_info}, between it and {response},
        and after {response};
    tail_ids: the end of the user turn and the generation prompt;
    segments: segments[k - 1] = ids of `segment_text(k)`, k = 1..max_annotations;
    digit_ids: the ids of "0" and "1".
    """

    system_ids: tuple[int, ...]
    user_parts: tuple[str, str, str]
    tail_ids: tuple[int, ...]
    segments: tuple[tuple[int, ...], ...]
    digit_ids: tuple[int, int]

    def user_text(self, key_info_text: str, response: str) -> str:
        """`judge_user_template.format(visual_key_info=..., response=...)`."""
        before, between, after = self.user_parts
        return before + key_info_text + between + response + after

    def skeleton_ids(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The forced steps after the first digit for K = k: (chunks [k - 1, C] int32, lengths
        [k - 1] int32). Step j (digit j + 1) feeds [digit j, segment j + 1] left-padded to C:
        slot C - lengths[j] holds a placeholder for the digit chosen before it."""
        segs = self.segments[1:k]
        c = 1 + max((len(s) for s in segs), default=0)
        chunks = np.zeros((len(segs), c), np.int32)
        for j, s in enumerate(segs):
            chunks[j, c - len(s):] = s
        return chunks, np.array([1 + len(s) for s in segs], np.int32)


def paper_prompt(tokenizer, max_annotations: int, vocab_size: int | None = None) -> PaperPrompt:
    """The reference's messages rendered with `tokenizer`'s chat template, split at the user
    content; a clear error when the template or the tokenizer does not allow the forced decode."""
    ref = prompts()
    user = ref["judge_user_template"].format(visual_key_info=_KEY_INFO_SENTINEL, response=_RESPONSE_SENTINEL)
    before, rest = user.split(_KEY_INFO_SENTINEL)
    between, after = rest.split(_RESPONSE_SENTINEL)
    messages = [{"role": "system", "content": ref["judge_system_prompt"]}, {"role": "user", "content": _USER_SENTINEL}]
    text = render_chat(tokenizer, messages)
    if text.count(_USER_SENTINEL) != 1:
        raise ValueError("the judge chat template did not keep the user content verbatim; cannot split the prompt")
    head, tail = text.split(_USER_SENTINEL)
    digit_ids = resolve_token_ids(tokenizer, DIGITS, vocab_size)
    segments = tuple(tuple(tokenize(tokenizer, segment_text(k), plain=True)) for k in range(1, max_annotations + 1))
    for d in range(2):
        want = [t for seg in segments for t in (*seg, digit_ids[d])]
        got = tokenize(tokenizer, skeleton_text([DIGITS[d]] * max_annotations, close=False), plain=True)
        if got != want:
            raise ValueError("the judge tokenizer does not split the answer skeleton "
                             f"{skeleton_text([DIGITS[d]] * 2)!r} into its tags and single-token digits "
                             f"(got {tokenizer.convert_ids_to_tokens(got[:12])}...); the paper prompt's "
                             "constrained decode needs a tokenizer that splits digits (as Qwen2's does)")
    return PaperPrompt(system_ids=tuple(tokenize(tokenizer, head, plain=False)), user_parts=(before, between, after),
                       tail_ids=tuple(tokenize(tokenizer, tail, plain=False)), segments=segments,
                       digit_ids=digit_ids)


def render_messages(key_info_text: str, response: str) -> list[dict]:
    """The reference's chat messages for one response (for checks: the judge never renders them)."""
    ref = prompts()
    return [{"role": "system", "content": ref["judge_system_prompt"]},
            {"role": "user", "content": ref["judge_user_template"].format(visual_key_info=key_info_text,
                                                                          response=response)}]


# ---- host-side batch --------------------------------------------------------------------------

@flax.struct.dataclass
class PaperBatch:
    """One device batch (numpy on the host, device arrays once placed).

    input_ids, attention_mask: [B, T] int32, each row's own tokens (after the shared system
        turn), right-padded (mask 0); rows beyond the real ones are all padding;
    last: [B] int32, the index of each row's last token (where digit 1 is read);
    valid: [B, K] bool, the digits read (k < the row's K).
    """

    input_ids: Any
    attention_mask: Any
    last: Any
    valid: Any


@dataclasses.dataclass
class PaperRow:
    """One response's own tokens (after the shared system turn) and its number of digits to read;
    `source` is its index in the caller's list."""

    source: int
    ids: list[int]
    k: int


def pack_rows(rows: Sequence[PaperRow], length: int, k: int, num_rows: int) -> PaperBatch:
    """The rows right-padded to `length`, numpy; rows beyond `rows` are all padding."""
    ids = np.zeros((num_rows, length), np.int32)
    mask = np.zeros((num_rows, length), np.int32)
    last = np.zeros(num_rows, np.int32)
    valid = np.zeros((num_rows, k), bool)
    for r, row in enumerate(rows):
        if len(row.ids) > length or row.k > k:
            raise ValueError(f"row of length {len(row.ids)} with {row.k} annotations exceeds ({length}, {k})")
        ids[r, :len(row.ids)] = row.ids
        mask[r, :len(row.ids)] = 1
        last[r] = len(row.ids) - 1
        valid[r, :row.k] = True
    return PaperBatch(input_ids=ids, attention_mask=mask, last=last, valid=valid)


# ---- device side (pure function) -----------------------------------------------------------------

def system_cache(module: QwenCausalLM, params, prompt: PaperPrompt, rows: int, slots: int,
                 mesh: Mesh | None = None) -> KVCache:
    """The system turn prefilled ONCE (one row of S tokens, positions 0..S-1) into a cache of
    `slots` >= S slots, repeated to `rows` rows: what every row's own tokens attend to."""
    s = len(prompt.system_ids)
    system = jnp.asarray(prompt.system_ids, jnp.int32)[None]
    _, cache = module.apply({"params": params}, system, jnp.arange(s, dtype=jnp.int32)[None],
                            jnp.ones((1, s), jnp.int32), None, slots, method=QwenCausalLM.hidden_states)
    return _constrain_rows(cache.repeat(rows), mesh)


def paper_forward(module: QwenCausalLM, params, batch: PaperBatch, prompt: PaperPrompt, mode: str,
                  mesh: Mesh | None = None) -> JudgeOutput:
    """The constrained decode of the module docstring -> JudgeOutput with logits [B, K, 2] (the
    "0" and "1" logits at each digit). Pure; jit it (the prompt and mode are constants)."""
    with activation_sharding(mesh):
        b, t = batch.input_ids.shape
        k = batch.valid.shape[1]
        chunks, lengths = prompt.skeleton_ids(k)
        c = chunks.shape[1]
        s = len(prompt.system_ids)
        cache = system_cache(module, params, prompt, b, s + t + (k - 1) * c, mesh)
        step_params = module.decode_params(params)
        zero, one = prompt.digit_ids

        def extend(ids, positions, mask, cache):
            return module.apply({"params": step_params}, ids, positions, mask, cache, method=QwenCausalLM.decode)

        def read(h):  # [B, E] -> [B, 2], the "0" and "1" logits
            return answer_pair(module, params, h, (zero,), (one,))

        positions = s + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        h, cache = extend(batch.input_ids, positions, batch.attention_mask, cache)
        first = read(jnp.take_along_axis(h, batch.last[:, None, None], axis=1)[:, 0])
        if k == 1:
            return judge_output(first[:, None], batch.valid, mode, REFERENCE_EPS)
        slot = jnp.arange(c, dtype=jnp.int32)

        def step(carry, xs):
            cache, next_pos, pair = carry
            chunk, n = xs
            digit = jnp.where(pair[:, 1] > pair[:, 0], one, zero)
            start = c - n  # real tokens at the end: the row's last token is the chunk's last
            ids = jnp.where(slot == start, digit[:, None], chunk[None])
            mask = jnp.broadcast_to(slot >= start, (b, c)).astype(jnp.int32)
            h, cache = extend(ids, next_pos[:, None] + slot[None] - start, mask, cache)
            pair = read(h[:, -1])
            return (cache, next_pos + n, pair), pair

        _, rest = jax.lax.scan(step, (cache, s + batch.last + 1, first), (jnp.asarray(chunks), jnp.asarray(lengths)))
        pairs = jnp.concatenate([first[:, None], rest.swapaxes(0, 1)], axis=1)
        return judge_output(pairs, batch.valid, mode, REFERENCE_EPS)


def _constrain_rows(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """The repeated cache sharded like the rows (over the data axes, KV heads over `tensor`):
    unconstrained, the repeat of one row may come out replicated on every device."""
    if mesh is None:
        return cache
    kv = sharding_for(("batch", "kv_heads", "length", None), cache.k[0].shape, mesh)
    rows = sharding_for(("batch", None), cache.mask.shape, mesh)
    constrain = lambda xs: tuple(jax.lax.with_sharding_constraint(x, kv) for x in xs)  # noqa: E731
    return cache.replace(k=constrain(cache.k), v=constrain(cache.v),
                         mask=jax.lax.with_sharding_constraint(cache.mask, rows))


# ---- the scheme: host work and device function of this prompt ---------------------------------------

class PaperScheme:
    """The paper's prompt for one tokenizer and config: rows, batches and the forward."""

    def __init__(self, tokenizer, config: JudgeConfig, vocab_size: int):
        self.tokenizer, self.config = tokenizer, config
        self.prompt = paper_prompt(tokenizer, config.max_annotations, vocab_size)
        fixed = len(self.prompt.tail_ids) + len(self.prompt.segments[0])
        if fixed >= config.max_length:
            raise ValueError(f"the paper judge's generation prompt and first tag take {fixed} tokens; the largest "
                             f"length bucket {config.max_length} leaves no room for annotations and a response")

    def _tokenize(self, texts: list[str], offsets: bool = False) -> dict:
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                              return_offsets_mapping=offsets)

    def _fit(self, info: str, response: str, offsets, n: int, budget: int):
        """(user-text ids, response tokens kept) with the response cut at its token n or earlier
        so that the ids fit `budget`; (None, 0) when not even an empty response fits."""
        while True:
            cut = response if n >= len(offsets) else response[:offsets[n][0]]
            ids = self._tokenize([self.prompt.user_text(info, cut)])["input_ids"][0]
            over = len(ids) - budget
            if over <= 0:
                return ids, n
            if n == 0:
                return None, 0
            n = max(0, n - over)

    def rows(self, responses: Sequence[str], annotations: Sequence[Any]) -> tuple[list[PaperRow], dict]:
        """Each judged response's row (its own tokens: the user turn, the generation prompt and
        the first tag, with truncation applied; `source` = its index) and the info arrays
        truncated [N], dropped [N], response_tokens [N], num_annotations [N]."""
        cfg, pr = self.config, self.prompt
        n = len(responses)
        truncated, dropped = np.zeros(n, bool), np.zeros(n, np.int32)
        resp_tokens, n_ann = np.zeros(n, np.int32), np.zeros(n, np.int32)
        infos = [key_info(a) for a in annotations]
        todo = [i for i in range(n) if infos[i][1]]
        end = list(pr.tail_ids) + list(pr.segments[0])
        budget = cfg.max_length - len(end)
        rows = []
        if todo:
            resp = self._tokenize([responses[i] for i in todo], offsets=True)
            users = self._tokenize([pr.user_text(infos[i][0], responses[i]) for i in todo])["input_ids"]
            for j, i in enumerate(todo):
                total, ids = len(resp["input_ids"][j]), users[j]
                keep = min(total, cfg.max_response_tokens)
                if keep < total or len(ids) > budget:
                    ids, keep = self._fit(infos[i][0], responses[i], resp["offset_mapping"][j], keep, budget)
                if ids is None:
                    dropped[i] = len(infos[i][1])
                    continue
                k = min(len(infos[i][1]), cfg.max_annotations)
                truncated[i], resp_tokens[i], n_ann[i], dropped[i] = keep < total, keep, k, len(infos[i][1]) - k
                rows.append(PaperRow(i, list(ids) + end, k))
        return rows, dict(truncated=truncated, dropped=dropped, response_tokens=resp_tokens, num_annotations=n_ann)

    def build(self, responses: Sequence[str], annotations: Sequence[Any], row_multiple: int):
        """Host work for a call: (batches, sources, info), see `pr1_jax.judge.shell.Judge.build`."""
        rows, info = self.rows(responses, annotations)
        batches, sources = [], []
        for idx, length, k, num_rows in plan_chunks([len(r.ids) for r in rows], [r.k for r in rows], self.config,
                                                    row_multiple):
            batches.append(pack_rows([rows[i] for i in idx], length, k, num_rows))
            sources.append([rows[i].source for i in idx])
        return batches, sources, info

    def forward(self, module: QwenCausalLM, params, batch: PaperBatch, mesh: Mesh | None = None) -> JudgeOutput:
        return paper_forward(module, params, batch, self.prompt, self.config.mode, mesh)

    @staticmethod
    def shape(batch: PaperBatch) -> tuple[int, int, int]:
        return batch.input_ids.shape + batch.valid.shape[1:]
