"""Record readers (parquet, JSONL), field handling, the sample dataset and Geometry3K."""

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pr1_jax.data import geometry3k, sample
from pr1_jax.data.config import DataConfig
from pr1_jax.data.processing import ExampleProcessor, load_tokenizer
from pr1_jax.data.records import (DUPLICATE_ID, EMPTY_PROBLEM, INVALID_RECORD, MISSING_ANSWER, MISSING_IMAGE, TOO_MANY_IMAGES,
                                  BadRecordError, ImageRef, RawRow, Record, RecordSource, read_records,
                                  row_to_record, write_jsonl, write_parquet)

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "qwen2_tokenizer"
GEO3K = Path(__file__).parent / "fixtures" / "geometry3k"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def _cfg(**kw):
    return DataConfig(tokenizer_path=str(TOKENIZER_DIR), **kw)


def test_sample_parquet_and_jsonl_hold_the_same_records():
    pq_records, pq_bad = read_records(_cfg(paths=sample.SAMPLE_PARQUET, **sample.PARQUET_COLUMNS))
    js_records, js_bad = read_records(_cfg(paths=sample.SAMPLE_JSONL, **sample.JSONL_COLUMNS))
    assert not pq_bad and not js_bad
    assert 5 <= len(pq_records) == len(js_records) <= 8
    for a, b in zip(pq_records, js_records):
        assert a.id == b.id and a.answer == b.answer and a.annotations == b.annotations
        assert a.problem == "<image>" + b.problem  # the paper's placeholder layout
        assert len(a.annotations) >= 2
        assert a.images[0].data == b.images[0].read_bytes()  # embedded bytes == the PNG on disk


def test_sample_prompts_identical_across_formats(tokenizer):
    tok = tokenizer
    pq_records, _ = read_records(_cfg(paths=sample.SAMPLE_PARQUET, **sample.PARQUET_COLUMNS))
    js_records, _ = read_records(_cfg(paths=sample.SAMPLE_JSONL, **sample.JSONL_COLUMNS))
    proc = ExampleProcessor(_cfg(), tok)
    for a, b in zip(pq_records[:3], js_records[:3]):
        ea, eb = proc.process(a), proc.process(b)
        np.testing.assert_array_equal(ea.input_ids, eb.input_ids)
        np.testing.assert_array_equal(ea.pixel_values, eb.pixel_values)


def _raw(data, base_dir="/base"):
    return RawRow(index=0, fallback_id="file:0", base_dir=base_dir, data=data)


def test_row_fields_and_image_forms(tmp_path):
    cfg = _cfg(max_images_per_record=3)
    r = row_to_record(_raw({"id": 7, "problem": "p", "answer": 30.0, "images": "img/a.png",
                            "visual_key_info": "<info1>x</info1>"}), cfg)
    assert r == Record("7", "p", "30", (ImageRef(path="/base/img/a.png"),), ("x",), "<info1>x</info1>")
    r = row_to_record(_raw({"problem": "p", "answer": 7.5, "images": [{"bytes": b"abc", "path": "z.png"},
                                                                      {"bytes": None, "path": "/abs/b.png"},
                                                                      b"raw"]}), cfg)
    assert r.id == "file:0" and r.answer == "7.5" and r.annotations == ()
    assert r.images == (ImageRef(data=b"abc"), ImageRef(path="/abs/b.png"), ImageRef(data=b"raw"))
    # image_root overrides the file's directory
    src_cfg = _cfg(paths=str(_write_jsonl(tmp_path, [{"problem": "p", "answer": "1", "image": "i.png"}])),
                   image_column="image", image_root="/elsewhere")
    assert RecordSource(src_cfg)[0].base_dir == "/elsewhere"


def _write_jsonl(tmp_path, rows, name="r.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("data,reason", [
    ({"id": "a", "problem": "  ", "answer": "1", "images": "x.png"}, EMPTY_PROBLEM),
    ({"id": "b", "answer": "1", "images": "x.png"}, EMPTY_PROBLEM),
    ({"id": "c", "problem": "p", "answer": "", "images": "x.png"}, MISSING_ANSWER),
    ({"id": "d", "problem": "p", "answer": None, "images": "x.png"}, MISSING_ANSWER),
    ({"id": "e", "problem": "p", "answer": "1"}, MISSING_IMAGE),
    ({"id": "f", "problem": "p", "answer": "1", "images": ["x.png", "y.png"]}, TOO_MANY_IMAGES),
    ({"id": "g", "problem": "p", "answer": "1", "images": "x.png", "visual_key_info": {"k": 1}}, INVALID_RECORD),
    ({"id": "h", "problem": "p", "answer": ["1"], "images": "x.png"}, INVALID_RECORD),
    ('{"id": "i", "problem": ', INVALID_RECORD),
])
def test_row_validation_names_the_record(data, reason):
    with pytest.raises(BadRecordError) as e:
        row_to_record(_raw(data), _cfg())
    assert e.value.reason == reason
    expected_id = data["id"] if isinstance(data, dict) else "file:0"
    assert e.value.record_id == expected_id and repr(expected_id) in str(e.value)


def test_record_source_over_several_files(tmp_path):
    a = _write_jsonl(tmp_path, [{"id": "a0", "problem": "p", "answer": "1", "image": "i.png"},
                                {"id": "a1", "problem": "p", "answer": "2", "image": "i.png"}], "a.jsonl")
    _write_jsonl(tmp_path, [{"problem": "p", "answer": "3", "image": "i.png"}], "b.jsonl")
    src = RecordSource(_cfg(paths=str(tmp_path), image_column="image"))
    assert len(src) == 3
    rows = [row_to_record(src[i], _cfg(image_column="image")) for i in range(3)]
    assert [r.id for r in rows] == ["a0", "a1", "b:1"]  # a row without id: "<file stem>:<line>"
    assert rows[0].images[0].path == str(tmp_path / "i.png")
    with pytest.raises(IndexError):
        src[3]
    assert len(RecordSource(_cfg(paths=[str(a)]))) == 2


def test_duplicate_ids_over_files_name_both_rows(tmp_path):
    """Ids are unique over all files: parquet rows are named "path row N" (from 0), JSONL rows
    "path:line" (from 1); the first row in file order keeps the id."""
    img = ImageRef(data=(Path(sample.SAMPLE_DIR) / "images" / "right-triangle.png").read_bytes())
    write_parquet([Record("x", "p", "1", (img,)), Record("y", "p", "2", (img,)), Record("x", "p", "3", (img,))],
                  str(tmp_path / "a.parquet"))
    _write_jsonl(tmp_path, [{"id": "y", "problem": "p", "answer": "4", "images": "i.png"},
                            {"id": "z", "problem": "p", "answer": "5", "images": "i.png"}], "b.jsonl")
    good, bad = read_records(_cfg(paths=[str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")]))
    assert [(r.id, r.answer) for r in good] == [("x", "1"), ("y", "2"), ("z", "5")]
    pq_path, js_path = tmp_path / "a.parquet", tmp_path / "b.jsonl"
    assert [(e.record_id, e.reason, e.location) for e in bad] == [("x", DUPLICATE_ID, f"{pq_path} row 2"),
                                                                  ("y", DUPLICATE_ID, f"{js_path}:1")]
    assert f"{pq_path} row 0" in str(bad[0]) and f"{pq_path} row 1" in str(bad[1])
    with pytest.raises(BadRecordError, match="row 2"):
        RecordSource(_cfg(paths=str(pq_path), strict=True))
    assert len(RecordSource(_cfg(paths=str(pq_path), id_column=None))) == 3  # no ids: nothing repeats


def test_writers_round_trip(tmp_path):
    img = (Path(sample.SAMPLE_DIR) / "images" / "right-triangle.png").read_bytes()
    recs = [Record("r/1", "Find x.", "5", (ImageRef(data=img),), ("AB = 3.", "BC = 4.")),
            Record("r/2", "Find y.", "7", (ImageRef(data=img),), ())]
    write_parquet(recs, str(tmp_path / "x.parquet"), tagged_annotations=False)
    write_jsonl(recs, str(tmp_path / "x.jsonl"))
    got_pq, _ = read_records(_cfg(paths=str(tmp_path / "x.parquet")))
    got_js, _ = read_records(_cfg(paths=str(tmp_path / "x.jsonl"), image_column="image",
                                  annotations_column="annotations"))
    for got in (got_pq, got_js):
        assert [(r.id, r.answer, r.annotations) for r in got] == [(r.id, r.answer, r.annotations) for r in recs]
        assert all(r.images[0].read_bytes() == img for r in got)


# ---- Geometry3K ------------------------------------------------------------------------------

def test_geometry3k_answers_are_precise_value_of_the_letter():
    records = geometry3k.load_examples(str(GEO3K))
    assert [r.id for r in records] == [f"geometry3k/{i}" for i in range(11, 21)]
    for r in records:
        data = json.loads((GEO3K / r.id.split("/")[1] / "data.json").read_text())
        value = data["precise_value"][ord(data["answer"]) - ord("A")]
        assert float(r.answer) == pytest.approx(value, rel=0, abs=0)
        assert r.problem == data["problem_text"].strip()
        assert r.images[0].path.endswith("img_diagram.png") and os.path.isfile(r.images[0].path)
    by_id = {r.id: r for r in records}
    assert by_id["geometry3k/11"].answer == "80"
    assert by_id["geometry3k/15"].answer == "8.660254037844386"


def test_geometry3k_annotations_from_logic_forms():
    r = geometry3k.example_to_record(str(GEO3K / "12"))
    assert r.annotations[:6] == ("AB = 5.", "EC = 4.5.", "CA = 7.5.", "BD = x.", "C lies on line EA.",
                                 "B lies on line AD.")
    assert r.annotations[6] == "E lies on circle X."
    r15 = geometry3k.example_to_record(str(GEO3K / "15"))
    assert r15.annotations == ("AB = 10.", "AC = y.", "angle ABC = 60.", "BC = x.", "AC is perpendicular to BC.")
    assert geometry3k.example_to_record(str(GEO3K / "16")).annotations[-1] == "EB is parallel to DC."
    assert "" not in geometry3k.example_to_record(str(GEO3K / "20")).annotations  # its last form is ''
    assert len(geometry3k.example_to_record(str(GEO3K / "14"), max_annotations=5).annotations) == 5


@pytest.mark.parametrize("form,text", [
    ("Equals(MeasureOf(Arc(C,Z)),40)", "arc CZ = 40."),
    ("Equals(MeasureOf(Angle(K, I, P)), MeasureOf(angle 1))", "angle KIP = angle 1."),
    ("Equals(Line(A, E), Line(B, E))", "AE = BE."),
    ("Tangent(Line(A, B), Circle(O, r))", "AB is tangent to circle O."),
    ("Similar(Triangle(A, B, C), Triangle(D, E, F))", "Similar(Triangle(A, B, C), Triangle(D, E, F))."),
    ("broken(form", "broken(form."),
    ("", None),
])
def test_render_logic_form(form, text):
    assert geometry3k.render_logic_form(form) == text


def test_geometry3k_logic_forms_from_zip(tmp_path):
    annot = {"12": {"diagram_logic_forms": ["Equals(LengthOf(Line(A, B)), 99)"]}}
    z = tmp_path / "logic_forms.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("logic_forms/diagram_logic_forms_annot.json", json.dumps(annot))
    forms = geometry3k.load_diagram_logic_forms(str(z))
    records = geometry3k.load_examples(str(GEO3K), forms)
    by_id = {r.id: r for r in records}
    assert by_id["geometry3k/12"].annotations == ("AB = 99.",)
    # ids missing from the mapping fall back to their directory's logic_form.json
    assert by_id["geometry3k/13"].annotations == geometry3k.example_to_record(str(GEO3K / "13")).annotations


def test_geometry3k_records_flow_through_processing(tokenizer):
    proc = ExampleProcessor(_cfg(), tokenizer)
    for r in geometry3k.load_examples(str(GEO3K))[:3]:
        ex = proc.process(r)
        assert ex.num_tokens < 1024 and ex.pixel_values.shape[1] == 1176
