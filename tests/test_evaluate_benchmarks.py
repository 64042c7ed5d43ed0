"""Benchmark readers on each benchmark's file layout (tests/fixtures/benchmarks, Geometry3K, the
training parquet), the reference's prompts, bad rows, and --prompts-only: no model anywhere."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pr1_jax import evaluate
from pr1_jax.data.config import DataConfig
from pr1_jax.data.processing import ExampleProcessor, load_tokenizer
from pr1_jax.data.records import BadRecordError
from pr1_jax.evaluation.benchmarks import eval_data_config, parse_option_lines, parse_wemath_options, read_problems
from pr1_jax.reference import format_prompt

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "benchmarks"
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2_tokenizer"


def _by_id(benchmark, path, **kw):
    problems, bad = read_problems(benchmark, [path], **kw)
    assert not bad, [str(e) for e in bad]
    return {p.id: p for p in problems}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def reference_prompt(tokenizer, text: str) -> str:
    """The reference's messages (evaluation/evaluate_*.py): one image, then the text and the format
    prompt after one space, in the model's chat template with the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text + " " + format_prompt()}]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_mathvision_choices_as_lines_and_the_reference_prompt(tokenizer):
    problems = _by_id("mathvision", FIXTURES / "mathvision")
    assert list(problems) == ["80", "168", "173", "181", "183", "187"]
    rows = {str(r["id"]): r for r in map(json.loads, (FIXTURES / "mathvision" / "testmini_sample.jsonl").open())}
    mc, free = problems["173"], problems["168"]
    assert mc.question == rows["173"]["question"] + "\nChoices:\n" + "\n".join(
        f"{letter}. {o}" for letter, o in zip("ABCDE", rows["173"]["options"]))
    assert (mc.choice, mc.answer, mc.options) == (4, "E", tuple(rows["173"]["options"]))
    assert free.question == rows["168"]["question"] and "<image1>" in free.question
    assert (free.choice, free.answer) == (None, "75")
    assert dict(mc.categories) == {"subject": "metric geometry - length", "level": "5"}
    # The prompt our data pipeline builds (`evaluate --model`'s settings) is the reference's.
    data = evaluate.data_config(evaluate.parse_args(["--benchmark", "mathvision", "--data", "x", "--model", str(TOKENIZER),
                                                     "--out", "o"]))
    proc = ExampleProcessor(data, tokenizer)
    for p in (mc, free):
        assert proc.prompt_text(p.record()) == reference_prompt(tokenizer, p.question)


def test_mathvista_query_else_question_and_choices_and_the_hf_parquet(tmp_path):
    problems = _by_id("mathvista", FIXTURES / "mathvista")
    queries = json.loads((FIXTURES / "mathvista" / "query.json").read_text())
    assert problems["2"].question == queries["2"]  # the dataset's query, as the reference sends it
    assert problems["3"].question == "What is the sum of the heights of all bars?"  # no query: the question
    assert (problems["2"].choice, problems["2"].answer, problems["2"].judge_choices) == (1, "45", "A. 30\nB. 45\nC. 60\nD. 90")
    assert (problems["1"].precision, problems["3"].precision, problems["1"].choice) == (1, None, None)
    assert dict(problems["2"].categories)["skills"] == ("geometry reasoning", "algebraic reasoning")
    # The Hugging Face parquet: the image decoded beside its path, the query in the row.
    rows = list(json.loads((FIXTURES / "mathvista" / "testmini.json").read_text()).values())
    for r in rows:
        r["decoded_image"] = {"bytes": (FIXTURES / "mathvista" / r["image"]).read_bytes(), "path": r["image"]}
        r["query"] = queries.get(r["pid"], r["question"])
        r["choices"] = r["choices"] or None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "testmini.parquet")
    from_parquet = _by_id("mathvista", tmp_path / "testmini.parquet")
    for pid, p in problems.items():
        q = from_parquet[pid]
        assert (q.question, q.answer, q.choice, q.options, q.precision) == (p.question, p.answer, p.choice, p.options,
                                                                             p.precision)
        assert q.images[0].read_bytes() == p.images[0].read_bytes()


def test_mathverse_versions_options_and_text_only():
    problems = _by_id("mathverse", FIXTURES / "mathverse" / "testmini.json")
    vision_only, text_only, free = problems["33"], problems["42"], problems["41"]
    assert vision_only.question.startswith("According to the question shown in the image")  # as is
    assert vision_only.options == ("40°", "50°", "80°", "100°")  # from question_for_eval
    assert vision_only.judge_choices == "\nA:40°\nB:50°\nC:80°\nD:100°"  # the reference judge's "Choices:" text
    assert (vision_only.choice, free.choice, free.answer) == (0, None, "5")
    assert text_only.images == () and dict(text_only.categories)["problem_version"] == "Text Only"
    assert parse_option_lines("A. x\n(B) y\nC: z") == ("x", "y", "z")
    assert parse_option_lines("A. x\nC. z") == ()


def test_wemath_ids_tie_sub_problems_to_their_composite():
    problems = _by_id("wemath", FIXTURES / "wemath")
    assert list(problems) == ["2steps_1/1", "2steps_1/2", "2steps_1/multi", "3steps_5/1", "3steps_5/2", "3steps_5/3",
                              "3steps_5/multi", "2steps_2/1"]
    multi = problems["3steps_5/multi"]
    assert (multi.group, multi.step, multi.choice) == ("3steps_5", "multi", 0)
    assert multi.question == "The area is ( ) cm² (π = 3.14)\nChoices:\nA. 12.56;B. 25.12;C. 50.24; D. No correct answer"
    assert problems["2steps_2/1"].options == ("3", "4", "5", "No correct answer")
    # The release's own irregular separators.
    assert parse_wemath_options("A. 4 ; B. 3 ; C. 2 ;D.1 ; E. No correct answer") == ("4", "3", "2", "1", "No correct answer")
    assert parse_wemath_options("A. ∠AB;E.; B. ∠AB;C.; C. none; D. No correct answer") == (
        "∠AB;E.", "∠AB;C.", "none", "No correct answer")


def test_geometry3k_as_multiple_choice_with_annotations():
    problems = _by_id("geometry3k", ROOT / "tests" / "fixtures" / "geometry3k")
    p = problems["geometry3k/11"]
    assert p.question.endswith("Find m \\widehat A B.\nChoices:\nA. 30\nB. 40\nC. 60\nD. 80")
    assert (p.answer, p.choice, p.option_values) == ("D", 3, ("30", "40", "60", "80"))
    assert p.annotations and dict(p.categories) == {"goal": ("Angle",), "graph": ("Circle",)}
    assert list(_by_id("geometry3k", ROOT / "tests" / "fixtures" / "geometry3k" / "12")) == ["geometry3k/12"]


def test_training_parquet_reads_as_training_does(tokenizer):
    data = eval_data_config(DataConfig(tokenizer_path=str(TOKENIZER)), "perception_r1")
    problems = _by_id("perception_r1", ROOT / "pr1_jax" / "data" / "sample" / "sample.parquet", data=data)
    p = problems["sample/circle-radius"]
    assert p.question.startswith("<image>") and p.annotations and p.choice is None
    assert data.image_placeholder == DataConfig().image_placeholder  # images at the placeholders, as in training
    assert eval_data_config(DataConfig(), "mathvision").image_placeholder == ""
    # a paper run's data settings (its checkpoint's config): every record once, an image without a
    # placeholder kept (first), whatever the training order and placeholder rule were
    paper = DataConfig(epoch_order="reference", unplaced_images="skip", image_placeholder="<image>")
    for benchmark in ("perception_r1", "mathvision"):
        got = eval_data_config(paper, benchmark)
        assert (got.epoch_order, got.unplaced_images, got.drop_remainder) == ("streaming", "first", False)


def test_bad_rows_are_counted_with_their_place_or_raised(tmp_path):
    good = dict(id="1", question="q <image1>", options=[], answer="3", image="a.png", subject="s", level=1)
    lines = [json.dumps(good), "{not json", json.dumps({**good, "id": "2", "answer": None}),
             json.dumps({**good, "id": "3", "options": ["x", "y"], "answer": "F"}), json.dumps(good),
             json.dumps({**good, "id": "4", "image": ""})]
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    problems, bad = read_problems("mathvision", [path])
    assert [p.id for p in problems] == ["1"]
    got = {(e.record_id, e.reason, e.location) for e in bad}
    assert got == {("test:2", "invalid_record", f"{path}:2"), ("2", "invalid_record", f"{path}:3"),
                   ("3", "invalid_record", f"{path}:4"), ("1", "duplicate_id", f"{path}:5"),
                   ("4", "missing_image", f"{path}:6")}
    assert "not an option letter" in next(e.detail for e in bad if e.record_id == "3")
    with pytest.raises(BadRecordError, match="test:2"):
        read_problems("mathvision", [path], strict=True)
    with pytest.raises(FileNotFoundError):
        read_problems("wemath", [tmp_path / "missing.json"])


def test_prompts_only_writes_each_prompt_and_its_images(tmp_path, tokenizer):
    out = tmp_path / "prompts.jsonl"
    assert evaluate.main(["--benchmark", "wemath", "--data", str(FIXTURES / "wemath"), "--prompts-only",
                          "--tokenizer", str(TOKENIZER), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    problems = _by_id("wemath", FIXTURES / "wemath")
    assert [r["id"] for r in rows] == list(problems)
    for r in rows:
        p = problems[r["id"]]
        assert r["prompt"] == reference_prompt(tokenizer, p.question)
        assert r["images"] == [p.images[0].path] and Path(r["images"][0]).is_file()
    # DataConfig overrides are checked: an unknown field is a one-line error.
    assert evaluate.main(["--benchmark", "wemath", "--data", str(FIXTURES / "wemath"), "--prompts-only",
                          "--tokenizer", str(TOKENIZER), "--out", str(out), "no_such_field=1"]) == 2


def test_model_flag_takes_qwen3vl_image_geometry(hf_checkpoint):
    """`evaluate --model` on a Qwen3-VL checkpoint processes images as Qwen3-VL's processor does,
    unless an override says otherwise."""
    _, path = hf_checkpoint("qwen3_vl")
    args = ["--benchmark", "mathvision", "--data", "x", "--model", str(path), "--tokenizer", str(TOKENIZER), "--out", "o"]
    assert evaluate.data_config(evaluate.parse_args(args)).patch_size == 16
    assert evaluate.data_config(evaluate.parse_args(args + ["image_processor=qwen2_vl"])).patch_size == 14
