"""Hugging Face safetensors <-> Flax params.

Key layouts accepted on load: the hub / `save_pretrained` layout (`model.layers.*`, `visual.*`,
`lm_head.weight`), transformers 5.x's in-memory layout (`model.language_model.*`,
`model.visual.*`) and 4.x's `language_model.model.*`. Saving writes the hub layout, which every
transformers version loads.

Per-layer HF tensors are stacked into the scanned `[L, ...]` Flax leaves. Loading streams: tensors
are read one at a time from memory-mapped shards into one host buffer per Flax leaf, and a leaf
moves to its device(s) as soon as its last layer arrives, so a 32B checkpoint never needs two full
host copies.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from models.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and key."""


_PREFIXES = (
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^model\.visual\."), "visual."),
)

# (canonical HF key regex, Flax path template, tensor kind). `{i}` is the layer index.
_RULES = (
    (r"model\.embed_tokens\.weight", "embed_tokens/embedding", "copy"),
    (r"lm_head\.weight", "lm_head/kernel", "linear"),
    (r"model\.norm\.weight", "decoder/norm/weight", "copy"),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", "decoder/layers/{1}/weight", "copy"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", "decoder/layers/{1}/kernel", "linear"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.bias", "decoder/layers/{1}/bias", "copy"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight", "decoder/layers/{1}/weight", "copy"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "decoder/layers/{1}/kernel", "linear"),
    (r"visual\.patch_embed\.proj\.weight", "visual/patch_embed/kernel", "conv"),
    (r"visual\.patch_embed\.proj\.bias", "visual/patch_embed/bias", "copy"),
    (r"visual\.pos_embed\.weight", "visual/pos_embed", "copy"),
    (r"visual\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", "visual/blocks/{1}/{2}", "norm"),
    (r"visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", "visual/blocks/{1}/{2}", "param"),
    (r"visual\.blocks\.(\d+)\.mlp\.(fc1|fc2|linear_fc1|linear_fc2|gate_proj|up_proj|down_proj)\.(weight|bias)", "visual/blocks/{1}/{2}", "param"),
    (r"visual\.merger\.ln_q\.(weight|bias)", "visual/merger_ln_q/{0}", "norm"),
    (r"visual\.merger\.mlp\.([02])\.(weight|bias)", "visual/merger_mlp_{0}/{1}", "param"),
    (r"visual\.merger\.norm\.(weight|bias)", "visual/merger_ln_q/{0}", "norm"),
    (r"visual\.merger\.linear_fc1\.(weight|bias)", "visual/merger_mlp_0/{0}", "param"),
    (r"visual\.merger\.linear_fc2\.(weight|bias)", "visual/merger_mlp_2/{0}", "param"),
    (r"visual\.deepstack_merger_list\.(\d+)\.norm\.(weight|bias)", "visual/deepstack_{0}_ln_q/{1}", "norm"),
    (r"visual\.deepstack_merger_list\.(\d+)\.linear_fc1\.(weight|bias)", "visual/deepstack_{0}_mlp_0/{1}", "param"),
    (r"visual\.deepstack_merger_list\.(\d+)\.linear_fc2\.(weight|bias)", "visual/deepstack_{0}_mlp_2/{1}", "param"),
)
_COMPILED = [(re.compile(p + "$"), t, k) for p, t, k in _RULES]


def canonical_key(key: str) -> str:
    for pattern, repl in _PREFIXES:
        key = pattern.sub(repl, key)
    return key


def _layer_norm_leaf(cfg: ModelConfig) -> bool:
    return cfg.vision is not None and cfg.vision.kind in ("qwen2_vl", "qwen3_vl")


def hub_key(key: str, cfg: ModelConfig) -> str:
    """The key `save_pretrained` writes for canonical `key`: Qwen3-VL's hub checkpoints use
    transformers 5.x's layout (`model.language_model.*`, `model.visual.*`), older models the flat one."""
    if cfg.model_type != "qwen3_vl":
        return key
    if key.startswith("visual."):
        return "model." + key
    return "model.language_model." + key[len("model."):] if key.startswith("model.") else key


def map_key(key: str, cfg: ModelConfig) -> tuple[tuple[str, ...], int | None, str] | None:
    """HF key -> (Flax path, layer index or None, how to convert). None for keys we do not know."""
    key = canonical_key(key)
    for pattern, template, kind in _COMPILED:
        m = pattern.match(key)
        if not m:
            continue
        groups = m.groups()
        layer = None
        if template.startswith(("decoder/layers", "visual/blocks")):
            layer, groups = int(groups[0]), groups[1:]
        path = template.format(*(["_"] + list(groups)) if layer is not None else groups)
        if kind == "param":  # a Linear inside the vision tower: weight -> kernel (transposed)
            kind = "linear" if path.endswith("weight") else "copy"
            path = path[: -len("weight")] + "kernel" if path.endswith("weight") else path
        elif kind == "norm":  # LayerNorm weight is Flax's scale; RMSNorm keeps `weight`
            if _layer_norm_leaf(cfg) and path.endswith("weight"):
                path = path[: -len("weight")] + "scale"
            kind = "copy"
        return tuple(path.split("/")), layer, kind
    return None


def to_flax(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return value.T
    if kind == "conv":  # Conv3d with kernel == stride == patch equals a Dense over flattened patches
        return value.reshape(value.shape[0], -1).T
    return value


def _hf_shape(flax_shape: tuple[int, ...], kind: str, conv_in: tuple[int, ...] = ()) -> tuple[int, ...]:
    if kind == "linear":
        return tuple(reversed(flax_shape))
    if kind == "conv":
        return (flax_shape[1], *conv_in)
    return flax_shape


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (pickle .bin checkpoints are refused; convert them first)")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{index}: lists {f.name}, which does not exist")
    return files


def load_params(path: Path, cfg: ModelConfig, abstract: dict, place: Callable[[tuple[str, ...], np.ndarray], jax.Array]):
    """Streams the checkpoint at `path` into a params tree shaped like `abstract`.

    abstract: nested dict of jax.ShapeDtypeStruct (unboxed); place(path, host_array) -> device array.
    """
    flat = {tuple(k.key for k in kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    seen: dict[tuple[str, ...], set] = {}
    out: dict[tuple[str, ...], jax.Array] = {}
    stacked_len = {("decoder",): cfg.text.num_layers, ("visual",): cfg.vision.depth if cfg.vision else 0}
    conv_in = ()
    if cfg.vision is not None:
        v = cfg.vision
        conv_in = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    for file in checkpoint_files(path):
        with safe_open(file, framework="np") as f:
            for key in f.keys():
                mapped = map_key(key, cfg)
                if mapped is None:
                    raise CheckpointError(f"{file.name}: unexpected tensor '{key}' for a {cfg.model_type} model")
                fpath, layer, kind = mapped
                if fpath[0] == "lm_head" and cfg.text.tie_word_embeddings:
                    continue  # tied checkpoints sometimes carry a copy of the embedding
                if fpath not in flat:
                    raise CheckpointError(f"{file.name}: tensor '{key}' has no place in a {cfg.model_type} model")
                target = flat[fpath]
                shape = target.shape[1:] if layer is not None else target.shape
                want = _hf_shape(shape, kind, conv_in)
                sl = f.get_slice(key)
                got = tuple(sl.get_shape())
                if got != want:
                    raise CheckpointError(f"{file.name}: tensor '{key}' has shape {got}, expected {want}")
                value = to_flax(f.get_tensor(key), kind).astype(target.dtype)
                if layer is None:
                    out[fpath] = place(fpath, value)
                    continue
                n = stacked_len[fpath[:1]]
                if not 0 <= layer < n:
                    raise CheckpointError(f"{file.name}: tensor '{key}' has layer {layer}, the config has {n}")
                buf = buffers.setdefault(fpath, np.empty(target.shape, target.dtype))
                buf[layer] = value
                seen.setdefault(fpath, set()).add(layer)
                if len(seen[fpath]) == n:
                    out[fpath] = place(fpath, buffers.pop(fpath))
    missing = [p for p in flat if p not in out]
    if missing:
        names = []
        for p in missing:
            n = stacked_len.get(p[:1])
            layers = sorted(set(range(n)) - seen.get(p, set())) if p[0] in ("decoder", "visual") and p[1] in ("layers", "blocks") else None
            names.append("/".join(p) + (f" (layers {layers[:8]}{'...' if len(layers) > 8 else ''})" if layers else ""))
        raise CheckpointError(f"{path}: checkpoint is missing tensors for: {', '.join(names)}")
    tree: dict = {}
    for p, v in out.items():
        node = tree
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = v
    return tree


def hf_tensors(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(hub-layout key, host tensor) for every tensor, one leaf on the host at a time."""
    flat = {tuple(k.key for k in kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    inverse = {}
    for kind_key in _hf_key_table(cfg):
        inverse.setdefault(kind_key[1], []).append(kind_key)
    for fpath, leaf in flat.items():
        if fpath not in inverse:
            raise CheckpointError(f"no Hugging Face name for param {'/'.join(fpath)}")
        host = np.asarray(jax.device_get(leaf))
        for hf_key, _, layer, kind in inverse[fpath]:
            value = host[layer] if layer is not None else host
            if kind == "linear":
                value = value.T
            elif kind == "conv":
                v = cfg.vision
                value = value.T.reshape(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
            yield hub_key(hf_key, cfg), np.ascontiguousarray(value)


def _hf_key_table(cfg: ModelConfig):
    """Every HF key of the model with its Flax path, layer and kind (the inverse of `map_key`)."""
    t = cfg.text
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not t.tie_word_embeddings:
        keys.append("lm_head.weight")
    for i in range(t.num_layers):
        p = f"model.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        keys += [p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if t.qkv_bias:
            keys += [p + f"self_attn.{n}.bias" for n in ("q_proj", "k_proj", "v_proj")]
        if t.qk_norm:
            keys += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        keys += [p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
    v = cfg.vision
    if v is not None and v.kind == "qwen3_vl":
        keys += _qwen3_vision_keys(v)
    elif v is not None:
        ln = v.kind == "qwen2_vl"
        keys.append("visual.patch_embed.proj.weight")
        mlp = ("fc1", "fc2") if ln else ("gate_proj", "up_proj", "down_proj")
        for i in range(v.depth):
            p = f"visual.blocks.{i}."
            for n in ("norm1", "norm2"):
                keys += [p + f"{n}.weight"] + ([p + f"{n}.bias"] if ln else [])
            keys += [p + f"attn.{n}.{w}" for n in ("qkv", "proj") for w in ("weight", "bias")]
            keys += [p + f"mlp.{n}.{w}" for n in mlp for w in ("weight", "bias")]
        keys += ["visual.merger.ln_q.weight"] + (["visual.merger.ln_q.bias"] if ln else [])
        keys += [f"visual.merger.mlp.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")]
    for key in keys:
        fpath, layer, kind = map_key(key, cfg)
        yield key, fpath, layer, kind


def _qwen3_vision_keys(v) -> list[str]:
    wb = lambda name: [f"{name}.weight", f"{name}.bias"]  # noqa: E731
    keys = wb("visual.patch_embed.proj") + ["visual.pos_embed.weight"]
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        for n in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            keys += wb(p + n)
    for p in ["visual.merger"] + [f"visual.deepstack_merger_list.{j}" for j in range(len(v.deepstack_visual_indexes))]:
        for n in ("norm", "linear_fc1", "linear_fc2"):
            keys += wb(f"{p}.{n}")
    return keys


def save_params(params: dict, cfg: ModelConfig, out: Path, max_shard_bytes: int = 4 << 30) -> None:
    """Writes `model*.safetensors` (+ index when sharded) and removes any other `*.safetensors` and
    index in `out`. Shards are written one at a time, each first to a temporary name then renamed,
    so an interrupted save never leaves a half shard under a final name."""
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    written: list[tuple[str, list[str]]] = []

    def flush():
        name = f"model-{len(written) + 1:05d}.safetensors"
        tmp = out / (name + ".tmp")
        save_file(shards[0], str(tmp), metadata={"format": "pt"})
        tmp.rename(out / name)
        written.append((name, list(shards[0])))
        shards[0] = {}

    total = 0
    for key, value in hf_tensors(params, cfg):
        if size and size + value.nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[0][key] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    index_path = out / "model.safetensors.index.json"
    if len(written) == 1:
        (out / written[0][0]).rename(out / "model.safetensors")
        finals = {"model.safetensors"}
        index_path.unlink(missing_ok=True)
    else:
        n = len(written)
        weight_map = {}
        for j, (name, keys) in enumerate(written):
            final = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            (out / name).rename(out / final)
            weight_map.update({k: final for k in keys})
        finals = set(weight_map.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        index_path.write_text(json.dumps(index, indent=2))
    # Weights of an earlier save into `out` would be read with these (`checkpoint_files` reads the
    # index, or else every *.safetensors): only what this save wrote stays.
    for f in out.glob("*.safetensors"):
        if f.name not in finals:
            f.unlink()


# What a Qwen2 / Qwen3 (VL) checkpoint directory carries besides weights and config.json:
# what a tokenizer and a processor load from.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
              "video_preprocessor_config.json", "processor_config.json", "generation_config.json")


def copy_side_files(src_dirs: Iterable[str | Path], out: str | Path) -> None:
    """The tokenizer / processor files of `src_dirs` (those present; later directories win) into
    the checkpoint directory `out`, beside what `save_params` wrote."""
    for d in src_dirs:
        for name in SIDE_FILES:
            if (Path(d) / name).exists():
                shutil.copy(Path(d) / name, Path(out) / name)
