"""`python -m pr1_jax.mcnemar A.jsonl B.jsonl`: the paper's McNemar test between two evaluations.

Both files are `pr1_jax.evaluate` outputs (one JSON object per sample with `id` and `accuracy`).
Only samples present in both count. The exact (binomial) test on the discordant pairs:
b = right in A only, c = right in B only, p = min(1, 2 * P[X <= min(b, c)]) with X ~ Bin(b + c, 1/2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def exact_mcnemar(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def read_results(path: str | Path) -> dict[str, bool]:
    out = {}
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["id"])] = float(row["accuracy"]) >= 0.5
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}:{i + 1}: not an evaluate result line ({e})") from e
    return out


def compare(a: dict[str, bool], b: dict[str, bool]) -> dict:
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two result files share no sample ids")
    only_a = sum(a[k] and not b[k] for k in common)
    only_b = sum(b[k] and not a[k] for k in common)
    return dict(samples=len(common), acc_a=sum(a[k] for k in common) / len(common),
                acc_b=sum(b[k] for k in common) / len(common), right_only_a=only_a, right_only_b=only_b,
                p_value=exact_mcnemar(only_a, only_b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pr1_jax.mcnemar", description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    try:
        r = compare(read_results(args.a), read_results(args.b))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"samples {r['samples']}  accuracy A {r['acc_a']:.4f}  B {r['acc_b']:.4f}  "
          f"right only in A {r['right_only_a']}  only in B {r['right_only_b']}  exact McNemar p = {r['p_value']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
