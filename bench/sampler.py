"""Sampler tokens/s against transformers `generate`, same weights, same prompts (one image each).

    python bench/sampler.py                       # defaults: a few minutes on 2 CPU cores
    python bench/sampler.py --size small --batches 1 16 64 --new 128 512

Both decode greedily for exactly `new` tokens (no EOS), so the work is identical. `ours` lays the
images out per row (what the trainer's rollout does: the vision tower attends within a row);
`ours_packed` gives the sampler the batch's packed patches (the HF layout, one [P, P] tower
attention over the whole batch), which is what the rollout did before; `packed_over_rows` is its
time over the per-row time.
"""

from __future__ import annotations

import argparse

from common import checkpoint, median_time, table  # first: sets the environment
import jax
import numpy as np
import torch

from models import load_pretrained
from pr1_jax.sampling import SamplingConfig, Sampler
from reference import vlm_batch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen2_vl")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--new", type=int, nargs="+", default=[128])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf, path = checkpoint(args.arch, args.size)
    model = load_pretrained(path)
    rows = []
    for b in args.batches:
        ids, mask, mm, pv, thw = vlm_batch([[(1, 4, 4)]] * b, [(16, 8)] * b, np.random.default_rng(0))
        inputs = model.prepare_inputs(ids, mask, pv, thw, per_row=True)
        packed = model.prepare_inputs(ids, mask, pv, thw)
        hf_kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
                     image_grid_thw=torch.tensor(thw), mm_token_type_ids=torch.tensor(mm))
        for new in args.new:
            sampler = Sampler(model.module, SamplingConfig(max_new_tokens=new, eos_ids=(-1,), pad_id=0, temperature=0.0))
            ours, ours_packed = (median_time(lambda: jax.block_until_ready(
                sampler(model.params, x, jax.random.key(0)).tokens), args.repeats) for x in (inputs, packed))

            def reference():
                with torch.no_grad():
                    hf.generate(**hf_kw, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

            ref = median_time(reference, args.repeats)
            rows.append(dict(batch=b, new_tokens=new, ours_tok_s=b * new / ours, hf_tok_s=b * new / ref,
                             ratio=ref / ours, ours_packed_tok_s=b * new / ours_packed,
                             packed_over_rows=ours_packed / ours))
            print(table(rows[-1:]), flush=True)
    print(f"\nsampler vs transformers generate ({args.arch}, {args.size}, {jax.devices()[0].platform}), "
          f"ratio = hf time / our time\n")
    print(table(rows))


if __name__ == "__main__":
    main()
