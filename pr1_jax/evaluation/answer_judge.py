"""The reference's LLM answer judge, read from logits by our in-mesh judge (`pr1_jax.judge.Judge`).

The reference (`evaluation/qwen_judge_*_v4.py`) asks a text LLM (Qwen2.5-72B-Instruct, greedy)
whether a response is right, with the texts of `answer_judge_prompts.json`: a system turn, and
the user turn

    **Choices**: {choices}\\n**Response**: {response}\\n**Ground Truth Answer**: {gt_answer}\\n

(without the Choices line for a free-form problem), where {response} is the response's first
`<answer>` block as its regex reads it; it reads "true" or "false" from the generated text.

Here the same messages, rendered by the judge tokenizer's chat template, go through `Judge` with
its template split as response | statement: "response" is the user turn up to
"**Ground Truth Answer**:", "statement" the space and the gold, so the prompt's tokens are those of
the whole chat (the pieces meet where the tokenizer splits anyway). The verdict is the sign of
lse(logits of "true", "True") - lse(logits of "false", "False") at the assistant turn's first
token: what the judge's first generated token would say, one prefill per response, no decoding.
Where the reference first has an LLM extract the answer from a response without an answer
block, this judge reads the whole response.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Sequence

from jax.sharding import Mesh

from pr1_jax.evaluation.benchmarks import Problem
from pr1_jax.judge import Judge, JudgeConfig, PendingVerdicts
from pr1_jax.rewards import first_block

PROMPTS_FILE = Path(__file__).with_name("answer_judge_prompts.json")
_GOLD = "{gt_answer}"


@functools.cache
def prompts() -> dict:
    """system, choice_template, open_template (and where they come from)."""
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))


def _split(template: str) -> tuple[str, str, str]:
    """"...Answer**: {gt_answer}\\n" -> ("...Answer**:", " ", "\\n"): the judge's response piece,
    the space that goes with the gold (tokenized with it, as in the whole text), the tail."""
    before, after = template.split(_GOLD)
    head = before.rstrip(" ")
    return head, before[len(head):], after


def judge_config(**overrides) -> JudgeConfig:
    """The reference's answer-judge messages as a `JudgeConfig`: one "annotation" (the gold) per response."""
    p = prompts()
    _, space, tail = _split(p["choice_template"])
    if _split(p["open_template"])[1:] != (space, tail):
        raise ValueError(f"{PROMPTS_FILE}: the choice and open templates end differently after the gold")
    kw = dict(system_prompt=p["system"], question_template="{response}{statement}" + tail,
              yes_tokens=("true", "True"), no_tokens=("false", "False"), annotation_buckets=(1,))
    kw.update(overrides)
    return JudgeConfig(**kw)


def reference_answer(response: str) -> str:
    """What the reference shows its judge: the first answer block's inside, as its regex reads it
    (unstripped), else the whole response."""
    # The reference's `re.search(r"<answer>(.+?)</answer>", response, re.MULTILINE | re.DOTALL)`, in linear time.
    block = first_block(response, "<answer>", "</answer>", min_len=1)
    return block if block is not None else response


def judge_inputs(problem: Problem, response: str) -> tuple[str, str]:
    """(response piece, statement) of one judge prompt: the user turn split before the gold."""
    p = prompts()
    template = p["choice_template"] if problem.judge_choices is not None else p["open_template"]
    head, space, _ = _split(template)
    return (head.format(choices=problem.judge_choices, response=reference_answer(response)),
            space + problem.answer)


def user_turn(problem: Problem, response: str) -> str:
    """The reference's user turn for this problem and response (for checks: the judge never renders it)."""
    piece, statement = judge_inputs(problem, response)
    return piece + statement + _split(prompts()["open_template"])[2]


class AnswerJudge:
    """`Judge` with the reference's answer-judge messages. `submit` returns at once; its
    `result()["verdicts"][i]` is [1.0] (true) or [0.0] for response i, `margins` the logit margin."""

    def __init__(self, judge: Judge):
        self.judge = judge

    @classmethod
    def load(cls, path: str | os.PathLike, *, mesh: Mesh | None = None, dtype="bfloat16",
             tokenizer_path: str | os.PathLike | None = None) -> "AnswerJudge":
        return cls(Judge.load(path, judge_config(), mesh=mesh, tokenizer_path=tokenizer_path, dtype=dtype))

    def submit(self, problems: Sequence[Problem], responses: Sequence[str]) -> PendingVerdicts:
        pieces, statements = zip(*(judge_inputs(p, r) for p, r in zip(problems, responses))) if problems else ((), ())
        return self.judge.submit(list(pieces), [[s] for s in statements])
