"""Visual annotations: parse them from a record into a list of short strings, and back.

The paper's parquet stores a problem's visual annotations ("visual key information") as one
text with numbered tags::

    <info1>AB = 12.</info1>
    <info2>Angle ABC is a right angle.</info2>

Other sources give a plain list of strings. :func:`parse_annotations` accepts both and returns
``list[str]`` in order of appearance, stripped, empty items dropped.

Tagged text rules (lenient, because the tags are written by an LLM):

* An ``<infoN>`` opens an annotation; it ends at the next ``</infoN>`` closing tag (any
  number: a mismatched number still closes it), **or at the next opening tag, or at the end
  of the text if it is never closed** (a left-open tag keeps its text, up to the next tag).
* Text outside tags (a "Visual Key Information:" prefix, separators) is ignored.
* A closing tag with nothing open is ignored. Tags are matched case-insensitively and may
  hold spaces (``<info 2>``). The numbers are not used for ordering.

Text with no ``<infoN>`` tag at all: a JSON list is read as a list; otherwise each non-empty
line is one annotation (leading "- ", "* " or "• " bullets removed).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

_TAG = re.compile(r"<\s*(/?)\s*info\s*(\d+)\s*>", re.IGNORECASE)
_BULLET = re.compile(r"^(?:[-*\u2022]\s+)")


def parse_tagged(text: str) -> list[str]:
    """Annotations from `<infoN>..</infoN>` tagged text (see the module docstring)."""
    out: list[str] = []
    start = None  # where the open annotation's text begins
    for m in _TAG.finditer(text):
        closing = bool(m.group(1))
        if start is not None:
            out.append(text[start:m.start()])
            start = None
        if not closing:
            start = m.end()
    if start is not None:
        out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def has_tags(text: str) -> bool:
    return _TAG.search(text) is not None


def _parse_text(text: str) -> list[str]:
    if has_tags(text):
        return parse_tagged(text)
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            value = json.loads(stripped)
        except ValueError:
            value = None
        if isinstance(value, list):
            return parse_annotations(value)
    lines = (_BULLET.sub("", line.strip()) for line in text.splitlines())
    return [line.strip() for line in lines if line.strip()]


def parse_annotations(value: Any) -> list[str]:
    """A record's annotations field as a list of strings.

    Accepts None (or a float NaN, as pandas writes missing values) -> [], a string (tagged
    or not, see module docstring), or any iterable of strings (list, tuple, numpy array, a
    pyarrow list value). A list item that itself holds `<infoN>` tags is split by them.
    """
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return _parse_text(value)
    if isinstance(value, dict):
        raise TypeError(f"annotations must be text or a list of strings, got a dict: {value!r:.80}")
    if not isinstance(value, Iterable):
        raise TypeError(f"annotations must be text or a list of strings, got {type(value).__name__}")
    out: list[str] = []
    for item in value:
        if item is None:
            continue
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if not isinstance(item, str):
            raise TypeError(f"annotation items must be strings, got {type(item).__name__}: {item!r:.80}")
        if has_tags(item):
            out.extend(parse_tagged(item))
        elif item.strip():
            out.append(item.strip())
    return out


def to_tagged_text(annotations: Iterable[str], sep: str = "\n") -> str:
    """The paper's storage format: ``<info1>a</info1>\\n<info2>b</info2>``."""
    return sep.join(f"<info{i}>{a}</info{i}>" for i, a in enumerate(annotations, start=1))
