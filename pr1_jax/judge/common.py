"""What both judge prompts share: the config, tokenization, buckets, the answer-column LM head
and the reward of a response's verdicts."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from models.causal_lm import QwenCausalLM

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

MODES = ("hard", "soft")
PROMPTS = ("yesno", "paper")
_YESNO_ONLY = ("yes_tokens", "no_tokens", "system_prompt", "question_template")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """How the judge is asked and read.

    prompt: "yesno" (`pr1_jax/judge/yesno.py`: one zero-shot yes/no question per annotation,
        all of a response's annotations in one prefix-sharing prefill) or "paper"
        (`pr1_jax/judge/paper.py`: the reference's few-shot prompt, one question per response,
        its `<infoK>` verdicts read by a constrained decode).
    mode: "hard" (0/1, the paper) or "soft" (P(positive) renormalised over the two answers).
    length_buckets: allowed row lengths (ascending); the last is the most a row may hold.
        yesno: a response's whole packed row; paper: a response's own tokens (the user turn,
        the generation prompt and the first tag), after the system turn every row shares.
    annotation_buckets: allowed annotation counts per row (ascending); the last is the most
        annotations judged per response (`max_annotations`).
    max_response_tokens: a response is cut to at most this many tokens (keeping its start).
    max_rows_per_call: responses per device call (memory bound); longer lists are split in
        chunks, sorted by length so each chunk gets a tight bucket. Use a power of two.
    yesno only (a paper judge with any of them changed is an error):
    yes_tokens / no_tokens: strings that must each be ONE token of the judge tokenizer; the
        variants of each side are combined with logsumexp.
    system_prompt: the system turn; None leaves the system turn to the chat template's default.
    question_template: the user turn; `{response}` and `{statement}` (each exactly once, the
        response first) are replaced literally (no str.format: other braces are fine).
    """

    prompt: str = "yesno"
    mode: str = "hard"
    length_buckets: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    annotation_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    max_response_tokens: int = 4096
    max_rows_per_call: int = 64
    yes_tokens: tuple[str, ...] = ("yes", "Yes")
    no_tokens: tuple[str, ...] = ("no", "No")
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    question_template: str = DEFAULT_QUESTION_TEMPLATE

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise ValueError(f"JudgeConfig.prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.mode not in MODES:
            raise ValueError(f"JudgeConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("length_buckets", "annotation_buckets"):
            b = tuple(getattr(self, name))
            if not b or any(x <= 0 for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"JudgeConfig.{name} must be positive and strictly ascending, got {b}")
        if self.max_response_tokens < 0 or self.max_rows_per_call <= 0:
            raise ValueError("JudgeConfig.max_response_tokens >= 0 and max_rows_per_call > 0 required")
        if self.prompt == "paper":
            changed = [f.name for f in dataclasses.fields(self)
                       if f.name in _YESNO_ONLY and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"JudgeConfig: {', '.join(changed)} apply to prompt 'yesno' only; the paper "
                                 "judge asks the reference's fixed messages and reads its '0'/'1' tokens: unset them")
            return
        if not self.yes_tokens or not self.no_tokens:
            raise ValueError("JudgeConfig.yes_tokens and no_tokens must each name at least one token")
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


# ---- tokens and buckets --------------------------------------------------------------------

def render_chat(tokenizer, messages: list[dict]) -> str:
    """The judge's chat rendered up to the assistant's turn. Qwen3 chat templates have a thinking
    switch: `enable_thinking=False` closes an empty think block after the generation prompt, so
    the judge answers directly, as the reference's Qwen2.5 judge does; templates without the
    switch (Qwen2 / Qwen2.5) ignore the variable."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def tokenize(tokenizer, text: str, *, plain: bool) -> list[int]:
    """Token ids of `text` without added BOS/EOS; `plain` treats special-token text as text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"])


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


def bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def row_bucket(n: int, multiple: int = 1) -> int:
    """Rows: the next power of two >= n, rounded up to a multiple of `multiple` (the data shards)."""
    p = 1 << max(0, int(n) - 1).bit_length()
    return -(-p // multiple) * multiple


def plan_chunks(lengths: Sequence[int], ks: Sequence[int], config: JudgeConfig, row_multiple: int):
    """The device calls for rows of these lengths and annotation counts: rows sorted longest first,
    in chunks of `max_rows_per_call`. Returns [(row indices, length bucket, K bucket, rows)]."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out = []
    for start in range(0, len(order), config.max_rows_per_call):
        idx = order[start:start + config.max_rows_per_call]
        out.append((idx, bucket(max(lengths[i] for i in idx), config.length_buckets),
                    bucket(max(ks[i] for i in idx), config.annotation_buckets), row_bucket(len(idx), row_multiple)))
    return out


# ---- device side (pure functions) -------------------------------------------------------------

@flax.struct.dataclass
class JudgeOutput:
    logits: jax.Array      # [B, K, 2] float32, the (negative, positive) answer logits; 0 in invalid slots
    margin: jax.Array      # [B, K] float32, positive minus negative; 0 in invalid slots
    verdict: jax.Array     # [B, K] float32, hard 0/1 or soft P(positive); 0 in invalid slots
    valid: jax.Array       # [B, K] bool
    visual: jax.Array      # [B] float32, the reward of the verdicts (see `visual_reward`)
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


def answer_pair(module: QwenCausalLM, params, h, negative_ids, positive_ids) -> jax.Array:
    """[..., 2]: logsumexp of the negative tokens' logits, then of the positive tokens', at hidden
    states h [..., E] (one token a side gives its logit)."""
    logits = answer_logits(module, params, h, tuple(negative_ids) + tuple(positive_ids))
    n = len(negative_ids)
    return jnp.stack([jax.nn.logsumexp(logits[..., :n], -1), jax.nn.logsumexp(logits[..., n:], -1)], -1)


def verdict_from_margin(margin, valid, mode: str):
    """hard: 1.0 where the positive answer beats the negative strictly (a tie is 0, as greedy
    decoding picks the lower token id, "0" before "1"); soft: sigmoid(margin). 0 where invalid."""
    if mode == "hard":
        v = (margin > 0).astype(jnp.float32)
    elif mode == "soft":
        v = jax.nn.sigmoid(margin.astype(jnp.float32))
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return jnp.where(valid, v, 0.0)


def visual_reward(verdict, valid, eps: float = 0.0):
    """sum of the valid verdicts / (their count + eps), clamped to [0, 1] -> ([B] float32,
    has_visual [B] bool); 0 without any. eps = 1e-6 is the reference's `sum / (count + 1e-6)`."""
    n = valid.sum(-1)
    total = jnp.where(valid, verdict, 0.0).sum(-1)
    mean = jnp.clip(total / (jnp.maximum(n, 1) + eps), 0.0, 1.0)
    return jnp.where(n > 0, mean, 0.0).astype(jnp.float32), n > 0


def judge_output(pair, valid, mode: str, eps: float = 0.0) -> JudgeOutput:
    """The output of answer logits pair [B, K, 2] at the valid slots [B, K]."""
    pair = jnp.where(valid[..., None], pair, 0.0)
    margin = pair[..., 1] - pair[..., 0]
    verdict = verdict_from_margin(margin, valid, mode)
    visual, has = visual_reward(verdict, valid, eps)
    return JudgeOutput(logits=pair, margin=margin, verdict=verdict, valid=valid, visual=visual, has_visual=has)
