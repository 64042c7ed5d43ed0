"""Per-problem results -> the numbers of the paper's tables, as JSON and as a printed table.

A result file (`python -m pr1_jax.evaluate --out R.jsonl`) holds one JSON object per problem
(one line per id; `R.source.json` beside it records what produced them, `check_resumable`):
`id`, `correct` (0/1; the answer judge's verdict when one was used, else the rules'), `rules`
(the rules' verdict), `judge` (with a judge), `format`, `response`, `answer`, `extracted`,
`categories` ({dimension: value or list of values}) and, for WeMath, `group` and `step`.

The report: accuracy over the scored problems, per value of each category dimension (MathVision:
subject, level; MathVista: task, skills, question and answer type; MathVerse: problem version,
subject; Geometry3K: goal, graph; a problem with several values counts in each), how many problems
were read, left out and scored, and for WeMath its own metrics (`wemath_metrics`).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence


def read_rows(path: str | Path) -> list[dict]:
    """The result lines of a file; an error naming the line that is not a result, or whose id an
    earlier line has (which of two results for one problem counts is not for a reader to guess)."""
    rows, lines = [], {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError("not an object with an id")
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not a result line ({e})") from None
        key = str(row["id"])
        if key in lines:
            raise ValueError(f"{path}:{n}: id {key!r} again (first at line {lines[key]})")
        lines[key] = n
        rows.append(row)
    return rows


def source_path(out: str | Path) -> Path:
    """Where `python -m pr1_jax.evaluate` records what produced the result file `out`."""
    return Path(out).with_suffix(".source.json")


def read_source(out: str | Path) -> dict | None:
    path = source_path(out)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def check_resumable(out: str | Path, source: dict) -> None:
    """A ValueError unless the rows in `out` were produced by `source` (benchmark and files,
    checkpoint and step or model, decoding and prompt settings): resuming would mix them."""
    recorded = read_source(out)
    if recorded is None:
        raise ValueError(f"--out {out}: holds results but no {source_path(out).name} saying what produced them; "
                         "give --no-resume to start it over, or another --out")
    source = json.loads(json.dumps(source))  # as it reads back (tuples as lists)
    differ = sorted(k for k in set(recorded) | set(source) if recorded.get(k) != source.get(k))
    if differ:
        k = differ[0]
        raise ValueError(f"--out {out}: holds results of another evaluation ({', '.join(differ)} differ, e.g. {k}: "
                         f"{recorded.get(k)!r} there, {source.get(k)!r} now); give --no-resume to start it over, "
                         "or another --out")


def tally(values: Iterable[float]) -> dict:
    values = [float(v) for v in values]
    n, c = len(values), sum(values)
    return {"correct": int(round(c)), "total": n, "accuracy": c / n if n else None}


def by_category(rows: Sequence[Mapping], key: str = "correct") -> dict[str, dict[str, dict]]:
    """{dimension: {value: tally}}, values sorted; list values count once per value."""
    groups: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        for dim, value in (r.get("categories") or {}).items():
            for v in value if isinstance(value, list) else [value]:
                groups[dim][str(v)].append(r[key])
    return {dim: {v: tally(vals[v]) for v in sorted(vals, key=_natural)} for dim, vals in groups.items()}


def _natural(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def wemath_metrics(rows: Sequence[Mapping], key: str = "correct") -> dict:
    """WeMath's metrics over its composite problems (rows with `group`, `step`, categories.steps).

    A composite problem of n steps has n one-step sub-problems (steps "1".."n") and itself
    ("multi"); one without all of them is `incomplete` and left out. With the sub-problems'
    verdicts s_1..s_n and the composite's m (the four-dimensional metric of We-Math's
    `evaluation/four_dimensional_metrics.py`):
      IK (insufficient knowledge)    some s_i wrong, m wrong
      IG (inadequate generalization) all s_i right, m wrong
      CM (complete mastery)          strict: all s_i right, m right; loose: some s_i right, m right
      RM (rote memorization)         strict: some s_i wrong, m right; loose: all s_i wrong, m right
    IK, IG, CM as shares of the N composite problems, RM as a share of CM + RM, and
    score = (N - 0.5 IG - RM - IK) / N, each strict and loose. S1: accuracy over the one-step
    sub-problems; S2, S3: over the two- and three-step composite problems (We-Math's
    `accuracy.py`)."""
    groups: dict[str, dict] = collections.defaultdict(dict)
    steps_of: dict[str, int] = {}
    for r in rows:
        groups[r["group"]][r["step"]] = bool(r[key])
        steps_of[r["group"]] = int(str(r["categories"]["steps"]).removesuffix("steps"))
    complete = {g: v for g, v in groups.items()
                if "multi" in v and all(str(i) in v for i in range(1, steps_of[g] + 1))}
    counts = collections.Counter()
    for g, v in complete.items():
        subs, m = [v[str(i)] for i in range(1, steps_of[g] + 1)], v["multi"]
        counts["IK"] += (not all(subs)) and not m
        counts["IG"] += all(subs) and not m
        counts["CM_strict"] += all(subs) and m
        counts["CM_loose"] += any(subs) and m
        counts["RM_strict"] += (not all(subs)) and m
        counts["RM_loose"] += (not any(subs)) and m
    n = len(complete)
    out = {"groups": n, "incomplete_groups": len(groups) - n, "counts": dict(counts)}
    for mode in ("strict", "loose"):
        cm, rm = counts[f"CM_{mode}"], counts[f"RM_{mode}"]
        out[mode] = {"IK": counts["IK"] / n if n else None, "IG": counts["IG"] / n if n else None,
                     "CM": cm / n if n else None, "RM": rm / (cm + rm) if cm + rm else None,
                     "score": (n - 0.5 * counts["IG"] - rm - counts["IK"]) / n if n else None}
    ones = [v[s] for g, v in complete.items() for s in v if s != "multi"]
    out["S1"] = tally(ones)["accuracy"]
    for k in (2, 3):
        out[f"S{k}"] = tally([v["multi"] for g, v in complete.items() if steps_of[g] == k])["accuracy"]
    return out


def build_report(benchmark: str, rows: Sequence[Mapping], *, problems: int, unreadable: Mapping[str, int],
                 skipped: Mapping[str, int]) -> dict:
    """The report of one evaluation: `problems` read, `unreadable` rows of the benchmark's files
    and `skipped` problems (the prompt pipeline's reasons), the scored `rows`."""
    out = {"benchmark": benchmark, "problems": problems, "unreadable": dict(unreadable), "skipped": dict(skipped),
           "scored": len(rows), **tally(r["correct"] for r in rows)}
    if rows and all("format" in r for r in rows):
        out["format"] = tally(r["format"] for r in rows)["accuracy"]
    if rows and all("judge" in r for r in rows):
        out["rules_accuracy"] = tally(r["rules"] for r in rows)["accuracy"]
        out["judge_agrees_with_rules"] = tally(r["judge"] == r["rules"] for r in rows)["accuracy"]
    out["categories"] = by_category(rows)
    if benchmark == "wemath":
        out["wemath"] = wemath_metrics(rows)
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:6.2f}"


def format_table(report: Mapping) -> str:
    """The report as text: the headline, then one line per category value."""
    lines = [f"{report['benchmark']}: accuracy {_pct(report['accuracy'])} % ({report['correct']}/{report['total']})"
             f"  scored {report['scored']} of {report['problems']} problems"
             + "".join(f", {k} {v}" for k, v in {**report["unreadable"], **report["skipped"]}.items())]
    if "format" in report:
        lines.append(f"  format {_pct(report['format'])} %")
    if "rules_accuracy" in report:
        lines.append(f"  rules alone {_pct(report['rules_accuracy'])} %, judge agrees with the rules on "
                     f"{_pct(report['judge_agrees_with_rules'])} %")
    width = max([len(v) + 2 for dims in report["categories"].values() for v in dims]
                + [len(d) for d in report["categories"]] + [10])
    for dim, values in report["categories"].items():
        lines.append(f"  {dim:<{width}}  accuracy %  correct / total")
        for v, t in values.items():
            lines.append(f"    {v:<{width - 2}}      {_pct(t['accuracy'])}  {t['correct']:>7} / {t['total']}")
    w = report.get("wemath")
    if w:
        lines.append(f"  WeMath: {w['groups']} composite problems ({w['incomplete_groups']} incomplete, left out); "
                     f"S1 {_pct(w['S1'])}  S2 {_pct(w['S2'])}  S3 {_pct(w['S3'])}")
        for mode in ("strict", "loose"):
            m = w[mode]
            lines.append(f"    {mode:<6}  score {_pct(m['score'])}  IK {_pct(m['IK'])}  IG {_pct(m['IG'])}  "
                         f"CM {_pct(m['CM'])}  RM {_pct(m['RM'])}")
    return "\n".join(lines)
