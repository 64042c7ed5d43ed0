"""The judge's stateful shell: `Judge` (tokenizer, model, config, mesh; host work and dispatch)
and `PendingVerdicts` (dispatched work, read back on `result()`).

Static shapes: a row's length is rounded up to one of `length_buckets`, its annotation count to
one of `annotation_buckets` (slots beyond a response's annotations have `valid = False`), the
rows to a power of two that the mesh's data axes divide; batches that land in the same buckets
reuse one compiled program. What does not fit is truncated or dropped (see the prompt's module),
counted and reported, never raised.

Asynchrony: `Judge.submit` does the host work (tokenize, pack), puts the batch on the mesh and
dispatches the jitted forward, returning a `PendingVerdicts` at once (JAX dispatch is
asynchronous). The train loop scores the host rewards meanwhile and calls `.result()`, which is
where it blocks. `Judge.__call__` is `submit(...).result()`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.causal_lm import QwenCausalLM
from models.pretrained import Model
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.judge.common import JudgeConfig, JudgeOutput
from pr1_jax.judge.paper import PaperScheme
from pr1_jax.judge.yesno import YesNoScheme
from pr1_jax.multihost import allgather_json
from pr1_jax.sharding import activation_sharding, batch_axis_size, batch_sharding, load_model

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Chunk:
    output: JudgeOutput        # device arrays (possibly not computed yet)
    sources: list[int]         # caller index of each real row
    shape: tuple[int, int, int]


class PendingVerdicts:
    """Dispatched judge work; `result()` blocks until the device is done and returns host values."""

    def __init__(self, n: int, chunks: list[_Chunk], truncated: np.ndarray, dropped: np.ndarray,
                 response_tokens: np.ndarray, num_annotations: np.ndarray, keep: slice = slice(None)):
        self.n, self.chunks, self.keep = n, chunks, keep
        self.truncated, self.dropped = truncated, dropped
        self.response_tokens, self.num_annotations = response_tokens, num_annotations
        self._result: dict | None = None

    def result(self) -> dict:
        """visual [N] float32 (0 where has_visual is False), has_visual [N] bool, verdicts (list of
        [n_i] float32: one per judged annotation, in order), margins (same, positive-minus-negative
        logit), answer_logits (list of [n_i, 2]: the negative and positive answers' logits),
        truncated [N] bool, response_tokens [N] int (response tokens the judge saw), dropped [N]
        int (annotations not judged), and the totals n_truncated, n_dropped, plus the shapes
        (rows, length, K) of the device calls."""
        if self._result is None:
            visual = np.zeros(self.n, np.float32)
            has = np.zeros(self.n, bool)
            verdicts = [np.zeros(0, np.float32) for _ in range(self.n)]
            margins = [np.zeros(0, np.float32) for _ in range(self.n)]
            pairs = [np.zeros((0, 2), np.float32) for _ in range(self.n)]
            for c in self.chunks:
                out = jax.device_get(c.output)
                for r, i in enumerate(c.sources):
                    k = int(out.valid[r].sum())
                    visual[i], has[i] = out.visual[r], out.has_visual[r]
                    verdicts[i] = np.asarray(out.verdict[r, :k], np.float32)
                    margins[i] = np.asarray(out.margin[r, :k], np.float32)
                    pairs[i] = np.asarray(out.logits[r, :k], np.float32)
            k = self.keep  # the caller's rows (this process's, in a multi-process call)
            truncated, dropped = self.truncated[k], self.dropped[k]
            self._result = dict(
                visual=visual[k], has_visual=has[k], verdicts=verdicts[k], margins=margins[k],
                answer_logits=pairs[k], truncated=truncated, dropped=dropped,
                response_tokens=self.response_tokens[k], n_truncated=int(truncated.sum()),
                n_dropped=int(dropped.sum()), shapes=[c.shape for c in self.chunks],
            )
        return self._result


class Judge:
    """Tokenizer + judge model (module, params) + config, on an optional mesh.

    `scheme` is the prompt's host work and device function (`YesNoScheme` or `PaperScheme`, by
    `config.prompt`); `forward(params, batch)` is THE jitted device function (one compile per
    bucket shape, traced inside the mesh's activation rules); `verdicts(params, batch)` returns
    its (verdict [B, K], valid [B, K]).
    Annotations are given per response as a list of strings, or as the record's stored text
    (`Record.annotations_text`, which the paper prompt quotes verbatim), or None.

        judge = Judge.load("Qwen2.5-32B-Instruct", JudgeConfig(prompt="paper"), mesh=mesh, dtype="bfloat16")
        pending = judge.submit(responses, annotations)    # returns immediately
        ...                                               # host rewards (math-verify) run here
        out = pending.result()      # dict(visual [N], has_visual [N], verdicts [list of arrays], ...)
    """

    def __init__(self, tokenizer, module: QwenCausalLM, params, config: JudgeConfig = JudgeConfig(),
                 mesh: Mesh | None = None):
        if module.cfg.is_vlm:
            logger.info("judge model is a VLM; it is used as a text model")
        self.tokenizer, self.module, self.params, self.config, self.mesh = tokenizer, module, params, config, mesh
        scheme_class = PaperScheme if config.prompt == "paper" else YesNoScheme
        self.scheme = scheme = scheme_class(tokenizer, config, module.cfg.text.vocab_size)
        self.row_multiple = 1 if mesh is None else batch_axis_size(mesh)
        # Outputs are small ([rows, K]); replicated, every process can read them.
        out = None if mesh is None else NamedSharding(mesh, P())

        def forward(params, batch):
            with activation_sharding(mesh):
                return scheme.forward(module, params, batch, mesh)

        self.forward = jax.jit(forward, out_shardings=out)
        self.stats = dict(responses=0, truncated=0, dropped_annotations=0, device_calls=0)

    @classmethod
    def load(cls, path: str | os.PathLike, config: JudgeConfig = JudgeConfig(), *, mesh: Mesh | None = None,
             tokenizer_path: str | os.PathLike | None = None, dtype="bfloat16", param_dtype=None,
             attention: str = "auto") -> "Judge":
        """An HF checkpoint directory (config.json + safetensors + tokenizer files). With a mesh,
        every weight goes straight to its shards under the policy's sharding rules. attention:
        the run's `model.attention` (`models.attention`)."""
        model = load_model(path, mesh, dtype=dtype, param_dtype=param_dtype, attention=attention)
        return cls.from_model(load_tokenizer(tokenizer_path or path, vision=False), model, config, mesh)

    @classmethod
    def from_model(cls, tokenizer, model: Model, config: JudgeConfig = JudgeConfig(),
                   mesh: Mesh | None = None) -> "Judge":
        return cls(tokenizer, model.module, model.params, config, mesh)

    # -- the yes/no prompt's pieces (its warm start trains on exactly these rows) --

    @property
    def pieces(self):
        return self.scheme.pieces

    @property
    def yes_ids(self) -> tuple[int, ...]:
        return self.scheme.yes_ids

    @property
    def no_ids(self) -> tuple[int, ...]:
        return self.scheme.no_ids

    def prompt_ids(self, response: str, statements: Sequence[str]):
        """See `YesNoScheme.prompt_ids`."""
        return self.scheme.prompt_ids(response, statements)

    # -- host side --

    def build(self, responses: Sequence[str], annotations: Sequence[Any]):
        """Host work for a call: rows, then numpy batches (one per chunk of `max_rows_per_call`,
        rows sorted by length). Returns (batches, sources: the caller's index of each batch's real
        rows, info: truncated [N], dropped [N], response_tokens [N], num_annotations [N])."""
        if len(responses) != len(annotations):
            raise ValueError(f"{len(responses)} responses but {len(annotations)} annotation lists")
        return self.scheme.build(responses, annotations, self.row_multiple)

    def place(self, batch):
        """The batch on the device(s): rows over the mesh's data axes, or the default device."""
        if self.mesh is None:
            return jax.device_put(batch)
        return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(self.mesh, x.shape)), batch)

    # -- device side --

    def verdicts(self, params, batch):
        """(verdict [B, K] float32, valid [B, K] bool); `visual_reward` of them gives [B]."""
        out = self.forward(params, batch)
        return out.verdict, out.valid

    def submit(self, responses: Sequence[str], annotations: Sequence[Any], params=None) -> PendingVerdicts:
        """Tokenize, pack, place and dispatch; returns without waiting for the device.

        On a mesh over several processes, each passes its own responses: the judge packs the
        responses of all processes (every process builds the same global rows, so the device
        calls match) and each gets its own verdicts back."""
        params = self.params if params is None else params
        n_own, keep = len(responses), slice(None)
        if self.mesh is not None and jax.process_count() > 1:
            own = [a if isinstance(a, str) else list(a or []) for a in annotations]
            parts = allgather_json([list(responses), own])
            start = sum(len(r) for r, _ in parts[:jax.process_index()])
            keep = slice(start, start + n_own)
            responses = [x for r, _ in parts for x in r]
            annotations = [x for _, a in parts for x in a]
        batches, sources, info = self.build(responses, annotations)
        chunks = [_Chunk(self.forward(params, self.place(b)), src, self.scheme.shape(b))
                  for b, src in zip(batches, sources)]
        n_truncated, n_dropped = int(info["truncated"][keep].sum()), int(info["dropped"][keep].sum())
        self.stats["responses"] += n_own
        self.stats["truncated"] += n_truncated
        self.stats["dropped_annotations"] += n_dropped
        self.stats["device_calls"] += len(chunks)
        if n_truncated or n_dropped:
            logger.info("judge: %d responses truncated, %d annotations dropped in this call", n_truncated, n_dropped)
        return PendingVerdicts(len(responses), chunks, info["truncated"], info["dropped"],
                               info["response_tokens"], info["num_annotations"], keep)

    def __call__(self, responses: Sequence[str], annotations: Sequence[Any]) -> dict:
        """Blocking: see `PendingVerdicts.result`."""
        return self.submit(responses, annotations).result()
