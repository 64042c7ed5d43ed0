"""The attention implementations against each other: splash attention (Pallas' interpreter on CPU)
against the XLA path, on the masks the models build; the `auto` choice per backend; the models
with each implementation against transformers' logits (the parity tests use `auto` = XLA on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, load_pretrained
from models.attention import AttentionMask, attend, attend_part, merge_parts, resolve
from models.layers import activation_sharding
from pr1_jax.sharding import RULES, make_mesh
from reference import hf_logits, vlm_batch

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


@pytest.mark.devices(8)
def test_auto_per_backend(monkeypatch):
    assert resolve("auto", jnp.float32) == "xla"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve("auto", jnp.bfloat16) == "cudnn"
    assert resolve("auto", jnp.float32) == "xla"  # cuDNN's flash attention takes bf16 / fp16 only
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve("auto", jnp.float32) == "xla"  # 8 devices and no mesh context: splash could not be split
    with activation_sharding(make_mesh((1, 8, 1)), RULES):
        assert resolve("auto", jnp.float32) == "pallas"
    assert resolve("cudnn", jnp.float32) == "cudnn"
    with pytest.raises(ValueError, match="attention 'flash'"):
        resolve("flash", jnp.float32)


def test_models_with_splash_match_transformers(hf_checkpoint):
    """Qwen2.5-VL (window and full attention in the tower, a left-padded batch in the decoder)
    with `attention="pallas"` against transformers."""
    hf, path = hf_checkpoint("qwen2_5_vl")
    model = load_pretrained(path, attention="pallas")
    ids, mask, mm, pv, thw = vlm_batch([[(1, 6, 10)], [(1, 4, 4)]], [(2, 3), (5, 1)], np.random.default_rng(2))
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
