"""Perception-R1 records: read them from parquet / JSONL, validate them, write them back.

A :class:`Record` is one training problem: id, problem text, ground-truth answer, images
(:class:`ImageRef`: bytes or a path, decoded later, in a worker) and visual annotations.

Reading is two-staged so that no bad row can crash a run:

* :class:`RecordSource` is a grain random-access source of :class:`RawRow` (the row as
  stored, never parsed or validated: reading it cannot fail on content);
* :func:`row_to_record` turns a raw row into a :class:`Record` or raises
  :class:`BadRecordError` with one of :data:`SKIP_REASONS`, naming the record. The
  pipeline turns that error into a counted, logged skip (or re-raises it when strict).

Every row has a location: ``path:line`` in a JSONL file (lines as an editor numbers them, from
1, blank lines included) or ``path row N`` in a parquet file (rows from 0, as pyarrow and pandas
index them). Errors name it. Ids must be unique over all files: the first row holding an id (in
file order) keeps it, a later one is a ``duplicate_id`` (a strict source refuses to start).

Supported layouts (column names come from :class:`~pr1_jax.data.config.DataConfig`):

* parquet as written by the paper's data preparation (Hugging Face ``datasets`` layout):
  ``problem`` (str, may contain ``<image>`` placeholders), ``answer`` (str),
  ``images`` (list of ``{"bytes": binary, "path": str}`` structs), ``visual_key_info``
  (``<infoN>``-tagged text); an ``id`` column if present.
* JSONL, one object per line, e.g.
  ``{"id": "tri-1", "problem": "...", "answer": "5", "image": "images/tri-1.png",
  "annotations": ["AB = 3.", "BC = 4."]}``; relative image paths are resolved against
  ``DataConfig.image_root`` or the JSONL file's directory.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pr1_jax.data.annotations import parse_annotations, to_tagged_text
from pr1_jax.data.config import DataConfig

# Why a record was skipped. Each skip is logged with the record id and counted per reason.
BAD_IMAGE = "bad_image"  # unreadable / corrupt / undecodable image, or unusable shape
MISSING_IMAGE = "missing_image"  # no image while DataConfig.require_image
MISSING_ANSWER = "missing_answer"
EMPTY_PROBLEM = "empty_problem"
PROMPT_TOO_LONG = "prompt_too_long"  # > DataConfig.max_prompt_length tokens (image tokens included)
TOO_MANY_PATCHES = "too_many_patches"  # > DataConfig.patch_limit_per_record patch rows
TOO_MANY_IMAGES = "too_many_images"  # > DataConfig.image_limit_per_record images
INVALID_RECORD = "invalid_record"  # anything else (malformed JSON line, wrong types, ...)
NO_IMAGE_PLACEHOLDER = "no_image_placeholder"  # images but no placeholder, with DataConfig.unplaced_images "skip"
# an id an earlier row (in file order) holds: results keyed by id (evaluation files, McNemar) would collide
DUPLICATE_ID = "duplicate_id"
SKIP_REASONS = (BAD_IMAGE, MISSING_IMAGE, MISSING_ANSWER, EMPTY_PROBLEM, PROMPT_TOO_LONG,
                TOO_MANY_PATCHES, TOO_MANY_IMAGES, INVALID_RECORD, DUPLICATE_ID, NO_IMAGE_PLACEHOLDER)


class BadRecordError(ValueError):
    """A record that cannot be used; `reason` is one of SKIP_REASONS, `location` where the row
    is stored ("path:line" or "path row N"; empty for a record not read from a file)."""

    def __init__(self, record_id: str, reason: str, detail: str = "", location: str = ""):
        super().__init__(record_id, reason, detail, location)  # args: pickled across worker processes
        self.record_id = record_id
        self.reason = reason
        self.detail = detail
        self.location = location

    def __str__(self) -> str:
        return (f"bad record {self.record_id!r}: {self.reason}" + (f" ({self.detail})" if self.detail else "")
                + (f" at {self.location}" if self.location else ""))

    def at(self, location: str) -> "BadRecordError":
        return BadRecordError(self.record_id, self.reason, self.detail, location)


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image as stored: encoded bytes, or a file path (absolute once resolved)."""

    data: bytes | None = None
    path: str | None = None

    def describe(self) -> str:
        return self.path if self.data is None else f"<{len(self.data)} bytes>"

    def open(self, load: bool = True):
        """The decoded PIL image (pixels loaded, so truncation errors surface here). With
        `load=False` only the header is read (size and mode known, nothing decoded yet)."""
        from PIL import Image

        if self.data is not None:
            img = Image.open(io.BytesIO(self.data))
        elif self.path:
            img = Image.open(self.path)
        else:
            raise ValueError("image reference has neither bytes nor a path")
        if load:
            try:
                img.load()
            except BaseException:
                img.close()
                raise
        return img

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            return f.read()


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    problem: str
    answer: str
    images: tuple[ImageRef, ...] = ()
    annotations: tuple[str, ...] = ()
    annotations_text: str = ""  # the annotations field verbatim when stored as text (the paper judge quotes it)


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One stored row, unparsed: `data` is a dict (parquet) or a JSON line (JSONL)."""

    index: int  # global row index over all files of the source
    fallback_id: str  # "<file stem>:<line>" (JSONL) or "<file stem>:<row>" (parquet), for a row without id
    base_dir: str  # relative image paths are resolved against this
    data: Any
    location: str = ""  # "path:line" or "path row N"
    duplicate_of: str | None = None  # location of the earlier row holding this row's id


# ---- files -------------------------------------------------------------------------------

def _file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".jsonl") or path.endswith(".json"):
        return "jsonl"
    raise ValueError(f"cannot tell the format of {path!r} (use .parquet or .jsonl, or set format)")


def list_record_files(paths: str | Sequence[str], fmt: str = "auto") -> list[tuple[str, str]]:
    """(path, format) for every record file; directories expand to their sorted
    `*.parquet` / `*.jsonl` files, glob patterns are expanded."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.parquet")) + glob.glob(os.path.join(p, "*.jsonl")))
            if not found:
                raise FileNotFoundError(f"no .parquet or .jsonl files in {p!r}")
            out.extend((f, _file_format(f, fmt)) for f in found)
        elif any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise FileNotFoundError(f"no files match {p!r}")
            out.extend((f, _file_format(f, fmt)) for f in found)
        elif os.path.isfile(p):
            out.append((p, _file_format(p, fmt)))
        else:
            raise FileNotFoundError(f"record file {p!r} does not exist")
    if not out:
        raise ValueError("no record files given (DataConfig.paths is empty)")
    return out


def _parquet_columns(path: str, wanted: Iterable[str | None]) -> list[str]:
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    return [c for c in dict.fromkeys(wanted) if c and c in names]


class _ParquetFile:
    def __init__(self, path: str, columns: list[str]):
        import pyarrow.parquet as pq

        self.path, self.columns = path, columns
        self.num_rows = pq.ParquetFile(path).metadata.num_rows
        self._table = None

    def row(self, i: int) -> dict:
        if self._table is None:
            import pyarrow.parquet as pq

            self._table = pq.read_table(self.path, columns=self.columns)
        row = self._table.slice(i, 1)
        try:
            return row.to_pylist()[0]
        except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8
            return {name: _cell(row.column(name)) for name in row.column_names}

    def ids(self, column: str) -> list:
        """The id column's cells (NotUtf8 where a cell is not text), read without the rest."""
        import pyarrow.parquet as pq

        if column not in self.columns:
            return [None] * self.num_rows
        ids = pq.read_table(self.path, columns=[column]).column(column)
        try:
            return ids.to_pylist()
        except UnicodeDecodeError:
            return [_cell(ids.slice(i, 1)) for i in range(len(ids))]

    def where(self, i: int) -> tuple[str, str]:
        """(fallback id, location) of row i."""
        return f"{Path(self.path).stem}:{i}", f"{self.path} row {i}"

    def __getstate__(self):
        return {**self.__dict__, "_table": None}  # each process reads the file itself


@dataclasses.dataclass(frozen=True)
class NotUtf8:
    """A parquet cell whose text is not valid UTF-8 (the row is reported as invalid_record)."""

    detail: str


def _cell(column) -> Any:
    try:
        return column.to_pylist()[0]
    except UnicodeDecodeError as e:
        return NotUtf8(str(e))


class _JsonlFile:
    """Lines are kept as bytes and decoded per row, so one line that is not UTF-8 is one
    invalid record, not a file that cannot be opened. Blank lines hold no row but keep their
    number: rows are named by the line an editor shows (from 1). Lines end at "\n" only (the
    JSON Lines rule; a "\r" before it is JSON whitespace)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            numbered = [(n, line) for n, line in enumerate(f.read().split(b"\n"), start=1) if line.strip()]
        self._line_numbers = [n for n, _ in numbered]
        self._lines = [line for _, line in numbered]
        self.num_rows = len(self._lines)

    def row(self, i: int) -> bytes:
        return self._lines[i]

    def ids(self, column: str) -> list:
        """Each row's `column` value (None where the line is not a JSON object)."""
        out = []
        for line in self._lines:
            try:
                data = json.loads(line.decode("utf-8-sig"))
            except ValueError:  # not UTF-8 (UnicodeDecodeError is a ValueError) or not JSON
                data = None
            out.append(data.get(column) if isinstance(data, dict) else None)
        return out

    def where(self, i: int) -> tuple[str, str]:
        """(fallback id, location) of row i."""
        line = self._line_numbers[i]
        return f"{Path(self.path).stem}:{line}", f"{self.path}:{line}"


class RecordSource:
    """Grain random-access data source over record files: `len()` and `[i] -> RawRow`.

    Parquet files are read lazily per process (only the configured columns); JSONL lines
    are kept as text and parsed per row by :func:`row_to_record`. The ids are read once, up
    front, over all files (before any per-host shard or shuffle, so every host and every epoch
    agrees on which row is a duplicate); with `config.strict` a duplicate id is an error here.
    """

    def __init__(self, config: DataConfig):
        self._files = []
        self._starts = []
        n = 0
        for path, fmt in list_record_files(config.paths, config.format):
            if fmt == "parquet":
                cols = _parquet_columns(path, [config.id_column, config.problem_column, config.answer_column,
                                               config.image_column, config.annotations_column])
                fobj = _ParquetFile(path, cols)
            else:
                fobj = _JsonlFile(path)
            self._files.append(fobj)
            self._starts.append(n)
            n += fobj.num_rows
        self._len = n
        self._image_root = config.image_root
        self._duplicate_of = self._find_duplicates(config)

    def _find_duplicates(self, config: DataConfig) -> dict[int, str]:
        """{row index: location of the first row with its id} for every later row with that id."""
        first: dict[str, str] = {}
        duplicate_of = {}
        if not config.id_column:  # fallback ids name distinct rows
            return duplicate_of
        for start, fobj in zip(self._starts, self._files):
            for i, value in enumerate(fobj.ids(config.id_column)):
                fallback, location = fobj.where(i)
                rid = _id_text(value, fallback)
                if rid not in first:
                    first[rid] = location
                    continue
                duplicate_of[start + i] = first[rid]
                if config.strict:
                    raise _duplicate_error(rid, first[rid], location)
        return duplicate_of

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> RawRow:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(index)
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        fobj, local = self._files[k], index - self._starts[k]
        base = self._image_root or os.path.dirname(os.path.abspath(fobj.path))
        fallback, location = fobj.where(local)
        return RawRow(index=index, fallback_id=fallback, base_dir=base, data=fobj.row(local), location=location,
                      duplicate_of=self._duplicate_of.get(index))

    def __repr__(self) -> str:
        return f"RecordSource({[f.path for f in self._files]}, len={self._len})"


# ---- parsing + validation ----------------------------------------------------------------

def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _answer_text(v: Any) -> str | None:
    if _is_missing(v):
        return None
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return format_number(float(v))
    if isinstance(v, str):
        return v.strip() or None
    raise TypeError(f"answer must be a string or a number, got {type(v).__name__}")


def format_number(v: float) -> str:
    """30.0 -> "30", 7.5 -> "7.5", 8.660254037844386 -> "8.660254037844386"."""
    if math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def image_refs(value: Any, base_dir: str) -> list[ImageRef]:
    """An image cell as stored (a path, raw bytes, a `{"bytes", "path"}` struct, or a list of
    those; relative paths resolved against `base_dir`) -> its images; empty cells dropped."""
    def one(v) -> ImageRef | None:
        if _is_missing(v):
            return None
        if isinstance(v, (bytes, bytearray, memoryview)):
            return ImageRef(data=bytes(v)) if len(v) else None
        if isinstance(v, (str, os.PathLike)):
            p = os.fspath(v)
            if not p.strip():
                return None
            return ImageRef(path=p if os.path.isabs(p) else os.path.join(base_dir, p))
        if isinstance(v, dict):
            if v.get("bytes"):
                return ImageRef(data=bytes(v["bytes"]))
            if v.get("path"):
                return one(v["path"])
            return None
        raise TypeError(f"unsupported image value of type {type(v).__name__}")

    if _is_missing(value):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        refs = [one(v) for v in value]
    else:
        refs = [one(value)]
    return [r for r in refs if r is not None]


def _row_dict(raw: RawRow) -> dict:
    data = raw.data
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BadRecordError(raw.fallback_id, INVALID_RECORD, f"line is not valid UTF-8: {e}") from None
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise BadRecordError(raw.fallback_id, INVALID_RECORD, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRecordError(raw.fallback_id, INVALID_RECORD, f"row is a {type(data).__name__}, not an object")
    return data


def _id_text(value: Any, fallback: str) -> str:
    return fallback if _is_missing(value) or value == "" or isinstance(value, NotUtf8) else str(value)


def _duplicate_error(record_id: str, first: str, location: str) -> BadRecordError:
    return BadRecordError(record_id, DUPLICATE_ID, f"the id of the row at {first}", location)


def record_id_of(raw: RawRow, config: DataConfig) -> str:
    """The id a row is reported under (its id column, else its fallback id)."""
    try:
        data = _row_dict(raw)
    except BadRecordError:
        return raw.fallback_id
    return _id_text(data.get(config.id_column) if config.id_column else None, raw.fallback_id)


def row_to_record(raw: RawRow, config: DataConfig) -> Record:
    """Parse and validate a raw row; raises BadRecordError (naming the record) if unusable.

    Checks here: repeated id, empty problem, missing answer, missing image, too many images,
    malformed fields. Image decoding, patch counts and prompt length are checked in processing.
    """
    data = _row_dict(raw)
    rid = record_id_of(raw, config)
    if raw.duplicate_of is not None:
        raise _duplicate_error(rid, raw.duplicate_of, raw.location)
    for column, v in data.items():
        if isinstance(v, NotUtf8):
            raise BadRecordError(rid, INVALID_RECORD, f"column {column!r} is not valid UTF-8: {v.detail}")
    try:
        problem = data.get(config.problem_column)
        if isinstance(problem, bytes):  # a binary column
            try:
                problem = problem.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRecordError(rid, INVALID_RECORD,
                                     f"column {config.problem_column!r} is not valid UTF-8: {e}") from None
        if not _is_missing(problem) and not isinstance(problem, str):
            raise TypeError(f"column {config.problem_column!r} must be text, got {type(problem).__name__}")
        if _is_missing(problem) or not problem.strip():
            raise BadRecordError(rid, EMPTY_PROBLEM, f"column {config.problem_column!r} is empty or missing")
        answer = _answer_text(data.get(config.answer_column))
        if answer is None:
            raise BadRecordError(rid, MISSING_ANSWER, f"column {config.answer_column!r} is empty or missing")
        images = image_refs(data.get(config.image_column), raw.base_dir)
        if not images and config.require_image:
            raise BadRecordError(rid, MISSING_IMAGE, f"column {config.image_column!r} holds no image")
        if len(images) > config.image_limit_per_record:
            raise BadRecordError(rid, TOO_MANY_IMAGES,
                                 f"{len(images)} images > limit {config.image_limit_per_record}")
        stored = data.get(config.annotations_column) if config.annotations_column else None
        if isinstance(stored, bytes):
            stored = stored.decode("utf-8")
        annotations = parse_annotations(stored)
    except (TypeError, ValueError) as e:
        if isinstance(e, BadRecordError):
            raise
        raise BadRecordError(rid, INVALID_RECORD, str(e)) from None
    return Record(id=rid, problem=problem, answer=answer, images=tuple(images),
                  annotations=tuple(annotations), annotations_text=stored if isinstance(stored, str) else "")


def read_records(config: DataConfig) -> tuple[list[Record], list[BadRecordError]]:
    """All records of the configured files (no grain): the good ones and the errors."""
    source = RecordSource(config)
    good, bad = [], []
    for i in range(len(source)):
        raw = source[i]
        try:
            good.append(row_to_record(raw, config))
        except BadRecordError as e:
            bad.append(e.at(raw.location))
    return good, bad


# ---- writers -----------------------------------------------------------------------------

def write_jsonl(records: Iterable[Record], path: str, *, image_key: str = "image",
                annotations_key: str = "annotations", image_dir: str | None = None) -> None:
    """Write records as JSONL with image paths relative to the file.

    Images given as bytes are written to `image_dir` (default: "<dir of path>/images") as
    "<id>_<k>.png" files. A record with one image gets `image_key: "path"`, more get a list.
    """
    out_dir = os.path.dirname(os.path.abspath(path))
    image_dir = image_dir or os.path.join(out_dir, "images")
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            rels = []
            for k, img in enumerate(r.images):
                if img.data is not None:
                    os.makedirs(image_dir, exist_ok=True)
                    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in r.id)
                    p = os.path.join(image_dir, f"{safe}_{k}.png")
                    with open(p, "wb") as g:
                        g.write(img.data)
                else:
                    p = img.path
                rels.append(os.path.relpath(os.path.abspath(p), out_dir))
            row = {"id": r.id, "problem": r.problem, "answer": r.answer,
                   image_key: rels[0] if len(rels) == 1 else rels,
                   annotations_key: list(r.annotations)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_parquet(records: Iterable[Record], path: str, *, image_placeholder: str | None = "<image>",
                  tagged_annotations: bool = True) -> None:
    """Write records in the paper's parquet layout (images embedded as bytes).

    Columns: id, problem (prefixed with `image_placeholder` once per image unless it already
    holds one), answer, images (list<struct<bytes, path>>), visual_key_info (`<infoN>` tagged
    text, or list<string> when `tagged_annotations=False`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"id": [], "problem": [], "answer": [], "images": [], "visual_key_info": []}
    for r in records:
        problem = r.problem
        if image_placeholder and image_placeholder not in problem:
            problem = image_placeholder * len(r.images) + problem
        rows["id"].append(r.id)
        rows["problem"].append(problem)
        rows["answer"].append(r.answer)
        rows["images"].append([{"bytes": img.read_bytes(),
                                "path": os.path.basename(img.path) if img.path else None}
                               for img in r.images])
        rows["visual_key_info"].append(to_tagged_text(r.annotations) if tagged_annotations
                                       else list(r.annotations))
    image_t = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    ann_t = pa.string() if tagged_annotations else pa.list_(pa.string())
    schema = pa.schema([("id", pa.string()), ("problem", pa.string()), ("answer", pa.string()),
                        ("images", image_t), ("visual_key_info", ann_t)])
    pq.write_table(pa.table(rows, schema=schema), path)
