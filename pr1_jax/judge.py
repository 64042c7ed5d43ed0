"""The visual-perception judge: a Qwen2 / Qwen2.5 text LLM in the policy's mesh, read from its logits.

Each training problem carries a few textual visual annotations ("AB = 12."). For every
(response, annotation) pair the judge is asked whether the response states the annotation and
answers yes or no. We never decode text: at the last prompt token (where the assistant's answer
would start) we compare the judge's logits of the "yes" token(s) with those of the "no" token(s),

    margin = logsumexp(logits[yes ids]) - logsumexp(logits[no ids])
    hard verdict = 1 if margin > 0 else 0          (the paper's 0/1 semantics; a tie is "no")
    soft verdict = sigmoid(margin)                 (P(yes) renormalised over {yes, no})

and the visual reward of a response is the mean verdict over its annotations. A response with no
annotations gets 0 and `has_visual = False`, so the logged visual metric can leave it out.

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

Static shapes: the packed length is rounded up to one of `length_buckets`, the annotation count to
one of `annotation_buckets` (slots beyond a response's annotations have `valid = False`), the
rows to a power of two that the mesh's data axes divide; batches that land in the same buckets
reuse one compiled program. A response whose prompt would not fit the largest length bucket (or
is longer than `max_response_tokens`) is truncated, keeping its start; annotations beyond the
largest annotation bucket, or that do not fit the largest length bucket even with an empty
response, are dropped; both are counted and reported, never raised. The visual reward is the
mean over the annotations actually judged.

Asynchrony: `Judge.submit` does the host work (tokenize, pack), puts the batch on the mesh and
dispatches the jitted forward, returning a `PendingVerdicts` at once (JAX dispatch is
asynchronous). The train loop scores the host rewards meanwhile and calls `.result()`, which is
where it blocks. `Judge.__call__` is `submit(...).result()`.

    judge = Judge.load("Qwen2.5-32B-Instruct", JudgeConfig(), mesh=mesh, dtype="bfloat16")
    pending = judge.submit(responses, annotations)    # returns immediately
    ...                                               # host rewards (math-verify) run here
    out = pending.result()      # dict(visual [N], has_visual [N], verdicts [list of arrays], ...)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.causal_lm import QwenCausalLM
from models.pretrained import Model
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.multihost import allgather_json
from pr1_jax.sharding import batch_axis_size, batch_sharding, load_model

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful grader. You are shown a response to a geometry problem and one statement "
    "about the problem's figure. Decide whether the response states the information in the "
    "statement. Answer with a single word: yes or no."
)

DEFAULT_QUESTION_TEMPLATE = (
    "Response:\n{response}\n\n"
    "Statement:\n{statement}\n\n"
    "Does the response state or contain the information in the statement? Answer yes or no."
)

_RESPONSE_SENTINEL = "\uE000PR1_JUDGE_RESPONSE\uE001"
_STATEMENT_SENTINEL = "\uE000PR1_JUDGE_STATEMENT\uE001"

MODES = ("hard", "soft")


# ---- config ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """How the judge is asked and read.

    yes_tokens / no_tokens: strings that must each be ONE token of the judge tokenizer; the
        variants of each side are combined with logsumexp.
    mode: "hard" (0/1, the paper) or "soft" (P(yes) renormalised over yes/no).
    length_buckets: allowed packed lengths (ascending); the last is the most a row may hold.
    annotation_buckets: allowed annotation counts per row (ascending); the last is the most
        annotations judged per response (`max_annotations`).
    max_response_tokens: a response is cut to at most this many tokens (keeping its start).
    max_rows_per_call: responses per device call (memory bound); longer lists are split in
        chunks, sorted by length so each chunk gets a tight bucket. Use a power of two.
    system_prompt: the system turn; None leaves the system turn to the chat template's default.
    question_template: the user turn; `{response}` and `{statement}` (each exactly once, the
        response first) are replaced literally (no str.format: other braces are fine).
    """

    yes_tokens: tuple[str, ...] = ("yes", "Yes")
    no_tokens: tuple[str, ...] = ("no", "No")
    mode: str = "hard"
    length_buckets: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    annotation_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    max_response_tokens: int = 4096
    max_rows_per_call: int = 64
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    question_template: str = DEFAULT_QUESTION_TEMPLATE

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"JudgeConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not self.yes_tokens or not self.no_tokens:
            raise ValueError("JudgeConfig.yes_tokens and no_tokens must each name at least one token")
        for name in ("length_buckets", "annotation_buckets"):
            b = tuple(getattr(self, name))
            if not b or any(x <= 0 for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"JudgeConfig.{name} must be positive and strictly ascending, got {b}")
        if self.max_response_tokens < 0 or self.max_rows_per_call <= 0:
            raise ValueError("JudgeConfig.max_response_tokens >= 0 and max_rows_per_call > 0 required")
        t = self.question_template
        if t.count("{response}") != 1 or t.count("{statement}") != 1:
            raise ValueError("JudgeConfig.question_template needs '{response}' and '{statement}' exactly once each")
        if t.index("{response}") > t.index("{statement}"):
            raise ValueError("JudgeConfig.question_template: '{response}' must come before '{statement}' "
                             "(the response is part of the shared prefix)")

    @property
    def max_annotations(self) -> int:
        return self.annotation_buckets[-1]

    @property
    def max_length(self) -> int:
        return self.length_buckets[-1]


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


def prompt_pieces(tokenizer, config: JudgeConfig) -> PromptPieces:
    """Renders the chat template with sentinels and splits it into head / mid / tail."""
    user = config.question_template.replace("{response}", _RESPONSE_SENTINEL).replace(
        "{statement}", _STATEMENT_SENTINEL)
    messages = [] if config.system_prompt is None else [{"role": "system", "content": config.system_prompt}]
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(_RESPONSE_SENTINEL) != 1 or text.count(_STATEMENT_SENTINEL) != 1:
        raise ValueError("the judge chat template did not keep the user content verbatim "
                         "(the response/statement placeholders were altered); cannot split the prompt")
    head, rest = text.split(_RESPONSE_SENTINEL)
    mid, tail = rest.split(_STATEMENT_SENTINEL)
    ids = lambda s: tuple(tokenize(tokenizer, s, plain=False))  # noqa: E731
    return PromptPieces(head, mid, tail, ids(head), ids(mid), ids(tail))


def tokenize(tokenizer, text: str, *, plain: bool) -> list[int]:
    """Token ids of `text` without added BOS/EOS; `plain` treats special-token text as text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"])


def render_prompt(tokenizer, config: JudgeConfig, response: str, statement: str) -> str:
    """The chat-template rendering of one judge prompt (for checks and debugging; the judge
    itself never tokenizes this string, see `prompt_pieces`)."""
    before, rest = config.question_template.split("{response}")
    between, after = rest.split("{statement}")
    user = before + response + between + statement + after
    messages = [] if config.system_prompt is None else [{"role": "system", "content": config.system_prompt}]
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def resolve_token_ids(tokenizer, strings: Sequence[str], vocab_size: int | None = None) -> tuple[int, ...]:
    """The single token id of each string; a clear error when a string is not exactly one token
    or lies outside the judge model's vocabulary."""
    ids = []
    for s in strings:
        got = tokenize(tokenizer, s, plain=True)
        if len(got) != 1:
            pieces = tokenizer.convert_ids_to_tokens(got) if got else []
            raise ValueError(f"judge answer string {s!r} is not a single token of the judge tokenizer: "
                             f"it tokenizes to {len(got)} tokens {pieces} (ids {got}); "
                             "pick strings that are one token each (e.g. 'yes', 'Yes', 'no', 'No')")
        if vocab_size is not None and got[0] >= vocab_size:
            raise ValueError(f"judge answer string {s!r} has token id {got[0]}, outside the judge model's "
                             f"vocabulary of {vocab_size}: tokenizer and checkpoint do not match")
        ids.append(got[0])
    return tuple(ids)


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


def bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def row_bucket(n: int, multiple: int = 1) -> int:
    """Rows: the next power of two >= n, rounded up to a multiple of `multiple` (the data shards)."""
    p = 1 << max(0, int(n) - 1).bit_length()
    return -(-p // multiple) * multiple


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

@flax.struct.dataclass
class JudgeOutput:
    margin: jax.Array      # [B, K] float32, lse(yes logits) - lse(no logits); 0 in invalid slots
    verdict: jax.Array     # [B, K] float32, hard 0/1 or soft P(yes); 0 in invalid slots
    valid: jax.Array       # [B, K] bool
    visual: jax.Array      # [B] float32, mean verdict over valid slots (0 with none)
    has_visual: jax.Array  # [B] bool


def answer_logits(module: QwenCausalLM, params, h, token_ids) -> jax.Array:
    """Logits of `token_ids` only, for hidden states h [..., E], in fp32.

    Runs the module's own `logits` method on a copy of the model whose vocabulary is just these
    tokens (the matching rows of the tied embedding, or columns of `lm_head`), so the numerics
    are those of `QwenCausalLM.logits` without forming [.., V]."""
    ids = jnp.asarray(token_ids, jnp.int32)
    text = dataclasses.replace(module.cfg.text, vocab_size=len(token_ids))
    head = module.clone(cfg=dataclasses.replace(module.cfg, text=text), dtype=jnp.float32, parent=None)
    if text.tie_word_embeddings:
        sub = {"embed_tokens": {"embedding": params["embed_tokens"]["embedding"][ids]}}
    else:
        sub = {"lm_head": {"kernel": params["lm_head"]["kernel"][:, ids]}}
    return head.apply({"params": sub}, h, method=QwenCausalLM.logits).astype(jnp.float32)


def judge_hidden_states(module: QwenCausalLM, params, batch: JudgeBatch) -> jax.Array:
    """[B, T, E]: the judge's final hidden states over the packed rows (prefix sharing)."""
    h, _ = module.apply({"params": params}, batch.input_ids, batch.positions, batch.attention_mask, None, None,
                        batch.branches, method=QwenCausalLM.hidden_states)
    return h


def margins_from_hidden(module: QwenCausalLM, params, h, batch: JudgeBatch, yes_ids, no_ids) -> jax.Array:
    """[B, K] lse(yes) - lse(no) at each branch's last token, from hidden states h [B, T, E];
    0 in invalid slots. (A judge's training reads its margins here, as inference does.)"""
    hk = jnp.take_along_axis(h, batch.verdict_index[..., None].astype(jnp.int32), axis=1)  # [B, K, E]
    logits = answer_logits(module, params, hk, tuple(yes_ids) + tuple(no_ids))
    ny = len(yes_ids)
    margin = jax.nn.logsumexp(logits[..., :ny], -1) - jax.nn.logsumexp(logits[..., ny:], -1)
    return jnp.where(batch.valid, margin, 0.0)


def yes_no_margin(module: QwenCausalLM, params, batch: JudgeBatch, yes_ids, no_ids) -> jax.Array:
    """[B, K] lse(yes) - lse(no) at each branch's last token; 0 in invalid slots."""
    return margins_from_hidden(module, params, judge_hidden_states(module, params, batch), batch, yes_ids, no_ids)


def verdict_from_margin(margin, valid, mode: str):
    """hard: 1.0 where yes beats no strictly (a tie is 0); soft: sigmoid(margin). 0 where invalid."""
    if mode == "hard":
        v = (margin > 0).astype(jnp.float32)
    elif mode == "soft":
        v = jax.nn.sigmoid(margin.astype(jnp.float32))
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return jnp.where(valid, v, 0.0)


def visual_reward(verdict, valid):
    """Mean verdict over valid slots -> ([B] float32, has_visual [B] bool); 0 without any."""
    n = valid.sum(-1)
    total = jnp.where(valid, verdict, 0.0).sum(-1)
    return jnp.where(n > 0, total / jnp.maximum(n, 1), 0.0).astype(jnp.float32), n > 0


def judge_forward(module: QwenCausalLM, params, batch: JudgeBatch, yes_ids, no_ids, mode: str) -> JudgeOutput:
    margin = yes_no_margin(module, params, batch, yes_ids, no_ids)
    verdict = verdict_from_margin(margin, batch.valid, mode)
    visual, has = visual_reward(verdict, batch.valid)
    return JudgeOutput(margin=margin, verdict=verdict, valid=batch.valid, visual=visual, has_visual=has)


# ---- the stateful shell ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Chunk:
    output: JudgeOutput        # device arrays (possibly not computed yet)
    sources: list[int]         # caller index of each real row
    shape: tuple[int, int, int]


class PendingVerdicts:
    """Dispatched judge work; `result()` blocks until the device is done and returns host values."""

    def __init__(self, n: int, chunks: list[_Chunk], truncated: np.ndarray, dropped: np.ndarray,
                 response_tokens: np.ndarray, num_annotations: np.ndarray, keep: slice = slice(None)):
        self.n, self.chunks, self.keep = n, chunks, keep
        self.truncated, self.dropped = truncated, dropped
        self.response_tokens, self.num_annotations = response_tokens, num_annotations
        self._result: dict | None = None

    def result(self) -> dict:
        """visual [N] float32 (0 where has_visual is False), has_visual [N] bool, verdicts (list of
        [n_i] float32: one per judged annotation, in order), margins (same, yes-minus-no logit),
        truncated [N] bool, response_tokens [N] int (response tokens the judge saw), dropped [N]
        int (annotations not judged), and the totals
        n_truncated, n_dropped, plus the shapes (rows, length, K) of the device calls."""
        if self._result is None:
            visual = np.zeros(self.n, np.float32)
            has = np.zeros(self.n, bool)
            verdicts = [np.zeros(0, np.float32) for _ in range(self.n)]
            margins = [np.zeros(0, np.float32) for _ in range(self.n)]
            for c in self.chunks:
                out = jax.device_get(c.output)
                for r, i in enumerate(c.sources):
                    k = int(out.valid[r].sum())
                    visual[i], has[i] = out.visual[r], out.has_visual[r]
                    verdicts[i] = np.asarray(out.verdict[r, :k], np.float32)
                    margins[i] = np.asarray(out.margin[r, :k], np.float32)
            k = self.keep  # the caller's rows (this process's, in a multi-process call)
            truncated, dropped = self.truncated[k], self.dropped[k]
            self._result = dict(
                visual=visual[k], has_visual=has[k], verdicts=verdicts[k], margins=margins[k],
                truncated=truncated, dropped=dropped, response_tokens=self.response_tokens[k],
                n_truncated=int(truncated.sum()), n_dropped=int(dropped.sum()),
                shapes=[c.shape for c in self.chunks],
            )
        return self._result


class Judge:
    """Tokenizer + judge model (module, params) + config, on an optional mesh.

    `forward(params, batch)` is THE jitted device function (one compile per bucket shape);
    `verdicts(params, batch)` returns its (verdict [B, K], valid [B, K]).
    """

    def __init__(self, tokenizer, module: QwenCausalLM, params, config: JudgeConfig = JudgeConfig(),
                 mesh: Mesh | None = None):
        if module.cfg.is_vlm:
            logger.info("judge model is a VLM; it is used as a text model")
        self.tokenizer, self.module, self.params, self.config, self.mesh = tokenizer, module, params, config, mesh
        vocab = module.cfg.text.vocab_size
        self.yes_ids = resolve_token_ids(tokenizer, config.yes_tokens, vocab)
        self.no_ids = resolve_token_ids(tokenizer, config.no_tokens, vocab)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"yes tokens {config.yes_tokens} and no tokens {config.no_tokens} share a token id")
        self.pieces = prompt_pieces(tokenizer, config)
        fixed = len(self.pieces.head_ids) + len(self.pieces.mid_ids) + len(self.pieces.tail_ids)
        if fixed >= config.max_length:
            raise ValueError(f"the judge prompt alone takes {fixed} tokens; the largest length bucket "
                             f"{config.max_length} leaves no room for a response and a statement")
        self.row_multiple = 1 if mesh is None else batch_axis_size(mesh)
        yes, no, mode = self.yes_ids, self.no_ids, config.mode
        # Outputs are small ([rows, K]); replicated, every process can read them.
        out = None if mesh is None else NamedSharding(mesh, P())
        self.forward = jax.jit(lambda p, b: judge_forward(module, p, b, yes, no, mode), out_shardings=out)
        self._statement_cache: dict[str, list[int]] = {}
        self.stats = dict(responses=0, truncated=0, dropped_annotations=0, device_calls=0)

    @classmethod
    def load(cls, path: str | os.PathLike, config: JudgeConfig = JudgeConfig(), *, mesh: Mesh | None = None,
             tokenizer_path: str | os.PathLike | None = None, dtype="bfloat16", param_dtype=None) -> "Judge":
        """An HF checkpoint directory (config.json + safetensors + tokenizer files). With a mesh,
        every weight goes straight to its shards under the policy's sharding rules."""
        model = load_model(path, mesh, dtype=dtype, param_dtype=param_dtype)
        return cls.from_model(load_tokenizer(tokenizer_path or path, vision=False), model, config, mesh)

    @classmethod
    def from_model(cls, tokenizer, model: Model, config: JudgeConfig = JudgeConfig(),
                   mesh: Mesh | None = None) -> "Judge":
        return cls(tokenizer, model.module, model.params, config, mesh)

    # -- host side --

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

    def build(self, responses: Sequence[str], annotations: Sequence[Sequence[str] | None]):
        """Host work for a call: rows, then packed numpy batches (one per chunk of
        `max_rows_per_call`, rows sorted by length). Returns (batches, sources, info)."""
        if len(responses) != len(annotations):
            raise ValueError(f"{len(responses)} responses but {len(annotations)} annotation lists")
        n = len(responses)
        truncated, dropped = np.zeros(n, bool), np.zeros(n, np.int32)
        resp_tokens, n_ann = np.zeros(n, np.int32), np.zeros(n, np.int32)
        rows = []
        for i, (resp, anns) in enumerate(zip(responses, annotations)):
            row, truncated[i], dropped[i] = self.prompt_ids(resp, anns or [])
            n_ann[i] = len(row.branches)
            resp_tokens[i] = len(row.prefix) - len(self.pieces.head_ids) - len(self.pieces.mid_ids)
            if row.branches:
                row.source = i
                rows.append(row)
        rows.sort(key=lambda r: -r.length)
        cfg = self.config
        batches, sources = [], []
        for start in range(0, len(rows), cfg.max_rows_per_call):
            chunk = rows[start:start + cfg.max_rows_per_call]
            length = bucket(max(r.length for r in chunk), cfg.length_buckets)
            k = bucket(max(len(r.branches) for r in chunk), cfg.annotation_buckets)
            batches.append(pack(chunk, length, k, row_bucket(len(chunk), self.row_multiple)))
            sources.append([r.source for r in chunk])
        info = dict(truncated=truncated, dropped=dropped, response_tokens=resp_tokens, num_annotations=n_ann)
        return batches, sources, info

    def place(self, batch: JudgeBatch) -> JudgeBatch:
        """The batch on the device(s): rows over the mesh's data axes, or the default device."""
        if self.mesh is None:
            return jax.device_put(batch)
        return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(self.mesh, x.shape)), batch)

    # -- device side --

    def verdicts(self, params, batch: JudgeBatch):
        """(verdict [B, K] float32, valid [B, K] bool); `visual_reward` of them gives [B]."""
        out = self.forward(params, batch)
        return out.verdict, out.valid

    def submit(self, responses: Sequence[str], annotations: Sequence[Sequence[str] | None],
               params=None) -> PendingVerdicts:
        """Tokenize, pack, place and dispatch; returns without waiting for the device.

        On a mesh over several processes, each passes its own responses: the judge packs the
        responses of all processes (every process builds the same global rows, so the device
        calls match) and each gets its own verdicts back."""
        params = self.params if params is None else params
        n_own, keep = len(responses), slice(None)
        if self.mesh is not None and jax.process_count() > 1:
            parts = allgather_json([list(responses), [list(a or []) for a in annotations]])
            start = sum(len(r) for r, _ in parts[:jax.process_index()])
            keep = slice(start, start + n_own)
            responses = [x for r, _ in parts for x in r]
            annotations = [x for _, a in parts for x in a]
        batches, sources, info = self.build(responses, annotations)
        chunks = []
        for b, src in zip(batches, sources):
            chunks.append(_Chunk(self.forward(params, self.place(b)), src, b.verdict_index.shape[:1] +
                                 b.input_ids.shape[1:] + b.verdict_index.shape[1:]))
        n_truncated, n_dropped = int(info["truncated"][keep].sum()), int(info["dropped"][keep].sum())
        self.stats["responses"] += n_own
        self.stats["truncated"] += n_truncated
        self.stats["dropped_annotations"] += n_dropped
        self.stats["device_calls"] += len(chunks)
        if n_truncated or n_dropped:
            logger.info("judge: %d responses truncated, %d annotations dropped in this call", n_truncated, n_dropped)
        return PendingVerdicts(len(responses), chunks, info["truncated"], info["dropped"],
                               info["response_tokens"], info["num_annotations"], keep)

    def __call__(self, responses: Sequence[str], annotations: Sequence[Sequence[str] | None]) -> dict:
        """Blocking: see `PendingVerdicts.result`."""
        return self.submit(responses, annotations).result()
