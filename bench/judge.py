"""Judge throughput: in-graph verdicts (our `Judge`) against autoregressive judging with
transformers `generate` (the reference's way), same Qwen2 weights, same prompts.

    python bench/judge.py                                   # defaults: a few minutes on 2 CPU cores
    python bench/judge.py --sizes tiny small --responses 32 --annotations 4 --words 300
    python bench/judge.py --prompts paper                   # the paper's prompt only

The batch: `responses` geometry-style responses of about `words` words, each with `annotations`
visual annotations. Two prompts (`--prompts`):

yesno: every (response, annotation) pair is one judge prompt (the chat template of
`pr1_jax.judge`'s yes/no prompt, Qwen2 tokenizer of tests/fixtures). Three ways to judge it:

- ours, shared: `Judge(...)` as the trainer calls it: per response ONE prefill of
  [prefix | statement 1 | ... | statement K], verdicts read from the yes/no logits in-graph;
- ours, unshared: the same `Judge`, but each (response, annotation) pair sent as its own row
  (K = 1): what prefix sharing saves;
- reference: each pair's prompt rendered with the chat template, batched (left-padded, `batch`
  prompts per call) through `generate` for `new` greedy tokens (min = max, so every call does the
  same work), decoded, and the verdict read with a regex (yes/no), as an HTTP judge server
  (vLLM in the paper's code) and the reward function's regex would.

paper: one prompt per response, the reference's messages (few-shot system turn, the tagged
annotation string, the response; `pr1_jax/judge/paper.py`). Two ways:

- ours: `Judge` with `prompt="paper"`: the system turn prefilled once per call, each row's own
  tokens on its cache, then K - 1 forced skeleton segments, the digits read from the "0"/"1"
  logits in-graph;
- reference: the rendered messages through `generate` for exactly the tokens of the answer
  `<info1>d</info1>\n...<infoK>d</infoK>` and its end-of-turn token (min = max, greedy), decoded
  and parsed with the reference's rule (its regex per tag, sum / (count + 1e-6)).

All include the host work (tokenizing, packing, decoding, parsing). Reported: responses/s and
judge prompts/s (yesno: response x annotation pairs), and the ratios, with paper against yesno
on the same batch. Checks that ours reads the logits transformers computes: the yes/no margin
against the first generated step's, and the paper's first digit's "0"/"1" logits against a
transformers forward of the prompt and `<info1>` (a random model does not write the skeleton,
so later digits are not compared here; tests/test_judge_paper.py compares all of them).
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
from pr1_jax.data.annotations import to_tagged_text
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.judge import Judge, JudgeConfig, render_prompt, skeleton_text
from pr1_jax.judge.paper import reference_reward, render_messages

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


def generate(hf, tok, prompts: list[str], new: int, batch: int, scores: bool = False):
    """Greedy `generate` of exactly `new` tokens per prompt, `batch` left-padded prompts a call:
    (decoded texts, the first step's logits [N, V] when `scores`)."""
    texts, firsts = [], []
    for s in range(0, len(prompts), batch):
        enc = tok(prompts[s:s + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = hf.generate(**enc, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                              pad_token_id=tok.pad_token_id, output_scores=scores, return_dict_in_generate=True)
        texts += tok.batch_decode(out.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        if scores:
            firsts.append(out.scores[0].float().numpy())
    return texts, (np.concatenate(firsts) if scores else None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "medium"])
    p.add_argument("--prompts", nargs="+", default=["yesno", "paper"], choices=["yesno", "paper"])
    p.add_argument("--responses", type=int, default=16)
    p.add_argument("--annotations", type=int, default=4)
    p.add_argument("--words", type=int, default=150, help="words per response (~1.6 tokens each)")
    p.add_argument("--new", type=int, default=4, help="tokens the reference yes/no judge generates per prompt")
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call / rows per judge call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the reference; 0 = the faster of 1 and all cores")
    args = p.parse_args()
    tok = load_tokenizer(TOKENIZER)
    responses, annotations = make_batch(args.responses, args.annotations, args.words, np.random.default_rng(0))
    n, k = args.responses, args.annotations
    buckets = dict(length_buckets=(256, 384, 512, 768, 1024, 1536, 2048), annotation_buckets=(1, 2, 4, 8, 16),
                   max_response_tokens=2048, max_rows_per_call=args.batch)
    cfg, paper_cfg = JudgeConfig(**buckets), JudgeConfig(prompt="paper", **buckets)
    # The unshared variant: one row per (response, annotation), K = 1.
    flat_resp = [r for r, anns in zip(responses, annotations) for _ in anns]
    flat_anns = [[a] for anns in annotations for a in anns]
    prompts = [render_prompt(tok, cfg, r, a[0]) for r, a in zip(flat_resp, flat_anns)]
    infos = [to_tagged_text(a) for a in annotations]
    paper_prompts = [tok.apply_chat_template(render_messages(i, r), tokenize=False, add_generation_prompt=True)
                     for r, i in zip(responses, infos)]
    count = lambda texts: [len(tok(x, add_special_tokens=False)["input_ids"]) for x in texts]  # noqa: E731
    prompt_tokens = {"yesno": count(prompts), "paper": count(paper_prompts)}
    # The reference's paper judge writes the skeleton, then its end-of-turn token.
    paper_new = len(tok(skeleton_text(["0"] * k), add_special_tokens=False)["input_ids"]) + 1
    tok.padding_side = "left"
    yes = [tok.convert_tokens_to_ids(t) for t in cfg.yes_tokens]
    no = [tok.convert_tokens_to_ids(t) for t in cfg.no_tokens]
    first_tag = tok("<info1>", add_special_tokens=False)["input_ids"]
    digits = [tok.convert_tokens_to_ids(d) for d in ("0", "1")]

    rows, summary = [], []
    for size in args.sizes:
        hf, path = checkpoint("qwen2", size, vocab_size=VOCAB)
        model = load_pretrained(path)
        judge, paper_judge = Judge.from_model(tok, model, cfg), Judge.from_model(tok, model, paper_cfg)
        methods, checks = {}, {}
        if "yesno" in args.prompts:
            methods["shared"] = lambda: judge(responses, annotations)
            methods["unshared"] = lambda: judge(flat_resp, flat_anns)

            def reference():
                texts, _ = generate(hf, tok, prompts, args.new, args.batch)
                return [1.0 if (m := VERDICT.search(t)) and m.group(1).lower() == "yes" else 0.0 for t in texts]

            methods["reference"] = reference
            # Same prompts, same weights: our verdict logits = transformers' first generated step.
            _, first = generate(hf, tok, prompts, 1, args.batch, scores=True)
            lse = lambda x: np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)  # noqa: E731
            hf_margin = lse(first[:, yes].astype(np.float64)) - lse(first[:, no].astype(np.float64))
            checks["max_margin_diff"] = float(np.abs(np.concatenate(judge(responses, annotations)["margins"])
                                                     - hf_margin).max())
        if "paper" in args.prompts:
            methods["paper"] = lambda: paper_judge(responses, infos)
            methods["paper_reference"] = lambda: [reference_reward(t) for t in generate(
                hf, tok, paper_prompts, paper_new, args.batch)[0]]
            ours = paper_judge(responses, infos)["answer_logits"]
            diffs = []
            for i in range(min(n, 2)):
                ids = tok(paper_prompts[i], add_special_tokens=False)["input_ids"] + first_tag
                with torch.no_grad():
                    last = hf(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
                diffs.append(np.abs(ours[i][0] - last[digits]).max())
            checks["paper_logit_diff"] = float(max(diffs))

        if args.threads:
            torch.set_num_threads(args.threads)
        slowest = methods.get("paper_reference") or methods["reference"]
        threads = args.threads or fastest_torch_threads(slowest, repeats=1)
        times = {name: t[0] for name, t in interleaved_times(methods, args.repeats).items()}
        calls = lambda prompts: f"{-(-len(prompts) // args.batch)} call(s) of <= {args.batch} prompts"  # noqa: E731
        names = {
            "shared": ("ours, yes/no, shared prefix", lambda: judge(responses, annotations)["shapes"]),
            "unshared": ("ours, yes/no, one row per annotation", lambda: judge(flat_resp, flat_anns)["shapes"]),
            "reference": (f"transformers generate, yes/no ({args.new} tokens, {threads} thr)", lambda: calls(prompts)),
            "paper": ("ours, paper prompt, shared system turn", lambda: paper_judge(responses, infos)["shapes"]),
            "paper_reference": (f"transformers generate, paper ({paper_new} tokens, {threads} thr)",
                                lambda: calls(paper_prompts)),
        }
        for key, t in times.items():
            name, shapes = names[key]
            judged = n * k if key in ("shared", "unshared", "reference") else n
            rows.append(dict(size=size, params=param_count(judge.params), method=name, responses_s=n / t,
                             prompts_s=judged / t, ms=1e3 * t, calls=str(shapes())))
            print(table(rows[-1:]), flush=True)
        ratios = dict(size=size)
        if "yesno" in args.prompts:
            ratios.update(shared_vs_generate=times["reference"] / times["shared"],
                          unshared_vs_generate=times["reference"] / times["unshared"],
                          shared_vs_unshared=times["unshared"] / times["shared"])
        if "paper" in args.prompts:
            ratios["paper_vs_generate"] = times["paper_reference"] / times["paper"]
        if len(args.prompts) == 2:
            ratios["paper_time_over_yesno"] = times["paper"] / times["shared"]
        summary.append({**ratios, **checks})
    spans = ", ".join(f"{name} prompts of {min(t)}-{max(t)} tokens" for name, t in prompt_tokens.items()
                      if name in args.prompts)
    print(f"\njudge: {n} responses x {k} annotations; {spans} ({jax.devices()[0].platform}, {os.cpu_count()} cores; "
          f"medians of {args.repeats} interleaved runs)\n")
    print(table(rows))
    print("\nratios (time of the slower way / time of ours, > 1 = ours faster; paper_time_over_yesno: the paper "
          "prompt's time over the yes/no prompt's, same batch)\n")
    print(table(summary))


if __name__ == "__main__":
    main()
