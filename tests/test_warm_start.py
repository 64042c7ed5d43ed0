"""Warm starts of the embedded default (`pr1_jax.tiny.warm_start`): the judge is trained on exactly
what it reads at inference, the policy's SFT targets are response + EOS and their loss falls,
and finished warm starts are reused from the run directory. A few steps only: the full warm
starts (minutes) are the train loop's business, not the tests'."""

import re

import jax
import numpy as np
import pytest

import models
from pr1_jax.tiny import synthetic as syn
from pr1_jax import tiny
from pr1_jax.tiny import warm_start as ws
from pr1_jax.data.processing import ExampleProcessor
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.judge import Judge, render_prompt
from pr1_jax.tiny.sft import SFTTrainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny.build_tiny_assets(tmp_path_factory.mktemp("run"), seed=0, n_train=8, n_val=4)


@pytest.fixture(scope="module")
def judge(assets):
    return Judge.from_model(load_tokenizer(assets.tokenizer), models.load_pretrained(assets.judge),
                            tiny.judge_prompt_config())


def test_tiny_data_config_fits_the_task(assets):
    cfg = assets.data_config("train", batch_size=4)
    assert cfg.min_pixels == cfg.max_pixels == 56 * 56
    assert cfg.patch_limit_per_record == 16 and cfg.patch_rows == 64  # not the paper's 9216 per image
    ex = ExampleProcessor(cfg).process(syn.make_records(1, seed=0)[0])
    assert ex.pixel_values.shape[0] == 16 and ex.num_tokens <= cfg.max_prompt_length <= 128


def test_tiny_judge_prompt(judge):
    assert judge.yes_ids != judge.no_ids and len(judge.yes_ids) == len(judge.no_ids) == 1
    # the statement is the last thing before the chat template's turn end
    assert judge.pieces.tail == "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("single", [False, True])
def test_judge_is_trained_on_what_it_reads(judge, single):
    """The rows of the warm start are the judge's own prompts (the chat-template rendering of
    each (response, annotation) pair), and the margin the loss trains is the judge's margin."""
    examples = syn.judge_examples(np.random.default_rng(1), 6, single=single)
    k = len(examples[0][1])
    batch, labels, (index, target, valid) = ws.judge_batch(judge, examples, 128, k)
    tok = judge.tokenizer
    for r, (response, notes, ys) in enumerate(examples):
        ids, br = batch.input_ids[r], batch.branches[r]
        prefix = ids[(br == 0) & (batch.attention_mask[r] == 1)]
        for j, note in enumerate(notes):
            branch = ids[br == j + 1]
            assert tok.decode(np.concatenate([prefix, branch])) == render_prompt(
                    tok, judge.config, response, note)
            assert batch.verdict_index[r, j] == np.flatnonzero(br == j + 1)[-1]
        assert list(labels[r, :len(ys)]) == ys
        # copy targets: the next statement token, inside positive statements only
        for i, t in zip(index[r][valid[r]], target[r][valid[r]]):
            assert ids[i + 1] == t and br[i] == br[i + 1] > 0 and ys[br[i] - 1] == 1
    out = judge([e[0] for e in examples], [e[1] for e in examples])
    loss, m = ws.judge_loss(judge.params, batch, labels, (index, target, valid), judge.module, judge.yes_ids,
                            judge.no_ids, copy_weight=0.0)
    margins = np.concatenate(out["margins"])
    y = np.concatenate([e[2] for e in examples])
    want = np.mean(np.logaddexp(0.0, -(2 * y - 1) * margins))  # logistic loss of the judge's margins
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean((margins > 0) == (y > 0.5)))


def test_policy_sft_targets_end_with_eos_and_loss_falls(assets):
    model = models.load_pretrained(assets.policy)
    cfg = assets.data_config("train", batch_size=4)
    proc = ExampleProcessor(cfg)
    pairs = syn.sft_pairs(4, seed=0)
    batch = ws.policy_sft_batch(model, proc, cfg, pairs, 48)
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    t = batch.input_ids.shape[1] - 48
    for row, mask, (_, response) in zip(batch.input_ids[:, t:], batch.response_mask, pairs):
        n = int(mask.sum())
        assert mask[:n].all() and row[n - 1] == eos
        assert proc.tokenizer.decode(row[:n - 1]) == response
        assert re.fullmatch(r"<think>\n.*?\n</think>\n<answer>\n.*?\\boxed{.+?}.*?\n</answer>", response, re.S)
    trainer = SFTTrainer(model.module, 6, lr=3e-3, warmup_ratio=0.0)
    params, opt = model.params, trainer.init(model.params)
    losses = []
    for _ in range(6):
        params, opt, m = trainer.step(params, opt, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_warm_starts_are_written_then_reused(assets, tmp_path, monkeypatch):
    judge_dir = ws.warm_start_judge(assets, tmp_path / "judge_ws", steps=2, batch_size=2, curriculum=0.0)
    policy_dir = ws.warm_start_policy(assets, tmp_path / "policy_ws", steps=1, batch_size=2)
    for d in (judge_dir, policy_dir):
        assert (d / "config.json").exists() and (d / "tokenizer.json").exists()
        assert not d.with_name(d.name + ".tmp").exists()
    Judge.load(judge_dir, tiny.judge_prompt_config(), dtype="float32")  # loads like any judge checkpoint
    trained = jax.tree.leaves(models.load_pretrained(judge_dir).params)
    initial = jax.tree.leaves(models.load_pretrained(assets.judge).params)
    assert any(not np.array_equal(a, b) for a, b in zip(trained, initial))

    def no_training(*a, **k):
        raise AssertionError("a finished warm start must be reused, not redone")

    monkeypatch.setattr(ws, "load_pretrained", no_training)
    assert ws.warm_start_judge(assets, judge_dir, steps=2, batch_size=2, curriculum=0.0) == judge_dir
    assert ws.warm_start_policy(assets, policy_dir, steps=1, batch_size=2) == policy_dir
    # Other settings: not reused (a cached warm start is a function of its settings and code).
    with pytest.raises(AssertionError, match="must be reused"):
        ws.warm_start_policy(assets, policy_dir, steps=1, batch_size=2, p_true=0.5)
