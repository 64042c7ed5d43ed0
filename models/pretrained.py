"""`load_pretrained` / `Model`: the public face of the port.

    model = load_pretrained("hf_dir", dtype=jnp.float32)
    logits = model(input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)   # [B, T, V]
    model.save_pretrained("out_dir")

`Model` is a thin shell: a config, a params tree and the Flax module; the host-side index work
(3D positions, patch layout) happens in `prepare_inputs`, the math in one jitted function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.attention import resolve
from models.causal_lm import QwenCausalLM
from models.config import ModelConfig, config_from_dict, load_config
from models.positions import rope_index, row_vision_arrays, text_positions, vision_layout
from models.vision import VisionInputs
from models.weights import load_params, save_params

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(d) -> jnp.dtype:
    return jnp.dtype(_DTYPES.get(d, d) if isinstance(d, str) else d)


def dummy_inputs(cfg: ModelConfig):
    """Smallest inputs that touch every parameter (for shape inference)."""
    ids = np.full((1, 4), cfg.image_token_id if cfg.is_vlm else 0, np.int32)
    mask = np.ones((1, 4), np.int32)
    if not cfg.is_vlm:
        return ids, text_positions(mask), mask, None
    m = cfg.vision.spatial_merge_size
    grid = np.array([[1, 2 * m, 2 * m]])
    pos, _ = rope_index(ids, mask, grid, image_token_id=cfg.image_token_id, spatial_merge_size=m)
    n = int(grid.prod())
    vi = VisionInputs(pixel_values=np.zeros((n, cfg.vision.patch_dim), np.float32), **vision_layout(grid, n, cfg.vision))
    return ids, pos, mask, vi


def abstract_params(module: QwenCausalLM) -> Any:
    """Boxed (`nn.LogicallyPartitioned`) tree of ShapeDtypeStructs: shapes, dtypes, logical axes."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(module.cfg))["params"])


class Model:
    """Config + params + module. Params are a plain nested dict (HF names inside the Flax tree)."""

    def __init__(self, config: ModelConfig, params: dict, *, dtype=jnp.float32, remat: bool = False,
                 attention: str = "auto"):
        # Here, not at the first call: a setting this backend or dtype cannot run stops a run at start-up.
        resolve(attention, as_dtype(dtype))
        self.config = config
        self.params = params
        self.module = QwenCausalLM(
            config, dtype=as_dtype(dtype), param_dtype=jax.tree.leaves(params)[0].dtype, remat=remat,
            attention=attention,
        )
        self._forward = jax.jit(lambda p, ids, pos, mask, vi: self.module.apply({"params": p}, ids, pos, mask, vi)[0])

    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       num_patches: int | None = None, per_row: bool = False) -> dict:
        """Host-side: positions [3, B, T] (or [B, T]), rope deltas and the patch layout.

        Packed (default, the HF layout): one `VisionInputs` for all of the batch's patches;
        num_patches pads them to a static count (default: the real count) so that batches with
        different images reuse one compiled program. per_row: every field gets a leading [B]
        axis, row b holding its own images padded to num_patches (see `row_vision_arrays`):
        cheaper attention in the tower, and rows that shard with the batch.
        """
        ids = np.asarray(input_ids).astype(np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
        cfg = self.config
        if not cfg.is_vlm:
            if pixel_values is not None:
                raise ValueError(f"a {cfg.model_type} model takes no images")
            return dict(input_ids=ids, positions=text_positions(mask), attention_mask=mask, vision=None,
                        rope_deltas=np.zeros(ids.shape[0], np.int32))
        pos, deltas = rope_index(ids, mask, image_grid_thw, image_token_id=cfg.image_token_id,
                                 spatial_merge_size=cfg.vision.spatial_merge_size, video_token_id=cfg.video_token_id)
        vi = None
        if pixel_values is not None and per_row:
            vi = VisionInputs(**row_vision_arrays(ids, mask, pixel_values, image_grid_thw, num_patches, cfg.vision,
                                                  image_token_id=cfg.image_token_id))
        elif pixel_values is not None:
            pv = np.asarray(pixel_values, np.float32)
            n = num_patches or pv.shape[0]
            layout = vision_layout(image_grid_thw, n, cfg.vision)
            pv = np.concatenate([pv, np.zeros((n - pv.shape[0], pv.shape[1]), pv.dtype)])
            vi = VisionInputs(pixel_values=pv, **layout)
        return dict(input_ids=ids, positions=pos, attention_mask=mask, vision=vi, rope_deltas=deltas)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """Logits [B, T, V] in the compute dtype. input_ids may be numpy or jax arrays."""
        x = self.prepare_inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        return self._forward(self.params, x["input_ids"], x["positions"], x["attention_mask"], x["vision"])

    def save_pretrained(self, out_dir: str | Path, max_shard_bytes: int = 4 << 30) -> None:
        """safetensors (hub key layout) + config.json that transformers loads."""
        out = Path(out_dir)
        save_params(self.params, self.config, out, max_shard_bytes)
        hf = dict(self.config.hf_dict)
        hf["dtype"] = jnp.dtype(self.module.param_dtype).name
        hf.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))


def init_params(config: ModelConfig, rng: jax.Array, *, param_dtype=jnp.float32,
                shardings: Any = None) -> dict:
    """Random params (normal 0.02, like HF's init); created directly with `shardings` if given
    (a tree of Shardings matching the params), so no host ever holds the full set."""
    module = QwenCausalLM(config, param_dtype=as_dtype(param_dtype))
    init = lambda r: nn.unbox(module.init(r, *dummy_inputs(config))["params"])  # noqa: E731
    return jax.jit(init, out_shardings=shardings)(rng)


def from_config(config: ModelConfig | dict, rng: jax.Array | int = 0, *, dtype=jnp.float32,
                param_dtype=jnp.float32, remat: bool = False, attention: str = "auto") -> Model:
    cfg = config if isinstance(config, ModelConfig) else config_from_dict(config)
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    return Model(cfg, init_params(cfg, rng, param_dtype=param_dtype), dtype=dtype, remat=remat, attention=attention)


def load_pretrained(path: str | Path, *, dtype=jnp.float32, param_dtype=None, remat: bool = False,
                    attention: str = "auto",
                    place: Callable[[tuple[str, ...], np.ndarray], jax.Array] | None = None) -> Model:
    """Loads an HF directory (config.json + *.safetensors, sharded or not).

    dtype: compute dtype; param_dtype: storage dtype of params (default: dtype); attention:
    "auto" | "xla" | "cudnn" | "pallas" (see `models.attention`).
    place(flax_path, host_array) -> device array puts each leaf where it belongs (e.g. sharded
    over a mesh, see `pr1_jax.sharding`); default: the default device.
    """
    path = Path(path)
    cfg = load_config(path)
    param_dtype = as_dtype(param_dtype or dtype)
    module = QwenCausalLM(cfg, param_dtype=param_dtype)
    abstract = nn.unbox(abstract_params(module))
    params = load_params(path, cfg, abstract, place or (lambda _, x: jax.device_put(x)))
    return Model(cfg, params, dtype=dtype, remat=remat, attention=attention)
