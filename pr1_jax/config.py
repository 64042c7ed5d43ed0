"""The run's config schema: `TrainConfig` and its sections, as YAML maps them.

`python -m pr1_jax.train --config X.yaml key.sub=value` reads a YAML file (`yaml.safe_load`) onto
these frozen dataclasses with `pr1_jax.configlib` (unknown keys and wrong types fail at start-up
with the dotted path). Sections that belong to one part of the system are that part's own config
(`DataConfig`, `SamplingConfig`, `RewardConfig`, `JudgeConfig`, `LearnerConfig`, `TrackerConfig`); this module
only adds what belongs to the run as a whole.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pr1_jax import configlib
from pr1_jax.data.config import DataConfig
from pr1_jax.judge import JudgeConfig
from pr1_jax.learner import LearnerConfig
from pr1_jax.rewards import RewardConfig
from pr1_jax.sampling import SamplingConfig
from pr1_jax.trackers import TrackerConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    policy: str | None = None  # HF checkpoint dir (Qwen2-VL / Qwen2.5-VL / Qwen3-VL); None with tiny.enabled
    judge: str | None = None  # HF checkpoint dir (Qwen2 / Qwen2.5 / Qwen3); only needed for a visual reward
    tokenizer: str | None = None  # default: the policy dir
    judge_tokenizer: str | None = None  # default: the judge dir
    judge_dtype: str = "float32"
    # The attention of the policy (sampler and learner) and the judge (`models.attention`): auto =
    # cuDNN on GPUs in bf16 / fp16, splash on TPUs, the XLA path otherwise.
    attention: Literal["auto", "xla", "cudnn", "pallas"] = "auto"


@dataclasses.dataclass(frozen=True)
class TinySection:
    """The embedded default (`pr1_jax.tiny`): synthetic task, tiny models and their warm starts,
    built in run_dir."""

    enabled: bool = False
    seed: int = 0
    # "qwen2": a Qwen2-VL policy and a Qwen2 judge; "qwen3": Qwen3-VL and Qwen3 (configs/tiny_qwen3.yaml).
    architecture: Literal["qwen2", "qwen3"] = "qwen2"
    policy_steps: int = 60
    policy_batch_size: int = 16
    policy_lr: float = 3e-3
    # Probability that a warm-start response states a fact (p_state), and that a stated fact has
    # its true value (p_true, else a random one); the answers are always random.
    policy_p_state: float = 0.6
    policy_p_true: float = 0.0
    judge_steps: int = configlib.bounded(400, ge=0)  # 0: no judge (a run with reward.weights.visual=0 that does not measure it)
    judge_batch_size: int = 32
    judge_lr: float = 1e-3
    judge_eval_pairs: int = 200


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelSection = ModelSection()
    data: DataConfig = DataConfig()
    val_paths: tuple[str, ...] = ()  # validation records (same columns as data); empty = none
    val_batch_size: int = configlib.bounded(32, ge=1)
    val_max_batches: int | None = configlib.bounded(None, ge=0)
    # The learner scores the samples at this section's temperature (one setting for both).
    sampling: SamplingConfig = SamplingConfig(n=8)
    reward: RewardConfig = RewardConfig()
    judge: JudgeConfig = JudgeConfig()
    learner: LearnerConfig = LearnerConfig()
    tiny: TinySection = TinySection()
    logging: TrackerConfig = TrackerConfig()  # where metrics go: console, jsonl, tensorboard, wandb, mlflow
    mesh: tuple[int, ...] = (1, -1, 1)  # (data, fsdp, tensor); one -1 = the remaining devices
    # default: data.num_epochs passes over the training records
    max_steps: int | None = configlib.bounded(None, ge=0)
    val_freq: int = configlib.bounded(10, ge=0)
    val_before_train: bool = True
    save_freq: int = configlib.bounded(20, ge=1)
    keep_checkpoints: int = configlib.bounded(3, ge=1)
    resume: bool = True
    resume_step: int | None = configlib.bounded(None, ge=0)
    max_consecutive_bad_steps: int = configlib.bounded(3, ge=1)
    # JAX's persistent compilation cache (`~` expanded): a rerun, or a run of the same shapes, reads
    # its compiled programs instead of compiling them. JAX_COMPILATION_CACHE_DIR, when set, wins.
    compilation_cache_dir: str | None = None
    distributed: bool = False  # jax.distributed.initialize() (multi-host pods)
    # Where no cluster is auto-detected (TPU pods, SLURM, Open MPI are): host:port of process 0, the
    # process count and this process's id. None = auto-detect.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        if not self.run_dir.strip():
            # An empty run_dir would write checkpoints and metrics into the working directory.
            raise ValueError("run_dir is empty; give the run's directory")

