"""The Flax port against transformers on the same tiny random weights (fp32, max abs <= 1e-4)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from models import CheckpointError, ConfigError, load_pretrained
from models.causal_lm import QwenCausalLM
from models.positions import text_positions
from reference import hf_logits, vlm_batch

# fp32 logits against transformers' to 1e-4: full-precision matmuls (TF32 on GPUs is ~3e-4 off).
pytestmark = pytest.mark.usefixtures("highest_precision")

TOL = 1e-4

# (images per row, (text before, text after) per row)
CASES = {
    "text_only": ([[], []], [(9, 0), (9, 0)]),
    "one_image": ([[(1, 4, 6)]], [(3, 5)]),
    "two_images_nonsquare": ([[(1, 6, 10), (1, 8, 4)]], [(2, 3)]),
    "left_padded_batch": ([[(1, 4, 4)], [(1, 6, 10), (1, 2, 8)], []], [(5, 1), (1, 2), (4, 0)]),
}


def _compare(ours, ref, mask):
    valid = np.asarray(mask).astype(bool)
    err = np.abs(np.asarray(ours, np.float32) - ref)[valid].max()
    assert err <= TOL, f"max abs diff {err}"
    return err


def _patch(arch):
    return 16 if arch == "qwen3_vl" else 14


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("case", list(CASES))
def test_vlm_logits_match_transformers(hf_checkpoint, arch, case):
    """Qwen3-VL: the 4x4 learned position grid is resampled up (6x10) and down (2x8), and DeepStack
    adds into 2 of the 3 decoder layers."""
    hf, path = hf_checkpoint(arch)
    model = load_pretrained(path)
    grids, lens = CASES[case]
    ids, mask, mm, pv, thw = vlm_batch(grids, lens, np.random.default_rng(1), patch=_patch(arch))
    if thw.size == 0:
        # transformers infers 1D positions for text-only input, ignoring padding; rows are unpadded here.
        assert mask.all()
        _compare(model(ids, attention_mask=mask), hf_logits(hf, ids, mask), mask)
        return
    ref = hf_logits(hf, ids, mask, mm, pv, thw)
    _compare(model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw), ref, mask)


def test_qwen25_window_padding_is_exercised(hf_checkpoint):
    """The 6x10 grid (3x5 merged) with 2x2-unit windows leaves partial windows at both edges."""
    from models.positions import vision_layout

    _, path = hf_checkpoint("qwen2_5_vl")
    cfg = load_pretrained(path).config.vision
    layout = vision_layout(np.array([[1, 6, 10]]), 60, cfg)
    sizes = np.bincount(layout["seg_window"]) // 4
    assert sorted(sizes.tolist()) == [1, 2, 2, 2, 4, 4], sizes


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("qwen2", True), ("qwen3", False)])
def test_text_logits_left_padded(hf_checkpoint, arch, tied):
    hf, path = hf_checkpoint(arch, tie_word_embeddings=tied)
    model = load_pretrained(path)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 120, (3, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ref = hf_logits(hf, ids, mask, position_ids=text_positions(mask))
    _compare(model(jnp.asarray(ids), attention_mask=mask), ref, mask)


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3", "qwen3_vl"])
def test_round_trip_through_transformers(hf_checkpoint, tmp_path, arch):
    hf, path = hf_checkpoint(arch)
    model = load_pretrained(path)
    model.save_pretrained(tmp_path / "out", max_shard_bytes=200_000)  # forces several shards
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    loader = type(hf) if arch in ("qwen2", "qwen3") else transformers.AutoModelForImageTextToText
    back = loader.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    rng = np.random.default_rng(3)
    if arch in ("qwen2", "qwen3"):
        ids = rng.integers(0, 120, (2, 8))
        mask = np.ones_like(ids)
        np.testing.assert_allclose(hf_logits(back, ids, mask), hf_logits(hf, ids, mask), atol=1e-6)
    else:
        ids, mask, mm, pv, thw = vlm_batch([[(1, 4, 6)]], [(2, 2)], rng, patch=_patch(arch))
        np.testing.assert_allclose(hf_logits(back, ids, mask, mm, pv, thw), hf_logits(hf, ids, mask, mm, pv, thw), atol=1e-6)
    again = load_pretrained(tmp_path / "out")
    same = [np.array_equal(x, y) for x, y in zip(_leaves(model.params), _leaves(again.params))]
    assert all(same)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_transformers4_flat_config_and_in_memory_key_layout(hf_checkpoint, tmp_path):
    """A 4.x-style flat config.json and 5.x in-memory key names load to the same model."""
    hf, path = hf_checkpoint("qwen2_vl")
    cfg = json.loads((path / "config.json").read_text())
    flat = {k: v for k, v in cfg.items() if k != "text_config"}
    text = dict(cfg["text_config"])
    rope = text.pop("rope_parameters")
    flat.update({k: v for k, v in text.items() if k != "model_type"})
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["rope_theta"] = rope["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(flat))
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    a, b = load_pretrained(path), load_pretrained(tmp_path)
    assert a.config.text == b.config.text and a.config.vision == b.config.vision
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(a.params), _leaves(b.params)))


def _copy_checkpoint(path, dst, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((path / "config.json").read_text())
    return dst


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("qwen2_vl")
    bad = _copy_checkpoint(path, tmp_path / "bad", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"decoder/layers/up_proj/kernel \(layers \[1\]\)"):
        load_pretrained(bad)


def test_misshaped_tensor_names_file_and_key(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("qwen2_5_vl")

    def edit(t):
        t["visual.blocks.0.attn.qkv.weight"] = t["visual.blocks.0.attn.qkv.weight"][:, :-1].copy()

    bad = _copy_checkpoint(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'visual\.blocks\.0\.attn\.qkv\.weight' has shape"):
        load_pretrained(bad)


def test_unexpected_tensor_is_refused(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("qwen2")
    bad = _copy_checkpoint(path, tmp_path / "bad", lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight'"):
        load_pretrained(bad)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="config.json: unsupported model_type 'llama'"):
        load_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("qwen2")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save({"model.norm.weight": torch.zeros(4)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle .bin checkpoints are refused"):
        load_pretrained(tmp_path)


def test_bf16_compute_stays_close(hf_checkpoint):
    hf, path = hf_checkpoint("qwen2_vl")
    ids, mask, mm, pv, thw = vlm_batch([[(1, 4, 6)]], [(3, 3)], np.random.default_rng(4))
    ref = hf_logits(hf, ids, mask, mm, pv, thw)
    for kw in (dict(dtype=jnp.bfloat16), dict(dtype=jnp.bfloat16, param_dtype=jnp.float32)):
        out = load_pretrained(path, **kw)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
        assert out.dtype == jnp.bfloat16
        assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_5_vl", "qwen3_vl"])
def test_kv_cache_prefill_then_decode_equals_full_forward(hf_checkpoint, arch):
    """Prefill T-k tokens into a cache, decode the rest one at a time: same logits as one forward."""
    _, path = hf_checkpoint(arch)
    model = load_pretrained(path)
    rng = np.random.default_rng(5)
    if arch == "qwen2":
        ids = rng.integers(0, 120, (2, 10))
        mask = np.ones_like(ids)
        mask[1, :3] = 0
        inputs = model.prepare_inputs(ids, mask)
    else:
        ids, mask, _, pv, thw = vlm_batch([[(1, 4, 6)], [(1, 4, 4)]], [(2, 4), (1, 5)], rng, patch=_patch(arch))
        inputs = model.prepare_inputs(ids, mask, pv, thw)
    full = np.asarray(model._forward(model.params, inputs["input_ids"], inputs["positions"], mask, inputs["vision"]))
    k = 3
    t = ids.shape[1]
    pos = inputs["positions"]
    apply = model.module.apply
    logits, cache = apply({"params": model.params}, ids[:, : t - k], pos[..., : t - k], mask[:, : t - k],
                          inputs["vision"], t + 4)
    steps = [np.asarray(logits)]
    decode_params = model.module.decode_params(model.params)
    for j in range(t - k, t):
        h, cache = apply({"params": decode_params}, ids[:, j:j + 1], pos[..., j:j + 1], mask[:, j:j + 1], cache,
                         method=QwenCausalLM.decode)
        steps.append(np.asarray(apply({"params": decode_params}, h, method=QwenCausalLM.logits)))
    _compare(np.concatenate(steps, axis=1), full, mask)
    # Decoding continues at n_valid + rope_delta on every row (what the sampler relies on).
    n_valid = mask.sum(1)
    expected = n_valid - 1 + inputs["rope_deltas"]
    last = pos[..., -1]
    assert np.array_equal(last if last.ndim == 1 else last[0], expected)


def test_branches_score_continuations_as_separate_sequences(hf_checkpoint):
    """prefix | a | b packed with branch ids gives, on a and b, the logits of prefix+a and prefix+b."""
    hf, path = hf_checkpoint("qwen2")
    model = load_pretrained(path)
    rng = np.random.default_rng(6)
    prefix, a, b = rng.integers(0, 120, 6), rng.integers(0, 120, 3), rng.integers(0, 120, 4)
    ids = np.concatenate([prefix, a, b])[None]
    branches = np.array([[0] * 6 + [1] * 3 + [2] * 4])
    positions = np.array([list(range(6)) + list(range(6, 9)) + list(range(6, 10))])
    logits, _ = model.module.apply({"params": model.params}, ids, positions, np.ones_like(ids), branches=branches)
    logits = np.asarray(logits)[0]
    for cont, sl in ((a, slice(6, 9)), (b, slice(9, 13))):
        seq = np.concatenate([prefix, cont])[None]
        ref = hf_logits(hf, seq, np.ones_like(seq))[0]
        assert np.abs(logits[:6] - ref[:6]).max() <= TOL
        assert np.abs(logits[sl] - ref[6:]).max() <= TOL


def test_unsupported_rope_scaling_is_refused(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("qwen2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        load_pretrained(tmp_path)


def test_video_tokens_are_refused(hf_checkpoint):
    """No video path: a video token among the real tokens is an error, not a text token."""
    from reference import VIDEO

    model = load_pretrained(hf_checkpoint("qwen3_vl")[1])
    ids, mask, _, pv, thw = vlm_batch([[(1, 4, 4)]], [(2, 2)], np.random.default_rng(0), patch=16)
    ids[0, 0] = VIDEO
    with pytest.raises(ValueError, match="video inputs are not supported"):
        model.prepare_inputs(ids, mask, pv, thw)
    mask[0, 0] = 0  # padding may hold any id
    model.prepare_inputs(ids, mask, pv, thw)
