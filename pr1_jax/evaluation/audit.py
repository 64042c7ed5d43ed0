"""`python -m pr1_jax.evaluation.audit A.jsonl [B.jsonl] (--judge HF_DIR | --run RUN_DIR) --out AUDIT.json`

The perception audit: the paper's hand analysis (50 problems: is the perception in the response
right? McNemar between the base model and Perception-R1) as one command, with the judge reading.

The inputs are result files of `python -m pr1_jax.evaluate` on a benchmark whose problems carry
visual annotations (geometry3k: the diagram logic forms; perception_r1: the training parquet's
visual_key_info), one file per checkpoint. For the problems with annotations that all files
answered (`--sample K` of them, drawn with `--seed`), the judge gives its verdict on every
annotation of every response; a response's perception verdict is 1 when the share of its
annotations the judge finds stated reaches `--threshold` (default 1.0: all of them). With two
files, McNemar on those per-problem verdicts (`pr1_jax.evaluation.mcnemar`).

The judge: `--run RUN_DIR` takes a run's judge, its tokenizer and its `judge` config (the prompt
it was trained with); `--judge HF_DIR` a checkpoint with `JudgeConfig`'s defaults. `key=value`
arguments override `JudgeConfig` fields either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from pr1_jax import configlib
from pr1_jax.config import TrainConfig
from pr1_jax.evaluation.report import read_rows
from pr1_jax.judge import Judge, JudgeConfig
from pr1_jax.evaluation.mcnemar import compare, summary
from pr1_jax.sharding import make_mesh

log = logging.getLogger("pr1_jax")


def audited_ids(files: Sequence[Sequence[dict]], sample: int | None, seed: int) -> list[str]:
    """Ids of problems with annotations that every file answered; `sample` of them (sorted)."""
    common = set.intersection(*({str(r["id"]) for r in rows if r.get("annotations")} for rows in files))
    ids = sorted(common)
    if sample is not None and sample < len(ids):
        ids = sorted(np.random.default_rng(seed).choice(ids, size=sample, replace=False).tolist())
    return ids


def check_results(files: Sequence[Sequence[dict]], names: Sequence[str] | None = None) -> None:
    """A ValueError naming the file and id of a result with annotations that the judge could not
    read: no response text, or annotations that are not a list of texts."""
    for f, rows in enumerate(files):
        name = names[f] if names else f"result file {f + 1}"
        for r in rows:
            if not r.get("annotations"):
                continue
            if not isinstance(r["annotations"], list) or not all(isinstance(a, str) for a in r["annotations"]):
                raise ValueError(f"{name}: the annotations of {r['id']!r} are {r['annotations']!r:.60}, "
                                 "not a list of texts")
            if not isinstance(r.get("response"), str):
                raise ValueError(f"{name}: the result of {r['id']!r} has no response text")


def audit(files: Sequence[Sequence[dict]], judge: Judge, *, sample: int | None = None, seed: int = 0,
          threshold: float = 1.0) -> dict:
    """Per problem: its annotations, each file's per-annotation verdicts, visual share, perception
    verdict and how many annotations the judge left out (past its largest annotation or length
    bucket: the verdicts are over the first ones); per file: the perception rate; McNemar for two files."""
    ids = audited_ids(files, sample, seed)
    if not ids:
        raise ValueError("no problem with visual annotations is answered in every result file "
                         "(evaluate geometry3k or perception_r1 to get annotated results)")
    check_results(files)
    by_id = [{str(r["id"]): r for r in rows} for rows in files]
    annotations = [list(by_id[0][i]["annotations"]) for i in ids]
    judged = [judge.submit([rows[i]["response"] for i in ids], annotations) for rows in by_id]
    judged = [j.result() for j in judged]
    problems = []
    for k, i in enumerate(ids):
        verdicts = [j["verdicts"][k].tolist() for j in judged]
        visual = [float(np.mean(v)) if v else 0.0 for v in verdicts]
        problems.append(dict(id=i, annotations=annotations[k], verdicts=verdicts, visual=visual,
                             perception=[int(v >= threshold) for v in visual],
                             not_judged=[int(j["dropped"][k]) for j in judged]))
    out = dict(problems=problems, threshold=threshold,
               perception_rate=[float(np.mean([p["perception"][f] for p in problems])) for f in range(len(files))],
               visual=[float(np.mean([p["visual"][f] for p in problems])) for f in range(len(files))],
               judge_truncated=[int(j["n_truncated"]) for j in judged], judge_dropped=[int(j["n_dropped"]) for j in judged])
    if len(files) == 2:
        out["mcnemar"] = compare(*({p["id"]: bool(p["perception"][f]) for p in problems} for f in (0, 1)))
    return out


def load_judge(args) -> Judge:
    if args.run:
        cfg = configlib.load(TrainConfig, Path(args.run) / "config.yaml")
        if not cfg.model.judge:
            raise configlib.ConfigError(f"{args.run}: the run has no judge (model.judge); give --judge")
        path, tok, dtype, base = cfg.model.judge, cfg.model.judge_tokenizer, cfg.model.judge_dtype, cfg.judge
    else:
        path, tok, dtype, base = args.judge, None, args.judge_dtype, JudgeConfig()
    config = configlib.load(JudgeConfig, None, args.overrides, base=base)
    return Judge.load(path, config, mesh=make_mesh(), tokenizer_path=args.judge_tokenizer or tok or path, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(message)s")
    p = argparse.ArgumentParser(prog="python -m pr1_jax.evaluation.audit", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="RESULTS_OR_OVERRIDE",
                   help="one or two result files of pr1_jax.evaluate (one per checkpoint), then JudgeConfig field=value")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--judge", help="the judge: a Hugging Face checkpoint directory (Qwen2 / Qwen2.5)")
    src.add_argument("--run", help="a pr1_jax.train run directory: its judge, judge tokenizer and judge config")
    p.add_argument("--judge-tokenizer", help="tokenizer directory (default: the judge's or the run's)")
    p.add_argument("--judge-dtype", default="bfloat16", help="with --judge (default bfloat16)")
    p.add_argument("--sample", type=int, help="audit this many problems, drawn with --seed (the paper: 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=1.0, help="share of annotations stated for a perception verdict of 1")
    p.add_argument("--out", required=True, help="the audit (JSON)")
    args = p.parse_intermixed_args(argv)
    args.overrides = [a for a in args.inputs if "=" in a]
    args.results = [a for a in args.inputs if "=" not in a]
    if not 1 <= len(args.results) <= 2:
        p.error("give one or two result files")
    try:
        files = [read_rows(f) for f in args.results]
        check_results(files, args.results)  # before the judge is loaded
        out = audit(files, load_judge(args), sample=args.sample, seed=args.seed, threshold=args.threshold)
    except (OSError, ValueError, configlib.ConfigError) as e:
        log.error("%s", e)
        return 2
    out = dict(files=args.results, **out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    n = len(out["problems"])
    for f, name in enumerate(args.results):
        print(f"{name}: perception right on {out['perception_rate'][f]:.3f} of {n} problems, "
              f"annotations stated {out['visual'][f]:.3f}")
    if any(out["judge_dropped"]):
        print(f"annotations the judge left out (past its largest bucket), per file: {out['judge_dropped']}")
    if "mcnemar" in out:
        print(summary(out["mcnemar"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
