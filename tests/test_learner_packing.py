"""The packed update (`pr1_jax.packing`): the same log-probs, loss and gradients as the padded
per-sequence layout, prompts once per group or once per sequence, on one device and on the mesh;
and a bounded set of compiled shapes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, load_pretrained
from pr1_jax.grpo import GRPOLossConfig, group_advantages
from pr1_jax.learner import Learner, LearnerConfig, batch_logprobs, loss_and_grads, make_module
from pr1_jax.packing import micro_bucket, pack, plan, unpack
from pr1_jax.rollout import train_batch_from_samples
from pr1_jax.sampling import Sampler, SamplingConfig
from pr1_jax.sharding import global_batch, make_mesh
from reference import vlm_batch

pytestmark = pytest.mark.usefixtures("highest_precision")

N = 4  # samples per prompt
TEMP = 0.9
EOS = tuple(range(2, 14))  # stop tokens: responses from 1 token to the cap
ROW = 64  # tokens per row: some groups fit whole, others split
# Every term the paper run and a KL run use: recomputed old log-probs, clip-higher, dual clip, KL.
CFG = LearnerConfig(recompute_old_logprobs=True,
                    loss=GRPOLossConfig(clip_high=0.3, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01))
SAMPLER_OLD = dataclasses.replace(CFG, recompute_old_logprobs=False)


@functools.cache
def rollout(path: str, arch: str):
    """(model, per-sequence batch with advantages and reference log-probs) of a tiny rollout."""
    model = load_pretrained(path)
    rng = np.random.default_rng(7)
    grids = [[(1, 4, 6)], [(1, 4, 4), (1, 2, 2)], [(1, 4, 4)]] if arch == "qwen2_vl" else [[(1, 8, 8)], [(1, 4, 8)], []]
    ids, mask, _, pv, thw = vlm_batch(grids, [(2, 4), (1, 5), (6, 3)], rng)
    inputs = model.prepare_inputs(ids, mask, pv, thw)
    scfg = SamplingConfig(max_new_tokens=12, eos_ids=EOS, pad_id=0, temperature=TEMP, n=N)
    out = Sampler(model.module, scfg)(model.params, inputs, jax.random.key(3))
    adv = group_advantages(jnp.asarray(rng.uniform(size=len(grids) * N)), N)
    batch = train_batch_from_samples(model.config, inputs, out, N, pv, thw, num_patches=64, advantages=adv)
    ref = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), model.params)
    logp = batch_logprobs(model.module, ref, batch, TEMP)[0]
    batch = batch.replace(ref_logprobs=np.where(batch.response_mask, np.asarray(logp), 0.0).astype(np.float32))
    return model, batch


def _grads(model, batch, cfg, mesh=None):
    module = make_module(model.config, cfg)
    return jax.jit(lambda p, b: loss_and_grads(p, b, cfg, module, mesh, temperature=TEMP))(model.params, batch)


def _rel(a, b) -> float:
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b))
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) / scale


@pytest.mark.parametrize("arch,mode", [("qwen2_vl", "groups"), ("qwen2_5_vl", "groups"), ("qwen2_vl", "sequences")])
def test_packed_equals_padded(hf_checkpoint, arch, mode, monkeypatch):
    """Also the block-sparse attention: with blocks of 8 slots the rows' pairs are a fraction of
    their causal squares, and a pair left out would change the log-probs."""
    monkeypatch.setattr(attention, "PAIR_BLOCK", 8)
    model, batch = rollout(str(hf_checkpoint(arch)[1]), arch)
    lengths = np.asarray(batch.response_mask).sum(-1)
    assert lengths.min() <= 2 and lengths.max() >= 10, lengths  # very different lengths
    packed = pack(model.config, batch, N, mode, ROW)
    rows, _, _, num_pairs = plan(batch, N, mode, ROW)
    assert len(rows) > 1 and packed.num_rows == len(rows)
    live = (np.asarray(packed.pairs)[..., 0] < ROW // 8).sum(-1)
    assert packed.pairs.shape[1] == num_pairs and live.max() <= num_pairs and live.max() < 8 * 9 / 2
    mask = np.asarray(batch.response_mask).astype(bool)
    prompt_tokens = np.asarray(batch.attention_mask)[:, :-mask.shape[1]].sum()
    computed = np.asarray(packed.attention_mask).sum()
    if mode == "groups":  # each prompt once per chunk, fewer than once per sample
        assert computed < prompt_tokens + mask.sum()
    else:
        assert computed == prompt_tokens + mask.sum()

    logp_ref, ent_ref = batch_logprobs(model.module, model.params, batch, TEMP)
    logp, ent = batch_logprobs(model.module, model.params, packed, TEMP)
    for got, want in ((logp, logp_ref), (ent, ent_ref)):
        got = unpack(packed, got, mask.shape)
        assert np.abs(got - np.asarray(want))[mask].max() <= 1e-5

    for cfg in (CFG, SAMPLER_OLD):
        g_ref, m_ref = _grads(model, batch, cfg)
        g, m = _grads(model, packed, cfg)
        assert _rel(g, g_ref) <= 1e-5
        assert "visual" in g and _rel(g["visual"], g_ref["visual"]) <= 1e-5  # through the tower once
        for k in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "ratio_mean", "num_tokens", "num_seqs",
                  "logprob_diff_mean", "logprob_diff_max", "ratio_max", "ratio_min"):
            assert float(m[k]) == pytest.approx(float(m_ref[k]), rel=1e-5, abs=1e-6), k


@pytest.mark.devices(8)
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_packed_step_on_the_mesh(hf_checkpoint, shape, monkeypatch):
    """A packed step on 8 devices (block-sparse attention in blocks of 8 slots): the unsharded
    padded step's loss, gradient norm and params."""
    monkeypatch.setattr(attention, "PAIR_BLOCK", 8)
    model, batch = rollout(str(hf_checkpoint("qwen2_vl")[1]), "qwen2_vl")
    cfg = dataclasses.replace(CFG, lr=1e-3, eps=1e-6, warmup_ratio=0.0, packing="groups",
                              max_tokens_per_micro_batch=ROW)
    learner = Learner(model.config, cfg, make_mesh(shape), 10, temperature=TEMP)
    shards = learner.mesh.shape["data"] * learner.mesh.shape["fsdp"]
    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    reference = Learner(model.config, dataclasses.replace(cfg, packing="off"), one, 10, temperature=TEMP)
    ref_state, ref = reference.step(reference.init_state(model.params), global_batch(reference.mesh, batch))
    packed = pack(model.config, batch, N, "groups", ROW, shards=shards)
    assert packed.num_rows % shards == 0
    state, m = learner.step(learner.init_state(model.params), global_batch(learner.mesh, packed))
    assert float(m["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(float(ref["grad_norm"]), rel=1e-5)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)))
    assert diff <= 1e-5


def test_micro_batch_counts_are_bounded():
    """At most 1/8 more micro-batches than needed, 8 counts per doubling: few compiled shapes."""
    counts = [micro_bucket(k) for k in range(1, 1025)]
    assert all(k <= c <= max(k, k + k / 8) for k, c in zip(range(1, 1025), counts))
    assert len(set(counts)) <= 16 + 8 * 6


def test_same_micro_count_same_shapes(hf_checkpoint):
    """Two steps with different responses packed to the same micro-batch and pair counts have the
    same shapes (the update compiles once); a pair count below a row's need is refused, and so is
    a token budget the attention's blocks cannot divide."""
    model, batch = rollout(str(hf_checkpoint("qwen2_vl")[1]), "qwen2_vl")
    shorter = batch.replace(response_mask=np.asarray(batch.response_mask) * (np.arange(batch.response_length) < 3))
    a = pack(model.config, batch, N, "groups", ROW, num_micro=8, num_pairs=4)
    b = pack(model.config, shorter, N, "groups", ROW, num_micro=8, num_pairs=4)
    shapes = lambda x: [y.shape for y in jax.tree.leaves(x)]  # noqa: E731
    assert shapes(a) == shapes(b) and jax.tree.structure(a) == jax.tree.structure(b)
    with pytest.raises(ValueError, match="block pairs"):
        pack(model.config, batch, N, "groups", ROW, num_pairs=0)
    with pytest.raises(ValueError, match="multiple of 8"):  # blocks of a slot or two: a budget's typo
        LearnerConfig(packing="groups", max_tokens_per_micro_batch=9217)
