"""The benchmarks' files, as a user downloads them, -> `Problem`s, with the question text the
reference's evaluation scripts (github.com/tongxiao2002/Perception-R1, `evaluation/`) give the
policy. The format prompt is added later, by the data pipeline (`DataConfig.format_prompt`).

mathvision
    files: MATH-V's `test.jsonl` / `testmini.jsonl` (images relative to the file), or the HF
        parquet (`decoded_image`). id: `id`.
    question: `question` as is (its `<image1>` kept); with more than one option, "\\nChoices:\\n"
        and "A. text" lines. gold: the option letter, or the value.
mathvista
    files: `testmini.json` ({pid: problem}; a `query.json` beside it is read), a JSON list, JSONL
        or the HF parquet. id: `pid`.
    question: `query` (the dataset's prompt: hint, question, "(A) text" choices), which the
        reference sends; without one, `question` and "A. text" lines. gold: the option's text, or
        the value (floats at `precision` decimals).
mathverse
    files: `testmini.json` (GitHub; images relative to it) or the HF parquet. id: `sample_index`.
    question: `question` as is (the text versions carry their choices). gold: the letter
        (options read from `question_for_eval`), or the value.
wemath
    files: `testmini.json` (GitHub `data/`) or the HF parquet. id: `ID` + "/" + the step of `key`
        ("2steps_7/1", "2steps_7/multi"): `ID` ties a composite problem to its one-step ones.
    question: `question` + "\\nChoices:\\n" + `option` as stored. gold: the letter.
geometry3k
    files: Inter-GPS example directories (`data.json`, `img_diagram.png`, `logic_form.json`), or
        a directory of them. id: "geometry3k/<id>".
    question: `problem_text` and "A. text" lines. gold: the letter (the choice's precise value
        names it too); the diagram logic forms are its visual annotations.
perception_r1
    files: the training parquet / JSONL (`pr1_jax.data`, the run's columns). id: the record's.
    question: the problem as training reads it (images at its `<image>` placeholders). gold: the
        value; its visual annotations come along.

Every problem of these benchmarks has one image, put before the text (the reference's messages),
except MathVerse's "Text Only" version (none). A row that cannot be read is a `BadRecordError`
naming the problem and where it is stored: counted and skipped, or raised when strict. Ids are
unique (results are keyed by them): a repeated id is a `duplicate_id` skip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pr1_jax.data.config import DataConfig
from pr1_jax.data.geometry3k import example_to_record
from pr1_jax.data.records import (DUPLICATE_ID, INVALID_RECORD, MISSING_IMAGE, BadRecordError, ImageRef, Record,
                                  format_number, image_refs, read_records)

BENCHMARKS = ("mathvision", "mathvista", "mathverse", "wemath", "geometry3k", "perception_r1")
LETTERS = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    question: the text before the format prompt, as the reference builds it (choices included).
    answer: the gold as the benchmark states it (an option letter, MathVista's option text, a value).
    choice: index of the right option of a multiple-choice problem; None for a free-form one.
    options: the options' texts in letter order (empty where only the letters are known).
    option_values: another form of each option that names it too (Geometry3K's precise values).
    precision: decimals a free-form number is compared at (MathVista's floats); None: math-verify's 6.
    categories: {dimension: value or tuple of values} the report groups by (subject, level, ...).
    annotations: visual annotations (Geometry3K's logic forms, the parquet's visual_key_info).
    group, step: WeMath: the composite problem (its `ID`) and "1", "2", "3" (its one-step
        sub-problems) or "multi" (the problem itself).
    judge_choices: the choices as the reference's answer judge shows them; None when free-form.
    """

    id: str
    question: str
    answer: str
    images: tuple[ImageRef, ...]
    choice: int | None = None
    options: tuple[str, ...] = ()
    option_values: tuple[str, ...] = ()
    precision: int | None = None
    categories: Mapping[str, str | tuple[str, ...]] = dataclasses.field(default_factory=dict)
    annotations: tuple[str, ...] = ()
    group: str | None = None
    step: str | None = None
    judge_choices: str | None = None

    def __post_init__(self):
        # The readers build these from JSON and parquet cells of any type: a wrong one is this
        # problem's INVALID_RECORD skip here, not an AttributeError in the prompt pipeline later.
        for name in ("id", "question", "answer"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} is a {type(getattr(self, name)).__name__}, not text")
        for name in ("options", "option_values", "annotations"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(x, str) for x in value):
                raise TypeError(f"{name} must be a tuple of texts, got {value!r:.80}")
        if self.choice is not None and self.options and not 0 <= self.choice < len(self.options):
            raise ValueError(f"answer {self.answer!r} names option {self.choice + 1} of {len(self.options)}")

    def record(self) -> Record:
        """The data pipeline's record of this problem (what `ExampleProcessor` turns into a prompt)."""
        return Record(id=self.id, problem=self.question, answer=self.answer, images=self.images,
                      annotations=self.annotations)


def choice_lines(options: Sequence[str]) -> str:
    """"A. text" lines, the reference's `make_choice_string`."""
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def with_choices(question: str, options: Sequence[str]) -> str:
    return f"{question}\nChoices:\n{choice_lines(options)}"


def letter_index(answer: str, n_options: int | None = None) -> int:
    """"B" or "(B)" -> 1; a ValueError for anything else or a letter past the options."""
    m = re.fullmatch(r"\(?([A-Z])\)?", answer.strip())
    if not m or (n_options is not None and LETTERS.index(m.group(1)) >= n_options):
        raise ValueError(f"answer {answer!r} is not an option letter" + (f" of {n_options} options" if n_options else ""))
    return LETTERS.index(m.group(1))


def _text(row: Mapping, key: str) -> str:
    """A text field; a number as written ("30.0" -> "30"); anything else (None, a bool, a list, a
    mapping: whose `str` would be read as text) a ValueError naming the field."""
    v = row[key]
    if isinstance(v, float):
        return format_number(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise ValueError(f"{key!r} is {type(v).__name__} {v!r:.60}, not text")
    return v.strip()


def _question(row: Mapping, key: str) -> str:
    """A question's text as stored (the reference sends it verbatim); anything but text (a number,
    None, a list: whose `str` would become the prompt) a ValueError naming the field."""
    v = row[key]
    if not isinstance(v, str):
        raise ValueError(f"{key!r} is {type(v).__name__} {v!r:.60}, not the question's text")
    return v


def _texts(row: Mapping, key: str) -> tuple[str, ...]:
    """A list of texts (options, choices, logic forms); missing or null: none. A string is refused:
    read as a list it would give one option per character."""
    v = row.get(key)
    if v is None:
        return ()
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{key!r} is {type(v).__name__} {v!r:.60}, not a list of texts")
    return tuple(_text({f"{key}[{i}]": x}, f"{key}[{i}]") for i, x in enumerate(v))


def _image(row: Mapping, base: str, *keys: str) -> tuple[ImageRef, ...]:
    """The first of `keys` holding an image (the HF parquets keep a decoded copy beside the path)."""
    for k in keys:
        refs = image_refs(row.get(k), base)
        if refs:
            return tuple(refs)
    return ()


# ---- one row of each benchmark -> Problem ---------------------------------------------------

def _mathvision(row: Mapping, base: str) -> Problem:
    options = _texts(row, "options")
    answer, question = _text(row, "answer"), _question(row, "question")
    mc = len(options) > 1  # the reference lists choices only then
    return Problem(
        id=_text(row, "id"), question=with_choices(question, options) if mc else question, answer=answer,
        images=_image(row, base, "decoded_image", "image"), choice=letter_index(answer, len(options)) if mc else None,
        options=options if mc else (), judge_choices=choice_lines(options) if mc else None,
        categories={"subject": _text(row, "subject"), "level": _text(row, "level")})


def _mathvista(row: Mapping, base: str, queries: Mapping[str, str]) -> Problem:
    pid = _text(row, "pid")
    choices = _texts(row, "choices")
    answer = _text(row, "answer")
    query = (_question(row, "query") if row.get("query") else None) or queries.get(pid) or (
        with_choices(_question(row, "question"), choices) if choices else _question(row, "question"))
    if not isinstance(query, str):
        raise ValueError(f"query.json's prompt of {pid!r} is {type(query).__name__}, not text")
    meta = row.get("metadata") or {}
    mc = row["question_type"] == "multi_choice"
    if mc and answer not in choices:
        raise ValueError(f"multi_choice answer {answer!r} is none of its choices {list(choices)}")
    precision = row.get("precision")
    return Problem(
        id=pid, question=query, answer=answer, images=_image(row, base, "decoded_image", "image"),
        choice=choices.index(answer) if mc else None, options=choices if mc else (),
        precision=int(precision) if row.get("answer_type") == "float" and precision is not None else None,
        judge_choices=choice_lines(choices) if choices else None,
        categories={"task": _text(meta, "task"), "skills": _texts(meta, "skills"),
                    "question_type": str(row["question_type"]), "answer_type": str(row.get("answer_type"))})


_CHOICES_RE = re.compile(r"(?:Choices|Choice):(.+)", re.DOTALL)  # the reference's MathVerse judge
_OPTION_LINE_RE = re.compile(r"\(?([A-Z])\)?\s*[:.：)]\s*(.*)")


def parse_option_lines(text: str) -> tuple[str, ...]:
    """"A:40°\\nB:60°" (MathVerse), "A. x" or "(A) x" lines -> option texts, when the letters run
    A, B, C, ... in order; () otherwise."""
    options = []
    for line in (x.strip() for x in text.splitlines()):
        m = _OPTION_LINE_RE.fullmatch(line)
        if m and m.group(1) == LETTERS[len(options)]:
            options.append(m.group(2).strip())
        elif line:
            return ()
    return tuple(options)


def _mathverse(row: Mapping, base: str) -> Problem:
    answer, question = _text(row, "answer"), _question(row, "question")
    for_eval = _question(row, "question_for_eval") if row.get("question_for_eval") else question
    meta = row.get("metadata") or {}
    choices = _CHOICES_RE.search(for_eval)
    try:  # a few multi-choice golds are not one letter ("C\nD", "False"): those are scored as text
        choice = letter_index(answer) if row["question_type"] == "multi-choice" else None
    except ValueError:
        choice = None
    options = parse_option_lines(choices.group(1)) if choices and choice is not None else ()
    return Problem(
        id=_text(row, "sample_index"), question=question, answer=answer, images=_image(row, base, "image"),
        choice=choice, options=options, judge_choices=choices.group(1) if choices and choice is not None else None,
        categories={"problem_version": _text(row, "problem_version"), "subject": str(meta.get("subject"))})


def parse_wemath_options(option: str) -> tuple[str, ...]:
    """"A. 300, 400;B. 400, 300; E. No correct answer" -> ("300, 400", "400, 300", ..., "No correct
    answer"). The letters are found in order, each at the start or after ";" or a space, and
    followed by a space or a digit: the release separates options either way ("A. 4 B. 3 ;D.1"),
    and option texts hold ";E." ("∠AB;E.;"). Where its options run together the texts come out
    joined; the letters, which score a WeMath answer, are unaffected."""
    s, marks = option.strip(), []
    for letter in LETTERS:
        m = re.compile(rf"(?:^|(?<=[;\s])){letter}\.(?=\s|\d)").search(s, marks[-1][1] if marks else 0)
        if not m:
            break
        marks.append(m.span())
    if not marks or marks[0][0] != 0:
        raise ValueError(f"option string {option!r} is not 'A. ...;B. ...'")
    ends = [start for start, _ in marks[1:]] + [len(s)]
    return tuple(s[end:stop].strip().rstrip(";").strip() for (_, end), stop in zip(marks, ends))


def _wemath(row: Mapping, base: str) -> Problem:
    group, key = _text(row, "ID"), _text(row, "key")
    steps, _, step = key.partition("_")
    if not re.fullmatch(r"\d+steps", steps) or not (step == "multi" or step.isdigit()):
        raise ValueError(f"key {key!r} is not '<n>steps_<k>' or '<n>steps_multi'")
    option = _question(row, "option")
    options = parse_wemath_options(option)
    answer = _text(row, "answer")
    return Problem(
        id=f"{group}/{step}", question=f"{_question(row, 'question')}\nChoices:\n{option}", answer=answer,
        images=_image(row, base, "image_path", "image"), choice=letter_index(answer, len(options)), options=options,
        group=group, step=step, judge_choices=option, categories={"steps": steps})


_ROW_READERS = {"mathvision": _mathvision, "mathverse": _mathverse, "wemath": _wemath}


# ---- files -------------------------------------------------------------------------------

def _files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl", ".parquet"))
            if not found:
                raise FileNotFoundError(f"no .json, .jsonl or .parquet files in {str(p)!r}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"benchmark file {str(p)!r} does not exist")
    return out


def _rows(path: Path) -> Iterator[tuple[Any, str, str]]:
    """(row, where it is stored, the id of a row without one) of a JSON array or object of
    objects, JSONL or parquet file; places and ids as `pr1_jax.data` names them."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield row, f"{path} row {i}", f"{path.stem}:{i}"
    elif path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    row = e
                yield row, f"{path}:{n}", f"{path.stem}:{n}"
    else:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        items = data.items() if isinstance(data, dict) else enumerate(data)
        for k, row in items:
            yield row, f"{path} [{k!r}]", f"{path.stem}[{k!r}]"


def _mathvista_queries(files: list[Path]) -> dict[str, str]:
    """MathVista's GitHub `query.json` ({pid: prompt}) beside (or among) the data files."""
    queries = {}
    for q in dict.fromkeys(f.with_name("query.json") for f in files):
        if q.is_file():
            queries.update({str(k): v for k, v in json.loads(q.read_text(encoding="utf-8")).items()})
    return queries


def _row_id(row: Any, fallback: str) -> str:
    """The id a bad row is reported under: its benchmark's id field when it has one."""
    for key in ("id", "pid", "sample_index", "ID"):
        if isinstance(row, dict) and row.get(key) is not None:
            return str(row[key])
    return fallback


def _from_files(benchmark: str, paths, image_root: str | None) -> Iterator[tuple[Problem, str] | BadRecordError]:
    files = _files(paths)
    queries = {}
    if benchmark == "mathvista":
        queries = _mathvista_queries(files)
        files = [f for f in files if f.name != "query.json"]
    read = (lambda row, base: _mathvista(row, base, queries)) if benchmark == "mathvista" else _ROW_READERS[benchmark]
    for f in files:
        base = image_root or str(f.parent.resolve())
        for row, where, fallback in _rows(f):
            try:
                if isinstance(row, Exception):
                    raise ValueError(f"malformed JSON: {row}")
                if not isinstance(row, dict):
                    raise TypeError(f"a row is an object, not a {type(row).__name__}")
                problem = read(row, base)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                yield BadRecordError(_row_id(row, fallback), INVALID_RECORD, detail, where)
                continue
            if not problem.images and not (benchmark == "mathverse" and problem.categories["problem_version"]
                                           == "Text Only"):
                yield BadRecordError(problem.id, MISSING_IMAGE, "no image", where)
                continue
            yield problem, where


def _example_dirs(root: str) -> list[str]:
    """A Geometry3K example directory itself, or the example directories inside one (numeric order)."""
    if os.path.isfile(os.path.join(root, "data.json")):
        return [root]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Geometry3K path {root!r} does not exist")
    dirs = sorted((d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "data.json"))),
                  key=lambda d: (0, int(d)) if d.isdigit() else (1, d))
    if not dirs:
        raise FileNotFoundError(f"no Geometry3K example directories (with a data.json) in {root!r}")
    return [os.path.join(root, d) for d in dirs]


def _geometry3k(example_dir: str) -> Problem:
    rec = example_to_record(example_dir)
    data = json.loads(Path(example_dir, "data.json").read_text(encoding="utf-8"))
    options, answer = _texts(data, "choices"), _text(data, "answer")
    return Problem(
        id=rec.id, question=with_choices(rec.problem, options), answer=answer, images=rec.images,
        choice=letter_index(answer, len(options)), options=options,
        option_values=tuple(format_number(float(v)) for v in _texts(data, "precise_value")),
        annotations=rec.annotations, judge_choices=choice_lines(options),
        categories={"goal": _texts(data, "problem_type_goal"), "graph": _texts(data, "problem_type_graph")})


def read_problems(benchmark: str, paths: Sequence[str | os.PathLike], *, image_root: str | None = None,
                  data: DataConfig = DataConfig(), strict: bool = False) -> tuple[list[Problem], list[BadRecordError]]:
    """The problems of `benchmark` in `paths` (files or directories), in file order, and the rows
    left out (each a BadRecordError naming the problem and where it is stored). `data` gives the
    columns of the training parquet (perception_r1); `image_root` overrides the directory
    relative image paths are read from (default: each file's). strict: the first bad row raises."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; one of {', '.join(BENCHMARKS)}")
    if benchmark == "perception_r1":
        records, bad = read_records(dataclasses.replace(data, paths=tuple(map(str, paths)), strict=strict))
        items = [(Problem(id=r.id, question=r.problem, answer=r.answer, images=r.images, annotations=r.annotations),
                  "") for r in records]
    elif benchmark == "geometry3k":
        items, bad = [], []
        for d in (d for root in paths for d in _example_dirs(str(root))):
            try:
                items.append((_geometry3k(d), d))
            except (KeyError, TypeError, ValueError, OSError) as e:
                bad.append(BadRecordError(f"geometry3k/{os.path.basename(d)}", INVALID_RECORD,
                                          f"missing field {e}" if isinstance(e, KeyError) else str(e), d))
    else:
        items, bad = [], []
        for x in _from_files(benchmark, paths, image_root):
            (bad if isinstance(x, BadRecordError) else items).append(x)
    problems, first = [], {}
    for p, where in items:
        if p.id in first:
            bad.append(BadRecordError(p.id, DUPLICATE_ID, f"the id of the problem at {first[p.id]}", where))
            continue
        first[p.id] = where
        problems.append(p)
    if strict and bad:
        raise bad[0]
    return problems, bad


def eval_data_config(base: DataConfig, benchmark: str) -> DataConfig:
    """`base` (the run's data settings, or the defaults) as evaluation reads a benchmark: every
    record once, in order, on one host, none dropped (the streaming order; a problem without a
    placeholder keeps its image, first); problems without an image allowed (MathVerse's Text Only);
    one image before the text with the question kept verbatim (no placeholder splitting:
    MathVision's `<image1>` stays text, as the reference sends it), except for the training
    parquet, whose `<image>` placeholders place its images as in training."""
    kw = dict(shuffle=False, num_epochs=1, drop_remainder=False, shard_index=0, shard_count=1, require_image=False,
              epoch_order="streaming", unplaced_images="first")
    if benchmark != "perception_r1":
        kw["image_placeholder"] = ""
    return dataclasses.replace(base, **kw)
