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
