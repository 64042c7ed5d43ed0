"""Decode speed on an accelerator: our sampler against transformers `generate` on the same device,
in tokens/s, their ratio and the share of the HBM roofline (copy bandwidth measured in the same
run); and the bf16 matmul peak (`matmul_peak`), the yardstick for model FLOP/s.

    python bench/accelerator.py                      # GPU / TPU: the decode issue's config, 128 and 512 rows
    python bench/accelerator.py --rows 128 --hf-rows 128 --json
    python bench/accelerator.py --size tiny          # smoke run on CPU (seconds); numbers mean nothing

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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import table  # first: sets the environment
import jax
import jax.numpy as jnp
import numpy as np

from models import Model, config_from_dict, init_params
from pr1_jax.sampling import SamplingConfig, Sampler
from reference import IMAGE, VEND, VIDEO, VSTART, vlm_batch

SIZES = {
    "1.5b": dict(
        text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6,
                  max_position_embeddings=32768),
        vision=dict(depth=32, hidden_size=1280, out_hidden_size=1536, intermediate_size=3420, num_heads=16,
                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        text_tokens=(150, 50), grid=16, new=256, rows=(128, 512), matmul=8192, copy_gib=2.0),
    "tiny": dict(  # the tests' model sizes
        text=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0,
                  max_position_embeddings=512),
        vision=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, window_size=56,
                    fullatt_block_indexes=[1]),
        text_tokens=(6, 4), grid=4, new=8, rows=(16, 32), matmul=256, copy_gib=0.0625),
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
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1.5b", choices=list(SIZES))
    p.add_argument("--rows", type=int, nargs="+", default=None, help="sequences decoded together (prompts x 8)")
    p.add_argument("--hf-rows", type=int, nargs="*", default=None, help="rows also run through transformers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON line per row count, then one for the peaks")
    a = p.parse_args()
    s = SIZES[a.size]
    rows_list = a.rows or list(s["rows"])
    hf_rows = rows_list if a.hf_rows is None else a.hf_rows
    backend = jax.default_backend()
    if a.size != "tiny" and backend == "cpu":
        raise SystemExit("no GPU / TPU visible to JAX: run --size tiny for a smoke test on CPU")
    cfg = config_from_dict(hf_config(a.size).to_dict())
    model = Model(cfg, init_params(cfg, jax.random.key(0), param_dtype=jnp.bfloat16), dtype=jnp.bfloat16)
    bandwidth = copy_bandwidth(s["copy_gib"])
    peak = matmul_peak(s["matmul"])
    hf = hf_model(a.size) if hf_rows else None
    results = []
    for rows in rows_list:
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
    peaks = dict(device=str(jax.devices()[0].device_kind), copy_GB_s=bandwidth / 1e9,
                 bf16_matmul_TFLOP_s=peak / 1e12, matmul_n=s["matmul"])
    if a.json:
        print(json.dumps(peaks))
        return
    print(f"\ndecode: our sampler vs transformers generate ({a.size}, {backend}, {peaks['device']}), ratio = hf "
          f"time / our time; roofline from the copy bandwidth {peaks['copy_GB_s']:.3g} GB/s measured here; "
          f"bf16 {s['matmul']}^3 matmul {peaks['bf16_matmul_TFLOP_s']:.3g} TFLOP/s\n")
    print(table(results))


if __name__ == "__main__":
    main()
