"""The embedded default's synthetic task and tiny assets: facts agree with pixels, judge labels
agree with the text, the tokenizer behaves like Qwen2's, and the tiny models load and run."""

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pr1_jax.tiny import synthetic as syn
from pr1_jax.tiny import assets as tiny
from pr1_jax.data.config import DataConfig
from pr1_jax.data.processing import ExampleProcessor, load_tokenizer
from pr1_jax.data.records import read_records

QWEN2_TOKENIZER = Path(__file__).parent / "fixtures" / "qwen2_tokenizer"
FORMAT_RE = r"^<think>\n.*?\n</think>\n<answer>\n.*?\\boxed{.+?}.*?\n</answer>$"  # the paper's
BIG = syn.TaskConfig(image_size=84, max_count=9, colors=tuple(syn.PALETTE), questions=syn.QUESTIONS)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny.build_tiny_assets(tmp_path_factory.mktemp("run"), seed=0, n_train=8, n_val=4)


@pytest.fixture(scope="module")
def tok(assets):
    return load_tokenizer(assets.tokenizer)


# ---- figures -----------------------------------------------------------------------------

def read_figure(img, cfg):
    """(count, colour, kind per shape, cells) recovered from pixels alone."""
    a = np.asarray(img).astype(int)
    ink = (a != syn.BACKGROUND).any(-1)
    colors = {tuple(c) for c in a[ink]}
    names = [n for n, rgb in syn.PALETTE.items() if {rgb} == colors]
    labels, n = ndimage.label(ink, structure=np.ones((3, 3)))
    kinds, cells = [], []
    for sl in ndimage.find_objects(labels):
        fill = ink[sl].mean()
        kinds.append("square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle")
        ys, xs = sl
        assert ys.start // syn.CELL == (ys.stop - 1) // syn.CELL and xs.start // syn.CELL == (xs.stop - 1) // syn.CELL
        cells.append((ys.start // syn.CELL, xs.start // syn.CELL))
    return n, names, kinds, cells


@pytest.mark.parametrize("cfg", [syn.TaskConfig(), BIG], ids=["default", "84px-all"])
def test_answers_and_annotations_agree_with_pixels(cfg):
    rng = np.random.default_rng(123)
    for _ in range(150):
        fig = syn.make_figure(rng, cfg)
        img = syn.draw(fig, cfg)
        assert img.size == (cfg.image_size, cfg.image_size)
        n, colors, kinds, cells = read_figure(img, cfg)
        assert n == fig.count and colors == [fig.color] and set(kinds) == {fig.kind}
        assert len(set(cells)) == n  # one shape per merged image token
        notes = syn.annotations(fig)
        stated_n = syn.NUMBER_WORDS.index(re.fullmatch(r"Number of shapes: (\w+)\.", notes[0]).group(1))
        assert stated_n == n and colors[0] in notes[1] and fig.kind in notes[2]
        assert syn.answer("count", fig, cfg) == str(n)
        assert cfg.colors[int(syn.answer("color", fig, cfg)) - 1] == colors[0]
        assert cfg.kinds[int(syn.answer("kind", fig, cfg)) - 1] == kinds[0]


def test_canonical_annotations():
    one = syn.Figure(1, "red", "circle", ((3, 3, 20, 20),))
    many = syn.Figure(3, "blue", "triangle", ())
    assert syn.annotations(one) == ["Number of shapes: one.", "Each shape is drawn in red.", "Each shape is a circle."]
    assert syn.annotations(many) == ["Number of shapes: three.", "Each shape is drawn in blue.",
                                     "Each shape is a triangle."]
    # every sentence ends with its value, after a cue word that no other sentence has
    cues = {a: syn.fact_sentence(a, v).split()[-2] for a, vs in syn._values(BIG).items() for v in vs}
    assert len({syn.fact_sentence(a, v).split()[-2] for a, vs in syn._values(BIG).items() for v in vs}) == 3
    assert cues["count"] == "shapes:" and cues["color"] == "in" and cues["kind"] == "a"


def test_deterministic_from_seed():
    a = syn.make_records(5, seed=7, split="train")
    b = syn.make_records(5, seed=7, split="train")
    assert a == b
    assert syn.make_records(3, seed=7, split="train") == a[:3]
    assert syn.make_records(5, seed=8, split="train") != a
    assert syn.make_records(5, seed=7, split="val") != a


def test_answers_uniform_and_chance():
    assert syn.chance_accuracy() == 0.25
    assert syn.chance_accuracy(syn.TaskConfig(questions=("kind",))) == pytest.approx(1 / 3)
    rng = np.random.default_rng(0)
    answers = [syn.make_example(rng)[2] for _ in range(2000)]
    freq = np.bincount([int(x) for x in answers])[1:] / len(answers)
    assert len(freq) == 4 and np.all(np.abs(freq - 0.25) < 0.04)


def test_config_checks():
    with pytest.raises(ValueError):
        syn.TaskConfig(image_size=60)
    with pytest.raises(ValueError):
        syn.TaskConfig(max_count=5)  # 56 px holds 4 cells
    with pytest.raises(ValueError):
        syn.TaskConfig(questions=("area",))


def test_written_dataset_reads_back_and_processes(tmp_path, assets, tok):
    path = syn.write_dataset(tmp_path, 6, seed=3, split="val")
    cfg = DataConfig(paths=path, image_column="image", annotations_column="annotations",
                     tokenizer_path=assets.tokenizer)
    got, bad = read_records(cfg)
    assert not bad and len(got) == 6
    want = syn.make_records(6, seed=3, split="val")
    for g, w in zip(got, want):
        assert (g.id, g.problem, g.answer, g.annotations) == (w.id, w.problem, w.answer, w.annotations)
        assert np.array_equal(np.asarray(g.images[0].open()), np.asarray(w.images[0].open()))
    ex = ExampleProcessor(cfg, tok).process(got[0])
    assert ex.pixel_values.shape == (16, 1176) and ex.image_grid_thw.tolist() == [[1, 4, 4]]
    assert int(ex.mm_token_type_ids.sum()) == 4  # 56x56 -> 4 merged image tokens
    assert ex.num_tokens < 128


# ---- warm-start text ---------------------------------------------------------------------

FACT_RES = {"count": r"Number of shapes: (\w+)\.", "color": r"Each shape is drawn in (\w+)\.",
            "kind": r"Each shape is an? (\w+)\."}


def stated_facts(response):
    """What a response's think text says, read independently of the generator."""
    think = re.search(r"<think>\n(.*)\n</think>", response, re.S).group(1)
    out = {attr: set(re.findall(rx, think)) for attr, rx in FACT_RES.items()}
    out["count"] = {syn.NUMBER_WORDS.index(w) for w in out["count"]}
    return out


def annotated_fact(note):
    for attr, rx in FACT_RES.items():
        m = re.fullmatch(rx, note)
        if m:
            return attr, syn.NUMBER_WORDS.index(m.group(1)) if attr == "count" else m.group(1)
    raise AssertionError(note)


def test_judge_pairs_balanced_and_labelled_right():
    pairs = syn.judge_pairs(np.random.default_rng(0), 600)
    labels = [y for _, _, y in pairs]
    assert sum(labels) == 300
    kinds = collections.Counter()
    for response, note, label in pairs:
        assert re.match(FORMAT_RE, response, re.S)
        attr, value = annotated_fact(note)
        stated = stated_facts(response)[attr]
        # label 1 iff the true value is stated and no other (a hedge states the note but is a no)
        assert (stated == {value}) == bool(label), (response, note, label)
        if label:
            assert note in response
            kinds["repeated" if response.count(note) > 1 else "once"] += 1
        else:
            kinds["hedge" if value in stated else "other value" if stated else "nothing"] += 1
    assert min(kinds.values()) > 30, kinds
    assert syn.judge_pairs(np.random.default_rng(0), 600) == pairs


@pytest.mark.parametrize("single", [False, True])
def test_judge_examples_label_every_annotation(single):
    examples = syn.judge_examples(np.random.default_rng(0), 600, single=single)
    for response, notes, ys in examples:  # word salads included: labels by the sentences stated
        for note, y in zip(notes, ys):
            attr, value = annotated_fact(note)
            assert (stated_facts(response)[attr] == {value}) == bool(y)
    examples = syn.judge_examples(np.random.default_rng(0), 600, single=single, p_salad=0.0)
    labels = []
    for response, notes, ys in examples:
        assert re.match(FORMAT_RE, response, re.S)
        assert len(notes) == len(ys) == (1 if single else 3)
        for note, y in zip(notes, ys):
            attr, value = annotated_fact(note)
            assert (stated_facts(response)[attr] == {value}) == bool(y)
            assert not y or note in response
        if single:
            assert sum(len(v) for v in stated_facts(response).values()) == 1
        labels += ys
    assert abs(np.mean(labels) - 0.5) < 0.05
    assert syn.judge_examples(np.random.default_rng(0), 600, single=single, p_salad=0.0) == examples


def test_sft_responses_have_the_format_and_random_answers():
    rng = np.random.default_rng(0)
    fig = syn.make_figure(rng)
    answers = []
    for _ in range(400):
        r = syn.sft_response(rng, "color", figure=fig, p_true=0.0)
        assert re.match(FORMAT_RE, r, re.S)
        answers.append(re.search(r"\\boxed{(.+?)}", r).group(1))
    freq = np.bincount([int(a) for a in answers])[1:] / len(answers)
    assert len(freq) == 4 and np.all(freq > 0.15)  # not tied to the figure
    always_true = [syn.sft_response(rng, "count", figure=fig, p_true=1.0, p_state=1.0) for _ in range(20)]
    assert all(stated_facts(r)["color"] == {fig.color} for r in always_true)
    # the facts are stated in exactly the annotations' sentences (what the judge was taught)
    assert all(all(note in r for note in syn.annotations(fig)) for r in always_true)
    sentences = {syn.fact_sentence(a, v) for a, vs in syn._values(syn.TaskConfig()).items() for v in vs}
    for _ in range(200):
        think = re.search(r"<think>\n(.*)\n</think>", syn.sft_response(rng, "color"), re.S).group(1)
        said = re.findall(r"[^.]+\.", think)
        assert said == [syn.NO_FACTS] or all(x.strip() in sentences for x in said), think
    rec, resp = syn.sft_pairs(3, seed=0)[0]
    assert rec.images and re.match(FORMAT_RE, resp, re.S)


# ---- tokenizer ---------------------------------------------------------------------------

def test_tokenizer_vocab_and_special_tokens(tok):
    assert len(tok) == 512
    ids = [tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS]
    assert ids == list(range(512 - len(tiny.SPECIAL_TOKENS), 512))  # after the BPE ranks, real order
    for t in tiny.SPECIAL_TOKENS:
        assert tok(t)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for w in ("yes", "no", " yes", " no", "0", "1", "9"):
        assert len(tok(w)["input_ids"]) == 1, w


def test_tokenizer_round_trips_and_matches_tokenizers_file(assets, tok):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(Path(assets.tokenizer) / "tokenizer.json"))
    qwen = Tokenizer.from_file(str(QWEN2_TOKENIZER / "tokenizer.json"))
    texts = [syn.sft_response(np.random.default_rng(1), "count"), syn.question_text("color"),
             "Ünïcödé ∑ 数学 😀\t\ttabs  and   spaces\n\n", "x = 12345.678; f(x) -> y", "It's they'll 'd"]
    for s in texts:
        ids = tok(s)["input_ids"]
        assert ids == raw.encode(s).ids
        assert tok.decode(ids) == s
        # same pre-tokenization as Qwen2 (words, single digits, spaces)
        assert qwen.pre_tokenizer.pre_tokenize_str(s) == raw.pre_tokenizer.pre_tokenize_str(s)
    assert len(tok(syn.sft_response(np.random.default_rng(2), "color"))["input_ids"]) < 60


def test_chat_template_renders_like_qwen2(tok):
    qwen = load_tokenizer(QWEN2_TOKENIZER)
    assert tok.chat_template == qwen.chat_template
    chats = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}],
            [{"role": "system", "content": "Think."},
             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"},
                                          {"type": "text", "text": "b"}]},
             {"role": "assistant", "content": "<think>\nx\n</think>"}, {"role": "user", "content": "again"}],
    ]
    for chat in chats:
        for kw in ({"add_generation_prompt": True}, {"add_generation_prompt": False, "add_vision_id": True}):
            text = tok.apply_chat_template(chat, tokenize=False, **kw)
            assert text == qwen.apply_chat_template(chat, tokenize=False, **kw)
            ids, qids = tok(text)["input_ids"], qwen(text)["input_ids"]
            assert tok.decode(ids) == qwen.decode(qids) == text
            specials = lambda t, xs: [t.convert_ids_to_tokens(i) for i in xs if i in t.all_special_ids  # noqa: E731
                                      or t.convert_ids_to_tokens(i) in tiny.SPECIAL_TOKENS]
            assert specials(tok, ids) == specials(qwen, qids)


def test_tokenizer_training_is_deterministic(tmp_path, assets):
    code = ("import sys; from pr1_jax.tiny import assets as tiny; "
            "tiny.save_tokenizer_dir(tiny.train_tokenizer(tiny.tokenizer_corpus(0, 2000)), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).parent.parent)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (Path(assets.tokenizer) / name).read_bytes(), name


# ---- tiny models -------------------------------------------------------------------------

def test_model_configs(tok):
    import models

    pol = models.config_from_dict(tiny.policy_config(tok))
    assert pol.model_type == "qwen2_vl" and pol.text.vocab_size == len(tok)
    assert sum(pol.text.mrope_section) == pol.text.head_dim // 2
    assert pol.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert pol.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert pol.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert pol.vision.out_dim == pol.text.hidden_size
    judge = models.config_from_dict(tiny.judge_config(tok))
    assert judge.model_type == "qwen2" and not judge.is_vlm and judge.text.vocab_size == len(tok)


def test_policy_and_judge_run_and_match_transformers(assets, tok):
    import models

    torch = pytest.importorskip("torch")
    import transformers

    cfg = assets.data_config("train")
    records, _ = read_records(cfg)
    ex = ExampleProcessor(cfg, tok).process(records[0])
    policy = models.load_pretrained(assets.policy)
    ids = ex.input_ids[None]
    logits = np.asarray(policy(ids, pixel_values=ex.pixel_values, image_grid_thw=ex.image_grid_thw))
    assert logits.shape == (1, ex.num_tokens, len(tok)) and np.isfinite(logits).all()

    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(assets.policy).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids.astype(np.int64)), pixel_values=torch.tensor(ex.pixel_values),
                 image_grid_thw=torch.tensor(ex.image_grid_thw.astype(np.int64)),
                 mm_token_type_ids=torch.tensor(ex.mm_token_type_ids[None].astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)

    judge = models.load_pretrained(assets.judge)
    jids = np.asarray(tok("Fact: There are 3 shapes.\nResponse: I count 3 shapes.\nAnswer: yes")["input_ids"])[None]
    jl = np.asarray(judge(jids))
    hf_j = transformers.Qwen2ForCausalLM.from_pretrained(assets.judge).eval()
    with torch.no_grad():
        jref = hf_j(input_ids=torch.tensor(jids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(jl, jref, atol=1e-4)


def test_assets_are_cached_by_content(assets, tmp_path):
    root = Path(assets.root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"tokenizer/tokenizer.json", "policy/config.json", "judge/config.json",
                                      "data/train.jsonl", "data/val.jsonl"}
    stamp = (root / "manifest.json").stat().st_mtime_ns
    again = tiny.build_tiny_assets(root.parent, seed=0, n_train=8, n_val=4)
    assert again == assets and (root / "manifest.json").stat().st_mtime_ns == stamp  # reused

    # a damaged file or another spec rebuilds (in a copy, so the shared fixture stays intact)
    import shutil
    run = tmp_path / "run"
    shutil.copytree(root, run / "tiny_assets")
    (run / "tiny_assets" / "data" / "val.jsonl").write_text("{}\n")
    rebuilt = tiny.build_tiny_assets(run, seed=0, n_train=8, n_val=4)
    assert Path(rebuilt.val).read_bytes() == Path(assets.val).read_bytes()
    assert not list(run.glob("tiny_assets.tmp-*"))
    spec = dict(manifest["spec"], seed=1)
    assert not tiny._cached(root, tiny.spec_hash_of(spec))  # another seed would rebuild
