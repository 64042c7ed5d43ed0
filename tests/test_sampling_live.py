"""The live sampler (`pr1_jax.sampling.Sampler`: shared prompt KV, response chunks, compaction)
against the whole-cache sampler (`pr1_jax.sampling.sample`, one program, every row to the cap):
the same tokens and log-probs, rows stopping at very different lengths, on one device and on the
8-device mesh. Small chunks (4 slots) make a 12-token budget run three segments with compactions
between them; greedy parity with transformers' generate is `test_sampling.py`'s."""

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from models import abstract_params, load_pretrained
from models.causal_lm import QwenCausalLM
from pr1_jax.sampling import SamplingConfig, Sampler, bucket, sample
from pr1_jax.sharding import batch_axis_size, batch_sharding, make_mesh, param_shardings, placer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decode_cost  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

# Five stop tokens of the tiny vocabulary: rows stop anywhere from the first step to the cap.
EOS = (2, 7, 11, 13, 17)
NEW, CHUNK = 12, 4


def _whole_cache(model, inputs, key, cfg):
    fn = jax.jit(lambda p, i, k: sample(model.module, p, i["input_ids"], i["positions"], i["attention_mask"],
                                        i["vision"], i["rope_deltas"], k, cfg))
    return fn(model.params, inputs, key)


def _assert_same(live, ref):
    assert int(live.steps) == int(ref.steps)
    assert np.array_equal(live.tokens, ref.tokens)
    assert np.array_equal(live.mask, ref.mask) and np.array_equal(live.lengths, ref.lengths)
    np.testing.assert_allclose(live.logprobs, ref.logprobs, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def text_model(hf_checkpoint):
    _, path = hf_checkpoint("qwen2")
    return load_pretrained(path), path


def _prompts(model, b, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(20, 120, (b, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return model.prepare_inputs(ids, mask)


@pytest.mark.parametrize("temperature,n", [(0.0, 1), (1.0, 1), (0.0, 8), (1.0, 8)])
def test_live_equals_whole_cache(text_model, temperature, n):
    model, _ = text_model
    inputs = _prompts(model, 3, seed=0)
    cfg = SamplingConfig(max_new_tokens=NEW, eos_ids=EOS, pad_id=0, temperature=temperature, n=n)
    ref = _whole_cache(model, inputs, jax.random.key(5), cfg)
    live = Sampler(model.module, cfg, chunk=CHUNK)(model.params, inputs, jax.random.key(5))
    _assert_same(live, ref)
    if temperature:  # the case is the one asked for: some rows stop early, others run to the cap
        lengths = np.asarray(ref.lengths)
        assert lengths.min() <= CHUNK < NEW == lengths.max(), lengths


def _gathered(sampler, params, inputs, key):
    """(bytes all-gathered per decode step, per segment) of the sampler's compiled segment program."""
    args = [inputs[k] for k in ("input_ids", "positions", "attention_mask", "vision", "rope_deltas")]
    decode_params, state = sampler._prefill(params, *args, key, None, sampler.cfg, batch_axis_size(sampler.mesh))
    hlo = sampler._segment.lower(decode_params, state, sampler.cfg).compile().as_text()
    return decode_cost.HloCosts(hlo, None).all_gathered()


@pytest.mark.devices(8)
@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_live_on_the_mesh_equals_whole_cache(text_model, shape):
    """Rows compacted within their shard of the data axes; the result as on one device, with the
    decode weights gathered over `fsdp` once per call (the default) or left split. Gathered, the
    segment program all-gathers no weight (neither per decode step nor per segment: XLA:CPU
    hoists a loop's weight all-gathers out of it, a TPU compile need not); split, it does."""
    model, path = text_model
    mesh = make_mesh(shape)
    shardings = param_shardings(abstract_params(QwenCausalLM(model.config)), mesh)
    params = load_pretrained(path, place=placer(shardings)).params
    inputs = _prompts(model, 8, seed=1)
    cfg = SamplingConfig(max_new_tokens=NEW, eos_ids=EOS, pad_id=0, temperature=1.0, n=2)
    assert cfg.gather_weights
    ref = _whole_cache(model, inputs, jax.random.key(2), cfg)
    sharded = dict(inputs)
    for k in ("input_ids", "attention_mask", "rope_deltas"):
        sharded[k] = jax.device_put(inputs[k], batch_sharding(mesh, inputs[k].shape))
    # The bytes a chip holds of the decode weights gathered over fsdp (split over tensor only).
    weights = sum(x.size * 4 for x in jax.tree.leaves(model.module.decode_params(model.params))) / shape[2]
    for gather in (True, False):
        sampler = Sampler(model.module, dataclasses.replace(cfg, gather_weights=gather), mesh, chunk=CHUNK)
        live = sampler(params, sharded, jax.random.key(2))
        _assert_same(live, ref)
        assert live.tokens.sharding.spec[0] is not None
        per_step, per_segment = _gathered(sampler, params, sharded, jax.random.key(2))
        if gather:  # what is left is rows' activations (a few KB)
            assert per_step + per_segment < 0.1 * weights, (per_step, per_segment, weights)
        else:
            assert per_step + per_segment > 0.5 * weights, (per_step, per_segment, weights)


def test_buckets():
    assert [bucket(c, 1000) for c in (1, 2, 3, 4, 5, 7, 9, 11, 13, 17, 21, 25, 29, 33, 600)] == \
        [1, 2, 3, 4, 5, 7, 10, 12, 14, 20, 24, 28, 32, 40, 640]
    assert bucket(100, 80) == 80
