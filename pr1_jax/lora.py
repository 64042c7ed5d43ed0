"""LoRA adapters on the policy's decoder: their config, their init, splitting them from and
merging them into the base params, and PEFT's file layout.

The adapter itself is `models.layers.Dense`: with `lora` set, a targeted projection holds
`lora_a` [in, rank] and `lora_b` [rank, out] (float32) next to its `kernel`, stacked over the
decoder's `layers` axis like it, named by the kernel's logical axes (so `pr1_jax.sharding`
places them as it places the kernel), and adds (alpha / rank) * dropout(x) A B to the layer's
output. The params tree of a module built with a `LoraConfig` is the base tree plus those leaves;
`split` / `join` take them apart and put them back, so the learner differentiates the adapters
only while the base (the run's `model.policy`, kept in `learner.dtype`) is a constant input.

Written here rather than taken from `qwix` (Tunix's LoRA / QLoRA library): qwix applies LoRA by
intercepting the `dot_general` / `einsum` calls of modules whose path matches a regex and
creating the adapters as params inside the intercepted call. Our decoder runs the same
`DecoderLayer` two ways, under `nn.scan` (learner, prefill: one path, stacked params) and unrolled
on per-layer params with the module applied unbound (`Qwen2Decoder.decode`), so the paths and
param layouts it would have to match differ between the two; its adapters would carry no logical
axis names for our sharding rules; and we still need PEFT's init, dropout only in the update and
PEFT's file layout, which it does not give. A dozen lines in `Dense` do the math on both paths.

Sampling: the sampler runs on the merged weights, merged once per step (`merge`, jitted by the
learner: `Learner.policy_params`), not on base + adapters in every decode step. Measured with
XLA's cost analysis on CPU (`python bench/lora_decode.py --rows 16 --rank 64`; the decode issue's
1.5B-class Qwen2.5-VL, fp32, 522 cache slots): a decode step reads 7.92 GB merged and 8.34 GB
unmerged (+5.3%; +4.7% flops, 1511 kernels instead of 1119: two small matmuls per projection and
token), a merge moves 21.3 GB once, so merging pays after 51 decode steps (17 at 128 rows, 107 at
rank 16), fewer than one decode segment (128 steps) of a rollout. The cost: a merged copy of the
adapted kernels in the compute dtype beside the base while the step samples (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pr1_jax import configlib

# PEFT's `target_modules` names of the decoder's projections (and transformers' module names).
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP
LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`learner.lora`: rank 0 (the default) trains every param; rank r > 0 trains adapters of rank
    r on the decoder's `targets` only (the base weights and the vision tower frozen), scaled by
    alpha / rank as PEFT does (alpha 16 and dropout 0.05 are verl's and TRL's usual settings)."""

    rank: int = configlib.bounded(0, ge=0)
    alpha: float = configlib.bounded(16.0, gt=0)
    dropout: float = configlib.bounded(0.0, ge=0, le=0.99)  # on the adapter's input, in the update only
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank {self.rank}: must be >= 0 (0 = off)")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"lora.targets {unknown}: unknown; the decoder's projections are {list(TARGETS)}")
        if self.rank and not self.targets:
            raise ValueError(f"lora.rank {self.rank} with no lora.targets: name the projections to adapt")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_adapter(path: tuple[str, ...]) -> bool:
    return path[-1] in LEAVES


def split(params: dict) -> tuple[dict, dict]:
    """(base, adapters) of a params tree with adapters (each keeps its own leaves' paths)."""
    flat = traverse_util.flatten_dict(params)
    base = {k: v for k, v in flat.items() if not is_adapter(k)}
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def join(base: dict, adapters: dict) -> dict:
    """The params tree a module with adapters applies: `base` with `adapters` beside its kernels."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapters)})


def init_adapters(key: jax.Array, abstract: dict) -> dict:
    """Adapters of the shapes in `abstract` (ShapeDtypeStructs, `split` of the module's abstract
    params), as PEFT initialises them: A kaiming-uniform (torch's a = sqrt(5) on the [rank, in]
    weight: U(-1/sqrt(in), 1/sqrt(in))), B zero, so the adapted model starts as the base. float32."""
    flat = traverse_util.flatten_dict(abstract)
    keys = dict(zip(flat, jax.random.split(key, len(flat))))

    def one(path, a):
        if path[-1] == "lora_b":
            return jnp.zeros(a.shape, jnp.float32)
        bound = 1.0 / np.sqrt(a.shape[-2])  # [..., in, rank]
        return jax.random.uniform(keys[path], a.shape, jnp.float32, -bound, bound)

    return traverse_util.unflatten_dict({p: one(p, a) for p, a in flat.items()})


def merge(base: dict, adapters: dict, cfg: LoraConfig) -> dict:
    """`base` with every adapted kernel replaced by W + (alpha / rank) A B, summed in float32 and
    stored in the kernel's dtype: the params of the model without adapters that computes what
    base + adapters compute (up to that rounding). Pure; jit it."""
    out = traverse_util.flatten_dict(base)
    flat = traverse_util.flatten_dict(adapters)
    for path in {p[:-1] for p in flat}:
        a, b = flat[path + ("lora_a",)], flat[path + ("lora_b",)]
        w = out[path + ("kernel",)]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        out[path + ("kernel",)] = (w.astype(jnp.float32) + cfg.scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(out)


# --------------------------------------------------------------------------- PEFT layout


def _module_path(name: str) -> str:
    """transformers' module of a decoder projection, inside a layer."""
    return f"self_attn.{name}" if name in ATTENTION else f"mlp.{name}"


# transformers 5.x holds a Qwen-VL's decoder at `model.language_model` (its in-memory names, which
# PEFT's keys follow), so `target_modules` is a regex on it: Qwen2.5-VL's vision MLP has
# gate/up/down projections too, and those stay frozen.
DECODER = "model.language_model.layers"
_DECODER_RE = DECODER.replace(".", r"\.")


def peft_tensors(adapters: dict) -> dict[str, np.ndarray]:
    """PEFT's `adapter_model.safetensors` tensors of the decoder's adapters: per layer i and
    projection, `base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_A.weight`
    [rank, in] (= A^T) and `....lora_B.weight` [out, rank] (= B^T), float32."""
    layers = adapters["decoder"]["layers"]
    out = {}
    for name, leaves in layers.items():
        a, b = (np.asarray(jax.device_get(leaves[k]), np.float32) for k in LEAVES)  # [L, in, r], [L, r, out]
        for i in range(a.shape[0]):
            prefix = f"base_model.model.{DECODER}.{i}.{_module_path(name)}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return out


def peft_config(cfg: LoraConfig, base_model: str) -> dict:
    """PEFT's `adapter_config.json` (a `LoraConfig` of `peft`) for adapters on `cfg.targets`."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": rf"{_DECODER_RE}\.\d+\.(self_attn|mlp)\.({'|'.join(cfg.targets)})",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_peft(out: str | Path, adapters: dict, cfg: LoraConfig, base_model: str) -> None:
    """Writes `adapter_config.json` and `adapter_model.safetensors` into `out` (PEFT's layout:
    `peft.PeftModel.from_pretrained(base, out)` loads them)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n")
    save_file(peft_tensors(adapters), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
