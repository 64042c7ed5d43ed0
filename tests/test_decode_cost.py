"""The bytes a compiled decode step moves (XLA's cost analysis; compile only, nothing runs).

`bench/decode_cost.py` measures the decode issue's 1.5B config; here a small config of the same
shape (2 KV heads of 128, grouped queries, tied embeddings) keeps the step near the bytes it must
move: its weights and its cache read once. The layer stack that restacked the whole cache every
step measured 7.7x at the bench's 128 rows."""

import copy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import decode_cost  # noqa: E402


def test_loop_aware_costs_count_every_iteration():
    """A scanned stack of matmuls costs what the unrolled one does (XLA counts the body once)."""
    w, x = jax.ShapeDtypeStruct((6, 64, 64), jnp.float32), jax.ShapeDtypeStruct((8, 64), jnp.float32)

    def scanned(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    def unrolled(w, x):
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i])
        return x

    client = jax.devices()[0].client
    a, b = (decode_cost.HloCosts(jax.jit(f).lower(w, x).compile().as_text(), client) for f in (scanned, unrolled))
    assert a.bytes_accessed() == pytest.approx(b.bytes_accessed(), rel=0.05)
    assert a.bytes_accessed() > 5 * jax.jit(scanned).lower(w, x).compile().cost_analysis()["bytes accessed"]


def test_decode_step_moves_little_beyond_weights_and_cache():
    cfg = copy.deepcopy(decode_cost.QWEN25VL_1_5B)
    cfg["text_config"].update(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=6,
                              vocab_size=8192)
    cfg["vision_config"].update(depth=1, hidden_size=64, num_heads=2, intermediate_size=64, out_hidden_size=768)
    r = decode_cost.decode_cost(cfg, rows=128, cache_len=128, dtype="float32")
    # 1.62 when written; activations weigh more next to this small model's weights than at 1.5B.
    assert r["ratio"] < 1.8, r


def _tiny(layers: int) -> dict:
    cfg = copy.deepcopy(decode_cost.QWEN25VL_1_5B)
    cfg["text_config"].update(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=2,
                              vocab_size=4096)
    cfg["vision_config"].update(depth=1, hidden_size=64, num_heads=2, intermediate_size=64, out_hidden_size=256)
    return cfg


def test_rollout_plan_and_ideal_bytes():
    """The live sampler's segments for rows stopping at 3, 10, 1, 1 (groups of 2, chunks of 4):
    after the first segment one row of one group is live; the last segment stops at the longest."""
    import rollout_cost

    lengths = np.array([3, 10, 1, 1])
    plan = rollout_cost.live_plan(lengths, n=2, chunk=4, max_new=16)
    assert [(s["rows"], s["groups"], s["slots"], s["steps"]) for s in plan] == [(4, 2, 4, 4), (1, 1, 8, 4),
                                                                              (1, 1, 12, 2)]
    assert (plan[0]["rows_out"], plan[0]["groups_out"]) == (1, 1) and "rows_out" not in plan[-1]
    # Step 0: 2 groups, 4 rows x 1 token; steps 1-2: 1 group, 2 rows x s+1; steps 3-9: 1 group, 1 row x s+1.
    expected = 10 * 100 + (2 * 5 + 4) + (5 + 2 * 2) + (5 + 2 * 3) + sum(5 + s + 1 for s in range(3, 10))
    assert rollout_cost.ideal_bytes(lengths, 2, prompt_len=5, weight_bytes=100, kv_token_bytes=1) == expected
    assert rollout_cost.response_lengths("cap", 3, 7).tolist() == [7, 7, 7]
    drawn = rollout_cost.response_lengths("lognormal:median=600,sigma=0.9,cap=4096", 4096, 4096)
    assert drawn.max() <= 4096 and 500 < np.median(drawn) < 700


def test_rollout_programs_extrapolate_over_layers():
    """A decode program's bytes are affine in its (unrolled, alike) layers: 1 and 2 layers give 3's."""
    import rollout_cost

    programs = rollout_cost.Programs(_tiny(3), prompt_len=16, max_new=32, n=2)
    extrapolated = programs.live_segment(rows=8, groups=4, slots=16, chunk=8)
    costs, _ = programs._compiled(programs.segment_program(rows=8, groups=4, slots=16, chunk=8), 3)
    assert extrapolated[0] == pytest.approx(costs.bytes_accessed(), rel=0.01)
