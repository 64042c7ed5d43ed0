"""A small real-format sample dataset (8 geometry problems, figures drawn with PIL).

`SAMPLE_JSONL` (image paths + annotation lists) and `SAMPLE_PARQUET` (the paper's layout:
`<image>` placeholders, image bytes, `<infoN>`-tagged `visual_key_info`) hold the same
records. Regenerate with `python -m pr1_jax.data.sample.generate`.
"""

import os

SAMPLE_DIR = os.path.dirname(os.path.abspath(__file__))
SAMPLE_JSONL = os.path.join(SAMPLE_DIR, "sample.jsonl")
SAMPLE_PARQUET = os.path.join(SAMPLE_DIR, "sample.parquet")

# DataConfig overrides for each file's column names.
JSONL_COLUMNS = dict(image_column="image", annotations_column="annotations")
PARQUET_COLUMNS = dict(image_column="images", annotations_column="visual_key_info")
