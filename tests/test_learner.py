"""The GRPO learner: batch layout, log-probs against the sampler, micro-batching, the vision tower
once per prompt against once per sample, response buckets, the mesh, frozen vision, remat, the
NaN guard, and that a few updates really optimise a reward."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import load_pretrained
from pr1_jax.grpo import group_advantages
from pr1_jax.learner import (Learner, LearnerConfig, apply_update, init_state, loss_and_grads, lr_schedule,
                             make_module, make_optimizer, micro_features, response_logprobs)
from pr1_jax.rollout import response_bucket, train_batch_from_samples, vision_copies
from pr1_jax.sampling import Sampler, SamplingConfig
from pr1_jax.sharding import global_batch, make_mesh, pad_sequences_left
from reference import vlm_batch

# Log-probs are compared with the sampler's and sharded steps with unsharded ones at 1e-4 / 1e-5.
pytestmark = pytest.mark.usefixtures("highest_precision")

N_SAMPLES = 2
TEMP = 0.8
EOS = tuple(range(2, 20))  # many stop tokens: response lengths vary, so token counts matter
PAD = 0
PATCHES = 32  # patch rows per sequence; the largest prompt below has 24
GRIDS = [[(1, 4, 6)], [(1, 4, 4), (1, 2, 2)], [], [(1, 2, 2)]]
TEXT = [(2, 4), (1, 5), (6, 0), (3, 3)]
# eps 1e-6 (not 1e-8): Adam's first step is g / (|g| + eps), which would blow float-rounding noise
# in near-zero gradients up to lr-sized parameter differences between summation orders.
BASE = LearnerConfig(lr=1e-3, eps=1e-6, warmup_ratio=0.0)


class Setup:
    """One tiny Qwen2-VL rollout (4 prompts x 2 samples = 8 sequences) and compiled functions,
    cached per config (compiling dominates the run time of these tests)."""

    def __init__(self, path, patch: int = 14):
        self.model = load_pretrained(path)
        ids, mask, _, pv, thw = vlm_batch(GRIDS, TEXT, np.random.default_rng(4), patch=patch)
        self.ids, self.mask, self.pv, self.thw = ids, mask, pv, thw
        self.inputs = self.model.prepare_inputs(ids, mask, pv, thw)
        scfg = SamplingConfig(max_new_tokens=6, eos_ids=EOS, pad_id=PAD, temperature=TEMP, n=N_SAMPLES)
        self.sampler = Sampler(self.model.module, scfg)
        self.out = self.sampler(self.model.params, self.inputs, jax.random.key(1))
        rewards = np.random.default_rng(0).uniform(size=len(GRIDS) * N_SAMPLES)
        self.adv = np.asarray(group_advantages(jnp.asarray(rewards), N_SAMPLES))
        self.batch = self.make_batch(self.out, self.adv)
        self._fns: dict = {}

    def make_batch(self, out, adv, **kw):
        return train_batch_from_samples(self.model.config, self.inputs, out, N_SAMPLES, self.pv, self.thw,
                                        num_patches=PATCHES, advantages=adv, **kw)

    def per_sample(self, batch=None):
        """The same batch with one vision group per sequence (the tower runs once per sample)."""
        batch = self.batch if batch is None else batch
        return batch.replace(vision=jax.tree.map(lambda x: np.repeat(x, N_SAMPLES, axis=0), batch.vision))

    def _cached(self, key, build):
        if key not in self._fns:
            self._fns[key] = build()
        return self._fns[key]

    def grads(self, cfg: LearnerConfig, batch=None, params=None):
        """(grads, metrics) of `loss_and_grads`, unsharded."""
        module = make_module(self.model.config, cfg)
        fn = self._cached(("grads", cfg), lambda: jax.jit(lambda p, b: loss_and_grads(p, b, cfg, module, temperature=TEMP)))
        return fn(self.model.params if params is None else params, self.batch if batch is None else batch)

    def update_fn(self, cfg: LearnerConfig):
        """(jitted apply_update, optimizer); shared by configs that differ only in the loss pass."""
        opt_cfg = dataclasses.replace(cfg, micro_batch_size=None, remat=False, recompute_old_logprobs=False)

        def build():
            tx = make_optimizer(opt_cfg, 10, learning_rate=1.0)
            return jax.jit(functools.partial(apply_update, cfg=opt_cfg, tx=tx, lr_fn=lr_schedule(opt_cfg, 10))), tx

        return self._cached(("update", opt_cfg), build)

    def run_step(self, cfg: LearnerConfig, batch=None, state=None):
        """The unsharded reference step: `loss_and_grads` then `apply_update` (= `train_step`)."""
        fn, tx = self.update_fn(cfg)
        state = init_state(self.model.params, tx) if state is None else state
        grads, metrics = self.grads(cfg, batch, state.params)
        return fn(state, grads, metrics)

    def learner(self, cfg: LearnerConfig, shape) -> Learner:
        return self._cached(("learner", cfg, shape), lambda: Learner(self.model.config, cfg, make_mesh(shape), 10,
                                                                               temperature=TEMP))


@pytest.fixture(scope="module")
def setup(hf_checkpoint):
    return Setup(hf_checkpoint("qwen2_vl")[1])


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_batch_layout(setup):
    b, out, inputs = setup.batch, setup.out, setup.inputs
    lengths = np.asarray(out.lengths)
    assert len(set(lengths.tolist())) > 2, lengths  # the rollout really has ragged responses
    t = setup.ids.shape[1]
    r = out.tokens.shape[1]
    n_valid = setup.mask.sum(-1)
    for i in range(b.input_ids.shape[0]):
        p = i // N_SAMPLES
        assert np.array_equal(b.input_ids[i, :t], setup.ids[p])
        assert np.array_equal(b.input_ids[i, t:], np.asarray(out.tokens[i]))
        assert np.array_equal(b.attention_mask[i], np.concatenate([setup.mask[p], np.asarray(out.mask[i])]))
        assert np.array_equal(b.positions[:, i, :t], inputs["positions"][:, p])
        k = np.arange(r)
        want = np.where(k < lengths[i], n_valid[p] + inputs["rope_deltas"][p] + k, 0)
        assert np.array_equal(b.positions[:, i, t:], np.broadcast_to(want, (3, r)))
    # Vision group p (one per prompt here) holds exactly the images of prompt p, laid out as for
    # that prompt alone; sequences p * n .. p * n + n - 1 read it.
    offsets = np.cumsum([0] + [sum(int(np.prod(g)) for g in row) for row in GRIDS])
    first_grid = np.cumsum([0] + [len(row) for row in GRIDS])
    assert b.vision.pixel_values.shape[0] == len(GRIDS)
    for p in range(len(GRIDS)):
        vi = jax.tree.map(lambda x: x[p], b.vision)
        real = offsets[p + 1] - offsets[p]
        assert np.array_equal(vi.pixel_values[:real], setup.pv[offsets[p]:offsets[p + 1]])
        assert not vi.pixel_values[real:].any()
        if real:
            alone = setup.model.prepare_inputs(setup.ids[p:p + 1], setup.mask[p:p + 1],
                                               setup.pv[offsets[p]:offsets[p + 1]],
                                               setup.thw[first_grid[p]:first_grid[p + 1]], num_patches=PATCHES)
            for f in ("perm", "rot_pos", "seg_full", "seg_window", "unperm"):
                assert np.array_equal(getattr(vi, f), getattr(alone["vision"], f)), f
    with pytest.raises(ValueError, match="num_patches"):
        train_batch_from_samples(setup.model.config, inputs, out, N_SAMPLES, setup.pv, setup.thw, num_patches=20)
    # Data shards that do not divide the prompts: each prompt's images are repeated (the fewest
    # copies dividing n) so that the groups shard with their rows; group g serves rows g * N / G ...
    sharded = setup.make_batch(out, setup.adv, shards=8)
    assert sharded.vision.pixel_values.shape[0] == 8
    np.testing.assert_array_equal(sharded.vision.pixel_values, setup.per_sample().vision.pixel_values)
    assert [vision_copies(4, 8, s) for s in (1, 2, 4, 8, 16, 32, 3)] == [1, 1, 1, 2, 4, 8, 8]
    assert vision_copies(6, 4, 4) == 2 and vision_copies(3, 6, 4) == 6


def test_response_buckets(setup):
    """The response axis cut to a bucket that holds the longest response: the same batch, shorter."""
    assert [response_bucket(x, (256, 512, 1024, 4096), 1024) for x in (0, 1, 256, 257, 600, 1024)] == \
        [256, 256, 256, 512, 1024, 1024]
    assert response_bucket(40, (256, 512), 64) == 64  # every bucket at or above the cap: the cap
    # The rollout's responses ended early (cut at 4 of the cap's 6 tokens: masked from there).
    longest = 4
    keep = np.arange(setup.out.tokens.shape[1])[None] < longest
    out = setup.out.replace(mask=np.asarray(setup.out.mask) * keep,
                            lengths=np.minimum(np.asarray(setup.out.lengths), longest))
    b = setup.make_batch(out, setup.adv)
    short = setup.make_batch(out, setup.adv, response_length=longest)
    r, t = short.response_length, b.input_ids.shape[1] - b.response_length
    assert r == longest
    for name in ("response_mask", "old_logprobs"):
        np.testing.assert_array_equal(getattr(short, name), getattr(b, name)[:, :r])
    np.testing.assert_array_equal(short.input_ids, b.input_ids[:, :t + r])
    np.testing.assert_array_equal(short.positions, b.positions[..., :t + r])
    assert not b.response_mask[:, r:].any()
    module = make_module(setup.model.config, BASE)
    fn = jax.jit(lambda p, x: response_logprobs(module, p, x, TEMP))
    m = short.response_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(fn(setup.model.params, short)[0])[m],
                               np.asarray(fn(setup.model.params, b)[0])[:, :r][m], atol=1e-6)
    g_short, m_short = setup.grads(BASE, short)
    g_full, m_full = setup.grads(BASE, b)
    assert _max_diff(g_short, g_full) <= 1e-6 and float(m_short["loss"]) == pytest.approx(float(m_full["loss"]))
    for bad in (longest - 1, out.tokens.shape[1] + 1):
        with pytest.raises(ValueError, match="response_length"):
            setup.make_batch(out, setup.adv, response_length=bad)


def test_micro_features_match_the_rows_groups():
    """micro_features gives micro-batch j the features of its rows' groups, in every regime:
    rows per group a multiple of the micro-batch count, a divisor of it, or neither (gather)."""
    for groups, k, num_micro in [(4, 2, 1), (4, 2, 2), (4, 4, 2), (4, 2, 4), (4, 2, 8), (2, 4, 8), (3, 2, 3),
                                 (4, 3, 2), (2, 6, 4)]:
        feats = jnp.arange(groups * 5, dtype=jnp.float32).reshape(groups, 5, 1)
        rows = groups * k
        for j in range(num_micro):
            want = np.asarray(feats)[(j + num_micro * np.arange(rows // num_micro)) // k]
            np.testing.assert_array_equal(np.asarray(micro_features(feats, j, num_micro, k)), want)
            traced = jax.jit(micro_features, static_argnums=(2, 3))(feats, j, num_micro, k)
            np.testing.assert_array_equal(np.asarray(traced), want)


def _tower_rows(fn, *args) -> list[int]:
    """Leading sizes of the patch embedding's matmuls (inputs [groups, patches, patch_dim]) in the
    jaxpr of fn(*args): how many image groups the vision tower runs on, forward and backward."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    sizes = []

    def visit(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                for v in eqn.invars:
                    shape = getattr(v.aval, "shape", ())
                    if len(shape) == 3 and shape[-1] == 1176:
                        sizes.append(shape[0])
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "eqns"):
                        visit(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        visit(sub.jaxpr)

    visit(jaxpr.jaxpr)
    return sizes


@pytest.mark.parametrize("micro", [None, 2])
def test_vision_once_per_prompt_equals_once_per_sample(setup, micro):
    """The tower on each prompt's images once, its features shared by the prompt's samples (and
    its gradient summed over them), against the per-sample layout (the tower once per sequence):
    the same loss, metrics and gradients within 1e-5, in one batch and in micro-batches that cut
    across prompts (test_micro_features_match_the_rows_groups covers every micro-batch regime
    of the feature routing itself)."""
    cfg = dataclasses.replace(BASE, micro_batch_size=micro)
    g_ref, m_ref = setup.grads(cfg, setup.per_sample())
    g, m = setup.grads(cfg)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_ref))
    assert _max_diff(g["visual"], g_ref["visual"]) <= 1e-5 * scale
    assert _max_diff(g, g_ref) <= 1e-5 * scale
    assert float(jnp.max(jnp.abs(g["visual"]["patch_embed"]["kernel"]))) > 0
    for k in ("loss", "pg_loss", "entropy", "logprob_diff_max", "num_tokens"):
        assert float(m[k]) == pytest.approx(float(m_ref[k]), abs=1e-6), k
    module = make_module(setup.model.config, cfg)
    grads = lambda b: loss_and_grads(setup.model.params, b, cfg, module, temperature=TEMP)  # noqa: E731
    prompts, rows = len(GRIDS), len(GRIDS) * N_SAMPLES
    assert set(_tower_rows(grads, setup.batch)) == {prompts}  # forward and backward, once per prompt
    assert set(_tower_rows(grads, setup.per_sample())) == {rows}


def test_qwen3vl_vision_once_per_prompt_equals_once_per_sample(hf_checkpoint):
    """The same on Qwen3-VL: the shared features carry DeepStack's levels, whose gradient flows
    back into the intermediate blocks and their mergers."""
    q3 = Setup(hf_checkpoint("qwen3_vl")[1], patch=16)
    g_ref, m_ref = q3.grads(BASE, q3.per_sample())
    g, m = q3.grads(BASE)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_ref))
    assert _max_diff(g, g_ref) <= 1e-5 * scale
    assert float(m["loss"]) == pytest.approx(float(m_ref["loss"]), abs=1e-6)
    for name in ("deepstack_0_mlp_0", "pos_embed"):
        assert float(jnp.max(jnp.abs(jax.tree.leaves(g["visual"][name])[0]))) > 0, name


FROZEN = dataclasses.replace(BASE, freeze_vision=True, recompute_old_logprobs=True)


def test_logprobs_equal_sampler_and_first_step_ratio_is_one(setup):
    module = make_module(setup.model.config, BASE)
    logp, ent = jax.jit(lambda p, b: response_logprobs(module, p, b, TEMP))(setup.model.params, setup.batch)
    m = np.asarray(setup.out.mask).astype(bool)
    assert np.abs(np.asarray(logp) - np.asarray(setup.out.logprobs))[m].max() <= 1e-4
    assert np.all(np.asarray(ent)[m] > 0)
    # More left padding (what global_batch adds when processes' length buckets differ) changes nothing.
    longer = pad_sequences_left(setup.batch, setup.batch.input_ids.shape[1] + 5)
    logp_longer, _ = jax.jit(lambda p, b: response_logprobs(module, p, b, TEMP))(setup.model.params, longer)
    np.testing.assert_allclose(np.asarray(logp_longer)[m], np.asarray(logp)[m], atol=1e-5)
    state, metrics = setup.run_step(BASE)
    assert abs(float(metrics["ratio_mean"]) - 1.0) <= 1e-4
    assert float(metrics["ratio_max"]) <= 1 + 1e-4 and float(metrics["ratio_min"]) >= 1 - 1e-4
    assert float(metrics["clip_frac"]) == 0.0
    assert float(metrics["logprob_diff_max"]) <= 1e-4
    assert float(metrics["entropy"]) == pytest.approx(float(np.asarray(ent)[m].mean()), rel=1e-5)
    assert float(metrics["num_tokens"]) == m.sum()
    # token-mean at ratio 1: loss = -sum_i A_i * len_i / num_tokens
    want = -(setup.adv * m.sum(-1)).sum() / m.sum()
    assert float(metrics["loss"]) == pytest.approx(want, abs=1e-5)
    assert int(state.step) == 1 and int(state.skipped) == 0 and float(metrics["skipped"]) == 0.0
    assert float(metrics["lr"]) == pytest.approx(BASE.lr)


def test_recomputed_old_logprobs(setup):
    """The old policy from the current params: ratio exactly 1, the sampler's distance reported."""
    _, metrics = setup.run_step(FROZEN)
    _, ref = setup.run_step(BASE)
    assert float(metrics["ratio_max"]) == 1.0 and float(metrics["ratio_min"]) == 1.0
    assert 0 < float(metrics["logprob_diff_max"]) <= 1e-4
    assert float(metrics["logprob_diff_mean"]) <= float(metrics["logprob_diff_max"])
    assert float(metrics["logprob_diff_max"]) == pytest.approx(float(ref["logprob_diff_max"]), abs=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(ref["loss"]), abs=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2", "qwen3_vl"])
def test_logprobs_equal_sampler_other_archs(hf_checkpoint, arch):
    """Qwen3-VL: the learner's per-prompt features carry DeepStack's levels beside the visual tokens."""
    model = load_pretrained(hf_checkpoint(arch)[1])
    rng = np.random.default_rng(5)
    if arch == "qwen2":
        ids = rng.integers(3, 120, (2, 7))
        mask = np.ones_like(ids)
        mask[1, :3] = 0
        pv = thw = None
    else:  # window attention: a 8x8-patch image spans several windows
        ids, mask, _, pv, thw = vlm_batch([[(1, 8, 8)], [(1, 4, 4), (1, 4, 8)]], [(2, 1), (1, 2)], rng,
                                          patch=16 if arch == "qwen3_vl" else 14)
    inputs = model.prepare_inputs(ids, mask, pv, thw)
    out = Sampler(model.module, SamplingConfig(max_new_tokens=5, eos_ids=EOS, pad_id=PAD, temperature=1.0, n=2))(
        model.params, inputs, jax.random.key(2))
    batch = train_batch_from_samples(model.config, inputs, out, 2, pv, thw)
    assert batch.positions.ndim == (2 if arch == "qwen2" else 3)
    logp, _ = jax.jit(lambda p, b: response_logprobs(model.module, p, b, 1.0))(model.params, batch)
    m = np.asarray(out.mask).astype(bool)
    assert np.abs(np.asarray(logp) - np.asarray(out.logprobs))[m].max() <= 1e-4


@pytest.mark.devices(8)
@pytest.mark.parametrize("shape,micro", [((1, 8, 1), None), ((2, 2, 2), 4)])
def test_sharded_step_equals_unsharded(setup, shape, micro):
    cfg = dataclasses.replace(BASE, micro_batch_size=micro)
    ref_state, ref = setup.run_step(BASE)  # unsharded, one batch
    learner = setup.learner(cfg, shape)
    state = learner.init_state(setup.model.params)
    shards = learner.mesh.shape["data"] * learner.mesh.shape["fsdp"]
    # (1, 8, 1): 4 prompts on 8 data shards, each prompt's images twice; (2, 2, 2): once.
    batch = global_batch(learner.mesh, setup.make_batch(setup.out, setup.adv, shards=shards))
    assert batch.vision.pixel_values.shape[0] == max(len(GRIDS), shards)
    assert batch.input_ids.sharding.spec[0] is not None  # really split over the data axes
    assert batch.positions.sharding.spec[1] is not None
    assert batch.vision.pixel_values.sharding.spec[0] is not None  # the groups with their rows
    state, metrics = learner.step(state, batch)
    q = state.params["decoder"]["layers"]["q_proj"]["kernel"]
    assert q.sharding == learner.param_shardings["decoder"]["layers"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.size < q.size
    moments = [x for kp, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if "'q_proj']['kernel']" in jax.tree_util.keystr(kp)]
    assert len(moments) == 2 and all(x.sharding == q.sharding for x in moments)  # Adam's mu, nu
    assert float(metrics["loss"]) == pytest.approx(float(ref["loss"]), abs=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(ref["grad_norm"]), rel=1e-5)
    assert _max_diff(state.params, ref_state.params) <= 1e-5
    assert _max_diff(state.params, setup.model.params) > 0.5 * BASE.lr  # the step moved the params
    assert _max_diff(state.opt_state, ref_state.opt_state) <= 1e-5
    assert int(state.step) == 1


def test_micro_batches_equal_one_batch(setup):
    micro = dataclasses.replace(BASE, micro_batch_size=2)  # 4 micro-batches of 2 sequences
    g_ref, m_ref = setup.grads(BASE)
    g_mic, m_mic = setup.grads(micro)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
    assert _max_diff(g_mic, g_ref) <= 1e-5 * scale
    for k in ("loss", "pg_loss", "entropy", "ratio_mean", "clip_frac", "logprob_diff_mean", "num_tokens"):
        assert float(m_mic[k]) == pytest.approx(float(m_ref[k]), abs=1e-6), k
    assert float(m_mic["logprob_diff_max"]) == pytest.approx(float(m_ref["logprob_diff_max"]), abs=1e-6)
    ref_state, ref = setup.run_step(BASE)
    state, metrics = setup.run_step(micro)
    assert float(metrics["grad_norm"]) == pytest.approx(float(ref["grad_norm"]), rel=1e-5)
    assert _max_diff(state.params, ref_state.params) <= 1e-5


def test_remat_gives_the_same_grads(setup):
    g_ref, m_ref = setup.grads(BASE)
    g_remat, m_remat = setup.grads(dataclasses.replace(BASE, remat=True))
    assert _max_diff(g_remat, g_ref) <= 1e-6
    assert float(m_remat["loss"]) == pytest.approx(float(m_ref["loss"]), abs=1e-7)


def test_frozen_vision(setup):
    state, _ = setup.run_step(FROZEN)
    before = setup.model.params
    bits = lambda x: np.asarray(x).view(np.uint32)  # noqa: E731
    for a, b in zip(jax.tree.leaves(state.params["visual"]), jax.tree.leaves(before["visual"])):
        assert np.array_equal(bits(a), bits(b))
    for key in ("decoder", "embed_tokens", "lm_head"):
        for a, b in zip(jax.tree.leaves(state.params[key]), jax.tree.leaves(before[key])):
            assert float(jnp.max(jnp.abs(a - b))) > 0.5 * BASE.lr
    # No optimizer moments for the tower: the state holds two moments of the text params only.
    n_text = sum(x.size for k, v in before.items() if k != "visual" for x in jax.tree.leaves(v))
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_state == 2 * n_text
    # The same step without freezing moves the tower: the checks above can fail.
    trained, _ = setup.run_step(BASE)
    assert _max_diff(trained.params["visual"], before["visual"]) > 0.5 * BASE.lr


def test_nan_guard_skips_the_step(setup):
    adv = setup.adv.copy()
    adv[3] = np.nan
    bad = setup.batch.replace(advantages=adv)
    _, tx = setup.update_fn(BASE)
    state0 = init_state(setup.model.params, tx)
    state, metrics = setup.run_step(BASE, bad, state0)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(state.skipped) == 1 and int(state.step) == 0
    assert _max_diff(state.params, state0.params) == 0.0
    assert _max_diff(state.opt_state, state0.opt_state) == 0.0
    # The next good batch is applied on top, and counts as the first update.
    state, metrics = setup.run_step(BASE, setup.batch, state)
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1 and int(state.skipped) == 1
    assert _max_diff(state.params, state0.params) > 0.5 * BASE.lr


def test_lr_schedule_counts_skipped_steps():
    """The schedule counts update attempts, as the reference's LR scheduler steps after a skipped
    update too: with a warmup of 5 updates, a skip then a good gradient applies lr / 5 (counting
    applied updates only, it would be the warmup's first, lr 0, and nothing would move); Adam's
    own count stays at the one applied update. Without a skip the updates are those of optax's
    own schedule (of its count of applied updates), weight decay included."""
    cfg = dataclasses.replace(BASE, warmup_ratio=0.5, weight_decay=0.1)  # int(0.5 * 10) = 5 warmup updates
    rng = np.random.default_rng(0)
    params = {"embed_tokens": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "lm_head": jnp.ones((3,))}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]
    tx = make_optimizer(cfg, 10, learning_rate=1.0)
    update = jax.jit(functools.partial(apply_update, cfg=cfg, tx=tx, lr_fn=lr_schedule(cfg, 10)))
    state0 = init_state(params, tx)
    skipped, metrics = update(state0, grads[0], {"loss": jnp.float32(np.nan)})
    assert float(metrics["skipped"]) == 1.0 and float(metrics["lr"]) == 0.0
    state, metrics = update(skipped, grads[1], {"loss": jnp.float32(1.0)})
    assert float(metrics["lr"]) == pytest.approx(cfg.lr / 5) and int(state.step) == 1 and int(state.skipped) == 1
    assert _max_diff(state.params, params) > 0.5 * cfg.lr / 5
    assert [int(x) for x in jax.tree.leaves(state.opt_state) if x.ndim == 0] == [1]  # Adam's count only
    plain = make_optimizer(cfg, 10)
    plain_update = jax.jit(plain.update)
    opt, state = plain.init(params), state0
    for g in grads:
        updates, opt = plain_update(g, opt, params)
        params = optax.apply_updates(params, updates)
        state, _ = update(state, g, {"loss": jnp.float32(1.0)})
    assert _max_diff(state.params, params) < 1e-6  # equal here; another CPU's fusion may round a last bit


@pytest.mark.devices(8)
def test_updates_raise_the_probability_of_rewarded_tokens(setup):
    """Reward = fraction of response tokens in a set S (a third of the vocabulary); a few GRPO
    steps on the mesh (sample with the live params, reward, advantages, update) must raise the
    probability mass of S at the first response position."""
    model, inputs = setup.model, setup.inputs
    rewarded = np.arange(20, 62)
    learner = setup.learner(BASE, (1, 8, 1))
    first = jax.jit(lambda p: jax.nn.softmax(model.module.apply(
        {"params": p}, inputs["input_ids"], inputs["positions"], inputs["attention_mask"], inputs["vision"])[0][:, -1]))
    mass = lambda params: float(first(jax.device_get(params))[:, rewarded].sum(-1).mean())  # noqa: E731
    m0 = mass(model.params)
    state = learner.init_state(model.params)
    key = jax.random.key(0)
    rewards_seen = []
    for _ in range(12):
        key, sub = jax.random.split(key)
        out = setup.sampler(jax.device_get(state.params), inputs, sub)
        tokens, m = np.asarray(out.tokens), np.asarray(out.mask)
        rewards = (np.isin(tokens, rewarded) & (m > 0)).sum(-1) / np.maximum(m.sum(-1), 1)
        rewards_seen.append(rewards.mean())
        adv = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), N_SAMPLES))
        state, metrics = learner.step(state, global_batch(learner.mesh, setup.make_batch(out, adv, shards=8)))
        assert float(metrics["skipped"]) == 0.0
    m1 = mass(state.params)
    assert m1 > m0 + 0.02, (m0, m1, rewards_seen)


def test_generated_image_tokens_are_scored_as_text(setup):
    """A sampled <|image_pad|> was fed to the sampler as a plain embedding; the learner must not
    put visual features there, or its log-probs drift from the sampler's after that token."""
    image_token = setup.model.config.image_token_id
    cfg = SamplingConfig(max_new_tokens=24, eos_ids=(-1,), pad_id=PAD, temperature=8.0, n=N_SAMPLES)
    out = Sampler(setup.model.module, cfg)(setup.model.params, setup.inputs, jax.random.key(3))
    assert (np.asarray(out.tokens) == image_token).any(), "the test needs a generated image token"
    batch = setup.make_batch(out, setup.adv)
    logp, _ = jax.jit(lambda p, b: response_logprobs(setup.model.module, p, b, 8.0))(setup.model.params, batch)
    m = np.asarray(out.mask).astype(bool)
    assert np.abs(np.asarray(logp) - np.asarray(out.logprobs))[m].max() <= 1e-4
