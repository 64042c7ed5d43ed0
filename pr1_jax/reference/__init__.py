"""The Perception-R1 reference code's prompts, shipped as data (see README.md here for the source
and licence). One reader, so the data pipeline, the judge and the evaluation quote the same text."""

from __future__ import annotations

import functools
import json
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("perception_r1_prompts.json")


@functools.cache
def prompts() -> dict:
    """The file's fields: format_prompt, judge_system_prompt, judge_user_template, ..."""
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))


def format_prompt() -> str:
    """The instruction the reference appends (after one space) to every question."""
    return prompts()["format_prompt"]
