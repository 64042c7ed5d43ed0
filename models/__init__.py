"""Flax port of Qwen2 / Qwen2-VL / Qwen2.5-VL / Qwen3 / Qwen3-VL that loads and saves Hugging Face checkpoints."""

from models.config import ConfigError, ModelConfig, TextConfig, VisionConfig, config_from_dict, load_config
from models.pretrained import Model, abstract_params, from_config, init_params, load_pretrained
from models.qwen2 import KVCache
from models.weights import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "Model", "ModelConfig", "TextConfig", "VisionConfig",
    "abstract_params", "config_from_dict", "from_config", "init_params", "load_config", "load_pretrained",
]
