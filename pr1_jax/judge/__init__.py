"""The visual-perception judge: a Qwen2 / Qwen2.5 text LLM in the policy's mesh, read from its logits.

Each training problem carries a few textual visual annotations ("AB = 12."); the judge decides,
per annotation, whether a response states it, and the visual reward of the response is the
fraction stated. No text is decoded freely and no regex reads it: the verdicts are the judge's
logits of its answer tokens, compared in-graph. Two ways to ask (`JudgeConfig.prompt`):

- `yesno.py` ("yesno"): one zero-shot yes/no question per annotation; a response's annotations
  share one prefill of the response (prefix-sharing branches); verdict = yes vs no logits.
- `paper.py` ("paper"): the reference run's own prompt (few-shot system turn, the record's
  tagged annotation string, the response); its `<info1>d</info1>\\n...` answer is decoded with
  the tags forced and each digit chosen between "0" and "1" by its logits, fed back as greedy
  decoding would; the system turn is prefilled once per device call and shared by every row.

A response with no annotations gets 0 and `has_visual = False`, so the logged visual metric
leaves it out. `common.py` holds the config and what both share; `shell.py` the stateful `Judge`
(host work, buckets, mesh placement, asynchronous dispatch) and `PendingVerdicts`.
"""

from pr1_jax.judge.common import (DEFAULT_QUESTION_TEMPLATE, DEFAULT_SYSTEM_PROMPT, MODES, PROMPTS, JudgeConfig,
                                  JudgeOutput, answer_logits, answer_pair, bucket, resolve_token_ids, row_bucket,
                                  tokenize, verdict_from_margin, visual_reward)
from pr1_jax.judge.paper import (PaperBatch, PaperPrompt, key_info, paper_forward, paper_prompt, skeleton_text,
                                 system_cache)
from pr1_jax.judge.shell import Judge, PendingVerdicts
from pr1_jax.judge.yesno import (JudgeBatch, PackedRow, PromptPieces, judge_forward, judge_hidden_states,
                                 margins_from_hidden, pack, prompt_pieces, render_prompt)

__all__ = [
    "DEFAULT_QUESTION_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "MODES", "PROMPTS", "Judge", "JudgeBatch", "JudgeConfig",
    "JudgeOutput", "PackedRow", "PaperBatch", "PaperPrompt", "PendingVerdicts", "PromptPieces", "answer_logits",
    "answer_pair", "bucket", "judge_forward", "judge_hidden_states", "key_info", "margins_from_hidden", "pack",
    "paper_forward", "paper_prompt", "prompt_pieces", "render_prompt", "resolve_token_ids", "row_bucket",
    "skeleton_text", "system_cache", "tokenize", "verdict_from_margin", "visual_reward",
]
