"""The jitted sampler against transformers' generate, a full-forward recompute, and statistics."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from models import load_pretrained
from pr1_jax.grpo import token_logprobs
from pr1_jax.sharding import pad_sequences_left
from pr1_jax.rollout import sample_rows
from pr1_jax.sampling import SamplingConfig, Sampler, filter_logits, next_tokens
from pr1_jax.sharding import batch_sharding, make_mesh, param_shardings, placer
from models import abstract_params
from models.causal_lm import QwenCausalLM
from reference import IMAGE, vlm_batch

# Greedy tokens and log-probs against transformers' and a full forward: full-precision fp32 matmuls.
pytestmark = pytest.mark.usefixtures("highest_precision")

EOS = (2, 7)
PAD = 0


ROW_GRIDS = [[(1, 4, 6)], [(1, 6, 10), (1, 2, 8)], []]


def _batch(rng, arch):
    if arch in ("qwen2", "qwen3"):
        ids = rng.integers(3, 120, (3, 9))
        mask = np.ones_like(ids)
        mask[1, :4] = 0
        return ids, mask, None, None, None
    return vlm_batch(ROW_GRIDS, [(5, 1), (1, 2), (4, 0)], rng, patch=16 if arch == "qwen3_vl" else 14)


def _hf_generate(hf, ids, mask, mm, pv, thw, new):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pv is not None:
        kw.update(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(thw), mm_token_type_ids=torch.tensor(mm))
    with torch.no_grad():
        out = hf.generate(**kw, do_sample=False, max_new_tokens=new, eos_token_id=list(EOS), pad_token_id=PAD)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen2", "qwen3_vl", "qwen3"])
def test_greedy_matches_transformers_generate(hf_checkpoint, arch):
    hf, path = hf_checkpoint(arch)
    model = load_pretrained(path)
    ids, mask, mm, pv, thw = _batch(np.random.default_rng(0), arch)
    new = 12
    cfg = SamplingConfig(max_new_tokens=new, eos_ids=EOS, pad_id=PAD, temperature=0.0)
    ref = _hf_generate(hf, ids, mask, mm, pv, thw, new)
    sampler = Sampler(model.module, cfg)
    # The images packed for the whole batch (HF layout) and per row (the rollout's layout; rows
    # with two images and with none included).
    for per_row in ([False, True] if pv is not None else [False]):
        out = sampler(model.params, model.prepare_inputs(ids, mask, pv, thw, per_row=per_row), jax.random.key(0))
        ours = np.asarray(out.tokens)
        for row in range(ids.shape[0]):
            n = int(out.lengths[row])
            assert np.array_equal(ours[row, :n], ref[row, :n]), (per_row, row, ours[row], ref[row])
            # transformers stops the row at EOS too (pads after it) or runs to max_new_tokens.
            assert n == new or ref[row, n - 1] in EOS


def _recompute_logprobs(model, ids, mask, pv, thw, out, n, temperature):
    """One full forward over prompt + response per sample; log-probs of the response tokens. The
    response continues the prompt's positions and its tokens are text, even a sampled image token
    (as the learner scores them)."""
    tokens, resp_mask = np.asarray(out.tokens), np.asarray(out.mask)
    patches = np.cumsum([0] + [sum(int(np.prod(g)) for g in grids) for grids in ROW_GRIDS])
    grids = np.cumsum([0] + [len(g) for g in ROW_GRIDS])
    t, new = ids.shape[1], tokens.shape[1]
    apply = functools.partial(model.module.apply, {"params": model.params})
    result = []
    for i in range(tokens.shape[0]):
        r = i // n
        kw = {}
        if pv is not None and grids[r + 1] > grids[r]:
            kw = dict(pixel_values=pv[patches[r]:patches[r + 1]], image_grid_thw=thw[grids[r]:grids[r + 1]])
        prompt = model.prepare_inputs(ids[r:r + 1], mask[r:r + 1], **kw)
        start = mask[r].sum() + prompt["rope_deltas"][0]
        pos = prompt["positions"]
        pos = np.concatenate([pos, np.broadcast_to(start + np.arange(new), pos.shape[:-1] + (new,))], -1)
        seq = np.concatenate([ids[r], tokens[i]])[None]
        h, _ = apply(seq, pos, np.concatenate([mask[r], resp_mask[i]])[None], prompt["vision"],
                     image_mask=(seq == IMAGE) & (np.arange(t + new) < t), method=QwenCausalLM.hidden_states)
        logits = apply(h[:, t - 1:-1], method=QwenCausalLM.logits)
        result.append(np.asarray(token_logprobs(logits, jnp.asarray(tokens[i:i + 1]), temperature or 1.0)))
    return np.concatenate(result), resp_mask


@pytest.mark.parametrize("arch,temperature", [("qwen2_vl", 1.0), ("qwen2_5_vl", 0.7), ("qwen2", 0.0), ("qwen3_vl", 1.0)])
def test_logprobs_equal_full_forward_recompute(hf_checkpoint, arch, temperature):
    _, path = hf_checkpoint(arch)
    model = load_pretrained(path)
    ids, mask, _, pv, thw = _batch(np.random.default_rng(1), arch)
    n = 2
    cfg = SamplingConfig(max_new_tokens=10, eos_ids=EOS, pad_id=PAD, temperature=temperature, n=n)
    out = Sampler(model.module, cfg)(model.params, model.prepare_inputs(ids, mask, pv, thw), jax.random.key(3))
    ref, resp_mask = _recompute_logprobs(model, ids, mask, pv, thw, out, n, temperature)
    got = np.asarray(out.logprobs)
    assert np.abs(got - ref)[resp_mask.astype(bool)].max() <= 1e-4
    assert np.all(got[~resp_mask.astype(bool)] == 0)


def test_fixed_seed_reproducible_and_shared_prefill_equals_separate(hf_checkpoint):
    _, path = hf_checkpoint("qwen2_vl")
    model = load_pretrained(path)
    ids, mask, _, pv, thw = vlm_batch([[(1, 4, 6)]], [(3, 2)], np.random.default_rng(2))
    inputs = model.prepare_inputs(ids, mask, pv, thw)
    cfg = SamplingConfig(max_new_tokens=8, eos_ids=EOS, pad_id=PAD, temperature=1.0, top_p=0.95, top_k=50, n=4)
    sampler = Sampler(model.module, cfg)
    a = sampler(model.params, inputs, jax.random.key(7))
    b = sampler(model.params, inputs, jax.random.key(7))
    c = sampler(model.params, inputs, jax.random.key(8))
    assert np.array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # n separate prefills: the prompt repeated 4 times with n = 1 uses the same per-row streams.
    rep = model.prepare_inputs(np.repeat(ids, 4, 0), np.repeat(mask, 4, 0), np.tile(pv, (4, 1)), np.tile(thw, (4, 1)))
    sep = sampler(model.params, rep, jax.random.key(7), dataclasses.replace(cfg, n=1))
    assert np.array_equal(a.tokens, sep.tokens)
    np.testing.assert_allclose(a.logprobs, sep.logprobs, atol=1e-5)


@pytest.mark.parametrize("vocab", [12, 3000])
def test_first_step_frequencies_match_softmax(vocab):
    """Chi-square of 20000 draws at temperature 1 against softmax(logits); with 3000 tokens the
    draw goes through blocks of the vocabulary (12 likely tokens spread over them, the rest one bin).
    The log-probs reported are log softmax of the drawn tokens."""
    rng = np.random.default_rng(0)
    logits = np.full(vocab, -4.0, np.float32)
    hot = rng.choice(vocab, 12, replace=False)
    logits[hot] = rng.standard_normal(12) * 1.5
    logits = jnp.asarray(logits)
    draws = 20000
    keys = jax.random.split(jax.random.key(0), draws)
    cfg = SamplingConfig(max_new_tokens=1, eos_ids=(0,), pad_id=0, temperature=1.0)
    tokens, logp = next_tokens(jnp.broadcast_to(logits, (draws, vocab)), keys, cfg)
    tokens = np.asarray(tokens)
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    bins = np.full(vocab, 12)
    bins[hot] = np.arange(12)
    counts = np.bincount(bins[tokens], minlength=13)
    expected = np.bincount(bins, weights=p, minlength=13) / p.sum() * draws
    used = expected > 0
    assert stats.chisquare(counts[used], expected[used]).pvalue > 1e-3
    np.testing.assert_allclose(np.asarray(logp), np.log(p[tokens]), atol=1e-5)


def test_truncated_tokens_are_never_drawn():
    """top-k 3 of 3000 (three blocks of the vocabulary): only those three come out."""
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((64, 3000)), jnp.float32)
    cfg = SamplingConfig(max_new_tokens=1, eos_ids=(0,), pad_id=0, temperature=1.0, top_k=3)
    tokens, _ = next_tokens(logits, jax.random.split(jax.random.key(0), 64), cfg)
    top3 = np.argsort(np.asarray(logits), axis=-1)[:, -3:]
    assert all(t in row for t, row in zip(np.asarray(tokens), top3))


def test_top_k_top_p_filter():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, k, p)))[0].tolist()  # noqa: E731
    assert keep(2, 1.0) == [True, True, False, False]
    assert keep(0, 0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert keep(0, 0.81) == [True, True, True, False]
    assert keep(0, 0.1) == [True, False, False, False]  # the top token always stays


def test_early_exit_and_masks(hf_checkpoint):
    """Every token an EOS: all rows stop after one step and the loop exits."""
    _, path = hf_checkpoint("qwen2")
    model = load_pretrained(path)
    ids = np.random.default_rng(3).integers(3, 120, (2, 5))
    cfg = SamplingConfig(max_new_tokens=6, eos_ids=tuple(range(128)), pad_id=PAD, temperature=1.0, n=3)
    out = Sampler(model.module, cfg)(model.params, model.prepare_inputs(ids), jax.random.key(0))
    assert int(out.steps) == 1
    assert np.array_equal(out.lengths, np.ones(6))
    assert np.array_equal(np.asarray(out.mask)[:, 0], np.ones(6)) and not np.asarray(out.mask)[:, 1:].any()


@pytest.mark.devices(8)
@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_sharded_sampler_matches_unsharded(hf_checkpoint, shape):
    _, path = hf_checkpoint("qwen2_vl")
    model = load_pretrained(path)
    mesh = make_mesh(shape)
    params = load_pretrained(path, place=placer(param_shardings(abstract_params(QwenCausalLM(model.config)), mesh))).params
    grids = [[(1, 4, 6)], [(1, 4, 4)], [], [(1, 2, 2)]] * 2  # 8 prompts: the batch divides every mesh
    ids, mask, _, pv, thw = vlm_batch(grids, [(2, 4), (1, 5), (6, 0), (3, 3)] * 2, np.random.default_rng(4))
    inputs = model.prepare_inputs(ids, mask, pv, thw)
    cfg = SamplingConfig(max_new_tokens=6, eos_ids=EOS, pad_id=PAD, temperature=1.0, n=2)
    ref = Sampler(model.module, cfg)(model.params, inputs, jax.random.key(1))
    sharded_inputs = dict(inputs)
    for k in ("input_ids", "attention_mask", "rope_deltas"):
        sharded_inputs[k] = jax.device_put(inputs[k], batch_sharding(mesh, inputs[k].shape))
    sampler = Sampler(model.module, cfg, mesh)
    out = sampler(params, sharded_inputs, jax.random.key(1))
    assert np.array_equal(ref.tokens, out.tokens)
    np.testing.assert_allclose(ref.logprobs, out.logprobs, atol=1e-5)
    assert out.tokens.sharding.spec[0] is not None  # rows stay sharded (each process reads its own)
    # The trainer's path: host rows with per-row images -> global arrays -> this process's rows.
    rows = sample_rows(sampler, params, model.prepare_inputs(ids, mask, pv, thw, per_row=True), jax.random.key(1), mesh)
    assert isinstance(rows.tokens, np.ndarray) and np.array_equal(ref.tokens, rows.tokens)
    np.testing.assert_allclose(ref.logprobs, rows.logprobs, atol=1e-5)
    # Prompts left-padded further (processes whose batches landed in different length buckets).
    longer = pad_sequences_left(model.prepare_inputs(ids, mask, pv, thw, per_row=True), ids.shape[1] + 3)
    rows = sample_rows(sampler, params, longer, jax.random.key(1), mesh)
    assert np.array_equal(ref.tokens, rows.tokens)
