"""The yes/no judge (`JudgeConfig.prompt = "yesno"`): one zero-shot question per annotation, all of
a response's annotations in one prefix-sharing prefill, verdicts from the yes/no logits.

For every (response, annotation) pair the judge is asked whether the response states the
annotation and answers yes or no. We never decode text: at the last prompt token (where the
assistant's answer would start) we compare the judge's logits of the "yes" token(s) with those of
the "no" token(s),

    margin = logsumexp(logits[yes ids]) - logsumexp(logits[no ids])
    hard verdict = 1 if margin > 0 else 0          (the paper's 0/1 semantics; a tie is "no")
    soft verdict = sigmoid(margin)                 (P(yes) renormalised over {yes, no})

and the visual reward of a response is the mean verdict over its annotations.

The judge prompt. With the judge tokenizer's own chat template, one (response, statement) pair is

    system turn (JudgeConfig.system_prompt; omitted -> the template's default)
    user turn   JudgeConfig.question_template with {response} and {statement} filled in
    assistant turn header (add_generation_prompt=True)

We render the template once with sentinels in place of {response} and {statement} and split it
there into three constant strings, `head`, `mid` and `tail`. **The judge prompt is defined as the
concatenation of separately tokenized pieces**

    ids(head) + ids(response)[:n] + ids(mid)  |  ids(statement) + ids(tail)
    '------------ prefix (shared) -----------'  '-------- branch k --------'

Template pieces are tokenized normally (their special tokens are real turn markers); the response
and the statement are tokenized with `split_special_tokens=True`, so text such as "<|im_end|>" in
a policy sample stays plain text and cannot close the judge's turn. Tokenizing pieces separately
only differs from tokenizing the whole string at the piece boundaries; the parity test checks the
decoded pieces reproduce the chat-template rendering exactly.

Cost: ONE prefill per response for all its annotations. A row packs

    [prefix | branch 1 | branch 2 | ... | padding]

with branch ids (0 = prefix) and positions as if each branch were its own sequence (prefix
0..P-1, every branch continues at P), so the decoder's prefix-sharing mask makes branch k exactly
"its own prompt". Only the K verdict positions go through the LM head, and only the yes/no
columns of it: the full [B, T, V] (or even [B, K, V]) logits are never formed.

Limits: a response whose row would not fit the largest length bucket (or longer than
`max_response_tokens`) is truncated, keeping its start; annotations beyond the largest annotation
bucket, or that do not fit the largest length bucket even with an empty response, are dropped;
both are counted (see `pr1_jax.judge.shell`). The reward is the mean over the annotations judged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models.causal_lm import QwenCausalLM
from pr1_jax.data.annotations import parse_annotations
from pr1_jax.judge.common import (JudgeConfig, JudgeOutput, answer_pair, judge_output, plan_chunks,
                                  render_chat, resolve_token_ids, tokenize)

_RESPONSE_SENTINEL = "\uE000PR1_JUDGE_RESPONSE\uE001"
_STATEMENT_SENTINEL = "\uE000PR1_JUDGE_STATEMENT\uE001"


# ---- prompt -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptPieces:
    """The constant parts of the judge prompt (see the module docstring) and their token ids."""

    head: str
    mid: str
    tail: str
    head_ids: tuple[int, ...]
    mid_ids: tuple[int, ...]
    tail_ids: tuple[int, ...]


def _messages(config: JudgeConfig, user: str) -> list[dict]:
    system = [] if config.system_prompt is None else [{"role": "system", "content": config.system_prompt}]
    return system + [{"role": "user", "content": user}]


def prompt_pieces(tokenizer, config: JudgeConfig) -> PromptPieces:
    """Renders the chat template with sentinels and splits it into head / mid / tail."""
    user = config.question_template.replace("{response}", _RESPONSE_SENTINEL).replace(
        "{statement}", _STATEMENT_SENTINEL)
    text = render_chat(tokenizer, _messages(config, user))
    if text.count(_RESPONSE_SENTINEL) != 1 or text.count(_STATEMENT_SENTINEL) != 1:
        raise ValueError("the judge chat template did not keep the user content verbatim "
                         "(the response/statement placeholders were altered); cannot split the prompt")
    head, rest = text.split(_RESPONSE_SENTINEL)
    mid, tail = rest.split(_STATEMENT_SENTINEL)
    ids = lambda s: tuple(tokenize(tokenizer, s, plain=False))  # noqa: E731
    return PromptPieces(head, mid, tail, ids(head), ids(mid), ids(tail))


def render_prompt(tokenizer, config: JudgeConfig, response: str, statement: str) -> str:
    """The chat-template rendering of one judge prompt (for checks and debugging; the judge
    itself never tokenizes this string, see `prompt_pieces`)."""
    before, rest = config.question_template.split("{response}")
    between, after = rest.split("{statement}")
    user = before + response + between + statement + after
    return render_chat(tokenizer, _messages(config, user))


def annotation_list(annotations) -> list[str]:
    """The statements of one record's annotations as given to the judge: a list, or the stored
    text (parsed by `pr1_jax.data.annotations.parse_annotations`), or None."""
    return parse_annotations(annotations) if isinstance(annotations, str) else list(annotations or [])


# ---- host-side batch --------------------------------------------------------------------------

@flax.struct.dataclass
class JudgeBatch:
    """One packed device batch (numpy on the host, device arrays once placed).

    input_ids, positions, attention_mask, branches: [B, T] int32 (branch 0 = shared prefix,
        k = annotation k-1; padding has mask 0);
    verdict_index: [B, K] int32, the last token of each branch (0 in unused slots);
    valid: [B, K] bool, slots holding a real annotation.
    """

    input_ids: Any
    positions: Any
    attention_mask: Any
    branches: Any
    verdict_index: Any
    valid: Any


@dataclasses.dataclass
class PackedRow:
    """One response's prompt ids before packing; `source` is its index in the caller's list.
    Each branch is a statement's ids followed by `tail` ids that close the prompt."""

    source: int
    prefix: list[int]
    branches: list[list[int]]
    tail: int = 0

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(map(len, self.branches))


def pack(rows: Sequence[PackedRow], length: int, k: int, num_rows: int) -> JudgeBatch:
    """[prefix | branch 1 | ... | padding] per row, numpy. Rows beyond `rows` are all padding."""
    shape = (num_rows, length)
    ids, pos, mask, br = (np.zeros(shape, np.int32) for _ in range(4))
    vidx = np.zeros((num_rows, k), np.int32)
    valid = np.zeros((num_rows, k), bool)
    for r, row in enumerate(rows):
        p = len(row.prefix)
        if row.length > length or len(row.branches) > k:
            raise ValueError(f"row of length {row.length} with {len(row.branches)} annotations exceeds ({length}, {k})")
        ids[r, :p] = row.prefix
        pos[r, :p] = np.arange(p)
        at = p
        for j, b in enumerate(row.branches):
            n = len(b)
            ids[r, at:at + n] = b
            pos[r, at:at + n] = p + np.arange(n)
            br[r, at:at + n] = j + 1
            vidx[r, j] = at + n - 1
            valid[r, j] = True
            at += n
        mask[r, :at] = 1
    return JudgeBatch(input_ids=ids, positions=pos, attention_mask=mask, branches=br, verdict_index=vidx, valid=valid)


# ---- device side (pure functions) ----------------------------------------------------------------

def judge_hidden_states(module: QwenCausalLM, params, batch: JudgeBatch) -> jax.Array:
    """[B, T, E]: the judge's final hidden states over the packed rows (prefix sharing)."""
    h, _ = module.apply({"params": params}, batch.input_ids, batch.positions, batch.attention_mask, None, None,
                        batch.branches, method=QwenCausalLM.hidden_states)
    return h


def pair_from_hidden(module: QwenCausalLM, params, h, batch: JudgeBatch, yes_ids, no_ids) -> jax.Array:
    """[B, K, 2] (lse no, lse yes) at each branch's last token, from hidden states h [B, T, E]."""
    hk = jnp.take_along_axis(h, batch.verdict_index[..., None].astype(jnp.int32), axis=1)  # [B, K, E]
    return answer_pair(module, params, hk, no_ids, yes_ids)


def margins_from_hidden(module: QwenCausalLM, params, h, batch: JudgeBatch, yes_ids, no_ids) -> jax.Array:
    """[B, K] lse(yes) - lse(no) at each branch's last token, from hidden states h [B, T, E];
    0 in invalid slots. (A judge's training reads its margins here, as inference does.)"""
    pair = pair_from_hidden(module, params, h, batch, yes_ids, no_ids)
    return jnp.where(batch.valid, pair[..., 1] - pair[..., 0], 0.0)


def judge_forward(module: QwenCausalLM, params, batch: JudgeBatch, yes_ids, no_ids, mode: str) -> JudgeOutput:
    h = judge_hidden_states(module, params, batch)
    return judge_output(pair_from_hidden(module, params, h, batch, yes_ids, no_ids), batch.valid, mode)


# ---- the scheme: host work and device function of this prompt ---------------------------------------

class YesNoScheme:
    """The yes/no prompt for one tokenizer and config: rows, packed batches and the forward."""

    def __init__(self, tokenizer, config: JudgeConfig, vocab_size: int):
        self.tokenizer, self.config = tokenizer, config
        self.yes_ids = resolve_token_ids(tokenizer, config.yes_tokens, vocab_size)
        self.no_ids = resolve_token_ids(tokenizer, config.no_tokens, vocab_size)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"yes tokens {config.yes_tokens} and no tokens {config.no_tokens} share a token id")
        self.pieces = prompt_pieces(tokenizer, config)
        fixed = len(self.pieces.head_ids) + len(self.pieces.mid_ids) + len(self.pieces.tail_ids)
        if fixed >= config.max_length:
            raise ValueError(f"the judge prompt alone takes {fixed} tokens; the largest length bucket "
                             f"{config.max_length} leaves no room for a response and a statement")
        self._statement_cache: dict[str, list[int]] = {}

    def _statement_ids(self, s: str) -> list[int]:
        ids = self._statement_cache.get(s)
        if ids is None:
            if len(self._statement_cache) > 100_000:
                self._statement_cache.clear()
            ids = self._statement_cache[s] = tokenize(self.tokenizer, s, plain=True) + list(self.pieces.tail_ids)
        return ids

    def prompt_ids(self, response: str, statements: Sequence[str]) -> tuple[PackedRow, bool, int]:
        """The packed row of one response (source -1) with truncation applied; returns
        (row, truncated, number of statements dropped). A row with no branches is not judged."""
        cfg, pc = self.config, self.pieces
        statements = list(statements or [])
        keep = statements[:cfg.max_annotations]
        branches = [self._statement_ids(s) for s in keep]
        fixed = len(pc.head_ids) + len(pc.mid_ids)
        while branches and fixed + sum(map(len, branches)) > cfg.max_length:
            branches.pop()
        dropped = len(statements) - len(branches)
        resp = tokenize(self.tokenizer, response, plain=True) if branches else []
        room = cfg.max_length - fixed - sum(map(len, branches))
        n = min(len(resp), cfg.max_response_tokens, room)
        prefix = list(pc.head_ids) + resp[:n] + list(pc.mid_ids)
        return PackedRow(-1, prefix, branches, tail=len(pc.tail_ids)), n < len(resp), dropped

    def build(self, responses: Sequence[str], annotations: Sequence[Any], row_multiple: int):
        """Host work for a call: (batches, sources, info), see `pr1_jax.judge.shell.Judge.build`."""
        n = len(responses)
        truncated, dropped = np.zeros(n, bool), np.zeros(n, np.int32)
        resp_tokens, n_ann = np.zeros(n, np.int32), np.zeros(n, np.int32)
        rows = []
        fixed = len(self.pieces.head_ids) + len(self.pieces.mid_ids)
        for i, (resp, anns) in enumerate(zip(responses, annotations)):
            row, truncated[i], dropped[i] = self.prompt_ids(resp, annotation_list(anns))
            n_ann[i] = len(row.branches)
            resp_tokens[i] = len(row.prefix) - fixed
            if row.branches:
                row.source = i
                rows.append(row)
        batches, sources = [], []
        for idx, length, k, num_rows in plan_chunks([r.length for r in rows], [len(r.branches) for r in rows],
                                                    self.config, row_multiple):
            batches.append(pack([rows[i] for i in idx], length, k, num_rows))
            sources.append([rows[i].source for i in idx])
        info = dict(truncated=truncated, dropped=dropped, response_tokens=resp_tokens, num_annotations=n_ann)
        return batches, sources, info

    def forward(self, module: QwenCausalLM, params, batch: JudgeBatch, mesh=None) -> JudgeOutput:
        """(`mesh` is not needed: the packed prefill's sharding follows its inputs.)"""
        return judge_forward(module, params, batch, self.yes_ids, self.no_ids, self.config.mode)

    @staticmethod
    def shape(batch: JudgeBatch) -> tuple[int, int, int]:
        return batch.verdict_index.shape[:1] + batch.input_ids.shape[1:] + batch.verdict_index.shape[1:]
