"""VLM forward (prefill logits [B, T, V]) against transformers' PyTorch forward on the same weights.

    python bench/forward.py                                   # defaults: a few minutes on 2 CPU cores
    python bench/forward.py --sizes tiny small medium --batches 1 8 --grid 16

Each row of the batch carries one image (grid 1 x g x g patches -> g*g/4 visual tokens) between
two text runs. Both sides run the whole model: vision tower, scatter of the visual tokens, the
decoder with M-RoPE, the LM head over every position. Ours is `Model.__call__`'s jitted forward
on host-prepared inputs (positions and patch layout are computed once, outside the timing, as
the sampler and learner do); transformers gets `input_ids, attention_mask, pixel_values,
image_grid_thw, mm_token_type_ids` and computes its rope index inside. `ours_per_row` is the same
forward with the images given per row (a leading [B] axis, the learner's layout), so the vision
tower attends within each row's [P/B, P/B] block instead of over the packed [P, P] with a
block-diagonal mask. fp32 rows also report the largest logit difference (same weights, same
inputs: the two must agree). bf16 casts both models' weights to bf16 (ours: params and compute
in bf16, scores and softmax in fp32; transformers: `model.to(torch.bfloat16)`, sdpa attention).

The reference gets the faster of 1 and all cores' torch threads, per row (`hf_threads`): on a
loaded machine OpenMP's spin-waiting makes 2 threads up to 60x slower than 1.
"""

from __future__ import annotations

import argparse
import os

from common import checkpoint, fastest_torch_threads, interleaved_times, param_count, table  # first: sets env
import jax
import jax.numpy as jnp
import numpy as np
import torch

from models import load_pretrained
from reference import vlm_batch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "medium"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--grid", type=int, default=16, help="image grid g (g x g patches of 14 px, g even)")
    p.add_argument("--text", type=int, nargs=2, default=[32, 32], help="text tokens before / after the image")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the reference; 0 = the faster of 1 and all cores, per row")
    args = p.parse_args()
    rows = []
    for size in args.sizes:
        hf32, path = checkpoint(args.arch, size)
        for dtype in args.dtypes:
            bf16 = dtype == "bfloat16"
            ours = load_pretrained(path, dtype=jnp.dtype(dtype))
            hf = hf32.to(torch.bfloat16) if bf16 else hf32.to(torch.float32)
            for b in args.batches:
                ids, mask, mm, pv, thw = vlm_batch([[(1, args.grid, args.grid)]] * b, [tuple(args.text)] * b,
                                                   np.random.default_rng(0))
                x = ours.prepare_inputs(ids, mask, pv, thw)
                x = jax.device_put((x["input_ids"], x["positions"], x["attention_mask"], x["vision"]))
                run_ours = lambda: jax.block_until_ready(ours._forward(ours.params, *x))  # noqa: E731
                # The same forward with each row's image in its own vision group (the learner's
                # per-sequence layout): the tower attends over [P/B, P/B] per row, not [P, P].
                xr = jax.device_put(x[:3] + (ours.prepare_inputs(ids, mask, pv, thw, per_row=True)["vision"],))
                run_rows = lambda: jax.block_until_ready(ours._forward(ours.params, *xr))  # noqa: E731
                hf_kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             pixel_values=torch.tensor(pv).to(hf.dtype), image_grid_thw=torch.tensor(thw),
                             mm_token_type_ids=torch.tensor(mm))

                def run_hf():
                    with torch.no_grad():
                        return hf(**hf_kw).logits

                if args.threads:
                    torch.set_num_threads(args.threads)
                threads = args.threads or fastest_torch_threads(run_hf)
                times = interleaved_times(dict(ours=run_ours, rows=run_rows, hf=run_hf), args.repeats)
                (t_ours, min_ours), (t_rows, _), (t_hf, min_hf) = times["ours"], times["rows"], times["hf"]
                ref = run_hf().float().numpy()
                diff = float(np.abs(np.asarray(run_ours(), np.float32) - ref).max())
                diff = max(diff, float(np.abs(np.asarray(run_rows(), np.float32) - ref).max()))
                rows.append(dict(size=size, params=param_count(ours.params), dtype=dtype, batch=b,
                                 tokens=ids.shape[1], patches=pv.shape[0] // b, hf_threads=threads,
                                 ours_ms=1e3 * t_ours, ours_per_row_ms=1e3 * t_rows, hf_ms=1e3 * t_hf,
                                 max_abs_diff=diff, ratio=t_hf / t_ours, ratio_min=min_hf / min_ours,
                                 ratio_per_row=t_hf / t_rows))
                print(table(rows[-1:]), flush=True)
        hf32.to(torch.float32)
    print(f"\nVLM forward vs transformers ({args.arch}, {jax.devices()[0].platform}, {os.cpu_count()} cores), "
          f"ratio = hf time / our time "
          f"(medians of {args.repeats} interleaved runs; ratio_min: of the fastest runs; per_row: ours with "
          f"the vision tower run per row instead of over the packed batch)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
