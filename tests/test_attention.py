"""The attention implementations against each other: splash attention (Pallas' interpreter on CPU)
and the cuDNN path (its kernel stood in for in plain JAX, `tests/lowering.py`) against the XLA
path, on the masks the models build; the `auto` choice and the refused settings per backend; the
models with each implementation against transformers' logits or the XLA path (the parity tests
use `auto` = XLA on CPU). What the cuDNN path lowers to: tests/test_accelerator_lowering.py."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowering import as_platform, cudnn_stand_in
from models import Model, abstract_params, attention, load_pretrained
from models.attention import AttentionMask, attend, attend_part, merge_parts, padding_last, resolve
from models.causal_lm import QwenCausalLM
from models.config import config_from_dict
from models.layers import activation_sharding
from pr1_jax.packing import block_pairs
from pr1_jax.sharding import RULES, make_mesh
from reference import hf_logits, tiny_config, vlm_batch

# The models against transformers' logits to 1e-4: full-precision fp32 matmuls.
pytestmark = pytest.mark.usefixtures("highest_precision")


def _qkv(rng, b, h, kh, t, d):
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, h, t, d), (b, kh, t, d), (b, kh, t, d)))
    return q, k, v


def _padded_segments(b, t):
    """Row 0 right-padded (a learner row), row 1 left-padded (a prompt), others full."""
    seg = np.ones((b, t), np.int32)
    seg[0, t - 5:] = 0
    seg[1, :7] = 0
    return jnp.asarray(seg)


@pytest.mark.parametrize("causal,d", [(True, 32), (False, 80)])
def test_splash_matches_xla(causal, d):
    """Causal with padding (the decoder), and segments without causality at an unaligned head dim
    (Qwen2.5-VL vision windows, head dim 80)."""
    q, k, v = _qkv(np.random.default_rng(0), 2, 4, 2, 40, d)
    seg = _padded_segments(2, 40) if causal else jnp.asarray(np.repeat(np.arange(5), 8)[None].repeat(2, 0))
    mask = AttentionMask(q_segment=seg, kv_segment=seg, causal=causal)
    ref = attend(q, k, v, mask, "xla", jnp.float32)
    np.testing.assert_allclose(attend(q, k, v, mask, "pallas", jnp.float32), ref, atol=1e-5)


@pytest.mark.devices(8)
def test_splash_per_shard_under_a_mesh():
    """Inside `activation_sharding` the kernel runs per shard (rows over data x fsdp, heads over tensor)."""
    q, k, v = _qkv(np.random.default_rng(1), 4, 4, 2, 24, 32)
    seg = _padded_segments(4, 24)
    mask = AttentionMask(q_segment=seg, kv_segment=seg, causal=True)
    ref = attend(q, k, v, mask, "xla", jnp.float32)
    mesh = make_mesh((1, 4, 2))

    def sharded(q, k, v, mask):
        with activation_sharding(mesh, RULES):
            return attend(q, k, v, mask, "pallas", jnp.float32)

    # Placed on the mesh as a sampler's or learner's inputs are: the program spans its devices.
    q, k, v, mask = jax.device_put((q, k, v, mask), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    out = jax.jit(sharded)(q, k, v, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_auto_and_explicit_settings_per_backend():
    """What `auto` picks on one device of each backend (a GPU node with one GPU included), and the
    explicit settings that backend or dtype cannot run refused by name (finding 5: an explicit
    cudnn in fp32 failed deep inside JAX, an explicit pallas on a GPU ran the TPU kernel in
    Pallas' interpreter)."""
    with as_platform("cpu"):
        assert resolve("auto", jnp.float32) == "xla"
        assert resolve("pallas", jnp.float32) == "pallas"  # Pallas' interpreter: the CPU tests
        with pytest.raises(ValueError, match="'cudnn' runs on GPUs .* not with bfloat16 on cpu"):
            resolve("cudnn", jnp.bfloat16)
    with as_platform("cuda"):
        assert resolve("auto", jnp.bfloat16) == "cudnn"
        assert resolve("auto", jnp.float16) == "cudnn"
        assert resolve("auto", jnp.float32) == "xla"  # cuDNN's flash attention takes bf16 / fp16 only
        assert resolve("cudnn", jnp.bfloat16) == "cudnn"
        with pytest.raises(ValueError, match="model.attention 'cudnn' .* not with float32 on gpu"):
            resolve("cudnn", jnp.float32)
        with pytest.raises(ValueError, match="model.attention 'pallas' is TPU splash attention"):
            resolve("pallas", jnp.bfloat16)
    with as_platform("tpu"), mock.patch.object(jax, "device_count", lambda: 1):
        assert resolve("auto", jnp.float32) == "pallas"
        assert resolve("auto", jnp.bfloat16) == "pallas"
    with pytest.raises(ValueError, match="attention 'flash'"):
        resolve("flash", jnp.float32)


def test_explicit_cudnn_in_fp32_is_a_start_up_error():
    """The error comes when a `Model` is built (policy, judge) or the module is first traced (a
    Learner's construction traces it)."""
    cfg = config_from_dict(tiny_config("qwen2").to_dict())
    with as_platform("cuda"), pytest.raises(ValueError, match="model.attention 'cudnn'"):
        abstract_params(QwenCausalLM(cfg, dtype=jnp.float32, attention="cudnn"))
    with as_platform("cuda"), pytest.raises(ValueError, match="model.attention 'cudnn'"):
        Model(cfg, {"w": jnp.zeros(1)}, dtype=jnp.float32, attention="cudnn")


@pytest.mark.devices(8)
def test_auto_on_several_tpu_chips():
    with as_platform("tpu"):
        assert resolve("auto", jnp.float32) == "xla"  # 8 devices and no mesh context: splash could not be split
        with activation_sharding(make_mesh((1, 8, 1)), RULES):
            assert resolve("auto", jnp.float32) == "pallas"


def _segments(b, t, sizes):
    """Rows of contiguous segments (vision frames / windows) of the given sizes, padding id last."""
    return jnp.asarray(np.repeat(np.arange(len(sizes)), sizes)[None].repeat(b, 0).astype(np.int32))


def test_cudnn_mask_value():
    """Finding 4: the masked value is JAX's own for cuDNN (-2^41 in bf16), not the dtype's
    minimum (cuDNN gets the difference of two large negatives wrong)."""
    seg = _segments(1, 6, [2, 4])
    bias = AttentionMask(q_segment=seg, kv_segment=seg).prepare("cudnn", jnp.bfloat16).bias
    assert bias.shape == (1, 1, 6, 6) and bias.dtype == jnp.bfloat16
    assert set(np.unique(np.asarray(bias, np.float32))) == {0.0, -2.0 ** 41}
    half = AttentionMask(q_segment=seg, kv_segment=seg).prepare("cudnn", jnp.float16).bias
    assert float(half.min()) == -2.0 ** 15


@pytest.mark.parametrize("t", [9, 16])
def test_cudnn_path_matches_xla(t):
    """What `models.attention` builds around cuDNN's kernel (bias, lengths, odd lengths padded to
    even ones), with the kernel's semantics in plain JAX (`cudnn_stand_in`), against the XLA path:
    vision segments with no causality, the judge's branches, right padding as lengths."""
    rng = np.random.default_rng(7)
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(rng, 2, 4, 2, t, 16))
    seg = _segments(2, t, [3, t - 5, 2])
    shared = jnp.asarray(np.arange(t) < 3)[None].repeat(2, 0)
    lengths = jnp.asarray([t, t - 4], jnp.int32)
    masks = [AttentionMask(q_segment=seg, kv_segment=seg),
             AttentionMask(q_segment=seg, kv_segment=seg, kv_shared=shared, causal=True),
             AttentionMask.right_padded(lengths, t, causal=True)]
    tokens = np.arange(t)[None, None, :, None] < np.asarray(lengths)[:, None, None, None]
    for i, mask in enumerate(masks):
        ref = np.asarray(attend(q, k, v, mask, "xla", jnp.bfloat16), np.float32)
        with cudnn_stand_in():
            out = np.asarray(attend(q, k, v, mask, "cudnn", jnp.bfloat16), np.float32)
        keep = tokens if i == 2 else np.ones_like(tokens)  # a padding query's output is not read
        np.testing.assert_allclose(np.where(keep, out, 0), np.where(keep, ref, 0), atol=2e-2)


def test_padding_last_is_exact():
    """The decoder's order for cuDNN: tokens first, padding last, causal over the tokens alone,
    gives every token the attention of the original order, whatever the padding pattern."""
    rng = np.random.default_rng(8)
    t = 12
    valid = np.ones((3, t), bool)
    valid[0, :4] = False  # left padding (a prompt)
    valid[1, 9:] = False  # right padding (a learner row)
    valid[2, [0, 5, 6, 11]] = False  # holes
    seg = jnp.asarray(valid.astype(np.int32))
    q, k, v = _qkv(rng, 3, 4, 2, t, 16)
    ref = attend(q, k, v, AttentionMask(q_segment=seg, kv_segment=seg, causal=True), "xla", jnp.float32)
    order = padding_last(jnp.asarray(valid))
    take = lambda x: jnp.take_along_axis(x, order[:, None, :, None], axis=2)  # noqa: E731
    mask = AttentionMask.right_padded(jnp.asarray(valid.sum(1)), t, causal=True)
    out = attend(take(q), take(k), take(v), mask, "xla", jnp.float32)
    out = jnp.take_along_axis(out, jnp.argsort(order, axis=1)[:, None, :, None], axis=2)
    tokens = np.broadcast_to(valid[:, None], (3, 4, t))
    np.testing.assert_allclose(np.asarray(out)[tokens], np.asarray(ref)[tokens], atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_models_on_the_cudnn_path_match_xla(hf_checkpoint, arch):
    """Finding 1's programs (a bf16 VLM forward with per-row vision groups, a prefill's cache) with
    `attention="cudnn"` and cuDNN's kernel stood in for, against the XLA path in bf16 (left
    padding: the decoder's padding-last order and its way back, the cache included); and rows
    packed with several sequences (`groups`, `learner.packing: sequences`), which cuDNN takes
    with a bias, not as padding."""
    _, path = hf_checkpoint(arch)
    ids, mask, _, pv, thw = vlm_batch([[(1, 6, 10)], [(1, 4, 4)]], [(2, 3), (5, 1)], np.random.default_rng(2))
    groups = jnp.asarray(1 + (np.arange(ids.shape[1]) >= ids.shape[1] // 2))[None].repeat(2, 0)
    out = {}
    for attention in ("xla", "cudnn"):
        with cudnn_stand_in():
            model = load_pretrained(path, dtype=jnp.bfloat16, attention=attention)
            inputs = model.prepare_inputs(ids, mask, pv, thw, per_row=True)
            args = inputs["input_ids"], inputs["positions"], inputs["attention_mask"], inputs["vision"]
            h, cache = model.module.apply({"params": model.params}, *args, ids.shape[1] + 2,
                                          method=QwenCausalLM.hidden_states)
            packed, _ = model.module.apply({"params": model.params}, *args, groups=groups,
                                           method=QwenCausalLM.hidden_states)
        out[attention] = [np.asarray(x, np.float32) for x in (h, cache.k[0], cache.v[1], packed)]
    valid = mask.astype(bool)
    assert np.abs(out["xla"][3] - out["xla"][0])[valid].max() > 0.1  # the groups change the result
    for a, b in zip(out["xla"], out["cudnn"]):
        a, b = (x[valid] if x.ndim == 3 else x[:, :, :valid.shape[1]].swapaxes(1, 2)[valid] for x in (a, b))
        assert np.abs(a - b).max() <= 0.05 * max(1.0, np.abs(a).max())


def test_models_with_splash_match_transformers(hf_checkpoint):
    """Qwen2.5-VL (window and full attention in the tower, a left-padded batch in the decoder)
    with `attention="pallas"` against transformers."""
    hf, path = hf_checkpoint("qwen2_5_vl")
    ids, mask, mm, pv, thw = vlm_batch([[(1, 6, 10)], [(1, 4, 4)]], [(2, 3), (5, 1)], np.random.default_rng(2))
    with as_platform("cpu"):  # the kernel in Pallas' interpreter, which a GPU refuses for a run
        model = load_pretrained(path, attention="pallas")
        ours = model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
    ref = hf_logits(hf, ids, mask, mm, pv, thw)
    assert np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max() <= 1e-4


def test_parts_merge_to_the_whole():
    """Attention split over disjoint key sets (a prompt's keys, then a sample's own, in chunks) and
    merged by their log-sum-exp equals one softmax over all keys, also where a query sees no key
    in one part (left padding, a chunk past its causal limit)."""
    q, k, v = _qkv(np.random.default_rng(3), 2, 4, 2, 24, 16)
    seg = _padded_segments(2, 24)
    allowed = AttentionMask(q_segment=seg, kv_segment=seg, causal=True).dense()[:, None, None]
    whole = attend(q, k, v, AttentionMask(q_segment=seg, kv_segment=seg, causal=True), "xla", jnp.float32)
    cuts = [0, 9, 10, 17, 24]
    parts = [attend_part(q, k[:, :, a:b], v[:, :, a:b], allowed[..., a:b], jnp.float32)
             for a, b in zip(cuts[:-1], cuts[1:])]
    np.testing.assert_allclose(merge_parts(parts, jnp.float32), whole, atol=2e-6)


def test_causal_blocks_equal_the_square(monkeypatch):
    """The XLA path's query blocks over the keys up to their end equal one softmax over the whole
    square, on a packed learner row's mask: two groups, each a prompt shared by its branches."""
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 8)
    q, k, v = _qkv(np.random.default_rng(5), 2, 4, 2, 32, 16)
    group = jnp.asarray(np.repeat([[1, 2, 0, 0], [1, 1, 2, 2]], 8, axis=1), jnp.int32)
    branch = jnp.asarray(np.tile(np.repeat([0, 1, 2, 1], 4), (2, 2))[:, :32], jnp.int32)
    mask = AttentionMask(q_segment=group * 40 + branch + 1, kv_segment=group * 40 + branch + 1,
                         kv_shared=(branch == 0) & (group > 0), q_group=group, kv_group=group, causal=True)
    square = attend_part(q, k, v, mask.dense()[:, None, None], jnp.float32)[0]
    np.testing.assert_allclose(attend(q, k, v, mask, "xla", jnp.float32), square, atol=2e-6)
    assert not mask.dense()[0, 12, 3] and mask.dense()[1, 9, 3]  # a prompt of its own group only


def test_block_pairs_equal_the_square(monkeypatch):
    """Packed learner rows through the block-sparse path (blocks of 8 slots, the pairs
    `pr1_jax.packing.block_pairs` gives the rows' layouts, padded) equal one softmax over the
    square, values and gradients; padding queries (no key in any pair) come out 0, not NaN."""
    monkeypatch.setattr(attention, "PAIR_BLOCK", 8)
    q, k, v = _qkv(np.random.default_rng(6), 2, 4, 2, 64, 16)
    rows = [[((0, 10), [(10, 17), (17, 30)]), ((30, 35), [(35, 44)])], [((0, 20), [(20, 23), (23, 53), (53, 54)])]]
    group, branch = np.zeros((2, 64), np.int32), np.zeros((2, 64), np.int32)
    pairs = np.tile(np.array([8, 0], np.int32), (2, 30, 1))
    for r, chunks in enumerate(rows):
        for g, ((a, b), responses) in enumerate(chunks, start=1):
            group[r, a:b] = g
            for j, (c, e) in enumerate(responses, start=1):
                group[r, c:e], branch[r, c:e] = g, j
        found = block_pairs(chunks, 8)
        pairs[r, :len(found)] = found
    valid = jnp.asarray(group > 0)
    seg = jnp.asarray(np.where(group > 0, group * 100 + branch + 1, 0))
    mask = AttentionMask(q_segment=seg, kv_segment=seg, kv_shared=valid & jnp.asarray(branch == 0),
                         q_group=jnp.asarray(group), kv_group=jnp.asarray(group), causal=True)
    sparse = mask.replace(pairs=jnp.asarray(pairs))
    assert (pairs[..., 0] < 8).sum(-1).max() < 36  # fewer than the causal square's blocks

    def loss(fn, *x):
        return (fn(*x) * valid[:, None, :, None] * jnp.arange(16)).sum()

    square = lambda q, k, v: attend_part(q, k, v, mask.dense()[:, None, None], jnp.float32)[0]  # noqa: E731
    blocks = lambda q, k, v: attend(q, k, v, sparse, "xla", jnp.float32)  # noqa: E731
    out = blocks(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[np.asarray(valid)[:, None].repeat(4, 1)],
                               np.asarray(square(q, k, v))[np.asarray(valid)[:, None].repeat(4, 1)], atol=2e-6)
    assert np.all(np.asarray(out)[1, :, 56:] == 0)  # a padding block: no pair
    for got, want in zip(jax.grad(functools.partial(loss, blocks), (0, 1, 2))(q, k, v),
                         jax.grad(functools.partial(loss, square), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
