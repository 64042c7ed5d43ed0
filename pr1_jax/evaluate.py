"""`python -m pr1_jax.evaluate --benchmark NAME --data PATH... (--checkpoint RUN_DIR[/STEP] | --model HF_DIR) --out R.jsonl`

Greedy evaluation on the paper's benchmarks (mathvision, mathvista, mathverse, wemath; geometry3k
and perception_r1, the training parquet; file formats in `pr1_jax/evaluation/benchmarks.py`):
one result line per problem (`id`, `correct`, `response`, ...: `pr1_jax/evaluation/report.py`),
and a report, overall and per category, printed and written as JSON (`--report`, default
R.report.json). `python -m pr1_jax.mcnemar A.jsonl B.jsonl` compares two result files.

Modes
  (default)          responses from our sampler (greedy, length buckets, `--max-new-tokens`,
                     `--batch-size`), scored as they come and appended to --out; a rerun resumes
                     (problems already in --out are not generated again; `--no-resume` starts over)
                     when R.source.json beside --out says the same evaluation produced them
                     (benchmark and files, checkpoint and step or model, decoding and prompt
                     settings), and refuses rows of anything else
  --prompts-only     with `--tokenizer DIR`: one line per problem {"id", "prompt", "images"} (the
                     rendered chat, the image paths), no model
  --score RESP.jsonl scores a response file (lines {"id", "response"}), no policy
  --answer-judge DIR with either of the above: the reference's LLM answer judge (a Qwen2 /
                     Qwen2.5 checkpoint) decides `correct`; the rules' verdict stays in `rules`

The prompt is the reference's: the question (choices as "A. text" lines, per benchmark) with the
format prompt after one space, the image first, the tokenizer's chat template with the
generation prompt. With --checkpoint the run's data settings (tokenizer, chat template, pixel
bounds, format prompt, prompt length) are the starting point and its stop tokens end a response;
with --model the reference's format prompt (`format_prompt=paper` in the user turn) and stop
tokens (<|im_end|>, <|endoftext|>). `key=value` arguments override DataConfig fields, e.g.
`max_prompt_length=8192` (longer prompts are skipped and counted) or `format_prompt=project
format_prompt_placement=system`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from models.config import ConfigError as ModelConfigError
from models.weights import CheckpointError
from pr1_jax import configlib
from pr1_jax.checkpoint import CheckpointRestoreError
from pr1_jax.data.config import DataConfig
from pr1_jax.data.processing import ExampleProcessor, load_tokenizer
from pr1_jax.data.records import BadRecordError
from pr1_jax.evaluation import scoring
from pr1_jax.evaluation.benchmarks import BENCHMARKS, Problem, eval_data_config, read_problems
from pr1_jax.evaluation.report import build_report, check_resumable, format_table, read_rows, source_path
from pr1_jax.export import quiet_logging
from pr1_jax.rewards import RewardConfig, RewardScorer

log = logging.getLogger("pr1_jax")

# The reference's generation config (Qwen2-VL / Qwen2.5-VL Instruct): it stops at either.
REFERENCE_STOP = ("<|im_end|>", "<|endoftext|>")


def scorer_config(workers: int) -> RewardConfig:
    """The rules' verdict and the format reward, each call bounded in a worker process."""
    return RewardConfig(weights={"benchmark_correct": 1.0, "format": 0.0}, options={}, timeout_s=10.0,
                        num_workers=workers)


def submit_scores(scorer: RewardScorer, problems: Sequence[Problem], responses: Sequence[str]):
    """The scorer's future for these responses (`result_rows` reads it)."""
    return scorer.submit([dict(response=r, ground_truth=p.answer, choice=p.choice, options=p.options,
                               option_values=p.option_values, precision=p.precision)
                          for p, r in zip(problems, responses)])


def result_rows(problems: Sequence[Problem], responses: Sequence[str], scores,
                response_tokens: Sequence[int] | None = None) -> list[dict]:
    """One result line per problem (see `pr1_jax.evaluation.report`)."""
    rows = []
    tokens = response_tokens if response_tokens is not None else [None] * len(problems)
    for p, r, t, n in zip(problems, responses, scores.result().terms, tokens):
        row = dict(id=p.id, correct=int(t["benchmark_correct"]), rules=int(t["benchmark_correct"]),
                   format=int(t["format"]), answer=p.answer, extracted=scoring.final_answer(r), response=r,
                   categories={k: list(v) if isinstance(v, tuple) else v for k, v in p.categories.items()})
        if n is not None:
            row["response_tokens"] = int(n)
        if p.group is not None:
            row.update(group=p.group, step=p.step)
        if p.annotations:
            row["annotations"] = list(p.annotations)
        rows.append(row)
    return rows


def write_rows(path: Path, rows: Sequence[dict], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open(mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def prompts_only(problems: Sequence[Problem], data: DataConfig, tokenizer_dir: str, out: Path,
                 unreadable: collections.Counter) -> None:
    proc = ExampleProcessor(data, load_tokenizer(tokenizer_dir, data.chat_template_path))
    rows = []
    for p in problems:
        try:
            prompt = proc.prompt_text(p.record())
        except ValueError as e:  # e.g. placeholders that do not match the images
            unreadable["invalid_record"] += 1
            log.warning("skipping problem %r: %s", p.id, e)
            continue
        rows.append(dict(id=p.id, prompt=prompt, images=[img.describe() for img in p.images]))
    write_rows(out, rows)
    log.info("wrote %d prompts to %s", len(rows), out)


def read_responses(path: str, problems: Sequence[Problem]) -> tuple[list[Problem], list[str]]:
    """The problems a response file answers (in benchmark order) and their responses (an id twice
    is an error: `read_rows`)."""
    responses = {}
    for row in read_rows(path):
        if not isinstance(row.get("response"), str):
            raise ValueError(f"{path}: the line of {row['id']!r} has no response text")
        responses[str(row["id"])] = row["response"]
    known = {p.id for p in problems}
    unknown = sorted(set(responses) - known)
    if unknown:
        log.warning("%s: %d responses for ids that are not problems of the benchmark files (e.g. %r), ignored",
                    path, len(unknown), unknown[0])
    answered = [p for p in problems if p.id in responses]
    if len(answered) < len(problems):
        log.warning("%s answers %d of %d problems", path, len(answered), len(problems))
    return answered, [responses[p.id] for p in answered]


def generate_and_score(args, problems: Sequence[Problem], data: DataConfig, out: Path,
                       skips: collections.Counter) -> None:
    """Responses from the policy, scored and appended to `out` batch by batch (scoring a batch in
    the workers while the next one is generated)."""
    from pr1_jax.evaluation.generation import generate, greedy_config
    from pr1_jax.export import load_run_policy
    from pr1_jax.sampling import SamplingConfig
    from pr1_jax.sharding import load_model, make_mesh

    mesh = make_mesh()
    if args.checkpoint:
        cfg, _, model = load_run_policy(args.checkpoint, mesh)
        sampling = cfg.sampling
    else:
        model, sampling = load_model(args.model, mesh, dtype=args.dtype), SamplingConfig(eos_tokens=REFERENCE_STOP)
    tokenizer = load_tokenizer(data.tokenizer_path, data.chat_template_path)
    by_id = {p.id: p for p in problems}
    done, pending = 0, None
    with RewardScorer(scorer_config(args.workers)) as scorer:
        for ids, ro in generate(model, model.params, tokenizer, problems, data,
                                greedy_config(sampling, args.max_new_tokens, tokenizer), mesh, skips):
            if pending:
                write_rows(out, result_rows(*pending), "a")
            batch = [by_id[i] for i in ids]
            pending = (batch, ro.texts, submit_scores(scorer, batch, ro.texts), ro.samples.lengths.tolist())
            done += len(ids)
            log.info("generated %d / %d", done, len(problems))
        if pending:
            write_rows(out, result_rows(*pending), "a")


def judge_answers(args, problems: Sequence[Problem], rows: list[dict]) -> None:
    """`correct` = the reference's answer judge's verdict, in place; `judge`, `judge_margin` beside."""
    from pr1_jax.evaluation.answer_judge import AnswerJudge
    from pr1_jax.sharding import make_mesh

    by_id = {p.id: p for p in problems}
    judge = AnswerJudge.load(args.answer_judge, mesh=make_mesh(), dtype=args.judge_dtype,
                             tokenizer_path=args.answer_judge_tokenizer)
    result = judge.submit([by_id[r["id"]] for r in rows], [r["response"] for r in rows]).result()
    for r, v, m in zip(rows, result["verdicts"], result["margins"]):
        r.update(correct=int(v[0]), judge=int(v[0]), judge_margin=float(m[0]))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pr1_jax.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data", nargs="+", required=True, help="the benchmark's files or directories")
    p.add_argument("--image-root", help="directory relative image paths are read from (default: each file's)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="RUN_DIR (latest step) or RUN_DIR/STEP of a pr1_jax.train run")
    src.add_argument("--model", help="a Hugging Face checkpoint directory (e.g. an export)")
    src.add_argument("--prompts-only", action="store_true", help="write the prompts, no model (needs --tokenizer)")
    src.add_argument("--score", metavar="RESPONSES", help="score a response file ({'id', 'response'} lines)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's or the run's)")
    p.add_argument("--out", required=True, help="result (or prompt) lines, JSONL")
    p.add_argument("--report", help="the report's JSON (default: <out>.report.json)")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of --model (default bfloat16)")
    p.add_argument("--no-resume", action="store_true", help="start --out over instead of resuming it")
    p.add_argument("--workers", type=int, default=4, help="scoring worker processes")
    p.add_argument("--answer-judge", metavar="HF_DIR", help="the LLM answer judge (Qwen2 / Qwen2.5 checkpoint)")
    p.add_argument("--answer-judge-tokenizer", help="its tokenizer directory (default: HF_DIR)")
    p.add_argument("--judge-dtype", default="bfloat16")
    p.add_argument("overrides", nargs="*", help="DataConfig field=value")
    args = p.parse_intermixed_args(argv)
    for flag in ("max_new_tokens", "batch_size", "workers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not (args.checkpoint or args.model or args.prompts_only or args.score):
        p.error("give --checkpoint or --model (generate), --prompts-only, or --score")
    if args.prompts_only and not args.tokenizer:
        p.error("--prompts-only needs --tokenizer")
    return args


def data_config(args) -> DataConfig:
    if args.checkpoint:
        from pr1_jax.config import TrainConfig
        from pr1_jax.export import locate

        cfg = configlib.load(TrainConfig, locate(args.checkpoint)[0] / "config.yaml")
        base, tok = cfg.data, args.tokenizer or cfg.model.tokenizer or cfg.model.policy
    else:
        base = DataConfig(format_prompt="paper", format_prompt_placement="user")
        tok = args.tokenizer or args.model or ""
        # A Qwen3-VL checkpoint takes Qwen3-VL's image geometry unless overridden.
        if args.model and (Path(args.model) / "config.json").exists():
            from models.config import load_config

            vision = load_config(args.model).vision
            if vision is not None and vision.kind == "qwen3_vl":
                base = dataclasses.replace(base, image_processor="qwen3_vl")
    base = dataclasses.replace(eval_data_config(base, args.benchmark), tokenizer_path=tok, batch_size=args.batch_size)
    return configlib.load(DataConfig, None, args.overrides, base=base)


# DataConfig fields that change no prompt (how records are read, batched, checked).
_NOT_PROMPT = ("batch_size", "read_threads", "worker_count", "worker_buffer_size", "strict", "paths")


def evaluation_source(args, data: DataConfig) -> dict:
    """What the lines of --out depend on, recorded beside it (`report.source_path`) and compared on
    resume: the benchmark's files, the policy (run and step, or model and dtype) or the response
    file, the answer judge, the decoding and the prompt settings."""
    src = dict(benchmark=args.benchmark, data=[str(Path(d).resolve()) for d in args.data],
               image_root=args.image_root and str(Path(args.image_root).resolve()))
    if args.checkpoint:
        from pr1_jax.export import locate

        run_dir, step = locate(args.checkpoint)  # RUN_DIR/checkpoints/STEP: `run` resolved it
        src.update(checkpoint=str(run_dir.resolve()), step=step, max_new_tokens=args.max_new_tokens)
    elif args.model:
        src.update(model=str(Path(args.model).resolve()), dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    elif args.score:
        src.update(score=str(Path(args.score).resolve()))
    else:
        src.update(prompts_only=True)
    if args.answer_judge:
        src.update(answer_judge=str(Path(args.answer_judge).resolve()), judge_dtype=args.judge_dtype)
    src["prompt"] = {k: v for k, v in configlib.to_dict(data).items() if k not in _NOT_PROMPT}
    return src


def run(args) -> dict | None:
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; give the result file (JSONL)")
    if args.checkpoint:
        from pr1_jax.export import resolve

        run_dir, step = resolve(args.checkpoint)
        # This step throughout: a step the run saves while the evaluation runs is not mixed in.
        args.checkpoint = str(run_dir / "checkpoints" / str(step))
    data = data_config(args)
    problems, bad = read_problems(args.benchmark, args.data, image_root=args.image_root, data=data,
                                  strict=data.strict)
    unreadable = collections.Counter(e.reason for e in bad)
    for e in bad:
        log.warning("skipping %s", e)
    if not problems:
        raise ValueError(f"no {args.benchmark} problems read from {args.data}")
    log.info("%s: %d problems%s", args.benchmark, len(problems), f", {len(bad)} rows left out" if bad else "")
    skips, source = collections.Counter(), evaluation_source(args, data)
    if args.prompts_only:
        prompts_only(problems, data, args.tokenizer, out, unreadable)
        _write_source(out, source)
        return None
    if args.score:
        answered, responses = read_responses(args.score, problems)
        with RewardScorer(scorer_config(args.workers)) as scorer:
            rows = result_rows(answered, responses, submit_scores(scorer, answered, responses))
    else:
        done = set() if args.no_resume or not out.exists() else {str(r["id"]) for r in read_rows(out)}
        if done:
            check_resumable(out, source)
            log.info("resuming %s: %d problems already answered", out, len(done))
        else:
            write_rows(out, [])
            _write_source(out, source)
        todo = [p for p in problems if p.id not in done]
        if todo:
            generate_and_score(args, todo, data, out, skips)
        order = {p.id: k for k, p in enumerate(problems)}
        rows = sorted((r for r in read_rows(out) if r["id"] in order), key=lambda r: order[r["id"]])
    if args.answer_judge:
        judge_answers(args, problems, rows)
    write_rows(out, rows)
    _write_source(out, source)
    report = build_report(args.benchmark, rows, problems=len(problems), unreadable=unreadable, skipped=skips)
    report["source"] = source
    report_path = Path(args.report) if args.report else out.with_suffix(".report.json")
    report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(format_table(report))
    return report


def _write_source(out: Path, source: dict) -> None:
    source_path(out).write_text(json.dumps(source, indent=1, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    quiet_logging()
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointRestoreError, configlib.ConfigError, ModelConfigError, CheckpointError, OSError, ValueError,
            BadRecordError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
