"""Resharding by accident: XLA's "[SPMD] Involuntary full rematerialization" in the compiled update,
sampler and judge, at the paper's sizes on 32 virtual CPU devices or for tiny configs.

    python bench/resharding.py                         # paper configs, 32 devices, mesh [1, 8, 4]
    python bench/resharding.py --config tiny --mesh 4,2,1 2,1,4 --devices 8
    python bench/resharding.py --layers 2              # the same bodies, compiled faster (see below)

When the SPMD partitioner cannot move a tensor from the sharding one op leaves it in to the
sharding the next op needs (an all-to-all it has no rule for, a split inside a head that must
become a split over heads), it replicates the tensor on every device and slices it again, and
says so on stderr from C++. At the paper's shapes such a copy is a whole activation per layer.
`involuntary_copies` catches those lines at the file-descriptor level while a program compiles.

Nothing runs and no weights exist: params, optimizer state and batches are ShapeDtypeStructs
with the trainer's shardings, and each program is jitted as the trainer jits it (the compile
functions of `bench/memory.py`): `train_step` (the learner's update, micro-batches of
`--micro` sequences), `train_step_packed` (the update on packed rows, the paper configs' layout:
one prompt and two responses a row, the block-sparse attention), `sampler` (prefill + decode of `--prompts` x n), `judge` (the yes/no
judge's prefill) and `judge_paper` (the paper judge's shared system turn + constrained decode,
`configs/paper_*.yaml`). Paper configs: the Qwen2.5-VL-7B and Qwen2-VL-7B policies (the two
paper configs) and the Qwen2.5-32B judge, mesh [1, N/4, 4] as the configs set it; shapes
(prompt, image patches, response, judge row) from the flags, 1024 / 1024 / 1024 / 2048 by default.

Depth: the decoders and vision towers are `nn.scan`s (one body whatever the depth) and the
decode steps repeat one layer's program per layer, so `--layers 2` sees every kind of copy the
full depth would, in a fraction of the time; the default compiles the real depth.

Prints one JSON line per (config, mesh, program): {"config", "mesh", "program", "copies",
"compile_s", "ops"} (ops: the first three offending HLO ops, abridged), and exits 1 if any
program has copies.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import memory

MARK = "[SPMD] Involuntary full rematerialization"
PROGRAMS = ("train_step", "train_step_packed", "sampler", "judge", "judge_paper")

# The tests' tiny architectures (tests/reference.py): 4 query heads, 2 KV heads, 4 vision heads.
_TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=False)
_TINY_IDS = dict(image_token_id=100, video_token_id=97, vision_start_token_id=98)
_MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}
TINY = {
    "qwen2_5_vl": dict(model_type="qwen2_5_vl", **_TINY_IDS, text_config=dict(_TINY_TEXT, rope_scaling=_MROPE),
                       vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48,
                                          num_heads=4, window_size=56, fullatt_block_indexes=[1])),
    "qwen2_vl": dict(model_type="qwen2_vl", **_TINY_IDS, text_config=dict(_TINY_TEXT, rope_scaling=_MROPE),
                     vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)),
    "judge": dict(model_type="qwen2", **_TINY_TEXT),
}
# (prompt tokens, image patches, response tokens, samples per prompt, annotations, judge row tokens)
SHAPES = {"paper": (1024, 1024, 1024, 8, 8, 2048), "tiny": (24, 16, 16, 2, 2, 40)}
# The paper configs' policies (configs/paper_*_v5p.yaml) and judge.
PAPER = {
    "qwen2_5_vl_7b": memory.POLICY,
    "qwen2_vl_7b": dict(model_type="qwen2_vl", image_token_id=151655, video_token_id=151656,
                        vision_start_token_id=151652,
                        text_config=dict(memory.POLICY["text_config"]),
                        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2)),
    "judge": memory.JUDGE,
}


@contextlib.contextmanager
def stderr_lines():
    """The lines written to file descriptor 2 inside the block (XLA logs from C++, past Python's
    sys.stderr), into the list it yields once the block ends; they are written on to the real
    stderr as well."""
    sys.stderr.flush()
    saved = os.dup(2)
    lines: list[str] = []
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text = f.read()
            os.write(2, text)
            lines.extend(text.decode(errors="replace").splitlines())


def involuntary_copies(compile_fn):
    """(result of compile_fn(), the partitioner's involuntary-rematerialization lines). The
    persistent compilation cache is off meanwhile: a program read from it is not partitioned, so
    it would say nothing."""
    import jax

    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with stderr_lines() as lines:
            result = compile_fn()
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    return result, [line for line in lines if MARK in line]


def _options(a) -> types.SimpleNamespace:
    """The settings `bench/memory.py`'s compile functions read."""
    return types.SimpleNamespace(mini_batch=0, n=a.n, learner_vision="per_prompt", attention="auto",
                                 prompt=a.prompt, response=a.response, patches=a.patches, sampler_vision="per_row",
                                 annotations=a.annotations, judge_length=a.judge_length, activation_rules="on",
                                 lora_rank=0, row_tokens=0, gather_weights="on")


def _configs(kind: str, layers: int):
    from models import config_from_dict

    out = {}
    for name, d in (TINY if kind == "tiny" else PAPER).items():
        d = copy.deepcopy(d)
        text = d if d["model_type"] == "qwen2" else d["text_config"]
        if layers:
            text["num_hidden_layers"] = layers
        out[name] = config_from_dict(d)
    return out


def check(kind: str, mesh_shape, programs, a, names=None) -> list[dict]:
    """One record per (policy or judge, program) compiled on `mesh_shape` (this process's
    devices); `names`: only these of the config's models (`TINY` / `PAPER` keys)."""
    from pr1_jax.sharding import batch_axis_size, make_mesh

    mesh = make_mesh(mesh_shape)
    opts = _options(a)
    rows = a.micro or batch_axis_size(mesh)  # one sequence (prompt, judge row) per data shard
    records = []
    for name, cfg in _configs(kind, a.layers).items():
        if names is not None and name not in names:
            continue
        is_judge = name == "judge"
        for program in programs:
            if program.startswith("judge") != is_judge:
                continue
            t0 = time.perf_counter()
            _, lines = involuntary_copies(lambda: memory.PROGRAMS[program](mesh, cfg, rows, opts))
            records.append(dict(config=name, mesh=list(mesh_shape), program=program, copies=len(lines),
                                compile_s=round(time.perf_counter() - t0, 1),
                                ops=[_abridged(x) for x in lines[:3]]))
    return records


def _abridged(line: str) -> str:
    return line[line.index("The compiler"):][:240] if "The compiler" in line else line[:240]


def parse(argv=None) -> argparse.Namespace:
    """The command line, shapes resolved (`SHAPES` of the config unless given)."""
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="paper", choices=["paper", "tiny"])
    p.add_argument("--devices", type=int, default=32)
    p.add_argument("--mesh", nargs="+", default=None,
                   help="mesh shapes data,fsdp,tensor (default: 1,N/4,4 as the paper configs)")
    p.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=list(PROGRAMS))
    p.add_argument("--layers", type=int, default=0, help="decoder depth of every model; 0 = the real depth")
    p.add_argument("--micro", type=int, default=0, help="sequences / prompts / judge rows; 0 = the data shards")
    for name in ("prompt", "patches", "response", "n", "annotations", "judge-length"):
        p.add_argument(f"--{name}", type=int, default=None, help="default: SHAPES of the config")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name, value in zip(("prompt", "patches", "response", "n", "annotations", "judge_length"), SHAPES[a.config]):
        if getattr(a, name) is None:
            setattr(a, name, value)
    return a


def main(argv=None) -> int:
    a = parse(argv)
    meshes = [tuple(int(x) for x in m.split(",")) for m in (a.mesh or [f"1,{a.devices // 4},4"])]
    if not a.worker:
        # The device count must be set before jax is imported: one subprocess does the compiling.
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices}",
                   JAX_PLATFORMS="cpu")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        args = sys.argv[1:] if argv is None else argv
        proc = subprocess.run([sys.executable, __file__, "--worker", *args], env=env)
        return proc.returncode
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    failed = False
    for shape in meshes:
        for record in check(a.config, shape, a.programs, a):
            print(json.dumps(record), flush=True)
            failed |= record["copies"] > 0
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
