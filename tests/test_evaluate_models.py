"""Evaluation with models, on tiny random weights of the real architectures: a run's checkpoint
evaluated by our sampler against its export run by transformers (AutoProcessor,
AutoModelForImageTextToText, greedy generate); the reference's answer judge against
transformers' logits; the perception audit."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml

from pr1_jax import configlib, evaluate
from pr1_jax.checkpoint import Checkpointer
from pr1_jax.config import ModelSection, TrainConfig
from pr1_jax.data.config import DataConfig
from pr1_jax.evaluation import answer_judge, audit
from pr1_jax.evaluation.benchmarks import read_problems
from pr1_jax.export import export
from pr1_jax.judge import JudgeConfig
from pr1_jax.reference import format_prompt
from pr1_jax.sampling import SamplingConfig
from pr1_jax.tiny.assets import judge_config, policy_config, save_tokenizer_dir, train_tokenizer

# Greedy responses and judge logits against transformers': full-precision fp32 matmuls.
pytestmark = pytest.mark.usefixtures("highest_precision")

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
STOP = ("<|im_end|>", "<|endoftext|>")
PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE with the Qwen2-VL special tokens and chat template (the tiny default's
    kind), trained on the words these tests write, so that the judges' answer words are tokens."""
    texts = [format_prompt(), answer_judge.prompts()["system"], JudgeConfig().system_prompt, JudgeConfig().question_template,
             "Hint: Please answer the question. Question: Find the measure of angle H. Which shape is drawn? square "
             "circle triangle speed block bars", "Choices: A. B. C. D. (A) (B)", "true false True False yes no Yes No",
             "<think>\nThe figure shows AB = 5.\n</think>\n<answer>\n\\boxed{B}\n</answer>", "**Response**: **Choices**:",
             "**Ground Truth Answer**:", "system\nYou are a helpful assistant.", "user", "assistant"]
    answers = ["true", "True", "false", "False", "yes", "Yes", "no", "No"]
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer_dir(train_tokenizer(texts * 3 + answers * 8, vocab_size=400), out)
    return out


def _hf_save(config, out, seed):
    """A transformers model of `config` with weights large enough that greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config) if hasattr(config, "vision_config") \
        else transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run_and_export(tokenizer_dir, tmp_path_factory):
    """A run directory (config.yaml, a checkpoint of params unlike the base model's) whose base
    directory has no preprocessor_config.json, as the tiny default's, and its export."""
    from tokenizers import Tokenizer

    from models import load_pretrained

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = policy_config(tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                        vision_depth=1, vision_width=32, vision_heads=2)
    base = _hf_save(transformers.Qwen2VLConfig(**cfg), tmp_path_factory.mktemp("base"), seed=0)
    run = tmp_path_factory.mktemp("run")
    data = DataConfig(tokenizer_path=str(tokenizer_dir), format_prompt="paper", format_prompt_placement="user", **PIXELS)
    config = TrainConfig(run_dir=str(run), model=ModelSection(policy=str(base), tokenizer=str(tokenizer_dir)), data=data,
                         sampling=SamplingConfig(eos_tokens=STOP))
    (run / "config.yaml").write_text(yaml.safe_dump(configlib.to_dict(config), sort_keys=False))
    params = load_pretrained(base).params
    trained = {"params": jax_tree_add_noise(params)}
    ckpt = Checkpointer(run / "checkpoints")
    ckpt.save(3, trained, {})
    ckpt.close()
    return run, export(run, tmp_path_factory.mktemp("hf"))


def jax_tree_add_noise(params):
    import jax

    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(1)
    return jax.tree.unflatten(treedef, [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
                                        for x in leaves])


def hf_processor(path):
    """AutoProcessor where torchvision is installed (its video processor needs it), with the PIL
    image processor our pipeline uses (AutoProcessor would pick the torchvision one, whose resize
    differs slightly); otherwise the same Qwen2VLProcessor class from the export's own files
    without a video processor."""
    try:
        processor = transformers.AutoProcessor.from_pretrained(path)
        processor.image_processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
        return processor
    except ImportError:
        from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

        class NoVideo(Qwen2VLProcessor):
            def check_argument_for_proper_class(self, name, arg):
                return type(None) if name == "video_processor" and arg is None else super().check_argument_for_proper_class(name, arg)

        tok = transformers.AutoTokenizer.from_pretrained(path)
        return NoVideo(image_processor=transformers.AutoImageProcessor.from_pretrained(path), tokenizer=tok,
                       video_processor=None, chat_template=tok.chat_template)


def test_checkpoint_evaluation_matches_transformers_on_the_export(run_and_export, tmp_path):
    """evaluate --checkpoint (our pipeline and sampler) on MathVista's fixture == transformers'
    greedy generate on the export, with the reference's messages (image, then the query and the
    format prompt after one space) through AutoProcessor: the same tokens."""
    run, hf_dir = run_and_export
    for name in ("preprocessor_config.json", "chat_template.jinja", "tokenizer.json", "config.json"):
        assert (hf_dir / name).is_file(), name
    out = tmp_path / "r.jsonl"
    assert evaluate.main(["--benchmark", "mathvista", "--data", str(FIXTURES / "mathvista"), "--checkpoint", str(run),
                          "--out", str(out), "--max-new-tokens", "10", "--batch-size", "4", "--workers", "1"]) == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["1", "2", "3", "4"]

    model = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    processor = hf_processor(hf_dir)
    assert (processor.image_processor.size.shortest_edge, processor.image_processor.size.longest_edge) == (
        PIXELS["min_pixels"], PIXELS["max_pixels"])
    stop = [processor.tokenizer.convert_tokens_to_ids(t) for t in STOP]
    problems, _ = read_problems("mathvista", [FIXTURES / "mathvista"])
    for p in problems:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.question + " " + format_prompt()}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[p.images[0].open().convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, do_sample=False, max_new_tokens=10, eos_token_id=stop, pad_token_id=stop[1])
        new = gen[0, inputs["input_ids"].shape[1]:].tolist()
        assert rows[p.id]["response_tokens"] == len(new), p.id
        assert rows[p.id]["response"] == processor.tokenizer.decode(new, skip_special_tokens=True), p.id
    assert (tmp_path / "r.report.json").is_file()


@pytest.fixture(scope="module")
def judge_dir(tokenizer_dir, tmp_path_factory):
    from tokenizers import Tokenizer

    cfg = judge_config(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")), hidden_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, intermediate_size=96)
    out = _hf_save(transformers.Qwen2Config(**cfg), tmp_path_factory.mktemp("judge"), seed=2)
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_answer_judge_reads_the_reference_messages_like_transformers(judge_dir, tmp_path):
    """evaluate --score --answer-judge: our packed prompt is the tokenization of the reference's
    chat (system; Choices / Response / Ground Truth Answer), and each verdict margin is
    transformers' last-token lse(true, True) - lse(false, False) on it."""
    problems, _ = read_problems("mathvista", [FIXTURES / "mathvista"])
    by_id = {p.id: p for p in problems}
    cases = {"2": "<think>\nangles\n</think>\n<answer>\n\\boxed{B}\n</answer>", "1": "the speed is 1.2"}
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"id": k, "response": v}) + "\n" for k, v in cases.items()))
    out = tmp_path / "judged.jsonl"
    assert evaluate.main(["--benchmark", "mathvista", "--data", str(FIXTURES / "mathvista"), "--score", str(responses),
                          "--answer-judge", str(judge_dir), "--judge-dtype", "float32", "--out", str(out),
                          "--workers", "1"]) == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    judge = answer_judge.AnswerJudge.load(judge_dir, dtype="float32").judge
    hf = transformers.AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    true_ids = [judge.tokenizer.convert_tokens_to_ids(t) for t in ("true", "True")]
    false_ids = [judge.tokenizer.convert_tokens_to_ids(t) for t in ("false", "False")]
    for pid, response in cases.items():
        p = by_id[pid]
        user = answer_judge.prompts()["choice_template" if p.judge_choices else "open_template"].format(
            choices=p.judge_choices, response=answer_judge.reference_answer(response), gt_answer=p.answer)
        assert answer_judge.user_turn(p, response) == user
        messages = [{"role": "system", "content": answer_judge.prompts()["system"]}, {"role": "user", "content": user}]
        ids = list(judge.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        piece, statement = answer_judge.judge_inputs(p, response)
        row, _, _ = judge.prompt_ids(piece, [statement])
        assert row.prefix + row.branches[0] == ids
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids])).logits[0, -1].double()
        margin = float(torch.logsumexp(logits[true_ids], 0) - torch.logsumexp(logits[false_ids], 0))
        assert abs(rows[pid]["judge_margin"] - margin) < 1e-4
        assert rows[pid]["correct"] == rows[pid]["judge"] == int(margin > 0)
    assert (rows["2"]["rules"], rows["1"]["rules"]) == (1, 1)


def test_audit_judges_each_annotation_of_two_checkpoints_responses(judge_dir, tmp_path):
    """Two result files on Geometry3K problems, the paper's audit on a sample of them: a verdict per
    annotation and response, perception = all stated, McNemar between the files on those."""
    problems, _ = read_problems("geometry3k", [Path(__file__).parent / "fixtures" / "geometry3k"])
    problems = problems[:4]
    files = []
    for name, say in (("a", lambda p: " ".join(p.annotations[:2])), ("b", lambda p: "no idea")):
        rows = [dict(id=p.id, correct=0, response=say(p), annotations=list(p.annotations)) for p in problems]
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    out = tmp_path / "audit.json"
    assert audit.main([str(f) for f in files] + ["--judge", str(judge_dir), "--judge-dtype", "float32", "--sample", "3",
                                                 "--out", str(out), "length_buckets=[256,512]"]) == 0
    report = json.loads(out.read_text())
    sampled = audit.audited_ids([[dict(id=p.id, annotations=p.annotations) for p in problems]] * 2, 3, 0)
    assert [q["id"] for q in report["problems"]] == sampled
    by_id = {p.id: p for p in problems}
    for q in report["problems"]:
        assert q["annotations"] == list(by_id[q["id"]].annotations)
        assert [len(v) + n for v, n in zip(q["verdicts"], q["not_judged"])] == [len(q["annotations"])] * 2
        assert q["perception"] == [int(all(x == 1.0 for x in v)) for v in q["verdicts"]]
    m = report["mcnemar"]
    assert m["samples"] == 3
    assert m["right_only_a"] == sum(q["perception"] == [1, 0] for q in report["problems"])
    assert m["right_only_b"] == sum(q["perception"] == [0, 1] for q in report["problems"])
