"""Judge throughput: in-graph verdicts (our `Judge`) against autoregressive judging with
transformers `generate` (the reference's way), same Qwen2 weights, same prompts.

    python bench/judge.py                                   # defaults: a few minutes on 2 CPU cores
    python bench/judge.py --sizes tiny small --responses 32 --annotations 4 --words 300

The batch: `responses` geometry-style responses of about `words` words, each with `annotations`
visual annotations; every (response, annotation) pair is one judge prompt (the chat template of
`pr1_jax.judge`, Qwen2 tokenizer of tests/fixtures). Three ways to judge it:

- ours, shared: `Judge(...)` as the trainer calls it: per response ONE prefill of
  [prefix | statement 1 | ... | statement K], verdicts read from the yes/no logits in-graph;
- ours, unshared: the same `Judge`, but each (response, annotation) pair sent as its own row
  (K = 1): what prefix sharing saves;
- reference: each pair's prompt rendered with the chat template, batched (left-padded, `batch`
  prompts per call) through `generate` for `new` greedy tokens (min = max, so every call does the
  same work), decoded, and the verdict read with a regex (yes/no), as an HTTP judge server
  (vLLM in the paper's code) and the reward function's regex would.

All three include the host work (tokenizing, packing, decoding). Reported: responses/s and
judge prompts/s, and the ratios. A margin check compares our verdict logits with the first
generated step's yes/no logits of transformers (they must agree: same prompt, same weights).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from common import checkpoint, fastest_torch_threads, interleaved_times, param_count, table  # first: sets env
import jax
import numpy as np
import torch

from models import load_pretrained
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.judge import Judge, JudgeConfig, render_prompt

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "qwen2_tokenizer"
VOCAB = 151665  # the Qwen2 tokenizer's ids fit
VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def make_batch(n: int, k: int, words: int, rng: np.random.Generator):
    """n responses of about `words` words in the <think>/<answer> format, k annotations each."""
    facts = ["AB = {}", "BC = {}", "angle ABC = {} degrees", "the radius is {}", "CD is parallel to AB",
             "triangle ABC is isosceles", "the area is {}", "AC = {}", "angle C is a right angle"]
    responses, annotations = [], []
    for _ in range(n):
        steps, count = [], 0
        while count < words:
            s = f"Step {len(steps) + 1}: " + rng.choice(facts).format(int(rng.integers(2, 99))) + \
                ", so we use it in the next equation."
            steps.append(s)
            count += len(s.split())
        answer = int(rng.integers(1, 100))
        responses.append(f"<think>\n{' '.join(steps)}\n</think>\n<answer>\n\\boxed{{{answer}}}\n</answer>")
        annotations.append([rng.choice(facts).format(int(rng.integers(2, 99))) + "." for _ in range(k)])
    return responses, annotations


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "medium"])
    p.add_argument("--responses", type=int, default=16)
    p.add_argument("--annotations", type=int, default=4)
    p.add_argument("--words", type=int, default=150, help="words per response (~1.6 tokens each)")
    p.add_argument("--new", type=int, default=4, help="tokens the reference judge generates per prompt")
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call / rows per judge call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the reference; 0 = the faster of 1 and all cores")
    args = p.parse_args()
    tok = load_tokenizer(TOKENIZER)
    responses, annotations = make_batch(args.responses, args.annotations, args.words, np.random.default_rng(0))
    n, k = args.responses, args.annotations
    cfg = JudgeConfig(length_buckets=(256, 384, 512, 768, 1024, 1536, 2048), annotation_buckets=(1, 2, 4, 8, 16),
                      max_response_tokens=2048, max_rows_per_call=args.batch)
    # The unshared variant: one row per (response, annotation), K = 1.
    flat_resp = [r for r, anns in zip(responses, annotations) for _ in anns]
    flat_anns = [[a] for anns in annotations for a in anns]
    prompts = [render_prompt(tok, cfg, r, a[0]) for r, a in zip(flat_resp, flat_anns)]
    prompt_tokens = [len(tok(x, add_special_tokens=False)["input_ids"]) for x in prompts]
    tok.padding_side = "left"
    yes = [tok.convert_tokens_to_ids(t) for t in cfg.yes_tokens]
    no = [tok.convert_tokens_to_ids(t) for t in cfg.no_tokens]

    rows, summary = [], []
    for size in args.sizes:
        hf, path = checkpoint("qwen2", size, vocab_size=VOCAB)
        judge = Judge.from_model(tok, load_pretrained(path), cfg)
        shared = lambda: judge(responses, annotations)  # noqa: E731
        unshared = lambda: judge(flat_resp, flat_anns)  # noqa: E731

        def reference(scores=False):
            verdicts, firsts = [], []
            for s in range(0, len(prompts), args.batch):
                enc = tok(prompts[s:s + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
                with torch.no_grad():
                    out = hf.generate(**enc, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                                      pad_token_id=tok.pad_token_id, output_scores=scores,
                                      return_dict_in_generate=True)
                texts = tok.batch_decode(out.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                verdicts += [1.0 if (m := VERDICT.search(t)) and m.group(1).lower() == "yes" else 0.0 for t in texts]
                if scores:
                    firsts.append(out.scores[0].float().numpy())
            return verdicts, (np.concatenate(firsts) if scores else None)

        # Same prompts, same weights: our verdict logits = transformers' first generated step.
        _, first = reference(scores=True)
        lse = lambda x: np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)  # noqa: E731
        hf_margin = lse(first[:, yes].astype(np.float64)) - lse(first[:, no].astype(np.float64))
        ours_margin = np.concatenate(shared()["margins"])
        margin_diff = float(np.abs(ours_margin - hf_margin).max())

        if args.threads:
            torch.set_num_threads(args.threads)
        threads = args.threads or fastest_torch_threads(reference, repeats=1)
        times = interleaved_times(dict(shared=shared, unshared=unshared, reference=reference), args.repeats)
        t_shared, t_unshared, t_ref = (times[x][0] for x in ("shared", "unshared", "reference"))
        out = shared()
        for name, t, calls in (("ours, shared prefix", t_shared, out["shapes"]),
                               ("ours, one row per annotation", t_unshared, judge(flat_resp, flat_anns)["shapes"]),
                               (f"transformers generate ({args.new} tokens, {threads} thr)", t_ref,
                                f"{-(-len(prompts) // args.batch)} call(s) of <= {args.batch} prompts")):
            rows.append(dict(size=size, params=param_count(judge.params), method=name, responses_s=n / t,
                             prompts_s=n * k / t, ms=1e3 * t, calls=str(calls)))
            print(table(rows[-1:]), flush=True)
        summary.append(dict(size=size, shared_vs_generate=t_ref / t_shared, unshared_vs_generate=t_ref / t_unshared,
                            shared_vs_unshared=t_unshared / t_shared, max_margin_diff=margin_diff))
    print(f"\njudge: {n} responses x {k} annotations = {n * k} prompts of {min(prompt_tokens)}-{max(prompt_tokens)} "
          f"tokens ({jax.devices()[0].platform}, {os.cpu_count()} cores; medians of {args.repeats} interleaved runs)\n")
    print(table(rows))
    print("\nratios (time of the slower way / time of ours, > 1 = ours faster)\n")
    print(table(summary))


if __name__ == "__main__":
    main()
