"""Per-device memory and compile time of the train step, the sampler and the judge at the paper's
sizes (Qwen2.5-VL-7B policy, Qwen2.5-32B judge; `--model qwen3vl8b`: Qwen3-VL-8B, Qwen3-32B), on
virtual CPU meshes, from abstract params only.

    python bench/memory.py                                 # defaults: 8/16/32 devices, ~12 min on 2 cores
    python bench/memory.py --devices 8 --programs judge --judge-length 8192
    python bench/memory.py --model qwen3vl8b --patches 784  # Qwen3-VL-8B + Qwen3-32B; 448 px = 28 x 28 patches of 16
    python bench/memory.py --programs sampler --patches 0  # text-only prompts
    python bench/memory.py --devices 32 --programs train_step --prompt 4096 --response 4096 --attention pallas
    python bench/memory.py --worker 8 ...                  # one mesh size (the parent runs one per N)
    python bench/memory.py --devices 32 --state --lora-rank 64  # params / grads / optimizer state per chip, ~1 min
    python bench/memory.py --devices 32 --programs train_step --lora-rank 64  # the update with LoRA

Nothing is materialised: params, optimizer state and batches are `jax.ShapeDtypeStruct`s carrying
the shardings of `pr1_jax.sharding.param_shardings(models.abstract_params(module), mesh)` (the
trainer's placement; mesh `[data=1, fsdp=N/4, tensor=4]` as `configs/paper_qwen25vl7b_v5p.yaml`).
Each program is jitted exactly as the trainer does it (`Learner.step`'s `train_step` with its
in/out shardings and donation; `Sampler`; `Judge.forward`, and with `--programs judge_paper` the
paper configs' constrained-decode judge), lowered and compiled for the N
virtual CPU devices; `compiled.memory_analysis()` gives the per-device bytes: arguments (params,
optimizer state, inputs), outputs, temporaries (activations, KV cache, gradients) and aliased
(donated) bytes. peak = arguments + outputs + temporaries - aliased.

Depth. Both decoders and the vision tower are `nn.scan`s: the compiled program holds one layer
body whatever the depth, so compiling the real depth (28 policy / 64 judge layers) takes about
as long as 2 layers (~30 s for the train step on 2 cores): every program is compiled at full
depth (`--layers N` overrides both decoders' depth for quick looks).

Batch search. Each program is compiled at 1 and 4 units (a unit = the data x fsdp device count),
then, per chip capacity (16 GiB: v5e, 95 GiB: v5p), secant steps between the largest batch that
fits and the smallest that does not (`--search` compiles each); the reported maximum is a batch
that was compiled and fits. The batch is: train step = sequences per micro-batch (the learner
scans micro-batches, so a mini-batch of any multiple of it has the same peak), sampler =
sequences (prompts x n, n = 8) decoded together, judge = rows per device call
(`max_rows_per_call`), each row one response with 8 annotations. Shapes: prompt `--prompt`
tokens holding one image of `--patches` patches (1024 = a 448 x 448 px figure, 256 visual
tokens; `--patches 0` for text-only prompts), response `--response` tokens, judge rows of
`--judge-length` tokens. The sampler's figure is the larger of its prefill and its largest decode
segment (every row live at the `--response` cap: prompt KV per prompt, response KV per row);
each is also reported apart (`prefill_tpu_est`, `segment_tpu_est`), with the bytes the programs'
all-gathers produce per chip (`gathered_per_step` in the decode loop, `gathered_per_segment`
elsewhere in the segment, `gathered_per_call` in the prefill: `decode_cost.HloCosts.all_gathered`).
`--gather-weights off` leaves the decode weights split over fsdp (`sampling.gather_weights`).

Attention and activation sharding. `--attention` sets the models' attention (`models.attention`;
on CPU `auto` is the XLA path with fp32 [T, S] scores per layer; `pallas` compiles splash attention
through Pallas' interpreter, whose buffers are the kernel's blocks: a stand-in for the TPU kernel's
memory, which XLA:CPU cannot compile; cuDNN's kernel cannot be compiled here at all).
`--activation-rules on` (default) traces the judge's forward inside
`models.layers.activation_sharding`, so the decoder layers' activation constraints map through
`pr1_jax.sharding.RULES` (batch over the data axes, heads / MLP over `tensor`); `off` leaves them
no-ops, as before the trainer's `Judge` entered it. The sampler and the train step (the learner's
`train_step`) enter it themselves.

The train step's vision: `--learner-vision per_prompt` (default, the learner batch's layout: the
tower once per prompt for the whole mini-batch before the micro-batches, its features shared by
the prompt's samples) or `per_sample` (the tower once per sequence, inside each micro-batch:
before issue 15). `--mini-batch M` compiles the update on M sequences in micro-batches of the
searched size (default: one micro-batch), e.g. the paper config's 1024.

XLA:CPU has no bf16 matmul: it converts bf16 weights to f32 copies (hoisted out of the layer
loop). Those bytes are found in the compiled HLO and reported (`cpu_upcast`); `tpu_est` = peak
minus them is what the batch search uses. This CPU compile is a proxy for the TPU one: XLA:TPU
fuses, lays out and rematerialises differently, so take these as estimates of the same order,
not TPU numbers.

LoRA. `--lora-rank R` compiles the update with `learner.lora` (rank R, alpha 2R, all seven
projections): the state is the adapters and their moments, the frozen bf16 base an argument.
`--state` compiles nothing: per chip, the bytes of the params (full fine-tuning: fp32 master
weights; LoRA: the bf16 base + fp32 adapters), of the gradients the update accumulates (fp32, of
the trainable params) and of Adam's two fp32 moments, each leaf's shard as the trainer places it,
without and with `--lora-rank` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from common import QWEN3_32B, QWEN3VL_8B, qwen25vl_config

GIB = 1 << 30
CAPACITIES = {"v5p (95 GiB)": 95 * GIB, "v5e (16 GiB)": 16 * GIB}

POLICY = qwen25vl_config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
JUDGE = dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
             num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1e6,
             tie_word_embeddings=False)
# (policy, judge) config dicts by --model: the paper's pair and its Qwen3 counterpart.
MODELS = {"qwen25vl7b": (POLICY, JUDGE), "qwen3vl8b": (QWEN3VL_8B, QWEN3_32B)}


# ------------------------------------------------------------------------------------ worker


def _configs(model: str, policy_layers: int | None, judge_layers: int | None):
    import copy

    from models import config_from_dict

    p, j = copy.deepcopy(MODELS[model])
    if policy_layers:
        p["text_config"]["num_hidden_layers"] = policy_layers
    if judge_layers:
        j["num_hidden_layers"] = judge_layers
    return config_from_dict(p), config_from_dict(j)


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def _bf16_upcast_bytes(hlo: str) -> int:
    """Bytes of f32 copies of bf16 weights made at the top level of the program. XLA:CPU has no
    bf16 matmul, so it converts every bf16 weight to f32, hoisted out of the layer loop (all layers
    at once); XLA:TPU multiplies in bf16 and makes no such copies. Two kinds: f32 copies of bf16
    parameters (all CPU-only), and f32 copies of f32 parameters rounded through bf16 (the sampler's
    bf16 decode weights, `QwenCausalLM.decode_params`), of which a TPU holds the bf16 half."""
    import re

    entry = hlo[hlo.index("\nENTRY"):]
    params = dict(re.findall(r"(%param[.\d]*) = (\w+)\[", entry))
    bodies = dict(re.findall(r"^(%[\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo, re.S | re.M))
    total = 0
    for dims, op, operands, rest in re.findall(r"= f32\[([\d,]*)\]\S* (fusion|convert)\(([^)]*)\)(.*)", entry):
        ops = [o.strip() for o in operands.split(",")]
        if len(ops) != 1 or ops[0] not in params:
            continue
        n = 4
        for d in filter(None, dims.split(",")):
            n *= int(d)
        callee = re.search(r"calls=(%[\w.\-]+)", rest)
        if params[ops[0]] == "bf16":
            total += n
        elif op == "fusion" and callee and "bf16[" in bodies.get(callee.group(1), ""):
            total += n // 2
    return total


def _compile(jitted, *args, keep: bool = False):
    """Compile; per-device bytes: args, out, temp, alias, peak = args + out + temp - alias, and
    tpu_est = peak minus the CPU-only f32 copies of bf16 weights. keep: (that dict, the compiled
    program)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    t = time.perf_counter() - t0
    m = compiled.memory_analysis()
    arg, out, tmp, alias = (int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias"))
    upcast = _bf16_upcast_bytes(compiled.as_text())
    peak = arg + out + tmp - alias
    stats = dict(args=arg, out=out, temp=tmp, alias=alias, peak=peak, cpu_upcast=upcast, tpu_est=peak - upcast,
                 compile_s=round(t, 1))
    return (stats, compiled) if keep else stats


def _vision_inputs(lead: tuple, patches: int, cfg, mesh, batch_axis: bool):
    """Abstract VisionInputs with `patches` rows per group; lead = () packed or (N,) per row."""
    import jax
    import jax.numpy as jnp

    from models.vision import VisionInputs
    from pr1_jax.sharding import sharding_for

    def arr(shape, dtype):
        logical = ("batch",) + (None,) * (len(shape) - 1) if batch_axis else None
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_for(logical, shape, mesh))

    m2 = cfg.spatial_merge_size**2
    i32 = jnp.int32
    taps = {}
    if cfg.kind == "qwen3_vl":
        taps = dict(pos_index=arr(lead + (patches, 4), i32), pos_weight=arr(lead + (patches, 4), jnp.float32))
    return VisionInputs(pixel_values=arr(lead + (patches, cfg.patch_dim), jnp.float32),
                        perm=arr(lead + (patches,), i32), rot_pos=arr(lead + (patches, 2), i32),
                        seg_full=arr(lead + (patches,), i32), seg_window=arr(lead + (patches,), i32),
                        unperm=arr(lead + (patches // m2,), i32), **taps)


def _traced(fn, mesh, a):
    """fn traced inside `activation_sharding` (the models' activation constraints and splash
    attention per shard follow `pr1_jax.sharding.RULES`) unless `--activation-rules off`: the
    judge's forward here (the sampler, the learner's update and the trainer's `Judge` enter it
    themselves)."""
    if a.activation_rules == "off":
        return fn
    from models.layers import activation_sharding
    from pr1_jax.sharding import RULES

    def traced(*args):
        with activation_sharding(mesh, RULES):
            return fn(*args)

    return traced


def train_step_stats(mesh, policy_cfg, seqs: int, a) -> dict:
    """The trainer's update (`Learner.jitted_step`, traced inside the activation rules) on
    micro-batches of `seqs` sequences, `--mini-batch` of them in all (default one micro-batch)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from pr1_jax.learner import Learner, LearnerConfig, init_state
    from pr1_jax.rollout import LearnerBatch, vision_copies
    from pr1_jax.sharding import batch_axis_size, batch_sharding

    mini = max(a.mini_batch, seqs)
    cfg = LearnerConfig(lr=1e-6, weight_decay=1e-3, dtype="bfloat16", param_dtype="float32", remat=True,
                        micro_batch_size=seqs, lora=_lora(a.lora_rank))
    learner = Learner(policy_cfg, cfg, mesh, total_steps=282, attention=a.attention)
    params = nn.unbox(__import__("models").abstract_params(learner.module))
    base = ()
    if a.lora_rank:
        from pr1_jax import lora

        frozen, params = lora.split(params)
        base = (_abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), frozen),
                          learner.policy_shardings),)
    state = _abstract(jax.eval_shape(functools.partial(init_state, tx=learner.tx), params), learner.state_shardings)
    length = a.prompt + a.response

    def arr(shape, dtype, axis=0):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, shape, axis))

    # The rollout's vision groups: each prompt's images once (copied where the data axes do not
    # divide the prompts), or once per sequence (before issue 15).
    groups = mini
    if a.learner_vision == "per_prompt" and mini % a.n == 0:
        groups = mini // a.n * vision_copies(mini // a.n, a.n, batch_axis_size(mesh))
    batch = LearnerBatch(input_ids=arr((mini, length), jnp.int32), attention_mask=arr((mini, length), jnp.int32),
                         positions=arr((3, mini, length), jnp.int32, axis=1),
                         response_mask=arr((mini, a.response), jnp.int32),
                         old_logprobs=arr((mini, a.response), jnp.float32), advantages=arr((mini,), jnp.float32),
                         vision=_vision_inputs((groups,), a.patches, policy_cfg.vision, mesh, batch_axis=True))
    return _compile(learner.jitted_step(batch), state, batch, *base)


def train_step_packed_stats(mesh, policy_cfg, rows: int, a) -> dict:
    """The update on packed rows (`learner.packing: groups`, the paper configs' layout): `rows`
    rows (micro-batches of one row per data shard), each one prompt of `--prompt` tokens and as
    many responses of `--response` as `--row-tokens` hold (default 2), the block-sparse attention's
    pairs of that layout (`pr1_jax.packing.block_pairs`)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from models.attention import pair_block
    from pr1_jax.learner import Learner, LearnerConfig, init_state
    from pr1_jax.packing import PackedBatch, block_pairs, micro_bucket
    from pr1_jax.sharding import batch_axis_size, batch_sharding

    length = a.row_tokens or a.prompt + 2 * a.response
    shards = batch_axis_size(mesh)
    rows = -(-rows // shards) * shards
    cfg = LearnerConfig(lr=1e-6, weight_decay=1e-3, dtype="bfloat16", param_dtype="float32", remat=True,
                        lora=_lora(a.lora_rank), packing="groups", max_tokens_per_micro_batch=length)
    learner = Learner(policy_cfg, cfg, mesh, total_steps=282, attention=a.attention)
    params = nn.unbox(__import__("models").abstract_params(learner.module))
    state = _abstract(jax.eval_shape(functools.partial(init_state, tx=learner.tx), params), learner.state_shardings)
    count = (length - a.prompt) // a.response
    responses = [(a.prompt + i * a.response, a.prompt + (i + 1) * a.response) for i in range(count)]
    pairs = micro_bucket(len(block_pairs([((0, a.prompt), responses)], pair_block(length))))

    def arr(shape, dtype, axis=0):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, shape, axis))

    i32, f32 = arr((rows, length), jnp.int32), arr((rows, length), jnp.float32)
    batch = PackedBatch(input_ids=i32, attention_mask=i32, positions=arr((3, rows, length), jnp.int32, axis=1),
                        groups=i32, sources=i32, response_mask=i32, old_logprobs=f32, sequence=i32, image_index=i32,
                        pairs=arr((rows, pairs, 2), jnp.int32), branches=i32, advantages=f32,
                        vision=_vision_inputs((rows,), a.patches, policy_cfg.vision, mesh, batch_axis=True))
    return _compile(learner.jitted_step(batch), state, batch)


def _lora(rank: int):
    from pr1_jax.lora import LoraConfig

    return LoraConfig(rank=rank, alpha=2.0 * rank)


def state_stats(mesh, policy_cfg, rank: int) -> dict:
    """Per-chip GiB of the train state as the trainer places it, full fine-tuning (rank 0) or LoRA:
    params (fp32 master weights; LoRA: bf16 base + fp32 adapters), grads (fp32, trainable only),
    Adam's moments (fp32, trainable only). Compiles nothing."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from models import abstract_params
    from pr1_jax import lora
    from pr1_jax.learner import Learner, LearnerConfig

    cfg = LearnerConfig(dtype="bfloat16", param_dtype="float32", lora=_lora(rank) if rank else lora.LoraConfig())
    learner = Learner(policy_cfg, cfg, mesh, total_steps=282)
    params = nn.unbox(abstract_params(learner.module))
    frozen = {}
    if rank:
        frozen, params = lora.split(params)
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), frozen)

    def gib(tree, shardings):
        return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))) / GIB

    opt = jax.eval_shape(learner.tx.init, params)
    trainable = gib(params, learner.param_shardings)
    out = dict(devices=len(mesh.devices.flat), lora_rank=rank,
               trainable_params=sum(x.size for x in jax.tree.leaves(params)),
               base_GiB=gib(frozen, learner.policy_shardings) if rank else 0.0, trainable_GiB=trainable,
               grads_GiB=trainable, optimizer_GiB=gib(opt, learner.state_shardings.opt_state))
    out["total_GiB"] = out["base_GiB"] + 2 * trainable + out["optimizer_GiB"]
    return out


def sampler_stats(mesh, policy_cfg, prompts: int, a) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from decode_cost import HloCosts
    from models import abstract_params
    from pr1_jax.learner import LearnerConfig, make_module
    from pr1_jax.sampling import SamplingConfig, Sampler
    from pr1_jax.sharding import batch_axis_size, param_shardings, sharding_for

    module = make_module(policy_cfg, LearnerConfig(dtype="bfloat16", param_dtype="float32"))
    module = module.clone(attention=a.attention)
    boxed = abstract_params(module)
    params = _abstract(nn.unbox(boxed), param_shardings(boxed, mesh))
    rep = NamedSharding(mesh, P())
    packed = a.sampler_vision == "packed"

    def sds(shape, axis=0):
        """The rollout's placement: prompt rows over the data axes (packed: replicated, as before)."""
        logical = [None] * len(shape)
        logical[axis] = "batch"
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep if packed else sharding_for(logical, shape, mesh))

    cfg = SamplingConfig(max_new_tokens=a.response, eos_ids=(151645,), pad_id=151643, temperature=1.0, n=a.n,
                         gather_weights=a.gather_weights == "on")
    sampler = Sampler(module, cfg, mesh)
    t = a.prompt
    vision = None
    if a.patches and packed:
        vision = _vision_inputs((), prompts * a.patches, policy_cfg.vision, mesh, batch_axis=False)
    elif a.patches:
        vision = _vision_inputs((prompts,), a.patches, policy_cfg.vision, mesh, batch_axis=True)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    shards = batch_axis_size(mesh) if prompts % batch_axis_size(mesh) == 0 else 1
    inputs = (params, sds((prompts, t)), sds((3, prompts, t), axis=1), sds((prompts, t)), vision, sds((prompts,)), key,
              None if packed else sds((prompts,)), cfg, shards)
    stats, prefill = _compile(sampler._prefill, *inputs, keep=True)
    # The live sampler's largest segment: every row still live at the cap (a `--lengths cap`
    # rollout's last one), its response KV grown to `--response` slots; shardings as the prefill's.
    shapes = jax.eval_shape(lambda *arrays: sampler._prefill(*arrays, cfg, shards), *inputs[:8])
    decode_params, state = _abstract(shapes, prefill.output_shardings)
    grow = lambda xs: tuple(jax.ShapeDtypeStruct((*x.shape[:2], a.response, x.shape[3]), x.dtype, sharding=x.sharding)
                            for x in xs)  # noqa: E731
    cache = state.decode.cache
    state = state.replace(decode=state.decode.replace(cache=cache.replace(k=grow(cache.k), v=grow(cache.v))))
    segment, compiled = _compile(sampler._segment, decode_params, state, cfg, keep=True)
    worst = max(stats, segment, key=lambda r: r["tpu_est"])
    # The weight all-gathers: per decode step (in the segment's loop), per segment, per call (prefill).
    per_step, per_segment = HloCosts(compiled.as_text(), None).all_gathered()
    per_call = sum(HloCosts(prefill.as_text(), None).all_gathered())
    return dict(worst, compile_s=stats["compile_s"] + segment["compile_s"], prefill_tpu_est=stats["tpu_est"],
                segment_tpu_est=segment["tpu_est"], gathered_per_step=per_step,
                gathered_per_segment=per_segment, gathered_per_call=per_call)


def _judge_setup(mesh, judge_cfg, a):
    """(module, abstract params on the mesh, sds(shape, dtype) -> a batch-sharded abstract array)
    of a bf16 judge."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from models import abstract_params
    from models.causal_lm import QwenCausalLM
    from pr1_jax.sharding import batch_sharding, param_shardings

    module = QwenCausalLM(judge_cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=a.attention)
    boxed = abstract_params(module)
    params = _abstract(nn.unbox(boxed), param_shardings(boxed, mesh))

    def sds(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, shape))

    return module, params, sds


def judge_stats(mesh, judge_cfg, rows: int, a) -> dict:
    import jax
    import jax.numpy as jnp

    from pr1_jax.judge import JudgeBatch, judge_forward

    module, params, sds = _judge_setup(mesh, judge_cfg, a)
    k, length = a.annotations, a.judge_length
    batch = JudgeBatch(input_ids=sds((rows, length)), positions=sds((rows, length)),
                       attention_mask=sds((rows, length)), branches=sds((rows, length)),
                       verdict_index=sds((rows, k)), valid=sds((rows, k), jnp.bool_))
    yes, no = (9693, 9454), (2152, 2753)
    forward = jax.jit(_traced(lambda p, b: judge_forward(module, p, b, yes, no, "hard"), mesh, a))
    return _compile(forward, params, batch)


def judge_paper_stats(mesh, judge_cfg, rows: int, a) -> dict:
    """The paper configs' judge (`pr1_jax.judge.paper`, jitted as `Judge` does): the shared system
    turn prefilled once, rows of `--judge-length` tokens, the constrained decode of
    `--annotations` digits. Its prompt is a stand-in of the reference's lengths (a system turn of
    1,300 tokens, 6-token tag segments): no tokenizer here."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from pr1_jax.judge.paper import PaperBatch, PaperPrompt, paper_forward

    module, params, sds = _judge_setup(mesh, judge_cfg, a)

    k, length = a.annotations, a.judge_length
    prompt = PaperPrompt(system_ids=(1,) * 1300, user_parts=("", "", ""), tail_ids=(), segments=((2,) * 6,) * k,
                         digit_ids=(15, 16))
    batch = PaperBatch(input_ids=sds((rows, length)), attention_mask=sds((rows, length)), last=sds((rows,)),
                       valid=sds((rows, k), jnp.bool_))
    forward = jax.jit(lambda p, b: paper_forward(module, p, b, prompt, "hard", mesh),
                      out_shardings=NamedSharding(mesh, P()))
    return _compile(forward, params, batch)


PROGRAMS = {"train_step": train_step_stats, "train_step_packed": train_step_packed_stats, "sampler": sampler_stats,
            "judge": judge_stats,
            "judge_paper": judge_paper_stats}


def worker(a) -> None:
    """Runs in a process whose XLA_FLAGS give it `a.worker` CPU devices; prints one JSON line per
    compile. Per program: two batches for the line, then per capacity a bracketing search (secant
    steps between the largest batch that fits and the smallest that does not, `a.search` compiles)."""
    import jax

    from pr1_jax.sharding import make_mesh

    n = len(jax.devices())
    assert n == a.worker, f"expected {a.worker} devices, got {n} (XLA_FLAGS must be set before jax is imported)"
    mesh = make_mesh((1, -1, a.tensor))
    data = n // a.tensor  # data x fsdp devices: the learner's and judge's rows must be multiples of this
    policy_cfg, judge_cfg = _configs(a.model, a.layers or None, a.layers or None)
    if a.state:
        for rank in sorted({0, a.lora_rank}):
            print(json.dumps(dict(program="state", **state_stats(mesh, policy_cfg, rank))), flush=True)
        return
    deadline = time.time() + a.budget
    for program in a.programs:
        cfg = judge_cfg if program.startswith("judge") else policy_cfg
        # Batches in multiples of the data x fsdp devices (sampler: prompts, each giving n rows). A
        # prompt count they do not divide leaves the sampler's prompt KV and its rows unsharded
        # over the data axes (pr1_jax/sampling.py: one block of rows).
        unit = data
        seen: dict[int, dict] = {}

        def point(b):
            if b in seen:
                return seen[b]
            if time.time() > deadline:
                r = dict(skipped="time budget")
            else:
                try:
                    r = PROGRAMS[program](mesh, cfg, b, a)
                except Exception as e:  # noqa: BLE001 - report and go on
                    r = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            seen[b] = r
            print(json.dumps(dict(devices=n, program=program, layers=cfg.text.num_layers, batch=b, unit=unit, **r)),
                  flush=True)
            return r

        for b in (unit, 4 * unit):
            point(b)
        for cap_name, cap in sorted(CAPACITIES.items(), key=lambda kv: kv[1]):
            for _ in range(a.search):
                ok = sorted((b, r["tpu_est"]) for b, r in seen.items() if "tpu_est" in r)
                if len(ok) < 2:
                    break
                fits = [(b, m) for b, m in ok if m <= cap]
                over = [(b, m) for b, m in ok if m > cap]
                lo = fits[-1] if fits else None
                hi = over[0] if over else None
                if lo and hi and hi[0] - lo[0] <= unit or (lo is None and hi[0] == unit):
                    break
                # Secant through the two points nearest the capacity.
                (b1, m1), (b2, m2) = (lo, hi) if lo and hi else (ok[-2], ok[-1]) if not hi else (ok[0], ok[1])
                slope = (m2 - m1) / (b2 - b1)
                guess = int(b1 + (cap - m1) / slope) if slope > 0 else 4 * b2
                guess = max(unit, guess // unit * unit)
                if lo:
                    guess = max(guess, lo[0] + unit)
                if hi:
                    guess = min(guess, hi[0] - unit)
                if guess in seen or guess > a.max_batch:
                    break
                point(guess)


# ------------------------------------------------------------------------------------ parent


def summarize(results: list[dict], a) -> list[dict]:
    rows = []
    for n in a.devices:
        for program in a.programs:
            pts = [r for r in results if r["devices"] == n and r["program"] == program]
            ok = sorted((r for r in pts if "tpu_est" in r), key=lambda r: r["batch"])
            if not ok:
                why = next((p.get("error") or p.get("skipped") for p in pts), "not run")
                rows.append(dict(devices=n, program=program, note=str(why)[:80]))
                continue
            first = ok[0]
            per = float("nan")
            if len(ok) > 1:
                per = (ok[1]["tpu_est"] - first["tpu_est"]) / (ok[1]["batch"] - first["batch"])
            scale = a.n if program.startswith("sampler") else 1
            row = dict(devices=n, program=program, layers=first["layers"], compile_s=max(r["compile_s"] for r in ok),
                       batch0=first["batch"] * scale, params_state_GiB=first["args"] / GIB,
                       peak0_GiB=first["peak"] / GIB, cpu_upcast_GiB=first["cpu_upcast"] / GIB,
                       tpu_est0_GiB=first["tpu_est"] / GIB, per_seq_MiB=per / scale / (1 << 20))
            for name, cap in CAPACITIES.items():
                fit = [r["batch"] for r in ok if r["tpu_est"] <= cap]
                over = [r["batch"] for r in ok if r["tpu_est"] > cap]
                best = max(fit) * scale if fit else 0
                bound = f" (<{min(b for b in over if not fit or b > max(fit)) * scale})" if over and (
                    not fit or any(b > max(fit) for b in over)) else " (+)"
                row[f"max {name}"] = f"{best}{bound}"
            rows.append(row)
    return rows


def parent(a) -> None:
    from common import table

    results = []
    for n in a.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        cmd = [sys.executable, __file__, "--worker", str(n), *sys.argv[1:]]
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.budget + 900)
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode:
            print(f"worker {n} exited {proc.returncode}:\n{proc.stderr[-2000:]}", file=sys.stderr)
        print(f"{n} devices: {len(lines)} compiles in {time.time() - t0:.0f} s", flush=True)
        for x in lines:
            print("  ", json.dumps(x), flush=True)
        results += lines
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    if a.state:
        print(f"\ntrain state per chip (GiB), mesh [1, N/{a.tensor}, {a.tensor}]: full fine-tuning and LoRA rank "
              f"{a.lora_rank} (alpha {2 * a.lora_rank}, all seven projections); total = base + params + grads + Adam\n")
        print(table([{k: v for k, v in r.items() if k != "program"} for r in results]))
        return
    print("\nper-device memory (XLA:CPU memory_analysis; tpu_est = peak - CPU-only f32 copies of bf16 weights)")
    print("and the largest batch whose tpu_est fits each chip (verified by a compile; (<B): B does not fit,")
    print("(+): the search stopped below the limit). train_step: sequences per micro-batch; sampler: sequences")
    print(f"(prompts x {a.n}) decoded together; judge: rows (responses, {a.annotations} annotations each) per call.")
    print(f"prompt {a.prompt} tokens ({a.patches} patches), response {a.response}, judge row {a.judge_length}; "
          f"mesh [1, N/{a.tensor}, {a.tensor}]\n")
    print(table(summarize(results, a)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", default="qwen25vl7b", choices=list(MODELS),
                   help="policy + judge: qwen25vl7b (Qwen2.5-VL-7B + Qwen2.5-32B) or qwen3vl8b (Qwen3-VL-8B + Qwen3-32B)")
    p.add_argument("--devices", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--programs", nargs="+", default=["train_step", "sampler", "judge"], choices=list(PROGRAMS))
    p.add_argument("--tensor", type=int, default=4, help="tensor axis of the mesh [1, N/tensor, tensor]")
    p.add_argument("--layers", type=int, default=0, help="decoder layers of both models; 0 = the real depth")
    p.add_argument("--search", type=int, default=4, help="compiles per capacity in the batch search")
    p.add_argument("--max-batch", type=int, default=4096, help="largest batch tried")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--response", type=int, default=1024)
    p.add_argument("--patches", type=int, default=1024, help="image patches per prompt (0 = text-only prompts)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--sampler-vision", default="per_row", choices=["per_row", "packed"],
                   help="the sampler's image layout: per row, sharded with the prompts (the rollout's), or "
                        "packed over the batch and replicated (before the fix)")
    p.add_argument("--gather-weights", default="on", choices=["on", "off"],
                   help="the sampler's decode weights gathered over fsdp once per call (sampling.gather_weights) "
                        "or left split (all-gathered in the decode program)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas"],
                   help="the models' attention; on CPU auto = xla, and pallas compiles splash attention in Pallas' "
                        "interpreter (a stand-in for the TPU kernel's memory: blocks, no [T, S] scores)")
    p.add_argument("--activation-rules", default="on", choices=["on", "off"],
                   help="trace the judge inside models.layers.activation_sharding (activations constrained by the "
                        "rules table) or not (the layers' constraints are then no-ops); the train step always is")
    p.add_argument("--learner-vision", default="per_prompt", choices=["per_prompt", "per_sample"],
                   help="the train step's vision tower once per prompt (the learner's layout) or once per sequence "
                        "(before issue 15)")
    p.add_argument("--mini-batch", type=int, default=0,
                   help="train step: sequences in the mini-batch (micro-batches of the searched size); 0 = one")
    p.add_argument("--row-tokens", type=int, default=0,
                   help="train_step_packed: tokens per packed row (0 = prompt + 2 responses)")
    p.add_argument("--annotations", type=int, default=8)
    p.add_argument("--judge-length", type=int, default=2048)
    p.add_argument("--budget", type=int, default=900, help="seconds of compiling per mesh size; later points skipped")
    p.add_argument("--json", default=None, help="write the raw points here")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="learner.lora.rank of the train step (0 = full fine-tuning)")
    p.add_argument("--state", action="store_true",
                   help="only the train state per chip (params, grads, optimizer), without and with --lora-rank")
    a = p.parse_args()
    if a.worker:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        worker(a)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        parent(a)


if __name__ == "__main__":
    main()
