"""A synthetic visual task for the embedded tiny default: coloured shapes on a white canvas.

Why it exists: `python -m pr1_jax.train` must show the whole Perception-R1 method working on
2 CPU cores in minutes, with no downloads. Geometry3K is far beyond a ~1M-parameter model, so
the default trains on figures a tiny Qwen2-VL can learn to read from pixels within a few
hundred GRPO steps, and whose facts are known exactly (so answers and visual annotations are
correct by construction).

A figure: `count` (1..max_count) shapes of one `kind` (circle / square / triangle) and one
`color` (red / green / blue / yellow), on a white square canvas of `image_size` pixels. The
canvas is cut into 28x28 cells, exactly the pixel blocks that Qwen2-VL merges into one image
token (2x2 patches of 14 px); every shape lies inside its own cell, away from the cell edges.
So a 56x56 figure is 4 image tokens, and "how many shapes" is "how many tokens are not blank":
learnable by a tiny model, and the shapes never touch (their count is verifiable by counting
connected components).

Questions (numeric answers, so math-verify checks them like the paper's):

* ``color``: "What colour are the shapes? Answer with the colour's number: 1 red, 2 green,
  3 blue, 4 yellow." -> "1".."4"; chance accuracy 1/4 (colours are uniform).
* ``count``: "How many shapes are in the figure?" -> "1".."max_count"; chance 1/max_count
  (counts are uniform).
* ``kind``: "What kind of shapes are they? Answer with the kind's number: 1 circle, 2 square,
  3 triangle." -> "1".."3"; chance 1/3.

The default asks about colour (the fact a tiny vision tower picks up fastest: it is linear in
the pixels); the figure still varies in count and kind, and all three facts are annotations, so
the visual reward has room beyond the answer. :func:`chance_accuracy` gives the chance level of
any config.

Visual annotations are phrased like the paper's: "There are 3 shapes.", "The shapes are red.",
"The shapes are circles." (singular for one shape).

Besides the dataset this module makes the text the warm starts need:

* :func:`judge_pairs`: (response, annotation, label) for the judge's warm start; positives
  state the annotation's fact (varied phrasings), negatives state another value or nothing.
* :func:`sft_response`: format-exact responses for the policy's warm start, whose answer and
  stated facts are *not* read from the figure (random by default), so that RL has accuracy and
  visual reward left to gain.

Everything is a pure function of a `numpy.random.Generator` (or a seed) and a
:class:`TaskConfig`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import zlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pr1_jax.data.records import ImageRef, Record, write_jsonl

CELL = 28  # pixels per merged image token (patch 14 x spatial merge 2)
MARGIN = 3  # blank pixels kept between a shape and its cell's edges

PALETTE = {
        "red": (220, 40, 40),
        "green": (40, 160, 60),
        "blue": (40, 80, 220),
        "yellow": (235, 200, 30),
        "purple": (140, 60, 180),
        "orange": (245, 130, 30),
}
KINDS = ("circle", "square", "triangle")
QUESTIONS = ("color", "count", "kind")
BACKGROUND = (255, 255, 255)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What figures and questions look like.

    image_size: canvas side in pixels, a multiple of 28 (56 -> 2x2 cells -> 4 image tokens;
        56*56 = 3136 is also the paper's min_pixels, so the processor does not resize it).
    max_count: most shapes in a figure, at most (image_size // 28) ** 2.
    colors: palette names (keys of PALETTE); the colour question's choices, in code order.
    kinds: shape kinds (subset of KINDS), in code order.
    questions: question types to draw from, uniformly per example.
    """

    image_size: int = 56
    max_count: int = 4
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    kinds: tuple[str, ...] = KINDS
    questions: tuple[str, ...] = ("color",)

    def __post_init__(self):
        if self.image_size <= 0 or self.image_size % CELL:
            raise ValueError(f"image_size must be a positive multiple of {CELL}, got {self.image_size}")
        if not 1 <= self.max_count <= self.cells ** 2:
            raise ValueError(f"max_count must be in 1..{self.cells ** 2} for image_size {self.image_size}")
        if self.max_count >= len(NUMBER_WORDS):
            raise ValueError(f"max_count must be < {len(NUMBER_WORDS)}")
        for c in self.colors:
            if c not in PALETTE:
                raise ValueError(f"unknown colour {c!r}; known: {sorted(PALETTE)}")
        for k in self.kinds:
            if k not in KINDS:
                raise ValueError(f"unknown kind {k!r}; known: {KINDS}")
        if len(set(self.colors)) != len(self.colors) or len(set(self.kinds)) != len(self.kinds):
            raise ValueError("colors and kinds must not repeat")
        if not self.questions or any(q not in QUESTIONS for q in self.questions):
            raise ValueError(f"questions must be a non-empty subset of {QUESTIONS}, got {self.questions}")

    @property
    def cells(self) -> int:
        """Cells (= merged image tokens) per side."""
        return self.image_size // CELL


@dataclasses.dataclass(frozen=True)
class Figure:
    """The facts of one figure, and where its shapes are (inclusive pixel boxes x0, y0, x1, y1)."""

    count: int
    color: str
    kind: str
    boxes: tuple[tuple[int, int, int, int], ...]


# ---- figures -----------------------------------------------------------------------------

def make_figure(rng: np.random.Generator, cfg: TaskConfig = TaskConfig()) -> Figure:
    """Uniform count, colour and kind; each shape in its own random cell with a random size
    (60-80% of the cell, so it covers most of the cell's 4 patches) and position."""
    count = int(rng.integers(1, cfg.max_count + 1))
    color = cfg.colors[int(rng.integers(len(cfg.colors)))]
    kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
    cells = rng.choice(cfg.cells ** 2, size=count, replace=False)
    boxes = []
    for c in sorted(int(c) for c in cells):
        cy, cx = divmod(c, cfg.cells)
        side = int(rng.integers(17, 23))  # box side in pixels (x1 - x0 + 1)
        free = CELL - 2 * MARGIN - side
        x0 = cx * CELL + MARGIN + int(rng.integers(free + 1))
        y0 = cy * CELL + MARGIN + int(rng.integers(free + 1))
        boxes.append((x0, y0, x0 + side - 1, y0 + side - 1))
    return Figure(count=count, color=color, kind=kind, boxes=tuple(boxes))


def draw(fig: Figure, cfg: TaskConfig = TaskConfig()) -> Image.Image:
    """The figure as an RGB image. PIL draws without anti-aliasing, so every pixel is either
    the background or exactly the shape colour (which keeps the tests exact)."""
    img = Image.new("RGB", (cfg.image_size, cfg.image_size), BACKGROUND)
    d = ImageDraw.Draw(img)
    rgb = PALETTE[fig.color]
    for x0, y0, x1, y1 in fig.boxes:
        if fig.kind == "circle":
            d.ellipse([x0, y0, x1, y1], fill=rgb)
        elif fig.kind == "square":
            d.rectangle([x0, y0, x1, y1], fill=rgb)
        else:  # triangle, apex up
            d.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=rgb)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---- facts as text -----------------------------------------------------------------------

def _shapes(n: int) -> str:
    return "shape" if n == 1 else "shapes"


def _kind_noun(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def annotations(fig: Figure) -> list[str]:
    """The figure's visual annotations, paper style: count, colour, kind."""
    n = fig.count
    if n == 1:
        return ["There is 1 shape.", f"The shape is {fig.color}.", f"The shape is a {fig.kind}."]
    return [f"There are {n} shapes.", f"The shapes are {fig.color}.", f"The shapes are {fig.kind}s."]


def _choices_text(names: Sequence[str]) -> str:
    return ", ".join(f"{i + 1} {name}" for i, name in enumerate(names))


def question_text(question: str, cfg: TaskConfig = TaskConfig()) -> str:
    if question == "count":
        return "How many shapes are in the figure?"
    if question == "color":
        return f"What colour are the shapes? Answer with the colour's number: {_choices_text(cfg.colors)}."
    if question == "kind":
        return f"What kind of shapes are they? Answer with the kind's number: {_choices_text(cfg.kinds)}."
    raise ValueError(f"unknown question {question!r}")


def answer_choices(question: str, cfg: TaskConfig = TaskConfig()) -> list[str]:
    """Every valid answer of a question type (all equally likely in the data)."""
    n = {"count": cfg.max_count, "color": len(cfg.colors), "kind": len(cfg.kinds)}[question]
    return [str(i) for i in range(1, n + 1)]


def answer(question: str, fig: Figure, cfg: TaskConfig = TaskConfig()) -> str:
    if question == "count":
        return str(fig.count)
    if question == "color":
        return str(cfg.colors.index(fig.color) + 1)
    if question == "kind":
        return str(cfg.kinds.index(fig.kind) + 1)
    raise ValueError(f"unknown question {question!r}")


def chance_accuracy(cfg: TaskConfig = TaskConfig()) -> float:
    """Expected accuracy of guessing uniformly among the valid answers (= of a policy that
    ignores the image, since every answer is equally likely): 1/4 for the default."""
    return float(np.mean([1.0 / len(answer_choices(q, cfg)) for q in cfg.questions]))


# ---- examples and datasets ---------------------------------------------------------------

def make_example(rng: np.random.Generator, cfg: TaskConfig = TaskConfig()
                 ) -> tuple[Image.Image, str, str, list[str]]:
    """(image, problem text, answer, annotations) of one random figure and question."""
    fig = make_figure(rng, cfg)
    question = cfg.questions[int(rng.integers(len(cfg.questions)))]
    return draw(fig, cfg), question_text(question, cfg), answer(question, fig, cfg), annotations(fig)


def split_rng(seed: int, split: str) -> np.random.Generator:
    """Independent streams per split name (train and val never share figures by construction
    of the seed, whatever n is)."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode())])


def make_records(n: int, seed: int, split: str = "train", cfg: TaskConfig = TaskConfig()) -> list[Record]:
    """n records (image as PNG bytes), ids "<split>-00000", ...; same (seed, split) -> same
    records, and the first k of n are the records of n = k."""
    rng = split_rng(seed, split)
    out = []
    for i in range(n):
        img, problem, ans, notes = make_example(rng, cfg)
        out.append(Record(id=f"{split}-{i:05d}", problem=problem, answer=ans,
                          images=(ImageRef(data=png_bytes(img)),), annotations=tuple(notes)))
    return out


def write_dataset(out_dir: str | os.PathLike, n: int, seed: int, split: str = "train",
                  cfg: TaskConfig = TaskConfig()) -> str:
    """Write `<out_dir>/<split>.jsonl` and `<out_dir>/images/<split>-NNNNN_0.png`; returns the
    JSONL path. Rows: {"id", "problem", "answer", "image", "annotations"}: read them with
    `DataConfig(paths=..., image_column="image", annotations_column="annotations")`."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    write_jsonl(make_records(n, seed, split, cfg), path)
    return path


# ---- responses: the policy's warm start and the judge's --------------------------------

def _number(rng: np.random.Generator, n: int) -> str:
    """A count as a digit or a word (both appear in responses; the judge must accept both)."""
    return str(n) if rng.random() < 0.5 else NUMBER_WORDS[n]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _count_sentence(rng, n: int) -> str:
    w, s = _number(rng, n), _shapes(n)
    be = "is" if n == 1 else "are"
    return [f"There {be} {w} {s}.", f"I count {w} {s}.", f"The figure has {w} {s}.",
            f"{_cap(w)} {s} {be} drawn.", f"The number of shapes is {w}."][int(rng.integers(5))]


def _color_sentence(rng, color: str, n: int | None) -> str:
    """n is the count the response also states, or None: then the phrasing says nothing
    about the number of shapes (so a response that omits the count cannot imply it)."""
    forms = [f"The colour is {color}.", f"Everything is drawn in {color}.", f"The fill colour is {color}."]
    if n is not None:
        forms.append(f"The shape is {color}." if n == 1 else f"The shapes are {color}.")
    return forms[int(rng.integers(len(forms)))]


def _kind_sentence(rng, kind: str, n: int | None) -> str:
    forms = [f"Every shape is a {kind}.", f"The shape type is {kind}.", f"Each shape is a {kind}."]
    if n is not None:
        forms.append(f"The shape is a {kind}." if n == 1 else f"The shapes are {kind}s.")
    return forms[int(rng.integers(len(forms)))]


def _think(rng: np.random.Generator, stated: dict, ans: str) -> str:
    """Think text stating exactly the facts in `stated` ({"count"?, "color"?, "kind"?})."""
    n = stated.get("count")
    if len(stated) == 3 and rng.random() < 0.3:
        facts = [f"I see {_number(rng, n)} {stated['color']} {_kind_noun(stated['kind'], n)}."]
    else:
        facts = []
        if "count" in stated:
            facts.append(_count_sentence(rng, n))
        if "color" in stated:
            facts.append(_color_sentence(rng, stated["color"], n))
        if "kind" in stated:
            facts.append(_kind_sentence(rng, stated["kind"], n))
        facts = [facts[i] for i in rng.permutation(len(facts))]
    opening = ["", "Let me look at the figure.", "I look at the image."][int(rng.integers(3))]
    closing = [f"So the answer is {ans}.", f"The answer is {ans}."][int(rng.integers(2))]
    return " ".join(s for s in [opening, *facts, closing] if s)


def format_response(think: str, ans: str) -> str:
    """The paper's output format, exactly what its format reward's regex accepts."""
    return f"<think>\n{think}\n</think>\n<answer>\n\\boxed{{{ans}}}\n</answer>"


def _values(cfg: TaskConfig) -> dict[str, list]:
    return {"count": list(range(1, cfg.max_count + 1)), "color": list(cfg.colors), "kind": list(cfg.kinds)}


def _fact(fig: Figure, attr: str):
    return getattr(fig, attr)


def sft_response(rng: np.random.Generator, question: str, cfg: TaskConfig = TaskConfig(), *,
                 figure: Figure | None = None, p_true: float = 0.0, p_state: float = 0.6) -> str:
    """A warm-start target for the policy: the exact output format, a uniformly random valid
    answer, and think text stating each fact with probability `p_state`, the figure's true
    value with probability `p_true` (needs `figure`), else a uniformly random value (right by
    chance). Nothing in it is read from the image by default: the warm start teaches the format
    and the vocabulary, and leaves grounding to RL."""
    choices = answer_choices(question, cfg)
    ans = choices[int(rng.integers(len(choices)))]
    stated = {}
    for attr, values in _values(cfg).items():
        if rng.random() < p_state:
            if figure is not None and rng.random() < p_true:
                stated[attr] = _fact(figure, attr)
            else:
                stated[attr] = values[int(rng.integers(len(values)))]
    return format_response(_think(rng, stated, ans), ans)


def sft_pairs(n: int, seed: int, cfg: TaskConfig = TaskConfig(), *, p_true: float = 0.0
              ) -> list[tuple[Record, str]]:
    """n (record, warm-start response) pairs from their own seed stream ("sft" split)."""
    rng = split_rng(seed, "sft")
    out = []
    for i in range(n):
        fig = make_figure(rng, cfg)
        q = cfg.questions[int(rng.integers(len(cfg.questions)))]
        rec = Record(id=f"sft-{i:05d}", problem=question_text(q, cfg), answer=answer(q, fig, cfg),
                     images=(ImageRef(data=png_bytes(draw(fig, cfg))),), annotations=tuple(annotations(fig)))
        out.append((rec, sft_response(rng, q, cfg, figure=fig, p_true=p_true)))
    return out


def judge_pairs(rng: np.random.Generator, n: int, cfg: TaskConfig = TaskConfig()
                ) -> list[tuple[str, str, int]]:
    """n (response, annotation, label) triples for the judge's warm start, half of them
    positive (label 1: the response states the annotation's fact).

    Each triple draws a random figure and one of its annotations. A positive states that fact
    (in one of several phrasings); a negative states another value of the same attribute or,
    half the time, says nothing about it. Other facts appear at random (right or wrong), and
    the boxed answer is random, so only the statement of the annotated fact decides the label.
    """
    labels = np.array([1, 0] * (n // 2) + [1] * (n % 2))[rng.permutation(n)]
    attrs = ("count", "color", "kind")
    values = _values(cfg)
    out = []
    for label in labels:
        fig = make_figure(rng, cfg)
        k = int(rng.integers(3))
        attr = attrs[k]
        stated = {}
        for other in attrs:
            if other != attr and rng.random() < 0.6:
                stated[other] = (_fact(fig, other) if rng.random() < 0.5
                                 else values[other][int(rng.integers(len(values[other])))])
        wrong = [v for v in values[attr] if v != _fact(fig, attr)]
        if label:
            stated[attr] = _fact(fig, attr)
        elif wrong and rng.random() < 0.5:
            stated[attr] = wrong[int(rng.integers(len(wrong)))]
        stated = {a: stated[a] for a in attrs if a in stated}  # canonical order for _think
        q = cfg.questions[int(rng.integers(len(cfg.questions)))]
        choices = answer_choices(q, cfg)
        ans = choices[int(rng.integers(len(choices)))]
        out.append((format_response(_think(rng, stated, ans), ans), annotations(fig)[k], int(label)))
    return out
