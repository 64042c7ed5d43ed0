"""`DataConfig`: every knob of the data pipeline, from record columns to batch shapes.

Defaults follow the Perception-R1 reference run: the paper's parquet columns (`problem`,
`answer`, `images`, `visual_key_info`), image pixels in [3136, 1806336], prompts of at most
4096 tokens. To train on the full Perception-R1 data, point `paths` at its parquet file(s)
(or a directory of them) and leave the column names as they are; to train on JSONL, set
`image_column`/`annotations_column` to that file's keys (see `pr1_jax/data/README.md`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from pr1_jax import configlib, reference

# Qwen2-VL vision geometry (the same for Qwen2.5-VL).
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2

# What `DataConfig.image_processor` selects: transformers' Qwen2VLImageProcessor settings of each
# family's released checkpoints (their preprocessor_config.json): patch size, normalisation.
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGE_PROCESSORS = {
    "qwen2_vl": dict(patch_size=PATCH_SIZE, image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
    "qwen3_vl": dict(patch_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
}

# Written for this project: the paper's output contract (think, then answer with \boxed{}). The
# format prompt named "project" (the default); "paper" names the reference run's text.
DEFAULT_FORMAT_PROMPT = (
        "First think through the problem step by step inside <think> </think> tags. "
        "Then give the final answer inside <answer> </answer> tags, "
        "with the answer itself written in \\boxed{}."
)


def max_resized_blocks(min_pixels: int, max_pixels: int, factor: int = PATCH_SIZE * MERGE_SIZE,
                       max_ratio: float = 200.0) -> int:
    """The most factor x factor blocks (one image token each) that transformers' `smart_resize`
    gives any image it accepts (aspect ratio <= max_ratio): a bound on the patch budget that no
    image transformers processes exceeds, and that some image reaches.

    `smart_resize` rounds each side to a multiple of `factor`; the product is <= max_pixels
    except in two branches that raise a side to `factor` after scaling:
    * over max_pixels with a short side under `factor` after scaling: (1, floor(y)) blocks with
      x * y = max_pixels / factor**2 and y / x <= max_ratio, so at most floor(sqrt(max_ratio * M));
    * under min_pixels, both sides rounded *up*: (ceil(a), ceil(b)) blocks with a * b =
      min_pixels / factor**2 = m and b / a in [1, max_ratio] (a the short side). For ceil(a) = i,
      a lies in (i - 1, i] and b = m / a is largest at the smallest a, so ceil(b) <= ceil(m /
      max(i - 1, a_min)); the loop takes the largest product over i.
    Ceilings are taken as floor + 1 (and floors with a 1e-9 margin) so that float rounding inside
    smart_resize, when a side scales to an exact multiple, cannot exceed the bound.
    """
    unit = factor * factor
    m_max, m_min = max_pixels / unit, min_pixels / unit
    best = max(1, max_pixels // unit, math.floor(math.sqrt(max_ratio * m_max) * (1 + 1e-9)))
    a_min, a_max = math.sqrt(m_min / max_ratio), math.sqrt(m_min)
    for i in range(max(1, math.ceil(a_min)), math.ceil(a_max) + 1):
        best = max(best, i * (math.floor(m_min / max(i - 1, a_min) * (1 + 1e-9)) + 1))
    return best


@dataclasses.dataclass(frozen=True)
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (`pr1_jax.dynamic_sampling`): a step keeps only groups whose
    `metric` differs between their samples and samples more prompts until it has batch_size
    of them per process.

    enabled: off by default (one rollout per step, every group kept).
    metric: the score key that must not be the same on all of a group's samples: "overall" (the
        reward trained on; DAPO's accuracy-only reward makes this its "all correct or all
        wrong"), or a term such as "accuracy" (a 0/1 term: all 0 or all 1).
    max_rollouts: rollouts per step at most, the first included (the cap on extra rollouts);
        a step still short then trains on the groups it has, the missing ones masked out.
    """

    enabled: bool = False
    metric: str = "overall"
    max_rollouts: int = 4

    def __post_init__(self):
        if self.max_rollouts < 1:
            raise ValueError(f"dynamic_sampling.max_rollouts must be >= 1, got {self.max_rollouts}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Configuration of record reading, prompt building, image processing and batching.

    Record source
        paths: parquet / JSONL file(s) or directories of them (`*.parquet`, `*.jsonl`).
        format: "auto" (by file extension), "parquet" or "jsonl".
        id_column .. annotations_column: column (parquet) or key (JSONL) names. A missing id
            falls back to "<file stem>:<line>" (JSONL, from 1) or "<file stem>:<row>" (parquet,
            from 0). Ids are unique: a row repeating an earlier row's id is skipped
            (`duplicate_id`). The image column may hold a path, raw bytes, a
            `{"bytes":..., "path":...}` struct (Hugging Face `datasets` Image layout), or a list
            of those. Annotations may be a list of strings or `<info1>..</info1>`-tagged text.
        image_root: directory that relative image paths are resolved against (default: the
            directory of the record file).
        require_image: records without any image are skipped (`missing_image`).

    Prompt
        tokenizer_path: directory with tokenizer files (a Hugging Face checkpoint directory or
            `tests/fixtures/qwen2_tokenizer`), or a single `tokenizer.json` file.
        chat_template_path: a `.jinja` file overriding the tokenizer's chat template (a
            `chat_template.jinja` inside `tokenizer_path` is picked up automatically).
        format_prompt: the think/answer/boxed instruction: the name of a shipped text, "project"
            (DEFAULT_FORMAT_PROMPT) or "paper" (the reference run's, `pr1_jax.reference`), or
            the text itself; "" for none. `format_prompt_text` resolves it.
            `format_prompt_placement` puts it in the system turn ("system") or appends it to the
            problem text after a space ("user", what the paper's public training script does,
            with the template's default system turn).
        image_placeholder: regex for image placeholders inside the problem text (the paper's
            parquet writes "<image>"; the reference's loader splits at that literal only, which the
            paper configs set); each match becomes an image slot in the user turn.
        unplaced_images: what a record whose problem has no placeholder gets: "first" (the
            images come first, then the text) or "skip" (skipped as `no_image_placeholder`: the
            reference's loader gives such a problem no image token, and its rollout and update
            cannot take image features without one; the paper configs).

    Images
        image_processor: the policy's image geometry: "qwen2_vl" (Qwen2-VL and Qwen2.5-VL:
            14-pixel patches, CLIP mean/std) or "qwen3_vl" (Qwen3-VL: 16-pixel patches, so
            smart-resize works in 32-pixel units, mean/std 0.5). The trainer checks it against
            the policy's vision config.
        min_pixels, max_pixels: smart-resize bounds (paper: 3136 and 1806336; Qwen3-VL's own
            processor: 65536 and 16777216).
        image_alpha: how an image that is not RGB becomes RGB: "white" (transformers' image
            processor: alpha composited on white, the default) or "drop" (PIL's `convert("RGB")`,
            what the reference's loader does first: the colour under a transparent pixel stays,
            often black; the paper configs).
        max_images_per_record: records with more images are skipped (`too_many_images`).
        max_patches_per_record: records whose images give more patch rows are skipped
            (`too_many_patches`); the effective limit is also capped by
            patch_rows_per_batch // batch_size, so any batch fits its patch budget. Unset, every
            image transformers' processor accepts fits: the budget is the largest grid smart-resize
            can make, which for thin images or min_pixels close to max_pixels is above max_pixels
            (56*56 both ways: 116 patch rows for a 1 x 197 image, 16 for a square). Set it when the
            data's images are known to be smaller, to shrink `patch_rows` with it.

    Batching (static shapes)
        batch_size: prompts per batch (per host).
        max_prompt_length: the most tokens of a prompt (image tokens included); longer ones are
            skipped (`prompt_too_long`) or shortened, as `truncation` says.
        truncation: "skip" (the default), "right" or "left": an over-long prompt's problem text
            loses tokens at its end ("right", what the reference run does) or its start ("left")
            until the prompt fits. Only the problem's text is cut, at token boundaries, and the
            chat is rendered again, so the images (each whole, at its place), the template, the
            format prompt and the generation prompt stay intact, and the tokens are what the HF
            processor makes of the shortened problem. A prompt that does not fit with one token
            of text left is skipped (`prompt_too_long`). (The reference cuts the end of the token
            sequence itself, generation prompt first, and only for the update: its sampler reads
            the whole prompt.)
        length_buckets: allowed padded prompt lengths; a batch is left-padded to the smallest
            bucket holding its longest prompt. Default: powers of two from 64, capped by and
            ending in max_prompt_length.
        patch_rows_per_batch: rows of `pixel_values` in every batch (zero-padded). Default:
            batch_size * the per-record budget (max_images_per_record * `max_patches_per_image`,
            or max_patches_per_record when set and smaller).
        images_per_batch: rows of `image_grid_thw` (zero-padded). Default:
            batch_size * max_images_per_record.
        drop_remainder: drop a final partial batch (True) or pad it with invalid rows.

    Order
        seed, shuffle, num_epochs (None = repeat forever; each epoch reshuffled with seed+epoch).
        epoch_order: "streaming" (each process its own shard, shuffled and repeated, batches
            drawn from the flat stream, drawing on past skipped records) or "reference" (the
            reference run's: per epoch one permutation of all records, the same on every
            process, global batches of batch_size x processes with the epoch's remainder
            dropped, each process its slice of each; a skipped record leaves an invalid row).
            See `pr1_jax.data.order`. "reference" needs drop_remainder.
        shard_index / shard_count: this process's index and the process count (the shard it
            reads, or its slice of each global batch); None = jax.process_index()/process_count()
            (so call jax.distributed.initialize() before building a pipeline on several hosts).

    Workers
        worker_count: decoding processes (0 = in the main process). read_threads: threads per
            process. worker_buffer_size: per-worker prefetch buffer (examples).

    Errors
        strict: raise `BadRecordError` naming the record and where it is stored instead of
            skipping it (a duplicate id: as soon as the pipeline is built, naming both rows).

    Steps
        dynamic_sampling: DAPO's filling of a step with informative groups
            (`DynamicSamplingConfig`); the trainer draws the extra batches from this pipeline.
    """

    paths: str | Sequence[str] = ()
    format: str = "auto"
    id_column: str | None = "id"
    problem_column: str = "problem"
    answer_column: str = "answer"
    image_column: str = "images"
    annotations_column: str | None = "visual_key_info"
    image_root: str | None = None
    require_image: bool = True

    tokenizer_path: str = ""
    chat_template_path: str | None = None
    format_prompt: str = "project"
    format_prompt_placement: str = "system"
    image_placeholder: str = r"<image\d*>"
    unplaced_images: str = "first"

    image_processor: str = "qwen2_vl"
    min_pixels: int = configlib.bounded(3136, ge=1)
    max_pixels: int = configlib.bounded(1806336, ge=1)
    max_images_per_record: int = configlib.bounded(1, ge=0)
    max_patches_per_record: int | None = configlib.bounded(None, ge=1)
    image_alpha: str = "white"

    batch_size: int = configlib.bounded(8, ge=1)
    max_prompt_length: int = configlib.bounded(4096, ge=1)
    truncation: str = "skip"
    length_buckets: Sequence[int] | None = None
    patch_rows_per_batch: int | None = None
    images_per_batch: int | None = None
    drop_remainder: bool = True

    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = configlib.bounded(1, ge=1)
    epoch_order: str = "streaming"
    shard_index: int | None = None
    shard_count: int | None = None

    worker_count: int = configlib.bounded(0, ge=0)
    read_threads: int = configlib.bounded(4, ge=0)
    worker_buffer_size: int = configlib.bounded(8, ge=1)

    strict: bool = False

    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()

    def __post_init__(self):
        if self.format not in ("auto", "parquet", "jsonl"):
            raise ValueError(f"format must be auto, parquet or jsonl, got {self.format!r}")
        if self.format_prompt_placement not in ("system", "user"):
            raise ValueError(
                    f"format_prompt_placement must be 'system' or 'user', got {self.format_prompt_placement!r}")
        if self.unplaced_images not in ("first", "skip"):
            raise ValueError(f"unplaced_images must be first or skip, got {self.unplaced_images!r}")
        if self.image_alpha not in ("white", "drop"):
            raise ValueError(f"image_alpha must be white or drop, got {self.image_alpha!r}")
        if self.epoch_order not in ("streaming", "reference"):
            raise ValueError(f"epoch_order must be streaming or reference, got {self.epoch_order!r}")
        if self.epoch_order == "reference" and not self.drop_remainder:
            raise ValueError("epoch_order 'reference' drops each epoch's remainder: it needs drop_remainder=True")
        if self.truncation not in ("skip", "right", "left"):
            raise ValueError(f"truncation must be skip, right or left, got {self.truncation!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.image_processor not in IMAGE_PROCESSORS:
            raise ValueError(f"image_processor must be one of {sorted(IMAGE_PROCESSORS)}, got {self.image_processor!r}")
        if self.min_pixels <= 0 or self.max_pixels < self.min_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.max_images_per_record < 0:
            raise ValueError("max_images_per_record must be >= 0")
        if self.length_buckets is not None:
            b = list(self.length_buckets)
            if not b or b != sorted(b) or b[0] <= 0:
                raise ValueError(f"length_buckets must be positive and ascending, got {b}")
        if self.patch_rows_per_batch is not None and self.patch_rows_per_batch % (MERGE_SIZE * MERGE_SIZE):
            raise ValueError(f"patch_rows_per_batch must be a multiple of {MERGE_SIZE * MERGE_SIZE} "
                             f"(the vision merger's block), got {self.patch_rows_per_batch}")
        if self.max_patches_per_record is not None and self.max_patches_per_record < MERGE_SIZE * MERGE_SIZE:
            raise ValueError(f"max_patches_per_record must be >= {MERGE_SIZE * MERGE_SIZE} (one merge block), "
                             f"got {self.max_patches_per_record}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("set both shard_index and shard_count, or neither")

    @property
    def format_prompt_text(self) -> str:
        """The format prompt as the policy reads it (a shipped text's name resolved)."""
        if self.format_prompt == "project":
            return DEFAULT_FORMAT_PROMPT
        if self.format_prompt == "paper":
            return reference.format_prompt()
        return self.format_prompt

    # ---- derived sizes -------------------------------------------------------------------

    @property
    def patch_size(self) -> int:
        return IMAGE_PROCESSORS[self.image_processor]["patch_size"]

    @property
    def patch_dim(self) -> int:
        """Values per row of `pixel_values`: channels x frames x patch x patch (1176, or 1536 for Qwen3-VL)."""
        return 3 * TEMPORAL_PATCH_SIZE * self.patch_size**2

    @property
    def buckets(self) -> tuple[int, ...]:
        """Padded prompt lengths, ascending; the last one is >= max_prompt_length."""
        if self.length_buckets is not None:
            b = tuple(int(x) for x in self.length_buckets)
            if b[-1] < self.max_prompt_length:
                b = b + (self.max_prompt_length,)
            return b
        b, n = [], 64
        while n < self.max_prompt_length:
            b.append(n)
            n *= 2
        b.append(self.max_prompt_length)
        return tuple(b)

    @property
    def max_patches_per_image(self) -> int:
        """Patch rows of the largest grid smart-resize gives any image it accepts (see
        `max_resized_blocks`: thin images and tight bounds go above max_pixels)."""
        blocks = max_resized_blocks(self.min_pixels, self.max_pixels, factor=self.patch_size * MERGE_SIZE)
        return blocks * MERGE_SIZE * MERGE_SIZE

    @property
    def patch_rows(self) -> int:
        """Rows of `pixel_values` in every batch."""
        if self.patch_rows_per_batch is not None:
            return int(self.patch_rows_per_batch)
        per_record = max(self.max_images_per_record, 1) * self.max_patches_per_image
        if self.max_patches_per_record is not None:
            per_record = min(per_record, int(self.max_patches_per_record))
        return self.batch_size * (per_record - per_record % (MERGE_SIZE * MERGE_SIZE))

    @property
    def image_slots(self) -> int:
        """Rows of `image_grid_thw` in every batch."""
        if self.images_per_batch is not None:
            return int(self.images_per_batch)
        return self.batch_size * max(self.max_images_per_record, 1)

    @property
    def patch_limit_per_record(self) -> int:
        """Most patch rows one record may bring (so that any batch fits `patch_rows`); a
        multiple of merge_size**2, like every image's patch count."""
        limit = self.patch_rows // self.batch_size
        if self.max_patches_per_record is not None:
            limit = min(limit, int(self.max_patches_per_record))
        return limit - limit % (MERGE_SIZE * MERGE_SIZE)

    @property
    def image_limit_per_record(self) -> int:
        return min(self.max_images_per_record, self.image_slots // self.batch_size)
