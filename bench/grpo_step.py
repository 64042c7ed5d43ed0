"""One full GRPO step of the trainer on a tiny / small config: where the time goes, and the
update's achieved FLOP/s against this machine's measured matmul peak.

    python bench/grpo_step.py                       # defaults: tiny, a few minutes on 2 CPU cores
    python bench/grpo_step.py --sizes tiny small --steps 3

The run is `pr1_jax.train.Trainer` on `pr1_jax.tiny` assets (synthetic task, random-weight Qwen2-VL
policy and Qwen2 judge of the sizes below, no warm start), batch 8 prompts x 8 samples, 64 new
tokens, as `configs/tiny.yaml`. After one step that compiles everything, each timed step runs the
trainer's pieces one after the other, each blocked on its result:

    sample   rollout: prefill + jitted decode loop + detokenize (pr1_jax.rollout)
    judge    Judge.submit(...).result(): tokenize, pack, one prefill per response, verdicts
    rewards  RewardScorer (math-verify, format, n-gram in worker processes) + combine + advantages
    update   train_batch_from_samples + Trainer.learner_batch (reference log-probs with a KL term)
             + Learner.step (forward, backward, AdamW), blocked

and then `Trainer.train_step` itself (judge and host rewards overlap there), whose wall time is
`step (trainer)`. The update's FLOPs come from XLA's cost analysis of the compiled step; XLA
counts the body of a `while` loop (our `nn.scan` over layers and micro-batches) once, so that
number is reported next to an analytic count: 6 x (matmul params) x (tokens through them), plus
attention (12 x L x T^2 x d per sequence; fwd + bwd), for the decoder and the vision tower (once
per vision group: a prompt's images, shared by its samples).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import table  # first: sets the environment
import jax
import jax.numpy as jnp
import numpy as np

from pr1_jax import train
from pr1_jax.grpo import group_advantages
from pr1_jax.rewards import combine_batch
from pr1_jax.rollout import rollout, train_batch_from_samples
from pr1_jax.tiny import build_tiny_assets

SIZES = {
    "tiny": dict(policy={}, judge={}),  # policy 128 wide, 2 layers, vision 64 x 2; judge 128 x 2
    "small": dict(policy=dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=704,
                              vision_depth=4, vision_width=128),
                  judge=dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=704)),
}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of one jitted n x n x n matmul on the default device (best of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def analytic_update_flops(cfg, batch) -> float:
    """6 x matmul params x tokens + attention, fwd + bwd, for the learner batch (see docstring)."""
    text, vis = cfg.text, cfg.vision
    n, length = batch.input_ids.shape
    r = batch.response_length
    d = text.hidden_size
    per_layer = d * (text.num_heads + 2 * text.num_kv_heads) * text.head_dim + text.num_heads * text.head_dim * d \
        + 3 * d * text.intermediate_size
    flops = 6 * per_layer * text.num_layers * n * length + 6 * d * text.vocab_size * n * r
    flops += 12 * text.num_layers * length * length * text.num_heads * text.head_dim * n
    if vis is not None and batch.vision is not None:
        g, p = batch.vision.pixel_values.shape[:2]  # the tower runs once per vision group
        w, m2 = vis.width, vis.spatial_merge_size**2
        block = 4 * w * w + (2 if vis.kind == "qwen2_vl" else 3) * w * vis.mlp_dim
        merger = (w * m2) ** 2 + w * m2 * vis.out_dim
        flops += 6 * g * (p * vis.patch_dim * w + vis.depth * p * block + p // m2 * merger)
        flops += 12 * vis.depth * p * p * w * g
    return float(flops)


class Timed:
    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def add(self, name, seconds):
        self.times.setdefault(name, []).append(seconds)

    def median(self, name):
        return statistics.median(self.times[name])


def split_step(trainer, batch, timed: Timed) -> dict:
    """The trainer's step, phase by phase, each blocked on its result; returns the learner batch."""
    t0 = time.perf_counter()
    trainer.key, key = jax.random.split(trainer.key)
    ro = rollout(trainer.policy, trainer.state.params, trainer.sampler, trainer.tokenizer, batch, key, trainer.mesh,
                 trainer.cfg.data.patch_limit_per_record)
    jax.block_until_ready(ro.samples.tokens)
    t1 = time.perf_counter()
    n = ro.n
    annotations = [a for a in batch["annotations"] for _ in range(n)]
    judged = trainer.judge.submit(ro.texts, annotations).result()
    t2 = time.perf_counter()
    host = trainer.scorer.submit(train.reward_records(trainer.cfg.reward, ro.texts, batch, n, ro.samples.lengths,
                                                      trainer.sample_cfg.max_new_tokens)).result()
    scores = combine_batch(host.terms, judged, trainer.cfg.reward.weights)
    adv = np.asarray(group_advantages(np.array([s["overall"] for s in scores], np.float32), n))
    t3 = time.perf_counter()
    tb = train_batch_from_samples(trainer.policy.config, ro.prompt_inputs, ro.samples, n, advantages=adv,
                                  example_valid=batch["example_valid"])
    gb = trainer.learner_batch(tb)
    trainer.state, m = trainer.learner.step(trainer.state, gb)
    jax.block_until_ready(m)
    t4 = time.perf_counter()
    for name, dt in (("sample", t1 - t0), ("judge", t2 - t1), ("rewards", t3 - t2), ("update", t4 - t3),
                     ("step (sum of phases)", t4 - t0)):
        timed.add(name, dt)
    timed.add("sampled tokens", float(np.asarray(ro.samples.lengths).sum()))
    return tb


def run(size: str, args, peak: float) -> tuple[list[dict], dict]:
    root = Path(tempfile.mkdtemp(prefix=f"bench-grpo-{size}-"))
    assets = build_tiny_assets(root, seed=0, n_train=256, n_val=8, **SIZES[size])
    overrides = [f"run_dir={root / 'run'}", "tiny.enabled=false", f"model.policy={assets.policy}",
                 f"model.judge={assets.judge}", f"model.tokenizer={assets.tokenizer}",
                 f"model.judge_tokenizer={assets.tokenizer}", f"data.paths=[{assets.train}]", "val_paths=[]",
                 "val_before_train=false", "val_freq=0", "save_freq=1000", f"data.batch_size={args.batch}",
                 f"sampling.n={args.n}", f"sampling.max_new_tokens={args.new}", "reward.num_workers=2",
                 "data.max_prompt_length=128", "data.length_buckets=[128]", "data.min_pixels=3136",
                 "data.max_pixels=3136", "data.max_patches_per_record=16", "judge.length_buckets=[128,256]",
                 "judge.annotation_buckets=[1,2,4]",
                 'judge.yes_tokens=["yes"]', 'judge.no_tokens=["no"]', "learner.lr=1e-3", "learner.warmup_ratio=0",
                 "data.image_column=image", "data.annotations_column=annotations"]
    trainer = train.Trainer(train.parse_config(overrides))
    timed = Timed()
    try:
        t0 = time.perf_counter()
        trainer.train_step(0, next(trainer.data))  # compiles sampler, judge, learner step
        first = time.perf_counter() - t0
        for _ in range(args.steps):
            tb = split_step(trainer, next(trainer.data), timed)
        for _ in range(args.steps):
            m = trainer.train_step(0, next(trainer.data))
            timed.add("step (trainer)", m["sec_step"])
    finally:
        trainer.scorer.close()
        trainer.metrics.close()

    # The update's FLOPs: XLA's count of the compiled step, and the analytic count.
    gb = trainer.learner_batch(tb)
    fn = next(iter(trainer.learner._steps.values()))
    cost = fn.lower(trainer.state, gb).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    analytic = analytic_update_flops(trainer.policy.config, tb)
    t_update = timed.median("update")
    n_params = sum(x.size for x in jax.tree.leaves(trainer.state.params))

    step_total = timed.median("step (sum of phases)")
    rows = [dict(size=size, phase=name, ms=1e3 * timed.median(name),
                 share=timed.median(name) / step_total if "trainer" not in name else float("nan"))
            for name in ("sample", "judge", "rewards", "update", "step (sum of phases)", "step (trainer)")]
    n_seq = args.batch * args.n
    info = dict(size=size, policy_params=n_params, sequences=n_seq, tokens_per_seq=tb.input_ids.shape[1],
                sampled_tok_s=timed.median("sampled tokens") / timed.median("sample"),
                first_step_s=first, update_xla_gflop=xla_flops / 1e9, update_analytic_gflop=analytic / 1e9,
                update_gflop_s=analytic / t_update / 1e9, matmul_peak_gflop_s=peak / 1e9,
                update_mfu=analytic / t_update / peak)
    return rows, info


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=["tiny"], choices=list(SIZES))
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one compiling step)")
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--new", type=int, default=64, help="max new tokens")
    args = p.parse_args()
    peak = matmul_peak()
    rows, infos = [], []
    for size in args.sizes:
        r, info = run(size, args, peak)
        rows += r
        infos.append(info)
        print(table(r), "\n", table([info]), flush=True)
    print(f"\nGRPO step on {jax.devices()[0].platform} ({len(jax.devices())} device), {args.batch} prompts x "
          f"{args.n} samples, <= {args.new} new tokens; medians of {args.steps} steps\n")
    print(table(rows))
    print("\nupdate FLOPs: XLA cost analysis (while bodies counted once) and analytic (used for FLOP/s);"
          " peak = measured fp32 2048^3 matmul\n")
    print(table(infos))


if __name__ == "__main__":
    main()
