"""`python -m pr1_jax.mcnemar A.jsonl B.jsonl [--field correct]`: the paper's McNemar test between
two evaluations of the same problems.

Both files are `pr1_jax.evaluate` result files (one JSON object per problem, keyed by `id`, with
`correct` 0/1; `--field rules` compares the rules' verdicts of runs scored with an answer judge).
Only problems present in both count; how many are in one file only is reported. The exact
(binomial) test on the discordant pairs: b = right in A only, c = right in B only,
p = min(1, 2 * P[X <= min(b, c)]) with X ~ Bin(b + c, 1/2).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pr1_jax.evaluation.report import read_rows


def exact_mcnemar(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def read_results(path: str | Path, field: str = "correct") -> dict[str, bool]:
    """{id: right} of a result file (an id twice is an error: `read_rows`); `field` must be 0 / 1."""
    out = {}
    for row in read_rows(path):
        value = row.get(field)
        if value not in (0, 1):  # True, 1 and 1.0 are 1
            raise ValueError(f"{path}: the result of {row['id']!r} has {field!r} {value!r:.40}, not 0 or 1")
        out[str(row["id"])] = value == 1
    return out


def compare(a: dict[str, bool], b: dict[str, bool]) -> dict:
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two result files share no problem ids")
    only_a = sum(a[k] and not b[k] for k in common)
    only_b = sum(b[k] and not a[k] for k in common)
    return dict(samples=len(common), only_in_a=len(set(a) - set(b)), only_in_b=len(set(b) - set(a)),
                acc_a=sum(a[k] for k in common) / len(common), acc_b=sum(b[k] for k in common) / len(common),
                right_only_a=only_a, right_only_b=only_b, p_value=exact_mcnemar(only_a, only_b))


def summary(r: dict) -> str:
    extra = (f" ({r['only_in_a']} ids only in A, {r['only_in_b']} only in B, left out)"
             if r["only_in_a"] or r["only_in_b"] else "")
    return (f"samples {r['samples']}{extra}  accuracy A {r['acc_a']:.4f}  B {r['acc_b']:.4f}  "
            f"right only in A {r['right_only_a']}  only in B {r['right_only_b']}  exact McNemar p = {r['p_value']:.4g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pr1_jax.mcnemar", description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--field", default="correct", help="the 0/1 field compared (default: correct)")
    args = p.parse_args(argv)
    try:
        r = compare(read_results(args.a, args.field), read_results(args.b, args.field))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
