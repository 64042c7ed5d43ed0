"""Visual annotations: lists and <infoN>-tagged text, including left-open tags."""

import numpy as np
import pytest

from pr1_jax.data.annotations import parse_annotations, parse_tagged, to_tagged_text


def test_list_of_strings():
    assert parse_annotations(["AB = 5.", "  C lies on line EA. ", "", None]) == ["AB = 5.", "C lies on line EA."]
    assert parse_annotations(("x",)) == ["x"]
    assert parse_annotations(np.array(["a", "b"], dtype=object)) == ["a", "b"]


def test_missing():
    assert parse_annotations(None) == []
    assert parse_annotations(float("nan")) == []
    assert parse_annotations("") == []
    assert parse_annotations([]) == []


def test_tagged_text_paper_format():
    text = "<info1>$JKLM$ is a parallelogram.</info1>\n<info2>Length of side $JK$ is $3f - 6$.</info2>"
    assert parse_annotations(text) == ["$JKLM$ is a parallelogram.", "Length of side $JK$ is $3f - 6$."]


def test_text_outside_tags_is_ignored():
    text = "Visual Key Information: <info1>A</info1>, <info2>B</info2> trailing"
    assert parse_annotations(text) == ["A", "B"]


def test_left_open_last_tag_runs_to_end():
    assert parse_annotations("<info1>AB = 5.</info1>\n<info2>angle C = 90.  ") == ["AB = 5.", "angle C = 90."]


def test_left_open_middle_tag_ends_at_next_tag():
    text = "<info1>AB = 5.\n<info2>BC = 4.</info2><info3>CA = 3.</info3>"
    assert parse_annotations(text) == ["AB = 5.", "BC = 4.", "CA = 3."]


def test_all_tags_left_open():
    assert parse_annotations("<info1>a <info2>b <info3>c") == ["a", "b", "c"]


def test_mismatched_and_stray_closing_tags():
    assert parse_tagged("<info1>a</info2></info3><info2>b</info1>") == ["a", "b"]
    assert parse_tagged("</info1>stray<info1>x</info1>") == ["x"]


def test_tag_spelling_variants_and_empty_items():
    assert parse_annotations("<Info1>a</INFO1><info 2> b </info 2><info3></info3>") == ["a", "b"]


def test_order_is_appearance_not_number():
    assert parse_annotations("<info2>second</info2><info1>first</info1>") == ["second", "first"]


def test_untagged_text_lines_and_json():
    assert parse_annotations("- AB = 5.\n\n* BC = 4.\n• CA = 3.\nplain") == ["AB = 5.", "BC = 4.", "CA = 3.", "plain"]
    assert parse_annotations('["AB = 5.", "BC = 4."]') == ["AB = 5.", "BC = 4."]


def test_list_items_holding_tags_are_split():
    assert parse_annotations(["<info1>a</info1><info2>b", "c"]) == ["a", "b", "c"]


def test_bad_types():
    with pytest.raises(TypeError):
        parse_annotations({"a": 1})
    with pytest.raises(TypeError):
        parse_annotations([1, 2])
    with pytest.raises(TypeError):
        parse_annotations(3)


def test_round_trip():
    items = ["AB = 5.", "angle ABC = 60.", "C lies on line EA."]
    text = to_tagged_text(items)
    assert text == "<info1>AB = 5.</info1>\n<info2>angle ABC = 60.</info2>\n<info3>C lies on line EA.</info3>"
    assert parse_annotations(text) == items
