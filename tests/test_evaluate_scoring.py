"""Scoring without a model (option letters and texts, math-verify at the benchmark's precision),
--score on a response file, the reports (categories, WeMath's four-dimensional metrics) and
McNemar on result files keyed by id."""

import json
from pathlib import Path

import pytest

from pr1_jax import evaluate
from pr1_jax.evaluation import mcnemar
from pr1_jax.evaluation.report import build_report, by_category, format_table, wemath_metrics
from pr1_jax.evaluation.scoring import benchmark_correct, final_answer, named_options

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
OPTIONS = ("$\\frac{6-\\sqrt{2}}{2}$", "$\\frac{3 \\sqrt{2}}{2}$", "2.5", "3", "$6(\\sqrt{2}-1)$")


@pytest.mark.parametrize("response,named", [
    ("<think>\nx\n</think>\n<answer>\n\\boxed{E}\n</answer>", {4}),
    ("<answer>(E)</answer>", {4}),
    ("<answer>E.</answer>", {4}),
    ("<answer>\\boxed{\\text{(E)}}</answer>", {4}),
    ("<answer>E. $6(\\sqrt{2}-1)$</answer>", {4}),
    ("<answer>\\boxed{6(\\sqrt{2} - 1)}</answer>", {4}),  # the option's own text, as math
    ("<answer>\\boxed{5/2}</answer>", {2}),  # 2.5
    ("so the answer is \\boxed{C}", {2}),  # no answer block: the whole response
    ("<answer>\\boxed{A right angle}</answer>", set()),  # a word, not a letter
    ("The answer is E.", set()),  # neither a letter nor an option's text
])
def test_multiple_choice_letter_or_option_text(response, named):
    assert named_options(response, OPTIONS) == named
    assert benchmark_correct(response, "E", choice=4, options=OPTIONS) == float(named == {4})


def test_an_answer_naming_two_equal_options_is_not_right():
    assert named_options("<answer>\\boxed{3}</answer>", ("3", "3.0", "4")) == {0, 1}
    assert benchmark_correct("<answer>\\boxed{3}</answer>", "A", choice=0, options=("3", "3.0", "4")) == 0.0


def test_free_form_math_verify_at_the_benchmarks_precision():
    assert benchmark_correct("<answer>\\boxed{1.23}</answer>", "1.2", precision=1) == 1.0  # MathVista float, 1 decimal
    assert benchmark_correct("<answer>\\boxed{1.23}</answer>", "1.2") == 0.0
    assert benchmark_correct("<answer>\\boxed{2\\sqrt{3}}</answer>", "\\sqrt{12}") == 1.0
    assert benchmark_correct("the answer: 75", "75") == 1.0  # no answer block: the whole response
    assert final_answer("<answer>\n\\boxed{\\text{B}}\n</answer> \\boxed{C}") == "B"  # the answer block first


def test_geometry3k_precise_value_names_its_option():
    assert benchmark_correct("<answer>\\boxed{8.66}</answer>", "B", choice=1, options=("5", "5\\sqrt{3}"),
                             option_values=("5", "8.66")) == 1.0


def test_score_a_response_file_and_the_report(tmp_path):
    responses = {"1": "<answer>\\boxed{1.2}</answer>", "2": "<think>\nx\n</think>\n<answer>\n\\boxed{B}\n</answer>",
                 "3": "<answer>90</answer>", "4": "<answer>circle</answer>", "99": "an id the benchmark lacks"}
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps({"id": k, "response": v}) + "\n" for k, v in responses.items()))
    out = tmp_path / "scored.jsonl"
    assert evaluate.main(["--benchmark", "mathvista", "--data", str(FIXTURES / "mathvista"), "--score", str(path),
                          "--out", str(out), "--workers", "1"]) == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {k: r["correct"] for k, r in rows.items()} == {"1": 1, "2": 1, "3": 0, "4": 1}
    assert rows["2"]["format"] == 1 and rows["2"]["extracted"] == "B" and rows["4"]["answer"] == "circle"
    report = json.loads((tmp_path / "scored.report.json").read_text())
    assert (report["problems"], report["scored"], report["accuracy"]) == (4, 4, 0.75)
    assert report["categories"]["task"]["figure question answering"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert report["categories"]["skills"]["arithmetic reasoning"]["total"] == 2


def _wemath_rows(verdicts: dict[str, dict[str, int]]) -> list[dict]:
    return [dict(id=f"{g}/{s}", group=g, step=s, correct=c, categories={"steps": g.split("_")[0]})
            for g, steps in verdicts.items() for s, c in steps.items()]


def test_wemath_four_dimensional_metrics():
    rows = _wemath_rows({
        "2steps_1": {"1": 1, "2": 1, "multi": 1},  # CM (strict and loose)
        "2steps_2": {"1": 1, "2": 0, "multi": 1},  # RM strict, CM loose
        "2steps_3": {"1": 0, "2": 0, "multi": 1},  # RM (strict and loose)
        "2steps_4": {"1": 1, "2": 1, "multi": 0},  # IG
        "3steps_1": {"1": 1, "2": 0, "3": 1, "multi": 0},  # IK
        "3steps_2": {"1": 1, "2": 1, "3": 1, "multi": 1},  # CM
        "2steps_5": {"1": 1},  # incomplete: left out
    })
    m = wemath_metrics(rows)
    assert (m["groups"], m["incomplete_groups"]) == (6, 1)
    assert m["counts"] == {"IK": 1, "IG": 1, "CM_strict": 2, "CM_loose": 3, "RM_strict": 2, "RM_loose": 1}
    assert m["strict"] == pytest.approx({"IK": 1 / 6, "IG": 1 / 6, "CM": 2 / 6, "RM": 2 / 4, "score": (6 - 0.5 - 2 - 1) / 6})
    assert m["loose"] == pytest.approx({"IK": 1 / 6, "IG": 1 / 6, "CM": 3 / 6, "RM": 1 / 4, "score": (6 - 0.5 - 1 - 1) / 6})
    assert (m["S1"], m["S2"], m["S3"]) == pytest.approx((10 / 14, 3 / 4, 1 / 2))
    report = build_report("wemath", rows, problems=len(rows), unreadable={}, skipped={"bad_image": 1})
    text = format_table(report)
    assert "S1  71.43" in text and "strict  score  41.67" in text and "bad_image 1" in text


def test_categories_count_each_value_of_a_multi_label_problem():
    rows = [dict(id="a", correct=1, categories={"skills": ["x", "y"], "level": "2"}),
            dict(id="b", correct=0, categories={"skills": ["y"], "level": "10"})]
    got = by_category(rows)
    assert got["skills"] == {"x": {"correct": 1, "total": 1, "accuracy": 1.0}, "y": {"correct": 1, "total": 2, "accuracy": 0.5}}
    assert list(got["level"]) == ["2", "10"]


def test_mcnemar_reads_result_files_by_id(tmp_path, capsys):
    def write(name, verdicts):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": k, "correct": v, "response": ""}) + "\n" for k, v in verdicts.items()))
        return path

    a = write("a.jsonl", {"p1": 1, "p2": 1, "p3": 0, "p4": 1, "only_a": 1})
    b = write("b.jsonl", {"p4": 1, "p3": 1, "p2": 0, "p1": 0})
    r = mcnemar.compare(mcnemar.read_results(a), mcnemar.read_results(b))
    assert (r["samples"], r["only_in_a"], r["right_only_a"], r["right_only_b"]) == (4, 1, 2, 1)
    assert r["p_value"] == pytest.approx(1.0)  # 2 * P[Bin(3, 1/2) <= 1] = 1
    assert mcnemar.exact_mcnemar(0, 6) == pytest.approx(2 / 64)
    assert mcnemar.main([str(a), str(b)]) == 0
    assert "1 ids only in A" in capsys.readouterr().out
    bad = write("bad.jsonl", {"p1": 1})
    bad.write_text('{"id": "p1"}\n')
    assert mcnemar.main([str(a), str(bad)]) == 2
    from pr1_jax import mcnemar as command  # `python -m pr1_jax.mcnemar`, the command's name

    assert command.main is mcnemar.main
