"""Data: Perception-R1 records -> model-ready, static-shape batches (see README.md here).

Modules, one job each:
  config       DataConfig (columns, pixel bounds, lengths, batch shapes, order, workers)
  annotations  visual annotations: list or <infoN>-tagged text -> list[str]
  records      record files (parquet / JSONL) -> raw rows -> validated Records; writers
  processing   Record -> Example (HF Qwen2-VL image processor + chat template + image tokens)
  batching     Examples -> one static-shape batch dict (the layout is documented there)
  order        the reference epoch order: per-epoch global permutation, each process its slice
  pipeline     the grain pipeline: shard, shuffle, epochs, workers, skip bad records, batch
  geometry3k   Geometry3K example directories + diagram logic forms -> Records
  sample       a shipped 8-record sample dataset (parquet and JSONL)
"""

from pr1_jax.data.annotations import parse_annotations, to_tagged_text
from pr1_jax.data.batching import ARRAY_KEYS, collate, split_batch
from pr1_jax.data.config import DEFAULT_FORMAT_PROMPT, DataConfig
from pr1_jax.data.pipeline import BatchIterator, make_dataset, make_example_dataset, make_iterator
from pr1_jax.data.processing import Example, ExampleProcessor, Skipped, build_messages, load_tokenizer
from pr1_jax.data.records import SKIP_REASONS, BadRecordError, ImageRef, Record, RecordSource, read_records

__all__ = [
    "ARRAY_KEYS", "BadRecordError", "BatchIterator", "DEFAULT_FORMAT_PROMPT", "DataConfig", "Example",
    "ExampleProcessor", "ImageRef", "Record", "RecordSource", "SKIP_REASONS", "Skipped", "build_messages",
    "collate", "load_tokenizer", "make_dataset", "make_example_dataset", "make_iterator", "parse_annotations",
    "read_records", "split_batch", "to_tagged_text",
]
