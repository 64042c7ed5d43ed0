"""Projection of a full Perception-R1 run on a TPU v5p slice: FLOPs and bytes counted from the model
configs and the run's shapes, turned into time with the chip's published numbers and an assumed
utilisation. Nothing here is measured on a TPU; the script only does arithmetic (instant).

    python bench/projection.py                                # paper run, v5p-64 (32 chips)
    python bench/projection.py --chips 8 --response-mean 1024 --mfu 0.3
    python bench/projection.py --model qwen3vl8b --patches 784   # Qwen3-VL-8B + Qwen3-32B, 448 px images

Run: 1,442 prompts x 8 samples x 25 epochs, 128 prompts per step (16 per host x 8 hosts of
`configs/paper_qwen25vl7b_v5p.yaml`), responses of `--response-mean` tokens (default: all 4096,
the cap; an upper bound), prompts of `--prompt` tokens with one `--patches`-patch image.

Per step:
  sample  prefill (shared by the n samples) + vision tower, then decode. Decode is a roofline:
          each step costs max(FLOPs / (chips x peak x mfu), HBM bytes / bandwidth, ICI bytes /
          ICI bandwidth) with the KV cache read once per step, the params read once per step
          (fp32: the trainer samples with the learner's fp32 state) and the FSDP weight all-gather
          (bf16) received per chip at every step (also shown: gathered once per sampler call).
          The sampler's vision tower runs per row ("now"); before, it attended over all
          prompts' patches at once ([P, P], P = prompts x patches), whose memory capped a
          sampler call at `--sampler-max-prompts` prompts, so a step decoded in several calls
          ("before" rows).
  judge   one prefill per response of [system + response + K annotations], rounded up to the
          judge's length bucket (now: the paper config's buckets; before: 1024 / 2048 / 4096 /
          8192), dense [T, T] attention.
  update  forward + backward + remat forward (8 x params x tokens) and dense attention, the
          vision tower run once per *sample* (the learner's per-sequence layout).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml

from common import table
from memory import MODELS

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
    p.add_argument("--response-mean", type=int, default=4096)
    p.add_argument("--annotations", type=int, default=8)
    p.add_argument("--judge-overhead", type=int, default=120, help="system + template tokens of a judge row")
    p.add_argument("--annotation-tokens", type=int, default=20, help="tokens per annotation branch")
    p.add_argument("--sampler-max-prompts", type=int, default=40,
                   help="prompts per sampler call that fit before the per-row vision fix "
                        "(bench/memory.py --sampler-vision packed: 320-336 rows on v5p)")
    a = p.parse_args()

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
    rows_per_step = a.prompts_per_step * a.n
    b, r, tp, pp = a.prompts_per_step, a.response_mean, a.prompt, a.patches
    vw, vd = v["hidden_size"], v["depth"]

    # -- sample
    prefill = 2 * dec * tp * b + 2 * head * b + 2 * vis * pp * b + 4 * L * tp * tp * d * b
    vis_packed_attn = 4 * vd * (b * pp) ** 2 * vw  # one [P, P] over the whole batch's patches
    vis_per_image_attn = 4 * vd * pp * pp * vw * b
    fsdp = chips // a.tensor

    def decode(rows: int, gather_per_step: bool = True) -> tuple[float, float]:
        """(seconds, FLOPs) of decoding `r` tokens for `rows` rows in one sampler call; the FSDP
        weight all-gather once per decode step, or once per call (held gathered: 2 x params /
        tensor bytes per chip, e.g. 3.5 GiB for the 7B at tensor 4)."""
        t_sum = f_sum = 0.0
        for s in range(r):
            ctx = tp + s
            f = rows * (2 * (dec + head) + 4 * L * ctx * d)
            kv = rows * ctx * L * 2 * kvd * 2  # bf16 K and V
            hbm = (kv + 4 * (dec + head)) / chips
            ici = 2 * (dec + head) / a.tensor * (fsdp - 1) / fsdp if gather_per_step else 0.0
            t_sum += max(f / flops_s, hbm / V5P["hbm_bw"], ici / V5P["ici_bw"])
            f_sum += f
        return t_sum, f_sum

    decode_t, decode_f = decode(rows_per_step)
    decode_once_t = decode(rows_per_step, gather_per_step=False)[0]
    # Today the packed vision attention caps a sampler call at `sampler_max_prompts` (bench/memory.py):
    # the step's prompts go through in several calls, each re-reading and re-gathering the weights.
    calls = math.ceil(b / a.sampler_max_prompts)
    decode_chunked_t = calls * decode(math.ceil(b / calls) * a.n)[0]
    # -- judge: rows padded to the config's length bucket (before the fix: 4096 -> 8192)
    jrow = a.judge_overhead + r + a.annotations * a.annotation_tokens
    config = CONFIGS[a.model]
    buckets = yaml.safe_load(config.read_text())["judge"]["length_buckets"]
    judge_flops = lambda n: rows_per_step * (2 * jdec * n + 4 * jt["num_hidden_layers"] * n * n * jd)  # noqa: E731
    jlen_old, jlen = bucket(jrow, OLD_JUDGE_BUCKETS), bucket(jrow, buckets)
    judge_old, judge = judge_flops(jlen_old), judge_flops(jlen)
    # -- update (remat: forward twice + backward = 4 forward-equivalents)
    seq = tp + a.response_max  # the learner pads responses to max_new_tokens
    update = 4 * rows_per_step * (2 * dec * seq + 2 * head * a.response_max + 2 * vis * pp + 4 * L * seq * seq * d
                                  + 4 * vd * pp * pp * vw)

    hours = lambda sec: sec * steps / 3600  # noqa: E731
    rows = [
        dict(phase="sample: prefill + per-row vision (now)", pflop=(prefill + vis_per_image_attn) / 1e15,
             s_per_step=(prefill + vis_per_image_attn) / flops_s),
        dict(phase="sample: packed [P,P] vision attention (before)", pflop=vis_packed_attn / 1e15,
             s_per_step=vis_packed_attn / flops_s),
        dict(phase=f"sample: decode {r} tokens, one call (now, roofline)", pflop=decode_f / 1e15, s_per_step=decode_t),
        dict(phase="sample: decode, one call, weights gathered once", pflop=decode_f / 1e15,
             s_per_step=decode_once_t),
        dict(phase=f"sample: decode in {calls} calls of <= {a.sampler_max_prompts} prompts (before)",
             pflop=decode_f / 1e15, s_per_step=decode_chunked_t),
        dict(phase=f"judge: rows of {jrow} -> bucket {jlen_old} (before)", pflop=judge_old / 1e15,
             s_per_step=judge_old / flops_s),
        dict(phase=f"judge: rows of {jrow} -> bucket {jlen} (now, {config.name})", pflop=judge / 1e15,
             s_per_step=judge / flops_s),
        dict(phase=f"update: {rows_per_step} x {seq} tokens, remat", pflop=update / 1e15, s_per_step=update / flops_s),
    ]
    for row in rows:
        row["run_hours"] = hours(row["s_per_step"])
    total_before = (prefill + vis_packed_attn) / flops_s + decode_chunked_t + judge_old / flops_s + update / flops_s
    total = (prefill + vis_per_image_attn) / flops_s + decode_t + judge / flops_s + update / flops_s
    print(f"{a.model}: v5p x {chips} chips ({chips * peak / 1e15:.1f} PFLOP/s bf16 peak, mfu {a.mfu}), {steps} steps of "
          f"{a.prompts_per_step} prompts x {a.n}; prompt {tp} (+{pp} patches), response mean {r} / max "
          f"{a.response_max}\n")
    print(table(rows))
    flops_run = (prefill + vis_per_image_attn + decode_f + judge + update) * steps
    ref_flops = 16 * A800["peak"] * 16 * 3600
    print(f"\ntotal per step before (packed vision -> chunked sampling, judge buckets {OLD_JUDGE_BUCKETS}): "
          f"{total_before:.0f} s = {hours(total_before):.1f} h for the run, {hours(total_before) * chips:.0f} chip-hours")
    print(f"total per step now (per-row vision, one sampler call, the config's judge buckets): {total:.0f} s = "
          f"{hours(total):.1f} h, {hours(total) * chips:.0f} chip-hours")
    print(f"reference: 16 A800 x 16 h = 256 GPU-hours, {ref_flops / 1e18:.0f} EFLOP of bf16 peak; this run's "
          f"{flops_run / 1e18:.0f} EFLOP would be {flops_run / ref_flops:.0%} of it")


if __name__ == "__main__":
    main()
