"""Is a response right? No model: the answer the response gives, matched against the gold.

The answer: the first `<answer>...</answer>` block when there is one, else the whole response
(`rewards.extract_answer`, the training reward's reading); shown and matched as a letter, the
content of its last `\\boxed{}` when it has one.

* Multiple choice: a letter ("B", "(B)", "B.", "B. 145°", "(B) 145°", also inside `\\text{}`)
  names its option; otherwise the options whose text (or Geometry3K's precise value) the answer
  equals, as text or as math (math-verify, as the accuracy reward checks it). Right when it names
  the gold option and no other.
* Free-form: math-verify against the gold, numbers compared at the benchmark's precision
  (MathVista's floats: `precision` decimals) or else at 6: the training accuracy reward
  (`rewards.accuracy_reward`).

`benchmark_correct` is a registered reward term, so `RewardScorer` runs it in worker processes
under a deadline (a hostile answer costs one timeout); this module has no JAX.
"""

from __future__ import annotations

import re
from typing import Sequence

from pr1_jax.rewards import accuracy_reward, extract_answer, register_reward

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LETTER_RE = re.compile(r"\(([A-Z])\)(?:\s.*)?|([A-Z])(?:[.:)](?:\s.*)?)?", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def final_answer(response: str) -> str:
    """The answer a response gives: its answer block (else all of it), the last \\boxed{} in it if
    any, without `\\text{}`-style wrappers, `$` and surrounding space or `*`."""
    text = extract_answer(response)
    boxed = last_boxed(text)
    text = _WRAPPER_RE.sub(r"\1", boxed if boxed is not None else text)
    return text.replace("$", "").strip().strip("*").strip()


def option_letter(answer: str) -> int | None:
    """"B", "(B)", "B.", "B: x", "(B) x" -> 1; None when the answer does not start with a letter."""
    m = _LETTER_RE.fullmatch(answer)
    return LETTERS.index(m.group(1) or m.group(2)) if m else None


def _plain(text: str) -> str:
    return re.sub(r"\s+", "", _WRAPPER_RE.sub(r"\1", text).replace("$", "")).rstrip(".").lower()


def _same(response: str, answer: str, option: str) -> bool:
    if _plain(answer) == _plain(option):
        return True
    try:
        return accuracy_reward(response, option) == 1.0
    except Exception:  # noqa: BLE001 - an option math-verify cannot read is matched as text only
        return False


def named_options(response: str, options: Sequence[str] = (), option_values: Sequence[str] = ()) -> set[int]:
    """The options a response's answer names: its letter's, else those whose text or value it equals."""
    answer = final_answer(response)
    letter = option_letter(answer)
    if letter is not None:
        return {letter}
    values = list(option_values) + [""] * (len(options) - len(option_values))
    return {i for i, (text, value) in enumerate(zip(options, values))
            if _same(response, answer, text) or (value and _same(response, answer, value))}


@register_reward("benchmark_correct")
def benchmark_correct(response: str, ground_truth: str, *, choice: int | None = None, options: Sequence[str] = (),
                      option_values: Sequence[str] = (), precision: int | None = None) -> float:
    """1.0 if the response answers the problem right (module docstring); `choice` is the gold
    option's index (None: free-form, checked against `ground_truth`)."""
    if choice is None:
        return accuracy_reward(response, ground_truth, float_rounding=6 if precision is None else precision)
    return float(named_options(response, options, option_values) == {choice})
