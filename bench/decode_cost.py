"""Bytes one decode step moves, from XLA's cost analysis of the compiled step, against the bytes it
must move: the text decoder's and head's weights plus the whole KV cache, each read once.

    python bench/decode_cost.py --rows 128 512 --dtype float32 --json   # ~1 min on 2 cores
    python bench/decode_cost.py --rows 128 --dtype bfloat16              # a table

The step is `pr1_jax.sampling.decode_step`, the body of the sampler's while-loop (draw a token per
row, feed it through the decoder on the cache, the LM head), jitted with its state donated as the
loop carries it, on abstract inputs (`jax.ShapeDtypeStruct`s, nothing allocated) shaped as the
sampler makes them (`QwenCausalLM.decode_params`, the prefill's `KVCache`). The model is a
Qwen2.5-VL with a 1.5B-class text decoder (hidden 1536, 28 layers, 12 query / 2 KV heads of 128,
MLP 8960, vocab 151936, tied embeddings) and its vision tower (which a decode step does not run);
the cache has 522 slots (a 266-token prompt + 256 new tokens).

One line per row count: `bytes_accessed` (XLA's HloCostAnalysis of the compiled program),
`ideal_bytes` (decoder + head weights and the whole cache in `dtype`), `ratio` of the two, and
`kernels`, the launches of one step (fusions, custom calls and other non-trivial instructions
outside fusions). XLA's own cost analysis counts a while loop's body once whatever its trip count
(`xla_bytes_loops_once`, the figure the decode issue started from); `bytes_accessed` and
`kernels` count every iteration of loops with a known trip count (XLA records it on the loop), as
the device runs them.

fp32 is the honest count on the CPU backend: XLA:CPU converts bf16 operands to fp32 copies, which a
TPU or GPU does not make.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import QWEN25VL_1_5B  # noqa: E402  (the decode issue's model)

# Instructions outside fusions that launch nothing: bookkeeping and control flow.
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
                "opt-barrier", "after-all", "add-dependency", "partition-id", "replica-id"}


class HloCosts:
    """XLA's cost analysis and kernel count of a compiled module, loops counted per iteration.

    XLA counts a while body once; here every computation is analysed on its own (as the entry of
    a module holding all of them) and a loop's body is counted `known_trip_count` times."""

    def __init__(self, hlo: str, client):
        from jax._src.lib import _jax, xla_client

        self._analyse = lambda text: _jax.hlo_module_cost_analysis(client, xla_client.hlo.hlo_module_from_text(text))
        hlo = re.sub(r", metadata=\{[^}]*\}", "", hlo)  # stack-frame ids point into sections dropped below
        self.comps, self.entry = {}, None
        for m in re.finditer(r"^(ENTRY )?%([\w.\-]+) \(.*?^\}$", hlo, re.S | re.M):
            self.comps[m.group(2)] = m.group(0).removeprefix("ENTRY ")
            if m.group(1):
                self.entry = m.group(2)

    @functools.cache
    def _once(self, name: str, key: str = "bytes accessed") -> float:
        text = "HloModule m\n\n" + "\n\n".join(("ENTRY " if n == name else "") + c for n, c in self.comps.items())
        return self._analyse(text)[key]

    def _loops(self, name: str):
        """(body, trip count) of each while loop directly in computation `name`."""
        for line in re.findall(r"^.*= .* while\(.*$", self.comps[name], re.M):
            n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            yield re.search(r"body=%([\w.\-]+)", line).group(1), int(n.group(1)) if n else 1

    @functools.cache
    def cost(self, key: str, name: str | None = None) -> float:
        """`key` of XLA's cost analysis ("bytes accessed", "flops", ...), loops per iteration."""
        name = name or self.entry
        total = self._once(name, key)
        for body, n in self._loops(name):
            total += n * self.cost(key, body) - self._once(body, key)
        return total

    def bytes_accessed(self) -> float:
        return self.cost("bytes accessed")

    @functools.cache
    def kernels(self, name: str | None = None) -> int:
        name = name or self.entry
        ops = re.findall(r"^\s*(?:ROOT )?%\S+ = .*?\s([a-z][\w-]*)\(", self.comps[name], re.M)
        return sum(op not in _NOT_KERNELS for op in ops) + sum(n * self.kernels(b) for b, n in self._loops(name))


    def _called(self, name: str) -> set[str]:
        """`name` and every computation it calls, transitively (loop bodies included)."""
        seen, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += [c for c in re.findall(r"%([\w.\-]+)", self.comps[n]) if c in self.comps and c != n]
        return seen

    def all_gathered(self) -> tuple[int, int]:
        """Bytes (per device) that the program's all-gathers produce: (in the bodies of the entry's
        while loops, once per iteration, e.g. per decode step; outside them, once per call).
        XLA:CPU's are synchronous `all-gather`s; an async pair is counted at its `-done`."""
        def gathered(names):
            text = "\n".join(self.comps[n] for n in names)
            results = re.findall(r"= (\([^=]*?\)|\S+) all-gather(?:-done)?\(", text)
            return sum(_array_bytes(r) for r in results)

        loops = set().union(*[self._called(b) for b, _ in self._loops(self.entry)])
        return gathered(loops), gathered(self._called(self.entry) - loops)


_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8}


def _array_bytes(hlo_type: str) -> int:
    """Bytes of an HLO result type: `f32[64,16]{1,0}` or a tuple of such."""
    return sum(_ITEMSIZE[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
               for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", hlo_type))


def ideal_bytes(decode_params, cache) -> int:
    """Every weight a decode step reads (the decoder and the head; the vision tower is not in the
    decode params) and the whole cache, once."""
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((decode_params, cache.k, cache.v)))


def decode_cost(config: dict, rows: int, cache_len: int, dtype: str, new_tokens: int = 256, lora=None) -> dict:
    """Compiles `decode_step` for `rows` rows on a `cache_len`-slot cache, params and compute in
    `dtype`; with `lora` (a `pr1_jax.lora.LoraConfig`) on base + unmerged adapters."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from models import abstract_params, config_from_dict
    from models.causal_lm import QwenCausalLM
    from models.qwen2 import KVCache
    from pr1_jax.sampling import DecodeState, SamplingConfig, decode_step

    cfg = config_from_dict(config)
    dt = jnp.dtype(dtype)
    module = QwenCausalLM(cfg, dtype=dt, param_dtype=dt, lora=lora)
    params = jax.eval_shape(module.decode_params, nn.unbox(abstract_params(module)))
    sds = jax.ShapeDtypeStruct
    t = cfg.text
    layer = sds((rows, t.num_kv_heads, cache_len, t.head_dim), dt)
    cache = KVCache(k=(layer,) * t.num_layers, v=(layer,) * t.num_layers, mask=sds((rows, cache_len), jnp.bool_),
                    index=sds((), jnp.int32))
    state = DecodeState(step=sds((), jnp.int32), start=sds((), jnp.int32), tokens=sds((rows, new_tokens), jnp.int32),
                        logprobs=sds((rows, new_tokens), jnp.float32), done=sds((rows,), jnp.bool_), cache=cache,
                        hidden=sds((rows, t.hidden_size), dt))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
    scfg = SamplingConfig(max_new_tokens=new_tokens, eos_ids=(151645,), pad_id=151643, temperature=1.0)
    step = jax.jit(functools.partial(decode_step, module, cfg=scfg), donate_argnames="state")
    compiled = step.lower(params, state, keys, sds((rows,), jnp.int32)).compile()
    costs = HloCosts(compiled.as_text(), jax.devices()[0].client)
    raw = compiled.cost_analysis()
    raw = raw[0] if isinstance(raw, (list, tuple)) else raw
    accessed, ideal = int(costs.bytes_accessed()), ideal_bytes(params, cache)
    return dict(rows=rows, cache_len=cache_len, dtype=dt.name, bytes_accessed=accessed, ideal_bytes=ideal,
                ratio=round(accessed / ideal, 3), kernels=costs.kernels(), flops=int(costs.cost("flops")),
                xla_bytes_loops_once=int(raw["bytes accessed"]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[128, 512])
    p.add_argument("--cache-len", type=int, default=522, help="KV cache slots (prompt + new tokens)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="one JSON line per row count")
    a = p.parse_args()
    results = []
    for rows in a.rows:
        results.append(decode_cost(QWEN25VL_1_5B, rows, a.cache_len, a.dtype))
        if a.json:
            print(json.dumps(results[-1]), flush=True)
    if not a.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import table

        print(table([dict(r, bytes_accessed_GB=r["bytes_accessed"] / 1e9, ideal_GB=r["ideal_bytes"] / 1e9)
                     for r in results]))


if __name__ == "__main__":
    main()
