"""Bytes a whole rollout's decode moves, the whole-cache sampler's against the live one's, next to the
bytes it must move, for a distribution of response lengths.

    python bench/rollout_cost.py                                   # 1.5B and 7B, 128 and 1,024 rows
    python bench/rollout_cost.py --configs 1.5b --rows 128 --lengths cap
    python bench/rollout_cost.py --lengths file:lengths.txt        # a run's response lengths

One JSON line per (config, rows, lengths, sampler): `bytes_accessed` = the sum over the decode
steps the rollout runs of the bytes of the compiled programs it runs (XLA's cost analysis, fp32 on
CPU, every loop trip counted as `bench/decode_cost.py` does; compile only, nothing runs);
`ideal_bytes` = per step the decoder and head weights once, each group's prompt KV once (groups
with a live row) and each live row's response KV so far; `ratio` of the two; `peak_memory` = the
largest of those programs' arguments + outputs + temporaries (XLA's memory analysis; during a live
compaction the state plus the one KV buffer being gathered).

Samplers (`pr1_jax.sampling`): `whole_cache` (`sample`: every row's copy of its prompt and all
`max_new_tokens` slots read every step until the longest row stops) and `live` (`Sampler`: the
prompt read once per group, response chunks read as far as filled, rows compacted to buckets
between segments of `CHUNK` steps; the segments and compactions it would run are simulated from
the lengths with the sampler's own `bucket`).

How the programs are measured: a compiled decode program costs an affine function of the layer
count (the layers are unrolled and alike), so each program is compiled with 1 and 2 layers and
extrapolated to the config's; and, at a given layer count, an affine function of its row, group
and slot counts (weights, per-row activations and logits, per-group prompt KV, per-row response
KV), so each program kind is compiled at a few small shapes and the costs of the shapes the
rollout meets come from a least-squares fit (`fit_residual`: its largest relative error at the
compiled points, per program kind). A compaction is `compact` on the state without its KV plus
`take_kv` on each of its 4 x layers KV buffers (as `Sampler` runs it, one buffer at a time).
Prompts are `--prompt-len` real tokens each, n samples per prompt.

Lengths: `cap` (every row at `--max-new`), `lognormal:median=600,sigma=0.9,cap=4096` (seeded,
rounded up, clipped to [1, cap]), `file:PATH` (integers, one per line or a JSON list; drawn with
replacement when they are not `rows` many).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import QWEN25VL_1_5B, response_lengths  # noqa: E402
from decode_cost import HloCosts  # noqa: E402
from memory import POLICY  # noqa: E402  (the paper's 7B policy)

CONFIGS = {"1.5b": QWEN25VL_1_5B, "7b": POLICY}
EOS, PAD = (151645,), 151643


def _config(config: dict, layers: int) -> dict:
    return {**config, "text_config": {**config["text_config"], "num_hidden_layers": layers}}


class Programs:
    """Compiles the samplers' decode programs of one config (fp32, abstract inputs) and returns
    (bytes accessed, peak memory) per shape, extrapolated to the config's layer count."""

    def __init__(self, config: dict, prompt_len: int, max_new: int, n: int):
        self.config, self.t, self.new, self.n = config, prompt_len, max_new, n
        self.layers = config["text_config"]["num_hidden_layers"]

    @functools.cache
    def _setup(self, layers: int):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from models import abstract_params, config_from_dict
        from models.causal_lm import QwenCausalLM

        cfg = config_from_dict(_config(self.config, layers))
        module = QwenCausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32)
        params = jax.eval_shape(module.decode_params, nn.unbox(abstract_params(module)))
        return cfg, module, params

    def _compiled(self, build, layers: int):
        """(HloCosts, peak memory) of the program `build(cfg, module, params) -> (fn, args)` makes."""
        import jax

        fn, args = build(*self._setup(layers))
        compiled = fn.lower(*args).compile()
        mem = compiled.memory_analysis()
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        return HloCosts(compiled.as_text(), jax.devices()[0].client), peak

    def measure(self, build, loop_trip: bool = False) -> np.ndarray:
        """[bytes accessed, peak memory] of the program `build` makes, at the config's layer count;
        with loop_trip, also the bytes of one trip of its (one) while loop's body."""
        def once(layers):
            costs, peak = self._compiled(build, layers)
            row = [costs.bytes_accessed(), peak]
            if loop_trip:
                (body, _), = costs._loops(costs.entry)
                row.append(costs.cost("bytes accessed", body))
            return np.array(row, float)

        one, two = once(1), once(2)
        return one + (self.layers - 1) * (two - one)

    def _sampling(self):
        from pr1_jax.sampling import SamplingConfig

        return SamplingConfig(max_new_tokens=self.new, eos_ids=EOS, pad_id=PAD, temperature=1.0, n=self.n)

    def whole_cache_step(self, rows: int):
        """One step of `sample`'s loop on rows x (prompt + max_new) slots (as `bench/decode_cost.py`)."""
        import jax
        import jax.numpy as jnp

        from models.qwen2 import KVCache
        from pr1_jax.sampling import DecodeState, decode_step

        sds, scfg, slots = jax.ShapeDtypeStruct, self._sampling(), self.t + self.new

        def build(cfg, module, params):
            t = cfg.text
            layer = sds((rows, t.num_kv_heads, slots, t.head_dim), jnp.float32)
            cache = KVCache(k=(layer,) * t.num_layers, v=(layer,) * t.num_layers, mask=sds((rows, slots), bool),
                            index=sds((), jnp.int32))
            state = DecodeState(step=sds((), jnp.int32), start=sds((), jnp.int32),
                                tokens=sds((rows, self.new), jnp.int32), logprobs=sds((rows, self.new), jnp.float32),
                                done=sds((rows,), bool), cache=cache, hidden=sds((rows, t.hidden_size), jnp.float32))
            keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
            step = functools.partial(decode_step, module, cfg=scfg)
            return jax.jit(step, donate_argnames="state"), (params, state, keys, sds((rows,), jnp.int32))

        return self.measure(build)

    def _live_state(self, cfg, rows: int, groups: int, slots: int, chunk: int):
        import jax
        import jax.numpy as jnp

        from models.attention import SharedPrefixMask
        from models.qwen2 import SharedPrefixCache
        from pr1_jax.sampling import DecodeState, LiveRollout

        # The output buffers' rows: the call's, >= rows (their size only weighs in a per-segment scatter).
        sds, t, total = jax.ShapeDtypeStruct, cfg.text, rows
        prompt = sds((groups, t.num_kv_heads, self.t, t.head_dim), jnp.float32)
        own = sds((rows, t.num_kv_heads, slots, t.head_dim), jnp.float32)
        i32 = lambda *shape: sds(shape, jnp.int32)  # noqa: E731
        layout = SharedPrefixMask(prompt_mask=sds((groups, self.t), bool), group=i32(rows), member=i32(rows),
                                  index=i32(), width=self.n, shards=1)
        cache = SharedPrefixCache(prompt_k=(prompt,) * t.num_layers, prompt_v=(prompt,) * t.num_layers,
                                  k=(own,) * t.num_layers, v=(own,) * t.num_layers, layout=layout)
        decode = DecodeState(step=i32(), start=i32(), tokens=i32(rows, chunk),
                             logprobs=sds((rows, chunk), jnp.float32), done=sds((rows,), bool), cache=cache,
                             hidden=sds((rows, t.hidden_size), jnp.float32))
        keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
        return LiveRollout(decode=decode, row=i32(rows), keys=keys, next_pos=i32(rows), tokens=i32(total, self.new),
                           logprobs=sds((total, self.new), jnp.float32))

    def segment_program(self, rows: int, groups: int, slots: int, chunk: int):
        """The build of `segment` on rows x slots of response and groups of prompt."""
        import jax

        from pr1_jax.sampling import segment

        scfg = self._sampling()

        def build(cfg, module, params):
            fn = jax.jit(functools.partial(segment, module, cfg=scfg), donate_argnums=1)
            return fn, (params, self._live_state(cfg, rows, groups, slots, chunk))

        return build

    def live_segment(self, rows: int, groups: int, slots: int, chunk: int) -> np.ndarray:
        """[bytes with the loop's body once, peak memory, bytes of one more trip of the body] of
        `segment_program`."""
        return self.measure(self.segment_program(rows, groups, slots, chunk), loop_trip=True)

    def live_compact(self, rows: int, groups: int, slots: int, chunk: int, rows_out: int, groups_out: int) -> float:
        """Bytes of a compaction from rows / groups / slots to rows_out / groups_out / slots + chunk:
        `compact` on the state without its KV, then `take_kv` on each of the 4 x layers buffers."""
        import jax
        import jax.numpy as jnp

        from pr1_jax.sampling import _without_kv, compact, take_kv

        cfg, _, _ = self._setup(1)
        t, sds = cfg.text, jax.ShapeDtypeStruct
        bare = _without_kv(self._live_state(cfg, rows, groups, slots, chunk))[0]
        fn = jax.jit(functools.partial(compact, rows=rows_out, groups=groups_out))
        total = self._bytes(fn, bare)
        for count, keep, grow, shape in ((rows, rows_out, chunk, slots), (groups, groups_out, 0, self.t)):
            buffer = sds((count, t.num_kv_heads, shape, t.head_dim), jnp.float32)
            take = jax.jit(functools.partial(take_kv, grow=grow))
            total += 2 * self.layers * self._bytes(take, buffer, sds((1, keep), jnp.int32))
        return total

    @staticmethod
    def _bytes(fn, *args) -> float:
        import jax

        return HloCosts(fn.lower(*args).compile().as_text(), jax.devices()[0].client).bytes_accessed()


def _fit(points: list[tuple], values: list[np.ndarray], features):
    """Least squares of values [P, k] on features(*point); returns (predict(*point) -> [k], the
    largest relative error of column 0 at the points)."""
    a = np.array([features(*p) for p in points], float)
    y = np.array(values)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    err = float(np.max(np.abs(a @ coef - y)[:, 0] / y[:, 0]))
    return (lambda *p: np.array(features(*p), float) @ coef), err


def live_plan(lengths: np.ndarray, n: int, chunk: int, max_new: int) -> list[dict]:
    """The segments `Sampler` runs for rows stopping at `lengths` (row i in group i // n): per
    segment its rows, groups, slots, steps, and the compaction after it (rows_out, groups_out)."""
    from pr1_jax.sampling import bucket

    rows, groups, longest = len(lengths), len(lengths) // n, int(lengths.max())
    chunk = min(chunk, max_new)
    r, g, plan, start = rows, groups, [], 0
    while True:
        end = min(start + chunk, longest)
        seg = dict(rows=r, groups=g, slots=start + chunk, steps=end - start, start=start)
        plan.append(seg)
        if end >= longest:
            return plan
        live = lengths > end
        seg.update(rows_out=bucket(int(live.sum()), rows),
                   groups_out=bucket(int(live.reshape(groups, n).any(-1).sum()), groups))
        r, g, start = seg["rows_out"], seg["groups_out"], end


def ideal_bytes(lengths: np.ndarray, n: int, prompt_len: int, weight_bytes: int, kv_token_bytes: int) -> int:
    """Sum over steps s < max(lengths) of the weights, each group's prompt KV (groups with a live
    row) and each live row's s + 1 response tokens (the one fed at s included)."""
    total = 0
    for s in range(int(lengths.max())):
        live = lengths > s
        total += weight_bytes + kv_token_bytes * (prompt_len * int(live.reshape(-1, n).any(-1).sum())
                                                  + (s + 1) * int(live.sum()))
    return total


def rollout_cost(name: str, rows_list, specs, n: int, prompt_len: int, max_new: int, chunk: int, seed: int):
    """The JSON records of one config (see the module docstring)."""
    import jax

    programs = Programs(CONFIGS[name], prompt_len, max_new, n)
    _, _, params = programs._setup(programs.layers)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    text = CONFIGS[name]["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    kv_token_bytes = 2 * programs.layers * text["num_key_value_heads"] * head_dim * 4
    chunk = min(chunk, max_new)
    # Small shapes for the fits: rows, groups, slots (slots in chunks, 2 to 4; n rows per group or fewer).
    seg_points = [(16, 2, 2 * chunk), (16, 2, 4 * chunk), (32, 4, 2 * chunk), (32, 2, 4 * chunk),
                  (16, 4, 3 * chunk), (48, 6, 2 * chunk)]
    segment = _fit(seg_points, [programs.live_segment(r, g, s, chunk) for r, g, s in seg_points],
                   lambda r, g, s: (1, r, g, r * s))
    comp_points = [(16, 2, 2 * chunk, 8, 1), (32, 4, 2 * chunk, 16, 2), (32, 4, 3 * chunk, 24, 3),
                   (16, 2, 3 * chunk, 16, 2), (48, 6, 2 * chunk, 12, 3), (32, 4, 4 * chunk, 8, 4)]
    comp = _fit(comp_points, [[programs.live_compact(r, g, s, chunk, ro, go)] for r, g, s, ro, go in comp_points],
                lambda r, g, s, ro, go: (1, r, g, r * s, ro * s, go))
    out = []
    for rows in rows_list:
        today = programs.whole_cache_step(rows)
        for spec in specs:
            lengths = response_lengths(spec, rows, max_new, seed)
            ideal = ideal_bytes(lengths, n, prompt_len, weight_bytes, kv_token_bytes)
            common = dict(config=name, rows=rows, n=n, prompt_len=prompt_len, lengths=spec,
                          median_length=float(np.median(lengths)), steps=int(lengths.max()), ideal_bytes=ideal)
            accessed = int(today[0]) * int(lengths.max())
            out.append(dict(common, sampler="whole_cache", bytes_accessed=accessed, ratio=round(accessed / ideal, 3),
                            peak_memory=int(today[1])))
            accessed, peak, segments = 0.0, 0.0, live_plan(lengths, n, chunk, max_new)
            for seg in segments:
                key = (seg["rows"], seg["groups"], seg["slots"])
                first, seg_peak, trip = segment[0](*key)
                accessed += first + (seg["steps"] - 1) * trip
                peak = max(peak, seg_peak)
                if "rows_out" in seg:
                    accessed += comp[0](*key, seg["rows_out"], seg["groups_out"])[0]
                    # Compaction holds the state and one new response buffer at a time.
                    peak = max(peak, seg_peak + seg["rows_out"] * (seg["slots"] + chunk) * kv_token_bytes
                               / (2 * programs.layers))
            out.append(dict(common, sampler="live", bytes_accessed=int(accessed), ratio=round(accessed / ideal, 3),
                            peak_memory=int(peak), segments=len(segments),
                            fit_residual=dict(segment=round(segment[1], 4), compaction=round(comp[1], 4))))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rows", type=int, nargs="+", default=[128, 1024], help="B*n rows per sampler call")
    p.add_argument("--lengths", nargs="+", default=["lognormal:median=600,sigma=0.9,cap=4096", "cap"])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--max-new", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=None, help="response slots per segment (default: the sampler's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from pr1_jax.sampling import CHUNK

    for name in a.configs:
        for record in rollout_cost(name, a.rows, a.lengths, a.n, a.prompt_len, a.max_new, a.chunk or CHUNK, a.seed):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
