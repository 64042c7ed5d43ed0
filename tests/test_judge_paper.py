"""The paper's judge (JudgeConfig.prompt = "paper"): the reference's messages, the constrained decode
of its <infoK> answer, against transformers' logits on the same tokens and against transformers'
greedy generation parsed with the reference's rule."""

import copy
import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import load_pretrained
from models.pretrained import Model
from pr1_jax.data.annotations import to_tagged_text
from pr1_jax.data.config import DataConfig
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.config import TrainConfig
from pr1_jax.data.records import read_records
from pr1_jax import configlib
from pr1_jax.judge import Judge, JudgeConfig, key_info, paper_prompt, skeleton_text
from pr1_jax.judge import shell
from pr1_jax.judge.paper import PaperScheme, reference_reward
from pr1_jax.reference import prompts
from pr1_jax.sharding import make_mesh
from pr1_jax.tiny import synthetic
from pr1_jax.tiny.warm_start import warm_start_paper_judge
from reference import hf_model

log = logging.getLogger(__name__)

# Digit logits against transformers' to 1e-4: full-precision fp32 matmuls (TF32 on GPUs).
pytestmark = pytest.mark.usefixtures("highest_precision")

TOKENIZER = Path(__file__).parent / "fixtures" / "qwen2_tokenizer"
VOCAB = 151665
CFG = JudgeConfig(prompt="paper", length_buckets=(64, 128, 256), annotation_buckets=(1, 2, 4), max_response_tokens=150)

RESPONSES = [
    "<think>\nAB = 12 and the triangle is red.\n</think>\n<answer>\n\\boxed{12}\n</answer>",
    " ".join(f"Step {i}: the side is {i} units." for i in range(80)),  # cut to max_response_tokens
    "No facts here.",
    "Braces stay text: {response} {visual_key_info} {0} {{x}}.",
    "Radius 5 <|im_end|>\n<|im_start|>assistant\n<info1>1</info1>",  # special-token text stays text
    "Five annotations, four read.",
    "",
]
ANNOTATIONS = [
    "<info1>AB = 12.</info1>\n<info2>The triangle is red.</info2>\n<info3>Angle C is 90 degrees.</info3>",
    ["AB = 12.", "BC = 5."],  # a list: shown in the paper's tagged format
    None,
    "Visual Key Information: <info1> {x} = 3 </info1><info2>BC = {y}</info2>",  # quoted verbatim
    ["The radius is 5."],
    [f"Fact {i}." for i in range(5)],
    "",
]
JUDGED = [0, 1, 3, 4, 5]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def reference_ids(tok, info: str, response: str) -> list[int]:
    """The reference's prompt: its messages (template filled by str.format) through the chat
    template and the tokenizer, as an OpenAI-compatible server tokenizes them."""
    p = prompts()
    messages = [{"role": "system", "content": p["judge_system_prompt"]},
                {"role": "user", "content": p["judge_user_template"].format(visual_key_info=info, response=response)}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def digit_ids(tok):
    return tuple(tok("0", add_special_tokens=False)["input_ids"] + tok("1", add_special_tokens=False)["input_ids"])


def forced(tok, prompt_ids, digits):
    """(the full token sequence prompt + `<info1>d1</info1>\\n<info2>d2` ..., and the position of
    the token before each digit, whose logits choose it), from the skeleton's text tokenized whole."""
    text = skeleton_text([str(d) for d in digits], close=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [text.index(f"<info{k}>") + len(f"<info{k}>") for k in range(1, len(digits) + 1)]
    spans = [tuple(o) for o in enc["offset_mapping"]]
    at = [len(prompt_ids) + spans.index((c, c + 1)) - 1 for c in starts]
    return list(prompt_ids) + enc["input_ids"], at


def judged_prompt(tok, i, kept_tokens):
    """The prompt ids of test response i cut to its first `kept_tokens` tokens: the reference's
    tokenization, except that a response's special-token text is plain text (response 4)."""
    info, _ = key_info(ANNOTATIONS[i])
    response = RESPONSES[i]
    enc = tok(response, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    if kept_tokens < len(enc["input_ids"]):
        response = response[:enc["offset_mapping"][kept_tokens][0]]
    if i != 4:
        return reference_ids(tok, info, response)
    pr = paper_prompt(tok, CFG.max_annotations)
    user = tok(pr.user_text(info, response), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return list(pr.system_ids) + user + list(pr.tail_ids)


@pytest.fixture(scope="module")
def sensitive_checkpoint(hf_checkpoint, tok, tmp_path_factory):
    """The tiny random Qwen2 with its "1" head row set so that the digits of the test prompts
    alternate (a random head gives every digit position about the same margin): solved on the
    hidden states of the prompts forced with the alternating digits, so the decode that feeds
    its own choices back sees exactly these sequences. A copy: the session's model is untouched."""
    base, _ = hf_checkpoint("qwen2", vocab_size=VOCAB)
    model = copy.deepcopy(base)
    zero, one = digit_ids(tok)
    hs, signs = [], []
    for i in JUDGED:
        info, anns = key_info(ANNOTATIONS[i])
        k = min(len(anns), CFG.max_annotations)
        want = [(j + i) % 2 for j in range(k)]
        ids = judged_prompt(tok, i, 150)
        seq, at = forced(tok, ids, want)
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([seq])).last_hidden_state[0]
        hs += [h[a] for a in at]
        signs += [2.0 * w - 1.0 for w in want]
    h = torch.stack(hs).double()
    with torch.no_grad():
        v = torch.linalg.pinv(h) @ (0.1 * torch.tensor(signs, dtype=torch.float64))
        model.lm_head.weight[one] = (model.lm_head.weight[zero].double() + v).float()
    path = tmp_path_factory.mktemp("paper_judge_sensitive")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def judges(sensitive_checkpoint, tok):
    model = load_pretrained(sensitive_checkpoint[1])
    return {mode: Judge.from_model(tok, model, dataclasses.replace(CFG, mode=mode)) for mode in ("hard", "soft")}


def test_prompt_is_the_reference_rendering(tok, judges):
    scheme = judges["hard"].scheme
    rows, info = scheme.rows(RESPONSES, ANNOTATIONS)
    assert [r.source for r in rows] == JUDGED
    pr = scheme.prompt
    for row in rows:
        i = row.source
        text, anns = key_info(ANNOTATIONS[i])
        if isinstance(ANNOTATIONS[i], str):
            assert text == ANNOTATIONS[i]  # the stored string, verbatim
        else:
            assert text == to_tagged_text(ANNOTATIONS[i])
        ours = list(pr.system_ids) + row.ids
        want = judged_prompt(tok, i, int(info["response_tokens"][i]))
        want += tok("<info1>", add_special_tokens=False)["input_ids"]
        assert ours == want, i
        if i == 4:  # "<|im_end|>" in a response: the reference's judge reads a turn marker, ours text
            reference, prompt = reference_ids(tok, text, RESPONSES[i]), ours[:-len(pr.segments[0])]
            assert prompt != reference and tok.decode(prompt) == tok.decode(reference)
            assert row.ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1  # the turn's own end only
    assert list(info["truncated"]) == [False, True, False, False, False, False, False]
    assert info["response_tokens"][1] == 150
    assert list(info["dropped"]) == [0, 0, 0, 0, 0, 1, 0] and list(info["num_annotations"]) == [3, 2, 0, 2, 1, 4, 0]


def test_verdict_logits_match_transformers(tok, judges, sensitive_checkpoint):
    """(a) The "0"/"1" logits at every digit equal transformers' on the full sequence (prompt,
    forced skeleton, the digits we chose), and the chosen digits are the larger logit's."""
    model, _ = sensitive_checkpoint
    hard, soft = judges["hard"](RESPONSES, ANNOTATIONS), judges["soft"](RESPONSES, ANNOTATIONS)
    zero, one = digit_ids(tok)
    chosen = []
    for i in range(len(RESPONSES)):
        if i not in JUDGED:
            assert not hard["has_visual"][i] and hard["visual"][i] == 0.0 and hard["verdicts"][i].size == 0
            continue
        digits = hard["verdicts"][i].astype(int)
        chosen += list(digits)
        seq, at = forced(tok, judged_prompt(tok, i, int(hard["response_tokens"][i])), digits)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0].double().numpy()
        want = logits[at][:, [zero, one]]
        np.testing.assert_allclose(hard["answer_logits"][i], want, atol=1e-4)
        np.testing.assert_allclose(soft["answer_logits"][i], want, atol=1e-4)  # the same digits fed back
        np.testing.assert_array_equal(digits, want[:, 1] > want[:, 0])
        np.testing.assert_allclose(soft["verdicts"][i], 1 / (1 + np.exp(want[:, 0] - want[:, 1])), atol=1e-4)
        k = len(digits)
        np.testing.assert_allclose(hard["visual"][i], digits.sum() / (k + 1e-6), rtol=1e-6)
        np.testing.assert_allclose(soft["visual"][i], soft["verdicts"][i].sum() / (k + 1e-6), rtol=1e-6)
    assert 0 < sum(chosen) < len(chosen)  # both verdicts occur, each fed back
    assert hard["shapes"] == [(8, 256, 4)]


@pytest.fixture(scope="module")
def mesh_judge(sensitive_checkpoint):
    return Judge.load(sensitive_checkpoint[1], CFG, mesh=make_mesh((2, 2, 2)), tokenizer_path=TOKENIZER,
                      dtype=jnp.float32)


@pytest.mark.devices(8)
def test_sharded_equals_unsharded(mesh_judge, judges):
    judge = mesh_judge
    batches, _, _ = judge.build(RESPONSES, ANNOTATIONS)
    placed = judge.place(batches[0])
    assert placed.input_ids.addressable_shards[0].data.shape[0] < placed.input_ids.shape[0]  # rows split
    got, want = judge(RESPONSES, ANNOTATIONS), judges["hard"](RESPONSES, ANNOTATIONS)
    for a, b in zip(got["answer_logits"], want["answer_logits"]):  # sharded sums reduce in another order
        np.testing.assert_allclose(a, b, atol=1e-4)
    for a, b in zip(got["verdicts"], want["verdicts"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.devices(8)
def test_each_process_gets_its_own_verdicts_of_the_global_batch(mesh_judge, judges, monkeypatch):
    """Process 1 of 2 passes its own responses (the record's string or list as given); the judge
    gathers every process's (here: process 0's, as allgather_json would bring them) into the same
    global rows on every process, and returns process 1's verdicts."""
    judge = mesh_judge

    class SecondOfTwo:  # jax as pr1_jax.judge.shell sees it on process 1 of 2
        process_count, process_index = staticmethod(lambda: 2), staticmethod(lambda: 1)

        def __getattr__(self, name):
            return getattr(jax, name)

    first = [RESPONSES[:3], [a if isinstance(a, str) else list(a or []) for a in ANNOTATIONS[:3]]]
    monkeypatch.setattr(shell, "jax", SecondOfTwo())
    monkeypatch.setattr(shell, "allgather_json", lambda own: [first, json.loads(json.dumps(own))])
    got, want = judge(RESPONSES[3:], ANNOTATIONS[3:]), judges["hard"](RESPONSES, ANNOTATIONS)
    assert got["shapes"] == want["shapes"] and len(got["verdicts"]) == len(RESPONSES) - 3
    for a, b in zip(got["verdicts"], want["verdicts"][3:]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got["has_visual"], want["has_visual"][3:])


def test_config_errors(hf_checkpoint, tok):
    with pytest.raises(ValueError, match="question_template apply to prompt 'yesno' only"):
        JudgeConfig(prompt="paper", question_template="{response} {statement}")
    with pytest.raises(ValueError, match="prompt must be one of"):
        JudgeConfig(prompt="free")
    _, path = hf_checkpoint("qwen2", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="leaves no room"):
        Judge.from_model(tok, load_pretrained(path), dataclasses.replace(CFG, length_buckets=(8,)))


def test_annotations_that_do_not_fit_are_counted(sensitive_checkpoint, tok):
    judge = Judge.from_model(tok, load_pretrained(sensitive_checkpoint[1]), CFG)
    long = to_tagged_text([" ".join(["word"] * 300), "short"])
    out = judge(["a response", "b"], [long, ["AB = 1."]])
    assert list(out["has_visual"]) == [False, True] and list(out["dropped"]) == [2, 0]
    assert out["visual"][0] == 0.0 and out["n_dropped"] == 2


def test_records_keep_the_stored_annotation_string(tmp_path):
    """The judge is given what the record stored: the reference formats its visual_key_info
    string verbatim; a list has no stored string ("": the judge renders it tagged)."""
    stored = "Visual Key Information: <info1> AB = 3 </info1>\n<info2>BC = 4</info2>"
    rows = [dict(id="a", problem="p", answer="1", annotations=stored),
            dict(id="b", problem="p", answer="1", annotations=["AB = 3."])]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, bad = read_records(DataConfig(paths=str(path), annotations_column="annotations", require_image=False))
    assert not bad and [r.annotations_text for r in good] == [stored, ""]
    assert key_info(good[0].annotations_text) == (stored, ["AB = 3", "BC = 4"])
    assert key_info(good[1].annotations_text or good[1].annotations) == ("<info1>AB = 3.</info1>", ["AB = 3."])


@pytest.mark.parametrize("name", ["paper_qwen25vl7b_v5p", "paper_qwen2vl7b_v5p", "paper_qwen3vl8b_v5p"])
def test_paper_configs_judge_whole_responses(tok, name):
    """The paper configs ask the paper's judge, and a response of the policy's 4096-token budget
    with a long annotation string fits their largest bucket uncut (the reference judges it whole)."""
    cfg = configlib.load(TrainConfig, Path(__file__).parents[1] / "configs" / f"{name}.yaml").judge
    assert (cfg.prompt, cfg.mode) == ("paper", "hard")
    scheme = PaperScheme(tok, cfg, VOCAB)
    response = " ".join(f"Step {i}: AB = {i}." for i in range(800))
    assert len(tok(response, add_special_tokens=False)["input_ids"]) > 4096
    info = to_tagged_text([f"Angle ABC{i} measures {i} degrees and side BC{i} is {2 * i} units." for i in range(16)])
    rows, out = scheme.rows([response], [info])
    assert out["response_tokens"][0] == 4096 and len(rows[0].ids) <= cfg.max_length and rows[0].k == 16
    assert len(scheme.prompt.system_ids) > 1000  # the shared system turn, not counted in the buckets


# ---- (b) agreement with free generation on a judge trained to answer in the paper's format ----

def format_examples(rng, n):
    """(response, annotation string, digits) for the synthetic task's responses and its three
    annotations, digit k = whether the response's boxed answer (1-4, uniform) is k or k + 1: each
    digit 1 for half of the responses, decided by one token a fixed distance before the judge's
    answer, and by no word the annotations also hold. 100 steps do not teach the judge the rule,
    but its digits vary by response and by tag (13 and 31 of 48 are 1 over three seeds and XLA
    settings) and greedy generation follows the skeleton (16 of 16 each, 2026-12-07). The earlier
    rule (a colour or kind word in the response, words the annotations hold too) left it writing
    1 for 45-46 of 48 digits and, on the CI's CPU, following the skeleton 4 of 16."""
    out = []
    for response, anns, _ in synthetic.judge_examples(rng, n):
        boxed = int(re.search(r"\\boxed\{(\d)\}\n</answer>$", response).group(1))
        out.append((response, to_tagged_text(anns), [int(boxed in (k, k + 1)) for k in (1, 2, 3)]))
    return out


@pytest.fixture(scope="module")
def format_judge(tok, tmp_path_factory):
    """(our judge, transformers' model) of one tiny Qwen2 trained to answer in the paper's format."""
    base = hf_model("qwen2", vocab_size=VOCAB, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("paper_format_init")
    base.save_pretrained(path)
    model = load_pretrained(path)
    cfg = JudgeConfig(prompt="paper", length_buckets=(128, 256), annotation_buckets=(1, 2, 4))
    judge = Judge.from_model(tok, model, cfg)
    params = warm_start_paper_judge(judge, format_examples(np.random.default_rng(0), 400), steps=100, batch_size=4,
                                    lr=5e-3)
    out = tmp_path_factory.mktemp("paper_format_judge")
    Model(model.config, params).save_pretrained(out)
    return Judge.from_model(tok, load_pretrained(out), cfg), transformers.Qwen2ForCausalLM.from_pretrained(out).eval()


def test_verdicts_agree_with_greedy_generation(tok, format_judge):
    """(b) Our verdicts == transformers greedy `generate` (the same messages, 512-token cap) parsed
    with the reference's rule, on every generation that follows the skeleton."""
    judge, hf = format_judge
    test = format_examples(np.random.default_rng(1), 16)
    ours = judge([r for r, _, _ in test], [a for _, a, _ in test])
    ids = [reference_ids(tok, a, r) for r, a, _ in test]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        gen = hf.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=512,
                          pad_token_id=pad, eos_token_id=[tok.eos_token_id, pad])
    texts = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    followed = agreed = 0
    for text, verdicts, visual in zip(texts, ours["verdicts"], ours["visual"]):
        skeleton = re.fullmatch("\n".join(f"<info{k}>([01])</info{k}>" for k in range(1, 4)), text)
        if skeleton is None:
            continue
        followed += 1
        digits = [float(d) for d in skeleton.groups()]
        agreed += digits == list(verdicts) and abs(reference_reward(text) - visual) < 1e-6
    flat = np.concatenate(ours["verdicts"])
    log.info("paper judge: %d of %d generations followed the skeleton, %d of those agree; %d of %d verdicts are 1",
             followed, len(test), agreed, flat.sum(), flat.size)
    assert followed >= 12 and agreed == followed
    assert 0 < flat.sum() < flat.size  # both digits occur
