"""`python -m pr1_jax.export --checkpoint RUN_DIR[/STEP] --out HF_DIR [--overwrite] [--lora merged|adapter]`

Writes the trained policy as a Hugging Face checkpoint that `transformers` loads unchanged with
`AutoModelForImageTextToText` and `AutoProcessor`: safetensors (hub key layout) and the base
model's config.json; the tokenizer / processor files of the base model and tokenizer directories;
the run's chat template when `data.chat_template_path` set one; and, when neither directory has a
`preprocessor_config.json` (the tiny default's), one written by transformers' Qwen2-VL image
processor with the run's pixel bounds (`data.min_pixels`, `data.max_pixels`), so the processor
resizes images as training did. Only the params are read from the Orbax checkpoint.

A LoRA run (`learner.lora.rank > 0`) checkpoints its adapters only; the base is the run's
`model.policy`. `--lora merged` (the default) writes the model above with the adapters merged into
the base's kernels (`pr1_jax.lora.merge`, in float32): transformers' logits equal those of base +
adapters. `--lora adapter` writes PEFT's layout instead, `adapter_config.json` and
`adapter_model.safetensors` (`pr1_jax.lora.save_peft`), for
`peft.PeftModel.from_pretrained(<the base model>, HF_DIR)`.

`AutoProcessor` builds `Qwen2VLProcessor`, whose video processor needs torchvision (a build that
matches the installed torch: `pip install torchvision`, from the CPU index for a CPU torch).
Without it the export still serves every image path: `AutoImageProcessor.from_pretrained` gives
the PIL image processor (`Qwen2VLImageProcessorPil`) and `AutoTokenizer` the tokenizer with its
chat template. With torchvision, transformers picks its torchvision image processor, whose
bicubic resize is close to PIL's but not the same; `AutoImageProcessor.from_pretrained(dir,
backend="pil")` gives the pixels the policy was trained and evaluated on.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
from jax.sharding import Mesh

from models.causal_lm import QwenCausalLM
from models.config import ConfigError as ModelConfigError
from models.config import load_config
from models.pretrained import Model, abstract_params, as_dtype
from models.weights import CheckpointError, copy_side_files
from pr1_jax import configlib, lora
from pr1_jax.checkpoint import Checkpointer, CheckpointRestoreError
from pr1_jax.config import TrainConfig
from pr1_jax.data.processing import make_image_processor
from pr1_jax.sharding import load_model, param_shardings

log = logging.getLogger("pr1_jax")

PROCESSOR_CONFIG = "preprocessor_config.json"


def locate(checkpoint: str | Path) -> tuple[Path, int | None]:
    """RUN_DIR -> (RUN_DIR, latest); RUN_DIR/STEP or RUN_DIR/checkpoints/STEP -> (RUN_DIR, STEP)."""
    path = Path(checkpoint)
    if (path / "checkpoints").is_dir():
        return path, None
    if path.name.isdigit():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        if (run / "checkpoints").is_dir():
            return run, int(path.name)
    raise CheckpointRestoreError(f"{path}: not a run directory (no checkpoints/ inside) or RUN_DIR/STEP")


def resolve(checkpoint: str | Path) -> tuple[Path, int]:
    """`locate` with the latest step looked up: (RUN_DIR, the step that will be read)."""
    run, step = locate(checkpoint)
    if step is None:
        with Checkpointer(run / "checkpoints") as ck:
            step = ck.latest_step()
        if step is None:
            raise CheckpointRestoreError(f"{run / 'checkpoints'}: no complete checkpoint")
    return run, step


def load_run_params(checkpoint: str | Path, mesh: Mesh | None = None):
    """(the run's TrainConfig, the step read, the checkpoint's params): the policy's, or a LoRA
    run's adapters. With a mesh, every param is restored straight to its shards."""
    run = locate(checkpoint)[0]
    cfg = configlib.load(TrainConfig, run / "config.yaml")
    if not cfg.model.policy or not Path(cfg.model.policy).is_dir():
        raise configlib.ConfigError(f"{run / 'config.yaml'}: model.policy {cfg.model.policy} is not a directory "
                                    "(moved?); the run's base model gives the architecture")
    model_cfg = load_config(cfg.model.policy)
    step = resolve(checkpoint)[1]
    adapters = cfg.learner.lora if cfg.learner.lora.enabled else None
    boxed = abstract_params(QwenCausalLM(model_cfg, param_dtype=as_dtype(cfg.learner.param_dtype), lora=adapters))
    if adapters is not None:
        boxed = lora.split(boxed)[1]
    abstract = nn.unbox(boxed)
    if mesh is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                param_shardings(boxed, mesh))
    with Checkpointer(run / "checkpoints") as ck:
        params = ck.restore_params(abstract, step)
    return cfg, step, params


def load_run_policy(checkpoint: str | Path, mesh: Mesh | None = None):
    """(the run's TrainConfig, the step read, the trained policy as a `Model` computing in the
    run's `learner.dtype`). A LoRA run's adapters are merged into its base (`model.policy`, read
    in `learner.param_dtype`). With a mesh, every param is restored straight to its shards."""
    cfg, step, params = load_run_params(checkpoint, mesh)
    if cfg.learner.lora.enabled:
        base = load_model(cfg.model.policy, mesh, dtype=cfg.learner.dtype, param_dtype=cfg.learner.param_dtype).params
        params = jax.jit(functools.partial(lora.merge, cfg=cfg.learner.lora))(base, params)
    return cfg, step, Model(load_config(cfg.model.policy), params, dtype=as_dtype(cfg.learner.dtype))


class ExportError(ValueError):
    """An export that cannot be written as asked; the message names the path."""


LORA_MODES = ("merged", "adapter")


def export(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, lora_mode: str = "merged") -> Path:
    """Writes the export into a fresh directory beside `out` and swaps it in when complete, so
    `out` never mixes files of two exports (an earlier sharded export's index and shards would
    otherwise be read by `load_pretrained` in place of the new weights) and an interrupted export
    leaves `out` as it was. A non-empty `out` is replaced only with `overwrite`. lora_mode: a LoRA
    run's "merged" model or its PEFT "adapter" (see the module's doc)."""
    if lora_mode not in LORA_MODES:
        raise ExportError(f"--lora {lora_mode}: expected one of {list(LORA_MODES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: not empty; give --overwrite to replace it, or another directory")
    if lora_mode == "adapter":
        cfg, step, adapters = load_run_params(checkpoint)
        if not cfg.learner.lora.enabled:
            raise ExportError(f"--lora adapter: {locate(checkpoint)[0]} is not a LoRA run (learner.lora.rank 0)")
        write = functools.partial(lora.save_peft, adapters=adapters, cfg=cfg.learner.lora,
                                  base_model=str(Path(cfg.model.policy).absolute()))
    else:
        cfg, step, model = load_run_policy(checkpoint)
        write = model.save_pretrained
    sources = list(dict.fromkeys([Path(cfg.model.policy), Path(cfg.model.tokenizer or cfg.model.policy)]))
    missing = [str(d) for d in sources if not d.is_dir()]
    if missing:
        raise ExportError(f"{locate(checkpoint)[0] / 'config.yaml'}: model.tokenizer {missing[0]} is not a "
                          "directory (moved?); its tokenizer and processor files go into the export")
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        write(fresh)
        copy_side_files(sources, fresh)  # in this order: the tokenizer directory's files win
        if cfg.data.chat_template_path:
            shutil.copyfile(cfg.data.chat_template_path, fresh / "chat_template.jinja")
        if not any((d / PROCESSOR_CONFIG).is_file() for d in sources):
            make_image_processor(cfg.data).save_pretrained(fresh)
            log.info("wrote %s from the run's pixel bounds [%d, %d]", PROCESSOR_CONFIG, cfg.data.min_pixels,
                     cfg.data.max_pixels)
        _swap_in(fresh, out)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)  # gone already when swapped in
    log.info("exported %s (step %d) to %s", checkpoint, step, out)
    return out


def _swap_in(fresh: Path, out: Path) -> None:
    """`fresh` renamed to `out`; what `out` held is deleted once the new directory is in place."""
    if not out.exists():
        fresh.rename(out)
        return
    old = out.with_name(f".{out.name}.replaced-{fresh.name.rsplit('-', 1)[-1]}")
    out.rename(old)
    fresh.rename(out)
    shutil.rmtree(old)


def quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    quiet_logging()
    p = argparse.ArgumentParser(prog="python -m pr1_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN_DIR (latest step) or RUN_DIR/STEP")
    p.add_argument("--out", required=True, help="output Hugging Face directory (empty or new)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out as a whole")
    p.add_argument("--lora", choices=LORA_MODES, default="merged",
                   help="a LoRA run: the merged model (default) or the adapters in PEFT's layout")
    args = p.parse_args(argv)
    try:
        export(args.checkpoint, args.out, overwrite=args.overwrite, lora_mode=args.lora)
    except (CheckpointRestoreError, configlib.ConfigError, ModelConfigError, CheckpointError, ExportError,
            OSError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
