"""GPU and TPU programs traced and lowered on a CPU host (nothing compiled or run for them).

`as_platform("cuda" | "tpu" | "cpu")` makes the models see that backend while a program is traced:
`jax.default_backend`, which `models.attention.resolve` reads (so `auto` and the refusals of
explicit settings behave as on that backend, and splash attention builds its Mosaic kernel
instead of Pallas' interpreter), and, for cuda, JAX's cuDNN version check: JAX asks the cuDNN
library for its version while tracing, and a CPU jaxlib has none, so it answers 9.8. Nothing else
is stood in for; lower with `jit(f).trace(...).lower(lowering_platforms=(platform,))`.

`cudnn_stand_in`: cuDNN's kernel as a plain JAX function of the same semantics, so that what
`models.attention` builds around it (lengths, bias, padding to even lengths, the decoder's
padding-last order) can be checked numerically on CPU.
"""

from __future__ import annotations

import contextlib
import re
from unittest import mock

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

import models.attention

BACKEND = {"cuda": "gpu", "tpu": "tpu", "cpu": "cpu"}


@contextlib.contextmanager
def as_platform(platform: str):
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(jax, "default_backend", lambda: BACKEND[platform]))
        if platform == "cuda":
            stack.enter_context(mock.patch.object(cudnn_fmha, "check_cudnn_version", lambda: 90800))
        yield


def lower(fn, *args, platform: str) -> str:
    """StableHLO text of jit(fn) traced on `args` (arrays or ShapeDtypeStructs) for `platform`."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    with as_platform(platform):
        return jitted.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def fmha_calls(text: str) -> list[tuple[str, str]]:
    """(custom call target, result types) of every cuDNN attention call in a lowered program."""
    return re.findall(r'stablehlo\.custom_call @(__cudnn\$fmha\w*)\(.*?\).*?-> (.*)', text)


def _fused_reference(q, k, v, bias, lengths, causal: bool):
    """`models.attention._cudnn_fused` in plain JAX: the bias added to the scaled scores, keys past
    a row's length masked and queries past it giving 0 (cuDNN's padding), causal from the top left."""
    b, h, t, d = q.shape
    s = k.shape[2]
    g = h // k.shape[1]
    k, v = (jnp.repeat(x, g, axis=1) for x in (k, v))
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) * d ** -0.5
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    allowed = jnp.ones((b, 1, t, s), bool)
    if causal:
        allowed &= jnp.tril(jnp.ones((t, s), bool))
    if lengths is not None:
        allowed &= jnp.arange(s)[None, None, None, :] < lengths[:, None, None, None]
    probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), v)
    if lengths is not None:
        out = jnp.where(jnp.arange(t)[None, None, :, None] < lengths[:, None, None, None], out, 0)
    return out.astype(q.dtype)


@contextlib.contextmanager
def cudnn_stand_in():
    with as_platform("cuda"), mock.patch.object(models.attention, "_cudnn_fused", _fused_reference):
        yield
