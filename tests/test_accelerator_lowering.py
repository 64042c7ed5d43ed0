"""The GPU and TPU programs, traced and lowered on CPU (nothing compiled or run for them).

Every program the trainer and the evaluator compile, at tiny sizes, for Qwen2-VL and Qwen2.5-VL
(the policy; Qwen3-VL for the update and the sampler) and Qwen2 (the judge), with `cudnn` and `xla` attention for cuda and `pallas` and
`xla` for tpu (`xla` is traced once and lowered for both): the update (`Learner.jitted_step`,
bf16 compute, remat, per-prompt vision groups; padded and packed rows), the sampler (`Sampler`: prefill and the decode
loop; the evaluator's generation is this program) and the judge (`Judge.forward`, the yes/no and
the paper prompts; the evaluator's answer judge is the yes/no program). `tests/lowering.py`
says what is stood in for (the backend name and JAX's cuDNN version check) and why.

Findings 1-3 of issue 31 (each failed on the code before it) come first, on the smallest
programs that show them."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowering import as_platform, fmha_calls, lower
from models import Model, abstract_params
from models.causal_lm import QwenCausalLM
from models.config import config_from_dict
from models.vision import VisionInputs
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.judge import Judge, JudgeConfig
from pr1_jax.learner import Learner, LearnerConfig, init_state
from pr1_jax.packing import PackedBatch
from pr1_jax.rollout import LearnerBatch
from pr1_jax.sampling import SamplingConfig, Sampler
from pr1_jax.sharding import make_mesh
from reference import tiny_config, vlm_batch
from test_judge import TOKENIZER, VOCAB

# attention -> (the backend it is traced as, the platforms it is lowered for)
PATHS = {"cudnn": ("cuda", ("cuda",)), "xla": ("cuda", ("cuda", "tpu")), "pallas": ("tpu", ("tpu",))}
S = jax.ShapeDtypeStruct
I32 = jnp.int32


def _lower_paths(jitted, args, attention) -> str:
    trace_as, platforms = PATHS[attention]
    with as_platform(trace_as):
        return jitted.trace(*args).lower(lowering_platforms=platforms).as_text()


def _check(text: str, attention: str, *, backward: bool):
    """The attention each path promises: cuDNN calls (and no bias gradient: a backward returns
    dq, dk, dv and its workspace), Mosaic kernels, or neither."""
    calls = fmha_calls(text)
    kernels = text.count("tpu_custom_call")
    if attention == "cudnn":
        assert calls and not kernels
        assert any(c.endswith("Backward") for c, _ in calls) == backward
        assert all(res.count("tensor<") == 4 for c, res in calls if c.endswith("Backward"))
    elif attention == "pallas":
        assert kernels and not calls
    else:
        assert not calls and not kernels


def _text_cfg(**over):
    return config_from_dict(tiny_config("qwen2", **over).to_dict())


# -- findings 1-3 --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_tower_takes_cudnn_per_group(arch):
    """Finding 1: with bf16 compute on a GPU (`auto` = cudnn) the vision tower's attention ran under
    `nn.vmap`, whose cuDNN batching rule cannot reshape the mask bias: every forward with images
    failed, and so did building the module's abstract params (a Learner's construction)."""
    cfg = config_from_dict(tiny_config(arch).to_dict())
    ids, mask, _, pv, thw = vlm_batch([[(1, 4, 6)], [(1, 4, 4)]], [(2, 3), (5, 1)], np.random.default_rng(0))
    with as_platform("cuda"):
        params = nn.unbox(abstract_params(QwenCausalLM(cfg, dtype=jnp.bfloat16)))
    model = Model(cfg, params, dtype=jnp.bfloat16)
    inputs = model.prepare_inputs(ids, mask, pv, thw, per_row=True)

    def loss(params):
        logits, _ = model.module.apply({"params": params}, inputs["input_ids"], inputs["positions"],
                                       inputs["attention_mask"], inputs["vision"])
        return logits.astype(jnp.float32).sum()

    calls = [c for c, _ in fmha_calls(lower(jax.grad(loss), params, platform="cuda"))]
    assert "__cudnn$fmhaScaleBiasSoftmax" in calls and "__cudnn$fmhaScaleBiasSoftmaxBackward" in calls


def _text_loss_calls(t: int, **kw) -> list[tuple[str, str]]:
    """The cuDNN calls of the gradient of a bf16 text forward over 2 rows of t tokens (row 1
    left-padded), `attention="cudnn"`."""
    module = QwenCausalLM(_text_cfg(), dtype=jnp.bfloat16, attention="cudnn")
    ids = np.arange(2 * t, dtype=np.int32).reshape(2, t)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    with as_platform("cuda"):
        params = nn.unbox(abstract_params(module))

    def loss(params):
        out = module.apply({"params": params}, ids, np.arange(t)[None].repeat(2, 0), mask, **kw)[0]
        return out.astype(jnp.float32).sum()

    return fmha_calls(lower(jax.grad(loss), params, platform="cuda"))


def test_odd_lengths():
    """Finding 2: an odd sequence length in a differentiated cuDNN attention raised "Unsupported
    sequence length Q 9, KV 9" (JAX's check, with or without a bias): lengths are padded to even
    ones, here for the decoder's lengths and for a bias (the judge's prefix-sharing mask)."""
    assert _text_loss_calls(9)
    branches = np.array([[0] * 5 + [1] * 2 + [2] * 2] * 2)
    assert {c for c, _ in _text_loss_calls(9, branches=branches)} == {"__cudnn$fmhaScaleBiasSoftmax",
                                                                      "__cudnn$fmhaScaleBiasSoftmaxBackward"}


def test_no_bias_gradient():
    """Finding 3: the backward returned the gradient of the [B, 1, T, S] mask bias, and the
    decoder's padding was such a bias: the decoder's calls now take lengths (no bias operand) and
    no backward returns a bias gradient (dq, dk, dv and the workspace only)."""
    calls = _text_loss_calls(10)
    assert {c for c, _ in calls} == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}
    branches = np.array([[0] * 4 + [1] * 3 + [2] * 3] * 2)
    for c, res in calls + _text_loss_calls(10, branches=branches):
        assert not c.endswith("Backward") or res.count("tensor<") == 4, (c, res)


# -- the programs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _vision(cfg, groups: int, patches: int) -> VisionInputs:
    lead = (groups, patches)
    taps = {}
    if cfg.kind == "qwen3_vl":  # the learned position grid's bilinear taps
        taps = dict(pos_index=S(lead + (4,), I32), pos_weight=S(lead + (4,), jnp.float32))
    return VisionInputs(pixel_values=S(lead + (cfg.patch_dim,), jnp.float32), perm=S(lead, I32),
                        rot_pos=S(lead + (2,), I32), seg_full=S(lead, I32), seg_window=S(lead, I32),
                        unperm=S((groups, patches // cfg.spatial_merge_size ** 2), I32), **taps)


@pytest.mark.parametrize("attention", list(PATHS))
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_update_lowers(arch, attention, mesh):
    """The GRPO update: 4 sequences of 13 + 6 tokens (odd), 2 vision groups of 16 patches."""
    cfg = config_from_dict(tiny_config(arch).to_dict())
    n, t, r, groups = 4, 19, 6, 2
    batch = LearnerBatch(input_ids=S((n, t), I32), attention_mask=S((n, t), I32), positions=S((3, n, t), I32),
                         response_mask=S((n, r), I32), old_logprobs=S((n, r), jnp.float32),
                         advantages=S((n,), jnp.float32), vision=_vision(cfg.vision, groups, 16))
    with as_platform(PATHS[attention][0]):
        learner = Learner(cfg, LearnerConfig(dtype="bfloat16", param_dtype="float32", remat=True), mesh, 10,
                          attention=attention)
        state = jax.eval_shape(functools.partial(init_state, tx=learner.tx), nn.unbox(abstract_params(learner.module)))
    _check(_lower_paths(learner.jitted_step(batch), (state, batch), attention), attention, backward=True)


@pytest.mark.parametrize("attention", list(PATHS))
def test_packed_update_lowers(attention, mesh):
    """The paper configs' update: 2 packed rows of 64 tokens (`learner.packing: groups`), the
    block-sparse attention's gathers and scatters over 6 pairs of 32-slot blocks a row (the
    decoder's; the vision tower keeps the path's kernel)."""
    cfg = config_from_dict(tiny_config("qwen2_5_vl").to_dict())
    w, length, groups = 2, 64, 2
    row = S((w, length), I32)
    batch = PackedBatch(input_ids=row, attention_mask=row, positions=S((3, w, length), I32), groups=row, sources=row,
                        response_mask=row, old_logprobs=S((w, length), jnp.float32), sequence=row, image_index=row,
                        pairs=S((w, 6, 2), I32), branches=row, advantages=S((w, length), jnp.float32),
                        vision=_vision(cfg.vision, groups, 16))
    lc = LearnerConfig(dtype="bfloat16", param_dtype="float32", remat=True, packing="groups",
                       max_tokens_per_micro_batch=length)
    with as_platform(PATHS[attention][0]):
        learner = Learner(cfg, lc, mesh, 10, attention=attention)
        state = jax.eval_shape(functools.partial(init_state, tx=learner.tx), nn.unbox(abstract_params(learner.module)))
    text = _lower_paths(learner.jitted_step(batch), (state, batch), attention)
    _check(text, attention, backward=True)
    # The pairs' row maxima scattered onto their query blocks (the dense square has no scatter-max).
    assert re.search(r'"stablehlo\.scatter"\(.*\n(?:.*\n){0,4}?.*stablehlo\.maximum', text)


@pytest.mark.parametrize("attention", list(PATHS))
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_sampler_lowers(arch, attention, mesh):
    """Prefill (2 left-padded prompts of 11 tokens, per-row vision of 16 patches) and a decode
    segment (2 samples each, 5 new tokens; decode steps take the XLA path whatever the setting)."""
    cfg = config_from_dict(tiny_config(arch).to_dict())
    b, t = 2, 11
    module = QwenCausalLM(cfg, dtype=jnp.bfloat16, attention=attention)
    with as_platform(PATHS[attention][0]):
        params = nn.unbox(abstract_params(module))
    scfg = SamplingConfig(max_new_tokens=5, eos_ids=(2,), pad_id=0, n=2)
    sampler = Sampler(module, scfg, mesh)
    key = S((), jax.eval_shape(lambda: jax.random.key(0)).dtype)
    args = (params, S((b, t), I32), S((3, b, t), I32), S((b, t), I32), _vision(cfg.vision, b, 16), S((b,), I32),
            key, S((b,), I32), scfg, 1)
    _check(_lower_paths(sampler._prefill, args, attention), attention, backward=False)
    with as_platform(PATHS[attention][0]):
        decode_params, state = sampler._prefill.eval_shape(*args)
    _check(_lower_paths(sampler._segment, (decode_params, state, scfg), attention), "xla", backward=False)


@pytest.fixture(scope="module")
def judge_batches():
    """One packed batch per prompt scheme, built by the judge itself from two responses."""
    tok = load_tokenizer(TOKENIZER)
    module = QwenCausalLM(_text_cfg(vocab_size=VOCAB), dtype=jnp.bfloat16)
    out = {}
    for prompt in ("yesno", "paper"):
        config = JudgeConfig(prompt=prompt, length_buckets=(64, 128), annotation_buckets=(2, 4), max_response_tokens=40)
        judge = Judge(tok, module, None, config)
        batches, _, _ = judge.build(["AB = 12 and the triangle is red.", "No facts."], [["AB = 12.", "Red."], ["x"]])
        out[prompt] = (tok, config, batches[0])
    return out


@pytest.mark.parametrize("attention", list(PATHS))
@pytest.mark.parametrize("prompt", ["yesno", "paper"])
def test_judge_lowers(prompt, attention, mesh, judge_batches):
    """The judge's forward. yesno: packed prefix-sharing rows (a bias for cuDNN; masks with shared
    keys are not splash's segment masks: XLA); paper: a prefill of padded rows (cuDNN takes
    lengths) and a constrained decode (XLA)."""
    tok, config, batch = judge_batches[prompt]
    module = QwenCausalLM(_text_cfg(vocab_size=VOCAB), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                          attention=attention)
    with as_platform(PATHS[attention][0]):
        params = nn.unbox(abstract_params(module))
    judge = Judge(tok, module, None, config, mesh)
    text = _lower_paths(judge.forward, (params, batch), attention)
    _check(text, "xla" if (prompt, attention) == ("yesno", "pallas") else attention, backward=False)
    if attention == "cudnn":
        bias = {"yesno": True, "paper": False}[prompt]
        assert all(("Bias" in c) == bias for c, _ in fmha_calls(text))
