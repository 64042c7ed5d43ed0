"""Decode and update speed on an accelerator: our sampler against transformers `generate` on the
same device, in tokens/s, their ratio and the share of the HBM roofline (copy bandwidth measured in
the same run); `Learner.step` in model TFLOP/s and MFU against the bf16 matmul peak measured in
the same run (`matmul_peak`).

    python bench/accelerator.py                      # GPU / TPU: decode at 128 and 512 rows, the update
    python bench/accelerator.py --parts learner --json
    python bench/accelerator.py --rows 128 --hf-rows 128 --json
    python bench/accelerator.py --size tiny          # smoke run on CPU (seconds); numbers mean nothing
    python bench/accelerator.py --learner-cost       # any backend, compile only: XLA's FLOPs of the update

The model (size "1.5b") is a Qwen2.5-VL with a 1.5B-class text decoder (hidden 1536, 28 layers,
12 query / 2 KV heads of 128, MLP 8960, vocab 151936, tied embeddings) and the Qwen2.5-VL vision
tower (depth 32, width 1280, MLP 3420, window 112), random weights, bf16 params and compute, one
transformers config for both sides. A prompt is 150 text tokens, one 16 x 16-patch image (64
visual tokens) and 50 text tokens (266 tokens); rows = prompts x 8 samples; 256 new tokens, always
(no EOS), temperature 1, no top-k / top-p. Ours: `pr1_jax.sampling.Sampler`, one prefill per
prompt shared by its 8 samples (images laid out per row, as the rollout does). Transformers:
`generate(do_sample=True)` on every prompt repeated 8 times, bf16, sdpa attention, on the same
device (CUDA; on a TPU it is skipped). Both timings are medians over `--repeats` runs after a
warm-up (compiles excluded) and include prefill and vision.

Roofline: a decode step must read the decoder's and head's weights and the filled part of the KV
cache once; over a decode that fills prompt .. prompt + new slots the cache read averages prompt +
new / 2 slots per row. roofline tokens/s = rows / (those bytes / copy bandwidth), the copy
bandwidth measured here (a jitted out-of-place add over 2 GiB: bytes read + written / time).

The update (issue 15's config): `Learner.step` on 64 sequences = 8 prompts x 8 samples of the same
266-token prompts and 256-token responses (522 tokens; random tokens, no EOS), bf16 compute, fp32
params, remat, micro-batches of 16, AdamW; fp32 random params; one mesh over the visible devices.
The median step time after a compiling step gives model TFLOP/s and MFU = that / the bf16 matmul
peak. Model FLOPs as the issue counts them (`learner_model_flops`): 6 x non-embedding params x
tokens + 6 x head x response tokens + causal attention (6 x layers x heads x head_dim x T^2 per
sequence) + 6 x vision params x patches per sequence, i.e. the tower counted once per sample,
whatever the learner runs; `work` counts the tower once per prompt, as the learner now runs it.

`--learner-cost` compiles the update on abstract inputs (nothing runs; on CPU too, at full size)
and prints XLA's FLOPs of it, while loops counted per iteration (`decode_cost.HloCosts`), with the
tower once per sample (the layout before issue 15) and once per prompt, and the response axis at
the sampler's cap (`--cap`, before) and at the bucket of the longest response (`--longest`).
"""

from __future__ import annotations

import argparse
import json
import time

import os
import types

os.environ.setdefault("JAX_PLATFORMS", "")  # JAX picks the accelerator (common would default to cpu)
from common import QWEN25VL_1_5B, median_time, table  # first: sets the environment
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import Model, abstract_params, config_from_dict, init_params
from models.causal_lm import QwenCausalLM
from models.positions import rope_index
from pr1_jax.learner import Learner, LearnerConfig, init_state
from pr1_jax.rollout import LearnerBatch, response_bucket, train_batch_from_samples
from pr1_jax.sampling import SamplingConfig, Sampler
from pr1_jax.sharding import batch_axis_size, global_batch, make_mesh
from reference import IMAGE, VEND, VIDEO, VSTART, vlm_batch

SIZES = {
    "1.5b": dict(
        text=dict(QWEN25VL_1_5B["text_config"], max_position_embeddings=32768),
        vision=QWEN25VL_1_5B["vision_config"],
        text_tokens=(150, 50), grid=16, new=256, rows=(128, 512), matmul=8192, copy_gib=2.0,
        learner_sequences=64, micro=16),
    "tiny": dict(  # the tests' model sizes
        text=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0,
                  max_position_embeddings=512),
        vision=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, window_size=56,
                    fullatt_block_indexes=[1]),
        text_tokens=(6, 4), grid=4, new=8, rows=(16, 32), matmul=256, copy_gib=0.0625,
        learner_sequences=16, micro=8),
}
SAMPLES = 8


def matmul_peak(n: int = 8192, dtype=jnp.bfloat16, repeats: int = 10) -> float:
    """FLOP/s of one jitted n x n x n matmul in `dtype` on the default device (median of `repeats`
    after a warm-up): the peak that model FLOP/s are compared with (e.g. a learner step's MFU)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    return 2 * n**3 / _median_seconds(lambda: f(a, b), repeats)


def copy_bandwidth(gib: float, repeats: int = 10) -> float:
    """Bytes/s of HBM traffic of a jitted out-of-place add over a `gib` GiB bf16 array: read + written."""
    x = jnp.zeros((int(gib * (1 << 30)) // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.ones((), a.dtype))
    return 2 * x.nbytes / _median_seconds(lambda: f(x), repeats)


def _median_seconds(fn, repeats: int) -> float:
    """Median seconds of fn() to completion on the device, after one compiling run."""
    return median_time(lambda: jax.block_until_ready(fn()), repeats)


def hf_config(size: str):
    import transformers

    s = SIZES[size]
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return transformers.Qwen2_5_VLConfig(text_config=s["text"], vision_config=s["vision"], **ids)


def prompts(size: str, n: int, seed: int = 0):
    """n prompts: text, one grid x grid-patch image, text. (ids, mask, mm_token_type_ids, pixels, grid_thw)."""
    s = SIZES[size]
    g = s["grid"]
    return vlm_batch([[(1, g, g)]] * n, [s["text_tokens"]] * n, np.random.default_rng(seed))


def roofline_tokens_per_s(model: Model, rows: int, prompt_len: int, new: int, bandwidth: float) -> float:
    """rows / (decoder + head weights + mean filled cache per step, in bytes / bandwidth)."""
    weights = model.module.decode_params(model.params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(weights))
    t = model.config.text
    per_slot = 2 * t.num_layers * t.num_kv_heads * t.head_dim * jnp.dtype(model.module.dtype).itemsize
    cache_bytes = rows * (prompt_len + new / 2) * per_slot
    return rows / ((weight_bytes + cache_bytes) / bandwidth)


def ours_seconds(model: Model, size: str, rows: int, repeats: int) -> tuple[float, int]:
    ids, mask, _, pv, thw = prompts(size, rows // SAMPLES)
    inputs = model.prepare_inputs(ids, mask, pv, thw, per_row=True)
    cfg = SamplingConfig(max_new_tokens=SIZES[size]["new"], eos_ids=(-1,), pad_id=0, temperature=1.0, n=SAMPLES)
    sampler = Sampler(model.module, cfg)
    key = jax.random.key(0)
    return _median_seconds(lambda: sampler(model.params, inputs, key).tokens, repeats), ids.shape[1]


def hf_seconds(hf, size: str, rows: int, repeats: int) -> float:
    import torch

    ids, mask, mm, pv, thw = prompts(size, rows // SAMPLES)
    patches = pv.shape[0] // ids.shape[0]
    device = next(hf.parameters()).device
    rep = lambda a: torch.tensor(np.repeat(a, SAMPLES, axis=0)).to(device)  # noqa: E731
    pixels = np.repeat(pv.reshape(ids.shape[0], patches, -1), SAMPLES, axis=0).reshape(-1, pv.shape[1])
    kw = dict(input_ids=rep(ids), attention_mask=rep(mask), mm_token_type_ids=rep(mm), image_grid_thw=rep(thw),
              pixel_values=torch.tensor(pixels).to(device, torch.bfloat16))
    new = SIZES[size]["new"]

    def run():
        with torch.no_grad():
            hf.generate(**kw, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                        min_new_tokens=new, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return median_time(run, repeats)


def hf_model(size: str):
    """transformers' model of the same config in bf16 on the accelerator JAX uses (CUDA or CPU);
    None on a TPU, where this torch cannot run."""
    import torch
    import transformers

    backend = jax.default_backend()
    if backend == "tpu" or (backend == "gpu" and not torch.cuda.is_available()):
        return None
    device = "cuda" if backend == "gpu" else "cpu"
    torch.manual_seed(0)
    cfg = hf_config(size)
    cfg._attn_implementation = "sdpa"
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).to(device, torch.bfloat16).eval()


# ------------------------------------------------------------------------------------ the update


def learner_config(size: str) -> LearnerConfig:
    return LearnerConfig(lr=1e-6, weight_decay=1e-3, warmup_ratio=0.0, dtype="bfloat16", param_dtype="float32",
                         remat=True, micro_batch_size=SIZES[size]["micro"])


def learner_batch(cfg, size: str, cap: int, longest: int, per_sample: bool = False, bucket: bool = True,
                  shards: int = 1) -> LearnerBatch:
    """Host learner batch of `learner_sequences` rows (the prompts of `prompts` x 8 samples), each
    response `longest` real tokens of a sampler capped at `cap`, cut to its bucket (`bucket`) or
    kept at the cap. per_sample: one vision group per sequence (the tower once per sample)."""
    s = SIZES[size]
    rows = s["learner_sequences"]
    ids, mask, _, pv, thw = prompts(size, rows // SAMPLES)
    pos, deltas = rope_index(ids, mask, thw, image_token_id=cfg.image_token_id,
                             spatial_merge_size=cfg.vision.spatial_merge_size)
    rng = np.random.default_rng(1)
    samples = types.SimpleNamespace(tokens=rng.integers(0, VSTART - 1, (rows, cap)),
                                    mask=np.broadcast_to(np.arange(cap) < longest, (rows, cap)),
                                    logprobs=-rng.random((rows, cap), np.float32))
    return train_batch_from_samples(
        cfg, dict(input_ids=ids, attention_mask=mask, positions=pos, rope_deltas=deltas), samples, SAMPLES, pv, thw,
        num_patches=s["grid"] ** 2, advantages=rng.standard_normal(rows).astype(np.float32),
        response_length=response_bucket(longest, LearnerConfig.response_buckets, cap) if bucket else None,
        shards=rows if per_sample else shards)


def learner_model_flops(cfg, batch: LearnerBatch, towers: int) -> float:
    """Model FLOPs of one update (see the module docstring); `towers`: how many times the vision
    tower's params count (the issue: once per sequence)."""
    params = nn.unbox(abstract_params(QwenCausalLM(cfg)))
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    t = cfg.text
    n, length = batch.input_ids.shape
    decoder = 6 * size(params["decoder"]) * n * length
    head = 6 * t.hidden_size * t.vocab_size * n * batch.response_length
    attention = 6 * t.num_layers * t.num_heads * t.head_dim * length**2 * n
    vision = 6 * size(params["visual"]) * batch.vision.pixel_values.shape[1] * towers
    return float(decoder + head + attention + vision)


def learner_seconds(cfg, size: str, repeats: int) -> tuple[float, LearnerBatch]:
    """Median seconds of `Learner.step` (after a compiling step) on the issue's config."""
    mesh = make_mesh((1, -1, 1))
    learner = Learner(cfg, learner_config(size), mesh, total_steps=1000)
    host = learner_batch(cfg, size, SIZES[size]["new"], SIZES[size]["new"], shards=batch_axis_size(mesh))
    batch = global_batch(mesh, host)
    state = learner.init_state(init_params(cfg, jax.random.key(0), param_dtype=jnp.float32))

    def step():  # the state is donated: each step takes the last one's
        nonlocal state
        state, metrics = learner.step(state, batch)
        return state, metrics

    return _median_seconds(step, repeats), host


def learner_flops_xla(cfg, size: str, batch: LearnerBatch) -> float:
    """XLA's FLOPs of the update compiled on abstract inputs (loops per iteration)."""
    from decode_cost import HloCosts

    mesh = make_mesh((1, -1, 1))
    learner = Learner(cfg, learner_config(size), mesh, total_steps=1000)
    state = jax.eval_shape(lambda p: init_state(p, learner.tx), nn.unbox(abstract_params(learner.module)))
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state,
                         learner.state_shardings)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    compiled = learner.jitted_step(abstract).lower(state, abstract).compile()
    return HloCosts(compiled.as_text(), jax.devices()[0].client).cost("flops")


def learner_cost_rows(cfg, size: str, cap: int, longest: int) -> list[dict]:
    """XLA's FLOPs of the update before / after items 1 and 2 of issue 15."""
    rows = []
    cases = [("per sample", "cap", dict(per_sample=True, bucket=False)),
             ("per prompt", "cap", dict(bucket=False)),
             ("per prompt", "bucket", dict())]
    for vision, resp, kw in cases:
        if resp == "bucket" and response_bucket(longest, LearnerConfig.response_buckets, cap) == cap:
            continue
        batch = learner_batch(cfg, size, cap, longest, **kw)
        t0 = time.perf_counter()
        flops = learner_flops_xla(cfg, size, batch)
        rows.append(dict(vision=vision, response_axis=f"{resp} ({batch.response_length})", cap=cap,
                         longest=longest, tokens=batch.input_ids.shape[1], xla_TFLOP=flops / 1e12,
                         model_TFLOP_issue=learner_model_flops(cfg, batch, batch.num_sequences) / 1e12,
                         compile_s=round(time.perf_counter() - t0, 1)))
    base = rows[0]["xla_TFLOP"]
    for r in rows:
        r["vs_before"] = r["xla_TFLOP"] / base
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1.5b", choices=list(SIZES))
    p.add_argument("--rows", type=int, nargs="+", default=None, help="sequences decoded together (prompts x 8)")
    p.add_argument("--hf-rows", type=int, nargs="*", default=None, help="rows also run through transformers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["decode", "learner"], choices=["decode", "learner"])
    p.add_argument("--json", action="store_true", help="one JSON line per row count, the update, then the peaks")
    p.add_argument("--learner-cost", action="store_true",
                   help="compile the update on abstract inputs (any backend) and print XLA's FLOPs before / after")
    p.add_argument("--cap", type=int, nargs="+", default=[256, 1024], help="--learner-cost: sampler caps")
    p.add_argument("--longest", type=int, default=256, help="--learner-cost: the longest real response")
    a = p.parse_args()
    s = SIZES[a.size]
    rows_list = a.rows or list(s["rows"])
    hf_rows = rows_list if a.hf_rows is None else a.hf_rows
    backend = jax.default_backend()
    cfg = config_from_dict(hf_config(a.size).to_dict())
    if a.learner_cost:
        out = [r for cap in a.cap for r in learner_cost_rows(cfg, a.size, cap, a.longest)]
        if a.json:
            for r in out:
                print(json.dumps(r), flush=True)
            return
        print(f"\nthe update's FLOPs (XLA cost analysis of the compiled program, loops per iteration; {backend}): "
              f"{a.size}, {s['learner_sequences']} sequences, micro-batches of {s['micro']}\n")
        print(table(out))
        return
    if a.size != "tiny" and backend == "cpu":
        raise SystemExit("no GPU / TPU visible to JAX: run --size tiny for a smoke test on CPU")
    model = Model(cfg, init_params(cfg, jax.random.key(0), param_dtype=jnp.bfloat16), dtype=jnp.bfloat16)
    bandwidth = copy_bandwidth(s["copy_gib"])
    peak = matmul_peak(s["matmul"])
    hf = hf_model(a.size) if hf_rows and "decode" in a.parts else None
    results = []
    for rows in rows_list if "decode" in a.parts else []:
        ours, prompt_len = ours_seconds(model, a.size, rows, a.repeats)
        tokens = rows * s["new"]
        roof = roofline_tokens_per_s(model, rows, prompt_len, s["new"], bandwidth)
        r = dict(rows=rows, new_tokens=s["new"], ours_tok_s=tokens / ours, hf_tok_s=None, ratio=None,
                 roofline_tok_s=roof, pct_roofline=100 * tokens / ours / roof)
        if hf is not None and rows in hf_rows:
            ref = hf_seconds(hf, a.size, rows, a.repeats)
            r.update(hf_tok_s=tokens / ref, ratio=ref / ours)
        results.append(r)
        if a.json:
            print(json.dumps(r), flush=True)
    update = None
    if "learner" in a.parts:
        seconds, batch = learner_seconds(cfg, a.size, a.repeats)
        model = learner_model_flops(cfg, batch, towers=batch.num_sequences)
        work = learner_model_flops(cfg, batch, towers=batch.num_sequences // SAMPLES)
        update = dict(sequences=batch.num_sequences, tokens=batch.input_ids.shape[1], micro=s["micro"],
                      devices=jax.device_count(), step_s=seconds, model_TFLOP=model / 1e12,
                      model_TFLOP_s=model / seconds / 1e12, mfu_pct=100 * model / seconds / peak,
                      work_TFLOP=work / 1e12, work_mfu_pct=100 * work / seconds / peak)
        if a.json:
            print(json.dumps(dict(learner=update)), flush=True)
    peaks = dict(device=str(jax.devices()[0].device_kind), copy_GB_s=bandwidth / 1e9,
                 bf16_matmul_TFLOP_s=peak / 1e12, matmul_n=s["matmul"])
    if a.json:
        print(json.dumps(peaks))
        return
    print(f"\n{a.size} on {backend} ({peaks['device']}); roofline from the copy bandwidth {peaks['copy_GB_s']:.3g} GB/s "
          f"measured here; bf16 {s['matmul']}^3 matmul {peaks['bf16_matmul_TFLOP_s']:.3g} TFLOP/s\n")
    if results:
        print("decode: our sampler vs transformers generate, ratio = hf time / our time\n")
        print(table(results))
    if update:
        print("\nupdate: Learner.step; model FLOPs as issue 15 counts them (the tower once per sequence), MFU against "
              "the bf16 matmul peak above; work: the tower once per prompt\n")
        print(table([update]))


if __name__ == "__main__":
    main()
