"""Projection of a full Perception-R1 run on a TPU v5p slice: FLOPs and bytes counted from the model
configs and the run's shapes, turned into time with the chip's published numbers and an assumed
utilisation. Nothing here is measured on a TPU; the script only does arithmetic (instant).

    python bench/projection.py                                # paper run, v5p-64 (32 chips)
    python bench/projection.py --chips 8 --lengths cap --mfu 0.3
    python bench/projection.py --model qwen3vl8b --patches 784   # Qwen3-VL-8B + Qwen3-32B, 448 px images

Run: 1,442 prompts x 8 samples x 25 epochs, 128 prompts per step (16 per host x 8 hosts of
`configs/paper_qwen25vl7b_v5p.yaml`), response lengths drawn from `--lengths` (as
`bench/rollout_cost.py`: default lognormal, median 600, sigma 0.9, capped at 4096; `cap` = every
response at the cap, an upper bound), prompts of `--prompt` tokens with one `--patches`-patch image.

Per step:
  sample  prefill (shared by the n samples) + vision tower, then decode. Decode is a roofline:
          each step costs max(FLOPs / (chips x peak x mfu), HBM bytes / bandwidth, ICI bytes /
          ICI bandwidth). HBM bytes per chip = the decode weights (bf16, the compute dtype
          `QwenCausalLM.decode_params` casts to) split over `tensor` only, as every chip's rows
          multiply all of them (however they are held: all-gathered for the step or gathered for
          the call), plus a sampler's measured ratio (`bench/rollout_cost.py`, 7B, 1,024 rows,
          the same lengths: `MEASURED_RATIOS`, or `--decode-ratios`) x the chip's share of the
          KV the step must read: each live group's prompt KV once and each live row's response
          KV so far (bf16). The ratios are measured on the weights and KV together, their excess
          is the KV's (chunk and bucket padding, fp32 attention scores) and the per-row logits'.
          The whole-cache sampler (before issue 24) computes every row until the longest stops,
          the live sampler the live rows. The FSDP weight all-gather (bf16) is received per chip
          at every step, or once per sampler call where the config's `sampling.gather_weights`
          is on (the paper configs; `--gather-weights` overrides): "now" is the config's, and
          both are shown.
          The sampler's vision tower runs per row ("now"); before, it attended over all
          prompts' patches at once ([P, P], P = prompts x patches), whose memory capped a
          sampler call at `--sampler-max-prompts` prompts, so a step decoded in several calls
          ("before" rows).
  judge   one prefill per response of [system + response + K annotations], rounded up to the
          judge's length bucket (now: the paper config's buckets; before: 1024 / 2048 / 4096 /
          8192), dense [T, T] attention.
  update  forward + backward + remat forward (8 x params x tokens) and attention, the vision
          tower once per prompt. "before": every sequence padded to the prompt plus the response
          bucket of the step's longest response (`learner.packing: off`), dense [T, T] attention;
          "now": the paper config's packed rows (`learner.packing: groups`, rows of
          `max_tokens_per_micro_batch` holding whole groups, `pr1_jax.packing.place`), the
          block-sparse attention's pairs (the most a row of the step needs, bucketed, for every
          row: `pr1_jax.packing.layout`). The LM head is not rematerialised (forward +
          backward only). With `--lengths` the
          responses' lengths are drawn (`bench/update_cost.py`), e.g. the long-tailed
          `lognormal:median=600,sigma=0.9`; the response mean of the other phases is then theirs.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import response_lengths, table  # noqa: E402
from memory import MODELS  # noqa: E402
from models.attention import pair_block  # noqa: E402
from pr1_jax.learner import LearnerConfig  # noqa: E402
from pr1_jax.packing import layout, micro_bucket  # noqa: E402
from pr1_jax.rollout import response_bucket  # noqa: E402
from pr1_jax.sampling import SamplingConfig  # noqa: E402

LOGNORMAL = "lognormal:median=600,sigma=0.9,cap=4096"
# bytes accessed / bytes needed of a rollout's decode, (whole-cache sampler, live sampler):
# `python bench/rollout_cost.py --configs 7b --rows 1024` (docs/PERFORMANCE.md).
MEASURED_RATIOS = {LOGNORMAL: (12.88, 1.767), "cap": (2.538, 1.599)}

V5P = dict(peak=459e12, hbm=95 * (1 << 30), hbm_bw=2765e9, ici_bw=4800e9 / 8)  # per chip; ICI 4,800 Gbps
A800 = dict(peak=312e12)  # bf16 dense, per GPU


def head_dim(t: dict) -> int:
    return t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]


def text_params(t: dict) -> tuple[float, float]:
    """(matmul params of the decoder layers, LM head params)."""
    d, hd = t["hidden_size"], head_dim(t)
    per = d * (t["num_attention_heads"] + 2 * t["num_key_value_heads"]) * hd + t["num_attention_heads"] * hd * d \
        + 3 * d * t["intermediate_size"]
    return per * t["num_hidden_layers"], d * t["vocab_size"]


def vision_params(v: dict) -> float:
    """Matmul params of the tower: blocks (Qwen2.5-VL's gated MLP has 3 matrices, Qwen3-VL's 2),
    the merger and Qwen3-VL's DeepStack mergers, the patch embedding."""
    w, m = v["hidden_size"], v["intermediate_size"]
    merged = w * 4
    mlp = 2 if "deepstack_visual_indexes" in v else 3
    mergers = 1 + len(v.get("deepstack_visual_indexes", ()))
    patch_dim = 3 * 2 * v["patch_size"] ** 2
    return v["depth"] * (4 * w * w + mlp * w * m) + mergers * (merged * merged + merged * v["out_hidden_size"]) \
        + patch_dim * w


OLD_JUDGE_BUCKETS = (1024, 2048, 4096, 8192)  # the paper configs' judge buckets before the fix
CONFIGS = {m: Path(__file__).resolve().parents[1] / "configs" / f"paper_{m}_v5p.yaml" for m in MODELS}


def bucket(n: int, buckets) -> int:
    return next((b for b in buckets if n <= b), buckets[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen25vl7b", choices=list(MODELS),
                   help="qwen25vl7b (Qwen2.5-VL-7B + Qwen2.5-32B) or qwen3vl8b (Qwen3-VL-8B + Qwen3-32B)")
    p.add_argument("--chips", type=int, default=32)
    p.add_argument("--tensor", type=int, default=4)
    p.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak for prefill / update matmuls")
    p.add_argument("--records", type=int, default=1442)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--prompts-per-step", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--patches", type=int, default=1024)
    p.add_argument("--response-max", type=int, default=4096)
    p.add_argument("--lengths", default=LOGNORMAL, help="response lengths (bench/rollout_cost.py's --lengths)")
    p.add_argument("--decode-ratios", type=float, nargs=2, default=None, metavar=("WHOLE_CACHE", "LIVE"),
                   help="bytes accessed / needed of the two samplers (default: MEASURED_RATIOS for --lengths)")
    p.add_argument("--gather-weights", default="config", choices=["config", "on", "off"],
                   help="the sampler's decode weights gathered once per call or all-gathered per step "
                        "(default: the config's sampling.gather_weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--annotations", type=int, default=8)
    p.add_argument("--judge-overhead", type=int, default=120, help="system + template tokens of a judge row")
    p.add_argument("--annotation-tokens", type=int, default=20, help="tokens per annotation branch")
    p.add_argument("--sampler-max-prompts", type=int, default=40,
                   help="prompts per sampler call that fit before the per-row vision fix "
                        "(bench/memory.py --sampler-vision packed: 320-336 rows on v5p)")
    a = p.parse_args()
    rows_per_step = a.prompts_per_step * a.n
    lengths = response_lengths(a.lengths, rows_per_step, a.response_max, a.seed)
    config = CONFIGS[a.model]
    learner = yaml.safe_load(config.read_text())["learner"]

    policy, jt = MODELS[a.model]
    t, v = policy["text_config"], policy["vision_config"]
    dec, head = text_params(t)
    vis = vision_params(v)
    jdec, _ = text_params(jt)
    # d: the attention width (heads x head_dim) in the [T, T] terms (Qwen3-32B's 8192 > hidden 5120).
    L, d = t["num_hidden_layers"], t["num_attention_heads"] * head_dim(t)
    jd = jt["num_attention_heads"] * head_dim(jt)
    kvd = t["num_key_value_heads"] * head_dim(t)
    chips, peak = a.chips, V5P["peak"]
    flops_s = chips * peak * a.mfu
    steps = math.ceil(a.records * a.epochs / a.prompts_per_step)
    whole_ratio, live_ratio = a.decode_ratios or MEASURED_RATIOS[a.lengths]
    b, r, tp, pp = a.prompts_per_step, int(round(lengths.mean())), a.prompt, a.patches
    vw, vd = v["hidden_size"], v["depth"]

    # -- sample
    prefill = 2 * dec * tp * b + 2 * head * b + 2 * vis * pp * b + 4 * L * tp * tp * d * b
    vis_packed_attn = 4 * vd * (b * pp) ** 2 * vw  # one [P, P] over the whole batch's patches
    vis_per_image_attn = 4 * vd * pp * pp * vw * b
    fsdp = chips // a.tensor
    # bf16 decode weights a chip receives to hold them split over `tensor` only
    gather_bytes = 2 * (dec + head) / a.tensor * (fsdp - 1) / fsdp
    gather = {"on": True, "off": False}.get(a.gather_weights,
                                          yaml.safe_load(config.read_text())["sampling"].get(
                                              "gather_weights", SamplingConfig.gather_weights))

    def decode(lengths, ratio: float, live: bool, gather_per_step: bool = True) -> tuple[float, float]:
        """(seconds, FLOPs) of one sampler call decoding rows (groups of n) that stop at `lengths`:
        HBM bytes = ratio x the bytes needed (see the module docstring); FLOPs of the live rows
        (`live`) or of every row over the whole cache; the FSDP weight all-gather once per step,
        or once per call (held gathered: 2 x params / tensor bytes per chip, e.g. 3.5 GiB for the
        7B at tensor 4)."""
        t_sum = f_sum = 0.0
        rows, cap = len(lengths), a.response_max
        for s in range(int(lengths.max())):
            alive = lengths > s
            n_live, g_live = int(alive.sum()), int(alive.reshape(-1, a.n).any(-1).sum())
            f = (n_live * (2 * (dec + head) + 4 * L * (tp + s) * d) if live
                 else rows * (2 * (dec + head) + 4 * L * (tp + cap) * d))
            kv = (g_live * tp + n_live * (s + 1)) * L * 2 * kvd * 2  # bf16 K and V
            hbm = 2 * (dec + head) / a.tensor + ratio * kv / chips
            ici = gather_bytes if gather_per_step else 0.0
            t_sum += max(f / flops_s, hbm / V5P["hbm_bw"], ici / V5P["ici_bw"])
            f_sum += f
        if not gather_per_step:  # the one gather of the call
            t_sum += gather_bytes / V5P["ici_bw"]
        return t_sum, f_sum

    decode_step_t, decode_f = decode(lengths, live_ratio, live=True)
    decode_once_t = decode(lengths, live_ratio, live=True, gather_per_step=False)[0]
    decode_t = decode_once_t if gather else decode_step_t
    whole_t, whole_f = decode(lengths, whole_ratio, live=False)
    whole_once_t = decode(lengths, whole_ratio, live=False, gather_per_step=False)[0]
    # Before per-row vision the packed vision attention capped a sampler call at
    # `sampler_max_prompts` (bench/memory.py): the step's prompts went through in several calls of
    # the whole-cache sampler, each re-reading and re-gathering the weights.
    calls = math.ceil(b / a.sampler_max_prompts)
    per_call = math.ceil(b / calls) * a.n
    decode_chunked_t = sum(decode(lengths[i:i + per_call], whole_ratio, live=False)[0]
                           for i in range(0, len(lengths), per_call))
    # -- judge: rows padded to the config's length bucket (before the fix: 4096 -> 8192)
    jrow = a.judge_overhead + r + a.annotations * a.annotation_tokens
    buckets = yaml.safe_load(config.read_text())["judge"]["length_buckets"]
    judge_flops = lambda n: rows_per_step * (2 * jdec * n + 4 * jt["num_hidden_layers"] * n * n * jd)  # noqa: E731
    jlen_old, jlen = bucket(jrow, OLD_JUDGE_BUCKETS), bucket(jrow, buckets)
    judge_old, judge = judge_flops(jlen_old), judge_flops(jlen)
    # -- update (remat: forward twice + backward = 4 forward-equivalents)
    def update_flops(rows: int, length: int, responses: int, pairs: float) -> float:
        """rows of `length` tokens, the LM head at `responses` tokens (all for packed rows), `pairs`
        query-key pairs per row and layer; the vision tower once per prompt. The head is outside
        the rematerialised layers: forward + backward."""
        return 4 * (rows * (2 * dec * length + 4 * L * pairs * d) + b * (2 * vis * pp + 4 * vd * pp * pp * vw)) \
            + 3 * rows * 2 * head * responses

    bucket_len = response_bucket(int(lengths.max()), LearnerConfig.response_buckets, a.response_max)
    seq = tp + bucket_len
    update_old = update_flops(rows_per_step, seq, bucket_len, seq * seq)
    row = learner["max_tokens_per_micro_batch"]
    shards = chips // a.tensor
    placed, pairs = layout([tp] * b, lengths, a.n, learner["packing"], row)
    packed_rows = micro_bucket(-(-len(placed) // shards)) * shards
    update = update_flops(packed_rows, row, row, micro_bucket(max(map(len, pairs))) * pair_block(row) ** 2)

    hours = lambda sec: sec * steps / 3600  # noqa: E731
    rows = [
        dict(phase="sample: prefill + per-row vision (now)", pflop=(prefill + vis_per_image_attn) / 1e15,
             s_per_step=(prefill + vis_per_image_attn) / flops_s),
        dict(phase="sample: packed [P,P] vision attention (before)", pflop=vis_packed_attn / 1e15,
             s_per_step=vis_packed_attn / flops_s),
        dict(phase=f"sample: decode, whole-cache sampler (before issue 24, ratio {whole_ratio})", pflop=whole_f / 1e15,
             s_per_step=whole_t),
        dict(phase=f"sample: decode, live sampler (ratio {live_ratio}), weights all-gathered per step"
                   f"{'' if gather else ' (now)'}", pflop=decode_f / 1e15, s_per_step=decode_step_t),
        dict(phase="sample: decode, whole cache, weights gathered once", pflop=whole_f / 1e15,
             s_per_step=whole_once_t),
        dict(phase=f"sample: decode, live, weights gathered once per call{' (now)' if gather else ''}",
             pflop=decode_f / 1e15, s_per_step=decode_once_t),
        dict(phase=f"sample: decode, whole cache, {calls} calls of <= {a.sampler_max_prompts} prompts (before)",
             pflop=whole_f / 1e15, s_per_step=decode_chunked_t),
        dict(phase=f"judge: rows of {jrow} -> bucket {jlen_old} (before)", pflop=judge_old / 1e15,
             s_per_step=judge_old / flops_s),
        dict(phase=f"judge: rows of {jrow} -> bucket {jlen} (now, {config.name})", pflop=judge / 1e15,
             s_per_step=judge / flops_s),
        dict(phase=f"update: {rows_per_step} x {seq} tokens, remat (before)", pflop=update_old / 1e15,
             s_per_step=update_old / flops_s),
        dict(phase=f"update: {packed_rows} packed rows x {row} tokens, remat (now)", pflop=update / 1e15,
             s_per_step=update / flops_s),
    ]
    for row in rows:
        row["run_hours"] = hours(row["s_per_step"])
    total_before = (prefill + vis_packed_attn) / flops_s + decode_chunked_t + judge_old / flops_s + update_old / flops_s
    total = (prefill + vis_per_image_attn) / flops_s + decode_t + judge / flops_s + update / flops_s
    total_whole = total - decode_t + whole_t
    print(f"{a.model}: v5p x {chips} chips ({chips * peak / 1e15:.1f} PFLOP/s bf16 peak, mfu {a.mfu}), {steps} steps of "
          f"{a.prompts_per_step} prompts x {a.n}; prompt {tp} (+{pp} patches), responses {a.lengths}: mean {r}, "
          f"median {int(np.median(lengths))}, max {int(lengths.max())} / cap {a.response_max}\n")
    print(table(rows))
    flops_run = (prefill + vis_per_image_attn + decode_f + judge + update) * steps
    ref_flops = 16 * A800["peak"] * 16 * 3600
    print(f"\ntotal per step before (packed vision -> chunked sampling, judge buckets {OLD_JUDGE_BUCKETS}, padded update): "
          f"{total_before:.0f} s = {hours(total_before):.1f} h for the run, {hours(total_before) * chips:.0f} chip-hours")
    print(f"total per step with the whole-cache sampler (per-row vision, one sampler call, the config's judge "
          f"buckets): {total_whole:.0f} s = {hours(total_whole):.1f} h, {hours(total_whole) * chips:.0f} chip-hours")
    print(f"total per step now (the live sampler, packed update): {total:.0f} s = {hours(total):.1f} h, "
          f"{hours(total) * chips:.0f} chip-hours; decode {hours(whole_t):.2f} h -> {hours(decode_t):.2f} h (weights "
          f"{'gathered once per call' if gather else 'all-gathered per step'}: sampling.gather_weights "
          f"{'on' if gather else 'off'}; all-gathered per step {hours(decode_step_t):.2f} h, gathered once "
          f"{hours(decode_once_t):.2f} h)")
    print(f"reference: 16 A800 x 16 h = 256 GPU-hours, {ref_flops / 1e18:.0f} EFLOP of bf16 peak; this run's "
          f"{flops_run / 1e18:.0f} EFLOP would be {flops_run / ref_flops:.0%} of it")


if __name__ == "__main__":
    main()
