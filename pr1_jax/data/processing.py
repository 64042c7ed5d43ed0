"""One record -> model-ready arrays, exactly as the Hugging Face Qwen2-VL processor makes them.

What the policy sees for a record:

1. the chat: an optional system turn, then a user turn holding the image(s) and the problem
   text (see :func:`build_messages`), rendered by the tokenizer's own chat template with
   ``add_generation_prompt=True``;
2. the images through transformers' ``Qwen2VLImageProcessorPil`` (smart-resize to multiples
   of 28 within [min_pixels, max_pixels] where the rounding allows, bicubic, RGB conversion
   incl. alpha on white, rescale 1/255, CLIP mean/std, temporal duplication to 2 frames,
   flattening to rows of 1176 in 2x2 merge-block order) -> ``pixel_values [N, 1176]``; for
   Qwen3-VL (``DataConfig.image_processor``) the same processor with 16-pixel patches
   (multiples of 32, rows of 1536) and mean/std 0.5, as Qwen3-VL's checkpoints configure it;
   ``image_grid_thw [n, 3]``; with ``DataConfig.image_alpha`` "drop", PIL's ``convert("RGB")``
   first, as the reference's loader does;
3. the token ids of the rendered text with each ``<|image_pad|>`` expanded to
   ``t*h*w / merge_size**2`` copies of itself (the one step written here by hand: it is
   what ``Qwen2VLProcessor`` does to the text before tokenizing; ``Qwen2VLProcessor``
   itself does not build without torchvision), and ``mm_token_type_ids`` (1 at image
   tokens, 0 elsewhere) as transformers 5.x expects beside image inputs;
4. with ``DataConfig.truncation`` "right" / "left", an over-long prompt's problem text cut at
   token boundaries and the chat rendered again (:meth:`ExampleProcessor.truncate`).

:class:`ExampleProcessor` runs this per record inside the grain pipeline (possibly in a
worker process) and turns every failure into a :class:`Skipped` marker naming the record.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pr1_jax.data import records as rec
from pr1_jax.data.config import IMAGE_PROCESSORS, MERGE_SIZE, DataConfig
from pr1_jax.data.records import BadRecordError, RawRow, Record

IMAGE_TOKEN = "<|image_pad|>"
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"


# ---- tokenizer + image processor ---------------------------------------------------------

def load_tokenizer(path: str | os.PathLike, chat_template_path: str | None = None, *, vision: bool = True):
    """A Hugging Face tokenizer from local files, with a chat template: the project's one
    tokenizer loader (policy, judge, evaluation).

    `path` is a directory (a checkpoint directory or `tests/fixtures/qwen2_tokenizer`: loaded
    with AutoTokenizer, offline) or a `tokenizer.json` file (loaded as PreTrainedTokenizerFast
    with eos `<|im_end|>` and pad `<|endoftext|>`). The chat template comes from
    `chat_template_path`, else the tokenizer's own, else a `chat_template.jinja` beside it.
    vision: require the image token (a policy's tokenizer; a text judge's need not have it).
    """
    path = Path(path)
    if path.is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
        template_dir = path.parent
    elif path.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        template_dir = path
    else:
        raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist")
    if chat_template_path:
        tok.chat_template = Path(chat_template_path).read_text(encoding="utf-8")
    elif not getattr(tok, "chat_template", None) and (template_dir / "chat_template.jinja").is_file():
        tok.chat_template = (template_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer at {str(path)!r} has no chat template (put a chat_template.jinja beside it, "
                         "or set data.chat_template_path for the policy)")
    if tok.pad_token_id is None:
        tok.pad_token = PAD_TOKEN
    if vision and tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        raise ValueError(f"tokenizer at {str(path)!r} has no {IMAGE_TOKEN} token (not a Qwen2-VL tokenizer?)")
    return tok


def make_image_processor(config: DataConfig):
    """transformers' PIL Qwen2-VL image processor (Qwen3-VL's too) with the configured family's
    patch size and normalisation and the configured pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    geometry = IMAGE_PROCESSORS[config.image_processor]
    return Qwen2VLImageProcessorPil(min_pixels=config.min_pixels, max_pixels=config.max_pixels,
                                    patch_size=geometry["patch_size"], image_mean=list(geometry["image_mean"]),
                                    image_std=list(geometry["image_std"]))


def resized_hw(height: int, width: int, config: DataConfig) -> tuple[int, int]:
    """The size the image processor will resize (height, width) to (HF smart_resize)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=config.patch_size * MERGE_SIZE,
                        min_pixels=config.min_pixels, max_pixels=config.max_pixels)


def num_patches(height: int, width: int, config: DataConfig) -> int:
    """Rows of pixel_values an image of this size gives (= t*h*w of its grid, t = 1)."""
    h, w = resized_hw(height, width, config)
    return (h // config.patch_size) * (w // config.patch_size)


# ---- prompt ------------------------------------------------------------------------------

def build_messages(problem: str, num_images: int, config: DataConfig) -> list[dict]:
    """The chat for one record.

    User turn: the problem text split at `config.image_placeholder` matches, an image item at
    each placeholder (as the paper's data loader does); without placeholders the images come
    first, then the text (with `unplaced_images` "skip" the record never gets here). The format prompt goes into a system turn
    (`format_prompt_placement="system"`) or is appended to the problem text after a space
    (`"user"`; the chat template then adds its default system turn).
    """
    format_prompt = config.format_prompt_text
    text = problem
    if format_prompt and config.format_prompt_placement == "user":
        text = f"{problem} {format_prompt.strip()}"
    pieces = re.split(config.image_placeholder, text) if config.image_placeholder else [text]
    n_placeholders = len(pieces) - 1
    content: list[dict] = []
    if n_placeholders == 0:
        content.extend({"type": "image"} for _ in range(num_images))
        content.append({"type": "text", "text": text})
    elif n_placeholders == num_images:
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
    else:
        raise ValueError(f"problem text has {n_placeholders} image placeholders but the record has "
                         f"{num_images} images")
    messages = []
    if format_prompt and config.format_prompt_placement == "system":
        messages.append({"role": "system", "content": format_prompt})
    messages.append({"role": "user", "content": content})
    return messages


def text_token_spans(problem: str, image_placeholder: str | None, tokenizer) -> list[tuple[int, int]]:
    """(start, end) character spans of the problem's text tokens, in order; image placeholders
    are not text. Each text run between placeholders is tokenized on its own, as the image
    tokens that replace the placeholders split it in the rendered chat."""
    bounds = [0]
    for m in (re.finditer(image_placeholder, problem) if image_placeholder else ()):
        bounds += [m.start(), m.end()]
    bounds.append(len(problem))
    spans = []
    for a, b in zip(bounds[::2], bounds[1::2]):
        if a < b:
            enc = tokenizer(problem[a:b], add_special_tokens=False, return_offsets_mapping=True)
            spans += [(a + start, a + end) for start, end in enc["offset_mapping"]]
    return spans


def drop_text_tokens(problem: str, spans: Sequence[tuple[int, int]], k: int, side: str) -> str:
    """`problem` without its last ("right") or first ("left") k text tokens (`spans` from
    :func:`text_token_spans`). A character that a kept token shares with a dropped one (a
    character split over byte-level tokens) is kept: no character is cut in two."""
    dropped, kept = (spans[len(spans) - k:], spans[:len(spans) - k]) if side == "right" else (spans[:k], spans[k:])
    keep = np.ones(len(problem), bool)
    for start, end in dropped:
        keep[start:end] = False
    for start, end in kept:
        keep[start:end] = True
    return "".join(c for c, kept_char in zip(problem, keep) if kept_char)


def expand_image_tokens(ids: np.ndarray, image_token_id: int, image_grid_thw: np.ndarray,
                        merge_size: int = MERGE_SIZE) -> np.ndarray:
    """Repeat the k-th `<|image_pad|>` id prod(grid_thw[k]) / merge_size**2 times (HF rule)."""
    ids = np.asarray(ids)
    where = np.flatnonzero(ids == image_token_id)
    if len(where) != len(image_grid_thw):
        raise ValueError(f"{len(where)} {IMAGE_TOKEN} tokens in the prompt but {len(image_grid_thw)} images")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[where] = np.prod(np.asarray(image_grid_thw, dtype=np.int64), axis=-1) // (merge_size ** 2)
    return np.repeat(ids, repeats)


# ---- examples ----------------------------------------------------------------------------

@dataclasses.dataclass
class Example:
    """A processed record: unpadded arrays plus the fields the rewards need."""

    record_id: str
    problem: str
    answer: str
    annotations: tuple[str, ...]
    input_ids: np.ndarray  # [L] int32, image tokens expanded
    mm_token_type_ids: np.ndarray  # [L] int32, 1 at image tokens
    pixel_values: np.ndarray  # [N, 1176] float32
    image_grid_thw: np.ndarray  # [n_images, 3] int32
    truncated_tokens: int = 0  # prompt tokens cut by DataConfig.truncation (`problem` is the cut text)
    annotations_text: str = ""  # `Record.annotations_text`

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker for a record the pipeline leaves out (it travels to the batcher, which counts,
    logs, or raises in strict mode, in the main process)."""

    record_id: str
    reason: str
    detail: str = ""
    location: str = ""

    def error(self) -> BadRecordError:
        return BadRecordError(self.record_id, self.reason, self.detail, self.location)


class ExampleProcessor:
    """Record -> Example. Callable on a RawRow (the grain map step: never raises, returns
    Skipped for bad records) and via :meth:`process` on a Record (raises BadRecordError).

    The tokenizer is loaded lazily from `config.tokenizer_path` in each process (unless one
    is given), so the processor pickles small to grain worker processes.
    """

    def __init__(self, config: DataConfig, tokenizer: Any = None, image_processor: Any = None):
        self.config = config
        self._given_tokenizer = tokenizer is not None
        self._tokenizer = tokenizer
        self._image_processor = image_processor
        self._lock = threading.RLock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"] = None
        state["_image_processor"] = None
        if not self._given_tokenizer:
            state["_tokenizer"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    if not self.config.tokenizer_path:
                        raise ValueError("DataConfig.tokenizer_path is not set")
                    self._tokenizer = load_tokenizer(self.config.tokenizer_path, self.config.chat_template_path)
        return self._tokenizer

    @property
    def image_processor(self):
        if self._image_processor is None:
            self._image_processor = make_image_processor(self.config)
        return self._image_processor

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def prompt_text(self, record: Record) -> str:
        """The chat-template text (one `<|image_pad|>` per image, not yet expanded)."""
        return self.chat_text(record.problem, len(record.images))

    def chat_text(self, problem: str, num_images: int) -> str:
        messages = build_messages(problem, num_images, self.config)
        with self._lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, text: str, image_grid_thw: np.ndarray) -> np.ndarray:
        """Token ids of a chat text, each image's `<|image_pad|>` expanded to its grid's tokens."""
        with self._lock:
            ids = np.asarray(self.tokenizer(text)["input_ids"], dtype=np.int32)
        return expand_image_tokens(ids, self.image_token_id, image_grid_thw).astype(np.int32)

    def truncate(self, record: Record, image_grid_thw: np.ndarray, length: int) -> tuple[str, np.ndarray]:
        """(problem, ids) with the problem's text cut at `config.truncation`'s side until the prompt
        of `length` tokens fits max_prompt_length; BadRecordError(prompt_too_long) if it fits only
        with no text left. Cutting k tokens of text alone need not shorten the rendered prompt by
        exactly k (tokens merge across the cut), so it is measured again after each cut."""
        cfg, n_images = self.config, len(record.images)
        with self._lock:
            spans = text_token_spans(record.problem, cfg.image_placeholder, self.tokenizer)
        k = length - cfg.max_prompt_length
        while k < len(spans):
            problem = drop_text_tokens(record.problem, spans, k, cfg.truncation)
            ids = self.prompt_ids(self.chat_text(problem, n_images), image_grid_thw)
            if len(ids) <= cfg.max_prompt_length:
                return problem, ids
            k += len(ids) - cfg.max_prompt_length
        bare = drop_text_tokens(record.problem, spans, len(spans), cfg.truncation)
        fixed = len(self.prompt_ids(self.chat_text(bare, n_images), image_grid_thw))
        raise BadRecordError(record.id, rec.PROMPT_TOO_LONG,
                             f"{length} tokens > max_prompt_length {cfg.max_prompt_length}, {fixed} without the "
                             f"problem text: truncation {cfg.truncation!r} keeps one token of it at least")

    def process(self, record: Record) -> Example:
        """Decode, preprocess and tokenize one record; raises BadRecordError naming it."""
        cfg, rid = self.config, record.id
        if not record.problem or not record.problem.strip():
            raise BadRecordError(rid, rec.EMPTY_PROBLEM, "problem text is empty")
        if not record.answer:
            raise BadRecordError(rid, rec.MISSING_ANSWER, "answer is empty")
        if not record.images and cfg.require_image:
            raise BadRecordError(rid, rec.MISSING_IMAGE, "record has no image")
        if len(record.images) > cfg.image_limit_per_record:
            raise BadRecordError(rid, rec.TOO_MANY_IMAGES,
                                 f"{len(record.images)} images > limit {cfg.image_limit_per_record}")
        placed = bool(cfg.image_placeholder) and re.search(cfg.image_placeholder, record.problem)
        if record.images and cfg.unplaced_images == "skip" and not placed:
            raise BadRecordError(rid, rec.NO_IMAGE_PLACEHOLDER,
                                 f"{len(record.images)} image(s) but no {cfg.image_placeholder!r} in the problem "
                                 "(data.unplaced_images: skip; 'first' puts the images before the text)")
        images = _open_images(record)
        try:
            n_patches = sum(num_patches(img.size[1], img.size[0], cfg) for img in images)
            if n_patches > cfg.patch_limit_per_record:
                raise BadRecordError(rid, rec.TOO_MANY_PATCHES,
                                     f"{n_patches} patch rows > limit {cfg.patch_limit_per_record}")
            for k, (ref, img) in enumerate(zip(record.images, images)):
                try:  # decode only now: the sizes above come from the headers
                    img.load()
                except Exception as e:  # PIL raises many types for corrupt data
                    raise BadRecordError(rid, rec.BAD_IMAGE, f"image {k} ({ref.describe()}): "
                                         f"{type(e).__name__}: {e}") from None
        except BaseException:
            for img in images:
                img.close()
            raise

        try:
            text = self.prompt_text(record)
        except ValueError as e:
            raise BadRecordError(rid, rec.INVALID_RECORD, str(e)) from None

        if images:
            try:
                if cfg.image_alpha == "drop":
                    images = [img if img.mode == "RGB" else img.convert("RGB") for img in images]
                out = self.image_processor(images=images, return_tensors="np")
            except Exception as e:
                raise BadRecordError(rid, rec.BAD_IMAGE, f"{type(e).__name__}: {e}") from None
            pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
            grid = np.asarray(out["image_grid_thw"], dtype=np.int32)
        else:
            pixel_values = np.zeros((0, cfg.patch_dim), np.float32)
            grid = np.zeros((0, 3), np.int32)

        try:
            ids = self.prompt_ids(text, grid)
        except ValueError as e:
            raise BadRecordError(rid, rec.INVALID_RECORD, str(e)) from None
        problem, length = record.problem, len(ids)
        if length > cfg.max_prompt_length:
            if cfg.truncation == "skip":
                raise BadRecordError(rid, rec.PROMPT_TOO_LONG,
                                     f"{length} tokens > max_prompt_length {cfg.max_prompt_length}")
            problem, ids = self.truncate(record, grid, length)
        return Example(record_id=rid, problem=problem, answer=record.answer,
                       annotations=tuple(record.annotations), annotations_text=record.annotations_text, input_ids=ids,
                       mm_token_type_ids=(ids == self.image_token_id).astype(np.int32),
                       pixel_values=pixel_values, image_grid_thw=grid, truncated_tokens=length - len(ids))

    def __call__(self, raw: RawRow) -> Example | Skipped:
        try:
            return self.process(rec.row_to_record(raw, self.config))
        except BadRecordError as e:
            return Skipped(e.record_id, e.reason, e.detail, raw.location)
        except Exception as e:  # never crash the loop on one record
            return Skipped(rec.record_id_of(raw, self.config), rec.INVALID_RECORD, f"{type(e).__name__}: {e}",
                           raw.location)


def _open_images(record: Record) -> list:
    """The record's images, headers read but pixels not decoded yet. An image with no pixels,
    an aspect ratio > 200, or more pixels than PIL's decompression-bomb limit
    (`PIL.Image.MAX_IMAGE_PIXELS`) is a BadRecordError(bad_image) before anything is decoded."""
    from PIL import Image

    images = []
    try:
        for k, ref in enumerate(record.images):
            try:
                img = ref.open(load=False)
                images.append(img)
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ValueError(f"empty image {w}x{h}")
                if max(h, w) / min(h, w) > 200:
                    raise ValueError(f"aspect ratio {max(h, w) / min(h, w):.0f} > 200")
                limit = Image.MAX_IMAGE_PIXELS
                if limit and w * h > limit:
                    raise ValueError(f"{w}x{h} = {w * h} pixels > PIL.Image.MAX_IMAGE_PIXELS = {limit} "
                                     f"(decompression-bomb limit); not decoded")
            except Exception as e:  # PIL raises many types for corrupt data
                raise BadRecordError(record.id, rec.BAD_IMAGE, f"image {k} ({ref.describe()}): "
                                     f"{type(e).__name__}: {e}") from None
    except BaseException:
        for img in images:
            img.close()
        raise
    return images


def process_records(records: Sequence[Record], config: DataConfig, tokenizer: Any = None) -> list[Example]:
    """Process records outside grain (e.g. for evaluation); raises on a bad record."""
    proc = ExampleProcessor(config, tokenizer)
    return [proc.process(r) for r in records]
