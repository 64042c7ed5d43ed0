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

Visual annotations are short canonical sentences, one per fact: "Number of shapes: three.",
"Each shape is drawn in red.", "Each shape is a circle." Every sentence ends with its value,
the token before the value (":", " in", " a") is that sentence's alone, every value is a word
that appears in no other sentence (counts are words, so they never collide with the boxed
answer), and the colour and kind sentences do not depend on the count (a response that gets
the count wrong can still state the colour in exactly the annotation's words). So whether a
response states an annotation is a lookup of the words after one cue, which a tiny judge learns
in a few minutes (see `pr1_jax.warm_start`).

Besides the dataset this module makes the text the warm starts need. Both state facts with
exactly the annotation sentences (:func:`fact_sentence`), so "does the response state this
annotation" is "does the response contain this sentence, and no other value for the same
fact": a matching task a tiny judge learns in a few minutes, and one that a policy warm-started
on the same sentences is judged on fairly in RL (the visual reward then measures whether it
states the figure's true facts; a hedge listing several values earns nothing).

* :func:`judge_pairs` / :func:`judge_examples`: (response, annotation(s), label(s)) for the
  judge's warm start and its held-out check; a response states the annotation when it gives the
  fact's true value and no other (once or repeated); negatives give another value, hedge (the
  true value and another) or leave the fact out.
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
import re
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

ATTRIBUTES = ("count", "color", "kind")


def fact_sentence(attr: str, value) -> str:
    """The one sentence that states a fact, in annotations and responses alike."""
    if attr == "count":
        return f"Number of shapes: {NUMBER_WORDS[value]}."
    if attr == "color":
        return f"Each shape is drawn in {value}."
    if attr == "kind":
        return f"Each shape is a {value}."
    raise ValueError(f"unknown attribute {attr!r}")


def annotations(fig: Figure) -> list[str]:
    """The figure's visual annotations: count, colour, kind."""
    return [fact_sentence(a, getattr(fig, a)) for a in ATTRIBUTES]


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

NO_FACTS = "I look at the figure."  # the think text of a response that states no fact


def think_text(stated: dict) -> str:
    """Think text stating exactly the facts in `stated` ({"count"?, "color"?, "kind"?}), one
    `fact_sentence` each, in canonical order (count, colour, kind)."""
    facts = [fact_sentence(a, stated[a]) for a in ATTRIBUTES if a in stated]
    return " ".join(facts) if facts else NO_FACTS


def format_response(think: str, ans: str) -> str:
    """The paper's output format, exactly what its format reward's regex accepts."""
    return f"<think>\n{think}\n</think>\n<answer>\n\\boxed{{{ans}}}\n</answer>"


def _values(cfg: TaskConfig) -> dict[str, list]:
    return {"count": list(range(1, cfg.max_count + 1)), "color": list(cfg.colors), "kind": list(cfg.kinds)}


def _pick(rng: np.random.Generator, values: Sequence):
    return values[int(rng.integers(len(values)))]


def sft_response(rng: np.random.Generator, question: str, cfg: TaskConfig = TaskConfig(), *,
                 figure: Figure | None = None, p_true: float = 0.0, p_state: float = 0.6) -> str:
    """A warm-start target for the policy: the exact output format, a uniformly random valid
    answer, and think text stating each fact (canonical sentence, canonical order) with
    probability `p_state`, the figure's true value with probability `p_true` (needs `figure`),
    else a uniformly random value (right by chance). Nothing in it is read from the image by
    default: the warm start teaches the format and the sentences, and leaves grounding to RL."""
    ans = _pick(rng, answer_choices(question, cfg))
    stated = {}
    for attr, values in _values(cfg).items():
        if rng.random() < p_state:
            if figure is not None and rng.random() < p_true:
                stated[attr] = getattr(figure, attr)
            else:
                stated[attr] = _pick(rng, values)
    return format_response(think_text(stated), ans)


def sft_pairs(n: int, seed: int, cfg: TaskConfig = TaskConfig(), *, p_true: float = 0.0, p_state: float = 0.6
              ) -> list[tuple[Record, str]]:
    """n (record, warm-start response) pairs from their own seed stream ("sft" split)."""
    rng = split_rng(seed, "sft")
    out = []
    for i in range(n):
        fig = make_figure(rng, cfg)
        q = cfg.questions[int(rng.integers(len(cfg.questions)))]
        rec = Record(id=f"sft-{i:05d}", problem=question_text(q, cfg), answer=answer(q, fig, cfg),
                     images=(ImageRef(data=png_bytes(draw(fig, cfg))),), annotations=tuple(annotations(fig)))
        out.append((rec, sft_response(rng, q, cfg, figure=fig, p_true=p_true, p_state=p_state)))
    return out


def stated_values(rng: np.random.Generator, mode: str, true, values: Sequence) -> list:
    """The values a response states for one fact, by mode: "true" (once), "true_twice", "wrong"
    (another value), "omit" (nothing), "hedge" (the true value and another, in random order).
    Only "true" and "true_twice" state the fact's annotation (see `states_annotation`)."""
    wrong = [v for v in values if v != true]
    if mode in ("wrong", "hedge") and not wrong:
        mode = "omit"
    if mode == "true":
        return [true]
    if mode == "true_twice":
        return [true, true]
    if mode == "wrong":
        return [_pick(rng, wrong)]
    if mode == "hedge":
        out = [true, _pick(rng, wrong)]
        return out if rng.random() < 0.5 else out[::-1]
    if mode == "omit":
        return []
    raise ValueError(f"unknown mode {mode!r}")


def states_annotation(stated: Sequence, true) -> bool:
    """Whether a response that states `stated` values of a fact states its annotation: it gives
    the true value and no other (a response listing several colours has not said which)."""
    return bool(stated) and all(v == true for v in stated)


def _mode(rng: np.random.Generator, label: int, p_omit: float, p_twice: float, p_hedge: float) -> str:
    if label:
        return "true_twice" if rng.random() < p_twice else "true"
    if rng.random() < p_omit:
        return "omit"
    return "hedge" if rng.random() < p_hedge else "wrong"


_SENTENCE_RES = {
        "count": re.compile(r"Number of shapes: (\w+)\."),
        "color": re.compile(r"Each shape is drawn in (\w+)\."),
        "kind": re.compile(r"Each shape is a (\w+)\."),
}


def stated_in(text: str) -> dict[str, list]:
    """The values that `text` states per fact, read back from its fact sentences (a word salad
    states only what its complete sentences state)."""
    out = {}
    for attr, rx in _SENTENCE_RES.items():
        words = rx.findall(text)
        out[attr] = [NUMBER_WORDS.index(w) if w in NUMBER_WORDS else w for w in words] if attr == "count" else words
    return out


def word_salad(rng: np.random.Generator, cfg: TaskConfig = TaskConfig(), max_words: int = 30) -> str:
    """Think text made of the fact sentences' words in random order and repetition, with now and
    then a whole (true or false) sentence: what a policy writes when RL pushes it off its format,
    and what a judge must not read facts into."""
    vocab = sorted({w for attr, vs in _values(cfg).items() for v in vs for w in fact_sentence(attr, v).split()})
    words = [vocab[int(i)] for i in rng.integers(len(vocab), size=int(rng.integers(1, max_words + 1)))]
    for _ in range(int(rng.integers(0, 3))):
        attr = _pick(rng, ATTRIBUTES)
        words.insert(int(rng.integers(len(words) + 1)), fact_sentence(attr, _pick(rng, _values(cfg)[attr])))
    if rng.random() < 0.5:  # a word repeated many times over
        words += [_pick(rng, vocab)] * int(rng.integers(5, 20))
    return " ".join(words)


def _response(rng: np.random.Generator, stated: dict[str, list], cfg: TaskConfig) -> str:
    """Every stated (fact, value) as its sentence, all in random order, then a random answer."""
    sentences = [fact_sentence(a, v) for a, vs in stated.items() for v in vs]
    think = " ".join(sentences[i] for i in rng.permutation(len(sentences))) if sentences else NO_FACTS
    return format_response(think, _pick(rng, answer_choices(_pick(rng, cfg.questions), cfg)))


def judge_pairs(rng: np.random.Generator, n: int, cfg: TaskConfig = TaskConfig(), *,
                p_other: float = 0.6, p_omit: float = 0.4, p_twice: float = 0.2, p_hedge: float = 0.4
                ) -> list[tuple[str, str, int]]:
    """n (response, annotation, label) triples, half of them positive (label 1: the response
    states the annotated fact with its true value and no other; see `states_annotation`).

    Each triple draws a random figure and one of its annotations. A positive states that fact
    (twice with probability `p_twice`); a negative leaves it out (probability `p_omit`), hedges
    (the true value and another, `p_hedge` of the rest) or states another value. Each other
    fact is stated with probability `p_other`, in any of those ways; the sentences come in random
    order and the boxed answer is random, so only what is said about the annotated fact decides
    the label.
    """
    labels = np.array([1, 0] * (n // 2) + [1] * (n % 2))[rng.permutation(n)]
    values = _values(cfg)
    out = []
    for label in labels:
        fig = make_figure(rng, cfg)
        k = int(rng.integers(len(ATTRIBUTES)))
        stated = {}
        for i, attr in enumerate(ATTRIBUTES):
            if i == k:
                mode = _mode(rng, int(label), p_omit, p_twice, p_hedge)
            elif rng.random() < p_other:
                mode = _mode(rng, int(rng.random() < 0.5), 0.0, p_twice, p_hedge)
            else:
                mode = "omit"
            stated[attr] = stated_values(rng, mode, getattr(fig, attr), values[attr])
        out.append((_response(rng, stated, cfg), annotations(fig)[k], int(label)))
    return out


def judge_examples(rng: np.random.Generator, n: int, cfg: TaskConfig = TaskConfig(), *, p_true: float = 0.5,
                   p_omit: float = 0.4, p_twice: float = 0.2, p_hedge: float = 0.4, p_salad: float = 0.15,
                   single: bool = False) -> list[tuple[str, list[str], list[int]]]:
    """n (response, annotations, labels) for the judge's warm start in the layout it is used in:
    one response with all of its figure's annotations (count, colour, kind), each labelled 1
    when the response states that fact with its true value and no other.

    Each fact is stated truly with probability `p_true` (twice with probability `p_twice`);
    otherwise it is left out (`p_omit`), hedged (`p_hedge` of the rest) or stated with another
    value. The sentences come in random order and the boxed answer is random. With probability
    `p_salad` the think text is a `word_salad` instead, labelled by the sentences it contains.
    The hedges, repeats and salads are there because a policy in RL finds them: a judge trained
    on one clean sentence per fact was fooled by a response repeating one sentence into
    accepting every annotation, and one trained without salads by "blue blue blue ...".

    single: the easy first stage of a curriculum instead: the response states one fact (true
    with probability `p_true`, else another value) and nothing else, and only that fact's
    annotation is asked.
    """
    values = _values(cfg)
    out = []
    for _ in range(n):
        fig = make_figure(rng, cfg)
        if single:
            k = int(rng.integers(len(ATTRIBUTES)))
            attr = ATTRIBUTES[k]
            label = int(rng.random() < p_true)
            stated = {attr: stated_values(rng, "true" if label else "wrong", getattr(fig, attr), values[attr])}
            out.append((_response(rng, stated, cfg), [annotations(fig)[k]], [label]))
            continue
        if rng.random() < p_salad:
            think = word_salad(rng, cfg)
            stated = stated_in(think)
            labels = [int(states_annotation(stated[a], getattr(fig, a))) for a in ATTRIBUTES]
            ans = _pick(rng, answer_choices(_pick(rng, cfg.questions), cfg))
            out.append((format_response(think, ans), annotations(fig), labels))
            continue
        stated, labels = {}, []
        for attr in ATTRIBUTES:
            label = int(rng.random() < p_true)
            stated[attr] = stated_values(rng, _mode(rng, label, p_omit, p_twice, p_hedge), getattr(fig, attr),
                                         values[attr])
            labels.append(int(states_annotation(stated[attr], getattr(fig, attr))))
        out.append((_response(rng, stated, cfg), annotations(fig), labels))
    return out
