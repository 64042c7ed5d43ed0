"""Geometry3K (Inter-GPS release, Lu et al. 2021, MIT) -> Perception-R1 records.

An example directory holds ``data.json`` (``problem_text``, ``choices``, ``answer`` as a
letter, ``precise_value`` per choice), ``img_diagram.png`` and usually ``logic_form.json``
(``diagram_logic_form``: formal facts about the figure). The full set of diagram logic forms
for ids 0..3001 is ``logic_forms/diagram_logic_forms_annot.json`` in the Inter-GPS release
(:func:`load_diagram_logic_forms` reads it, from the JSON or from the zip).

The record's answer is the value of the correct choice,
``precise_value[ord(answer) - ord("A")]`` (30.0 -> "30"); its visual annotations are the
diagram logic forms rendered as short sentences (:func:`render_logic_form`)::

    Equals(LengthOf(Line(A, B)), 5)          -> "AB = 5."
    Equals(MeasureOf(Angle(A, B, C)), 60)    -> "angle ABC = 60."
    Equals(MeasureOf(Arc(C, Z)), 40)         -> "arc CZ = 40."
    PointLiesOnLine(C, Line(E, A))           -> "C lies on line EA."
    PointLiesOnCircle(E, Circle(X, r))       -> "E lies on circle X."
    Perpendicular(Line(A, C), Line(B, C))    -> "AC is perpendicular to BC."
    Parallel(Line(E, B), Line(D, C))         -> "EB is parallel to DC."

These are gold, human-annotated facts: a stand-in for the paper's LLM-extracted annotations
when those are not at hand.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Iterable, Sequence

from pr1_jax.data.records import ImageRef, Record, format_number


# ---- logic forms -> sentences --------------------------------------------------------------

def _parse_term(s: str) -> Any:
    """'F(a, G(b))' -> ('F', ['a', ('G', ['b'])]); atoms stay strings."""
    s = s.strip()
    i = s.find("(")
    if i <= 0 or not s.endswith(")"):
        return s
    name, inner = s[:i].strip(), s[i + 1:-1]
    args, depth, cur = [], 0, []
    for ch in inner:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return s
        if ch == "," and depth == 0:
            args.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        return s
    args.append("".join(cur))
    return (name, [_parse_term(a) for a in args if a.strip()])


def _term(t: Any) -> str:
    if isinstance(t, str):
        return t
    name, args = t
    if name == "Line":
        return "".join(_term(a) for a in args)
    if name in ("LengthOf", "MeasureOf"):
        return _term(args[0]) if len(args) == 1 else f"{name}({', '.join(_term(a) for a in args)})"
    if name == "Angle":
        return "angle " + "".join(_term(a) for a in args)
    if name == "Arc":
        return "arc " + "".join(_term(a) for a in args)
    if name == "Circle":
        return f"circle {_term(args[0])}" if args else "circle"
    return f"{name}({', '.join(_term(a) for a in args)})"


# Two-argument relations of the logic forms, as sentences.
_RELATIONS = {
    "Equals": "{} = {}.",
    "PointLiesOnLine": "{} lies on line {}.",
    "PointLiesOnCircle": "{} lies on {}.",
    "Perpendicular": "{} is perpendicular to {}.",
    "Parallel": "{} is parallel to {}.",
    "Tangent": "{} is tangent to {}.",
}


def render_logic_form(form: str) -> str | None:
    """One diagram logic form as a short sentence ending in '.'; None for an empty form."""
    form = form.strip()
    if not form:
        return None
    t = _parse_term(form)
    if isinstance(t, str):
        return form.rstrip(".") + "."
    name, args = t
    a = [_term(x) for x in args]
    if name in _RELATIONS and len(a) == 2:
        return _RELATIONS[name].format(*a)
    return _term(t) + "."


def render_logic_forms(forms: Iterable[str], max_annotations: int | None = None) -> list[str]:
    out = [s for s in (render_logic_form(f) for f in forms) if s]
    return out[:max_annotations] if max_annotations is not None else out


def load_diagram_logic_forms(path: str) -> dict[str, list[str]]:
    """{problem id (str): diagram logic forms} from `diagram_logic_forms_annot.json` or
    from the Inter-GPS `logic_forms.zip` that holds it."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("diagram_logic_forms_annot.json"))
            data = json.loads(z.read(name))
    else:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    return {str(k): list(v.get("diagram_logic_forms", [])) for k, v in data.items()}


# ---- example dirs -> records ---------------------------------------------------------------

def example_to_record(example_dir: str, diagram_logic_forms: Sequence[str] | None = None, *,
                      max_annotations: int | None = None, id_prefix: str = "geometry3k/") -> Record:
    """One Geometry3K example directory as a Record.

    Annotations come from `diagram_logic_forms` if given, else from the directory's
    `logic_form.json` (`diagram_logic_form`), else there are none.
    """
    with open(os.path.join(example_dir, "data.json"), encoding="utf-8") as f:
        data = json.load(f)
    letter = str(data["answer"]).strip().upper()
    values = data["precise_value"]
    if len(letter) != 1 or not isinstance(values, list) or not 0 <= ord(letter) - ord("A") < len(values):
        raise ValueError(f"{example_dir}: answer {letter!r} has no precise value in {values!r:.80}")
    idx = ord(letter) - ord("A")
    if not isinstance(data["problem_text"], str):
        raise ValueError(f"{example_dir}: problem_text is {type(data['problem_text']).__name__}, not text")
    if diagram_logic_forms is None:
        lf_path = os.path.join(example_dir, "logic_form.json")
        if os.path.isfile(lf_path):
            with open(lf_path, encoding="utf-8") as f:
                diagram_logic_forms = json.load(f).get("diagram_logic_form", [])
        else:
            diagram_logic_forms = []
    # A string here would be read one character per logic form.
    if not isinstance(diagram_logic_forms, list) or not all(isinstance(x, str) for x in diagram_logic_forms):
        raise ValueError(f"{example_dir}: the diagram logic forms are {diagram_logic_forms!r:.80}, not a list of texts")
    image = os.path.abspath(os.path.join(example_dir, "img_diagram.png"))
    return Record(
        id=f"{id_prefix}{data.get('id', os.path.basename(os.path.normpath(example_dir)))}",
        problem=data["problem_text"].strip(),
        answer=format_number(float(values[idx])),
        images=(ImageRef(path=image),),
        annotations=tuple(render_logic_forms(diagram_logic_forms, max_annotations)),
    )


def load_examples(root: str, logic_forms: dict[str, list[str]] | None = None, *,
                  max_annotations: int | None = None) -> list[Record]:
    """Records for every example directory under `root` (sorted by numeric id).

    `logic_forms` ({id: forms}, e.g. from :func:`load_diagram_logic_forms`) overrides the
    per-directory `logic_form.json`; ids missing from it keep their directory's forms.
    """
    dirs = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "data.json"))]
    dirs.sort(key=lambda d: (0, int(d)) if d.isdigit() else (1, d))
    out = []
    for d in dirs:
        forms = logic_forms.get(d) if logic_forms is not None else None
        out.append(example_to_record(os.path.join(root, d), forms, max_annotations=max_annotations))
    return out
