"""Example reward plug-ins: your own reward terms beside the built-in ones, no code of ours edited.

    reward:
      functions:
        exact_box: examples/reward_plugin.py:exact_box
        numbers_seen: examples/reward_plugin.py:numbers_seen
      weights: {accuracy: 0.9, format: 0.1, ngram_penalty: 1.0, visual: 0.7, exact_box: 0.2, numbers_seen: 0}
      options:
        exact_box: {ignore_case: true}

A function gets the response and the gold answer, by keyword the record fields it declares
(``problem``, ``record_id``, ``annotations``) and its options (``reward.options.<name>``), and
returns a float. It runs in the reward worker processes under ``reward.timeout_s``: an exception or
a timeout scores 0 and is counted in the step's ``reward_errors`` / ``reward_timeouts``. The terms
are logged as ``<name>`` and ``reward/<name>``; weight 0 logs a term without training on it.
"""

import re

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def exact_box(response: str, ground_truth: str, *, ignore_case: bool = False) -> float:
    """1.0 when the last ``\\boxed{}`` holds the gold answer as written (spaces ignored): a stricter
    checker than math-verify's equivalence, e.g. for multiple-choice letters."""
    boxes = _BOXED.findall(response)
    if not boxes:
        return 0.0
    answer, gold = ("".join(s.split()) for s in (boxes[-1], ground_truth))
    if ignore_case:
        answer, gold = answer.lower(), gold.lower()
    return float(answer == gold)


def numbers_seen(response: str, ground_truth: str, *, annotations: list[str] = ()) -> float:
    """Share of the numbers in the record's visual annotations that the response mentions: a
    rule-based look at what the policy read off the figure, beside the judge's score."""
    wanted = {n for statement in annotations for n in _NUMBER.findall(statement)}
    if not wanted:
        return 0.0
    return len(wanted & set(_NUMBER.findall(response))) / len(wanted)
