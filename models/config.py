"""Model configs parsed from Hugging Face `config.json` (transformers 4.x flat and 5.x nested layouts).

One dataclass per tower. The HF dict is kept beside the parsed config so that `save_pretrained`
writes back exactly what was read (plus nothing we do not understand being lost).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3", "qwen3_vl")
TEXT_MODEL_TYPES = ("qwen2", "qwen3")

# Keys of the text decoder that transformers 4.x kept at the top level of a VLM config.
_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "hidden_act", "use_sliding_window", "max_position_embeddings",
    "eos_token_id", "bos_token_id", "pad_token_id", "head_dim",
)


class ConfigError(ValueError):
    """A config.json we cannot run, with the file and key named."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    # None for plain 1D RoPE (Qwen2 judge); (t, h, w) frequency split for M-RoPE (Qwen2-VL).
    mrope_section: tuple[int, int, int] | None = None
    # Qwen3-VL: the h and w frequencies interleave with t (t h w t h w ...) instead of three chunks.
    mrope_interleaved: bool = False
    tie_word_embeddings: bool = False
    # Qwen2: biases on q/k/v. Qwen3: none, and an RMSNorm over each head's q and k before RoPE.
    qkv_bias: bool = True
    qk_norm: bool = False


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: str  # "qwen2_vl", "qwen2_5_vl" or "qwen3_vl"
    depth: int
    width: int
    num_heads: int
    mlp_dim: int
    out_dim: int  # merger output = text hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # Qwen2.5-VL only: window attention everywhere except these blocks.
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    # Qwen3-VL only: a learned square grid of position embeddings resampled to each image, the
    # blocks whose outputs feed the DeepStack mergers, the blocks' MLP activation.
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    hf_dict: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None


def _require(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: missing required key '{key}'")
    return d[key]


def _text_config(d: dict, where: str, qwen3: bool = False) -> TextConfig:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        # YaRN / linear / dynamic scaling would load fine and give wrong logits: refuse instead.
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (only default and mrope)")
    theta = rope.get("rope_theta", d.get("rope_theta", 1e6))
    mrope = rope.get("mrope_section")
    n_heads = _require(d, "num_attention_heads", where)
    hidden = _require(d, "hidden_size", where)
    if d.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported")
    if qwen3 and d.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported for Qwen3 (no released checkpoint has it)")
    cfg = TextConfig(
        vocab_size=_require(d, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_require(d, "intermediate_size", where),
        num_layers=_require(d, "num_hidden_layers", where),
        num_heads=n_heads,
        num_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or hidden // n_heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(mrope) if mrope else None,
        mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=not qwen3,
        qk_norm=qwen3,
    )
    if cfg.mrope_section and sum(cfg.mrope_section) != cfg.head_dim // 2:
        raise ConfigError(f"{where}: sum(mrope_section)={sum(cfg.mrope_section)} != head_dim/2={cfg.head_dim // 2}")
    return cfg


def _vision_config(d: dict, model_type: str, text_hidden: int, where: str) -> VisionConfig:
    if model_type == "qwen2_vl":
        width = d.get("embed_dim", 1280)
        return VisionConfig(
            kind=model_type, depth=_require(d, "depth", where), width=width,
            num_heads=_require(d, "num_heads", where), mlp_dim=int(width * d.get("mlp_ratio", 4)),
            out_dim=d.get("hidden_size", text_hidden), patch_size=d.get("patch_size", 14),
            temporal_patch_size=d.get("temporal_patch_size", 2),
            spatial_merge_size=d.get("spatial_merge_size", 2), in_channels=d.get("in_channels", 3),
        )
    if model_type == "qwen3_vl":
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (gelu_pytorch_tanh, gelu)")
        n_pos = _require(d, "num_position_embeddings", where)
        if int(n_pos**0.5) ** 2 != n_pos:
            raise ConfigError(f"{where}: num_position_embeddings={n_pos} is not a square grid")
        deepstack = tuple(d.get("deepstack_visual_indexes") or ())
        depth = _require(d, "depth", where)
        if any(not 0 <= i < depth for i in deepstack):
            raise ConfigError(f"{where}: deepstack_visual_indexes {deepstack} outside the {depth} blocks")
        return VisionConfig(
            kind=model_type, depth=depth, width=_require(d, "hidden_size", where),
            num_heads=_require(d, "num_heads", where), mlp_dim=_require(d, "intermediate_size", where),
            out_dim=d.get("out_hidden_size", text_hidden), patch_size=d.get("patch_size", 16),
            temporal_patch_size=d.get("temporal_patch_size", 2),
            spatial_merge_size=d.get("spatial_merge_size", 2), in_channels=d.get("in_channels", 3),
            num_position_embeddings=n_pos, deepstack_visual_indexes=deepstack, hidden_act=act,
            rope_theta=float((d.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        )
    return VisionConfig(
        kind=model_type, depth=_require(d, "depth", where), width=_require(d, "hidden_size", where),
        num_heads=_require(d, "num_heads", where), mlp_dim=_require(d, "intermediate_size", where),
        out_dim=d.get("out_hidden_size", text_hidden), patch_size=d.get("patch_size", 14),
        temporal_patch_size=d.get("temporal_patch_size", 2),
        spatial_merge_size=d.get("spatial_merge_size", 2), in_channels=d.get("in_channels", 3),
        window_size=d.get("window_size", 112),
        fullatt_block_indexes=tuple(d.get("fullatt_block_indexes", ())),
    )


def config_from_dict(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Parses an HF config dict; `where` names the file in error messages."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{where}: unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    qwen3 = model_type.startswith("qwen3")
    if model_type in TEXT_MODEL_TYPES:
        return ModelConfig(model_type=model_type, text=_text_config(d, where, qwen3), hf_dict=d)
    # 5.x nests the decoder under text_config; 4.x keeps it flat. Flat keys fill what is absent.
    text_d = {k: d[k] for k in _TEXT_KEYS if k in d}
    text_d.update(d.get("text_config") or {})
    if "tie_word_embeddings" in d:
        text_d["tie_word_embeddings"] = d["tie_word_embeddings"] or text_d.get("tie_word_embeddings", False)
    text = _text_config(text_d, where, qwen3)
    if text.mrope_section is None:
        raise ConfigError(f"{where}: a {model_type} config needs rope mrope_section")
    vision = _vision_config(_require(d, "vision_config", where), model_type, text.hidden_size, f"{where} vision_config")
    return ModelConfig(
        model_type=model_type, text=text, vision=vision,
        image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
        vision_start_token_id=d.get("vision_start_token_id", 151652), hf_dict=d,
    )


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file}: not found")
    return config_from_dict(json.loads(file.read_text()), where=str(file))
