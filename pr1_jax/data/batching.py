"""Examples -> one batch of static shapes (pure numpy; no grain, no JAX).

The batch dict (B = DataConfig.batch_size, T = a length bucket, P = DataConfig.patch_rows,
I = DataConfig.image_slots):

==================== =============== ======= =================================================
key                  shape           dtype   meaning
==================== =============== ======= =================================================
input_ids            [B, T]          int32   prompt ids, LEFT-padded with the pad id
                                             (<|endoftext|>, 151643); image tokens expanded
attention_mask       [B, T]          int32   1 at real tokens, 0 at padding
mm_token_type_ids    [B, T]          int32   1 at image tokens (<|image_pad|>), else 0
pixel_values         [P, 1176]       float32 patch rows of all images, in batch-row order
                                             then image order (the order of the image tokens
                                             in input_ids, read row-major); zero rows after
patch_valid          [P]             bool    True for real patch rows
patch_image_index    [P]             int32   image slot (row of image_grid_thw) of each patch
                                             row; -1 for padding rows
image_grid_thw       [I, 3]          int32   (t, h, w) patch grid per image; zero rows after
image_valid          [I]             bool    True for real images
image_example_index  [I]             int32   batch row of each image; -1 for padding
example_valid        [B]             bool    False for filler rows: of a final partial batch
                                             (with drop_remainder=False), or in place of
                                             skipped records (epoch_order "reference")
record_id            list[str] (B)           record ids ("" for filler rows)
problem              list[str] (B)           problem text
answer               list[str] (B)           ground-truth answers (for the accuracy reward)
annotations          list[list[str]] (B)     visual annotations (for the visual reward)
annotations_text     list[str] (B)           the annotations as stored when text ("" otherwise):
                                             the string the paper judge quotes
==================== =============== ======= =================================================

The grain pipeline adds ``skipped``: a list of (record_id, reason) for records left out while
this batch was assembled, and ``truncated``: a list of (record_id, tokens cut) for the rows
whose prompt `DataConfig.truncation` shortened. :data:`ARRAY_KEYS` lists the array fields (ready for
``jax.device_put``); the rest are host-side Python values.

T is the smallest entry of ``DataConfig.buckets`` holding the longest prompt of the batch, so
a run compiles for at most ``len(buckets)`` prompt shapes; P and I never change.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pr1_jax.data.config import DataConfig
from pr1_jax.data.processing import Example

ARRAY_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "patch_valid",
              "patch_image_index", "image_grid_thw", "image_valid", "image_example_index", "example_valid")
META_KEYS = ("record_id", "problem", "answer", "annotations", "annotations_text")


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if n <= b:
            return int(b)
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def collate(examples: Sequence[Example], config: DataConfig, pad_id: int) -> dict:
    """Pack up to `config.batch_size` examples into the static-shape batch dict above (none: a
    batch of filler rows only, which the reference epoch order delivers when all its records
    were skipped)."""
    B, P, I = config.batch_size, config.patch_rows, config.image_slots
    if len(examples) > B:
        raise ValueError(f"need at most {B} examples, got {len(examples)}")
    T = bucket_length(max((e.num_tokens for e in examples), default=1), config.buckets)

    input_ids = np.full((B, T), pad_id, np.int32)
    attention_mask = np.zeros((B, T), np.int32)
    mm_token_type_ids = np.zeros((B, T), np.int32)
    pixel_values = np.zeros((P, config.patch_dim), np.float32)
    patch_valid = np.zeros((P,), bool)
    patch_image_index = np.full((P,), -1, np.int32)
    image_grid_thw = np.zeros((I, 3), np.int32)
    image_valid = np.zeros((I,), bool)
    image_example_index = np.full((I,), -1, np.int32)
    example_valid = np.zeros((B,), bool)

    p = i = 0
    for b, e in enumerate(examples):
        L = e.num_tokens
        input_ids[b, T - L:] = e.input_ids
        attention_mask[b, T - L:] = 1
        mm_token_type_ids[b, T - L:] = e.mm_token_type_ids
        example_valid[b] = True
        for k in range(len(e.image_grid_thw)):
            if i >= I:
                raise ValueError(f"batch needs more than images_per_batch={I} image slots")
            image_grid_thw[i] = e.image_grid_thw[k]
            image_valid[i] = True
            image_example_index[i] = b
            n = int(np.prod(e.image_grid_thw[k]))
            if p + n > P:
                raise ValueError(f"batch needs more than patch_rows_per_batch={P} patch rows")
            patch_image_index[p:p + n] = i
            p += n
            i += 1
        start = p - e.num_patches
        pixel_values[start:p] = e.pixel_values
        patch_valid[start:p] = True

    pad = B - len(examples)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_token_type_ids,
        "pixel_values": pixel_values,
        "patch_valid": patch_valid,
        "patch_image_index": patch_image_index,
        "image_grid_thw": image_grid_thw,
        "image_valid": image_valid,
        "image_example_index": image_example_index,
        "example_valid": example_valid,
        "record_id": [e.record_id for e in examples] + [""] * pad,
        "problem": [e.problem for e in examples] + [""] * pad,
        "answer": [e.answer for e in examples] + [""] * pad,
        "annotations": [list(e.annotations) for e in examples] + [[] for _ in range(pad)],
        "annotations_text": [e.annotations_text for e in examples] + [""] * pad,
    }


def split_batch(batch: dict) -> tuple[dict, dict]:
    """(arrays for the device, host-side metadata)."""
    arrays = {k: batch[k] for k in ARRAY_KEYS}
    meta = {k: v for k, v in batch.items() if k not in ARRAY_KEYS}
    return arrays, meta
