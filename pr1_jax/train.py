"""`python -m pr1_jax.train [--config configs/NAME.yaml] [key.sub=value ...]`

With no arguments: the embedded tiny default (configs/tiny.yaml) on CPU. Each step: a batch of
prompts -> n sampled responses (jitted sampler on the live params) -> host rewards in worker
processes while the judge scores visual annotations in the mesh -> group advantages -> one GRPO
update -> metrics. Validation (greedy, n = 1) before training and every `val_freq` steps.
Checkpoints every `save_freq` steps, at the end, and on SIGTERM; a rerun resumes from the run
directory's latest complete checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ConfigError as ModelConfigError
from models.config import load_config
from models.weights import CheckpointError
from models.pretrained import load_pretrained
from pr1_jax import configlib
from pr1_jax.checkpoint import Checkpointer, CheckpointRestoreError
from pr1_jax.data.config import DataConfig
from pr1_jax.data.pipeline import make_iterator
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.data.records import BadRecordError, RecordSource
from pr1_jax.grpo import group_advantages
from pr1_jax.judge import Judge, JudgeConfig
from pr1_jax.learner import Learner, LearnerConfig, TrainState, train_batch_from_samples
from pr1_jax.metrics import MetricsLogger
from pr1_jax.multihost import allgather_json
from pr1_jax.rewards import VISUAL, BatchScores, RewardConfig, RewardScorer, combine, mean_metrics
from pr1_jax.rollout import Rollout, rollout
from pr1_jax.sampling import SamplingConfig, Sampler
from pr1_jax.sharding import MeshError, batch_axis_size, make_mesh, placer

log = logging.getLogger("pr1_jax")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

# Errors that mean "fix your config or paths"; reported in one line.
USER_ERRORS = (configlib.ConfigError, ModelConfigError, CheckpointError, CheckpointRestoreError, BadRecordError,
               FileNotFoundError, MeshError)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    policy: str | None = None  # HF checkpoint dir (Qwen2-VL / Qwen2.5-VL); None with tiny.enabled
    judge: str | None = None  # HF checkpoint dir (Qwen2 / Qwen2.5); only needed for a visual reward
    tokenizer: str | None = None  # default: the policy dir
    judge_tokenizer: str | None = None  # default: the judge dir
    judge_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    n: int = 8
    max_new_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclasses.dataclass(frozen=True)
class TinySection:
    """The embedded default: synthetic task, tiny models and their warm starts, built in run_dir."""

    enabled: bool = False
    seed: int = 0
    policy_steps: int = 60
    policy_batch_size: int = 16
    policy_lr: float = 3e-3
    # Probability that a warm-start response states a fact (p_state), and that a stated fact has
    # its true value (p_true, else a random one); the answers are always random.
    policy_p_state: float = 0.6
    policy_p_true: float = 0.0
    judge_steps: int = 400
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
    val_batch_size: int = 32
    val_max_batches: int | None = None
    sampling: SamplingSection = SamplingSection()
    reward: RewardConfig = RewardConfig()
    judge: JudgeConfig = JudgeConfig()
    learner: LearnerConfig = LearnerConfig()
    tiny: TinySection = TinySection()
    mesh: tuple[int, ...] = (1, -1, 1)  # (data, fsdp, tensor); one -1 = the remaining devices
    max_steps: int | None = None  # default: data.num_epochs passes over the training records
    val_freq: int = 10
    val_before_train: bool = True
    save_freq: int = 20
    keep_checkpoints: int = 3
    resume: bool = True
    resume_step: int | None = None
    max_consecutive_bad_steps: int = 3
    distributed: bool = False  # jax.distributed.initialize() (multi-host pods)
    # Where no cluster is auto-detected (TPU pods, SLURM, Open MPI are): host:port of process 0, the
    # process count and this process's id. None = auto-detect.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


class Stop(Exception):
    """The run cannot go on; the message says why and names the step."""


def _all_processes(scores: list[dict]) -> list[dict]:
    """Every process's score dicts (each scored its own rows), so logged means are global."""
    if jax.process_count() == 1:
        return scores
    plain = [{k: (bool(v) if k == "has_visual" else float(v)) for k, v in x.items()} for x in scores]
    return [x for part in allgather_json(plain) for x in part]


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg = self._resolve_models(cfg)
        (self.run_dir / "config.yaml").write_text(_yaml(configlib.to_dict(cfg)))
        self.mesh = make_mesh(cfg.mesh)
        divisor = batch_axis_size(self.mesh)
        rows = cfg.data.batch_size * jax.process_count() * cfg.sampling.n
        if rows % divisor:
            raise configlib.ConfigError(
                f"data.batch_size x processes x sampling.n = {rows} sequences is not divisible by the mesh's "
                f"data x fsdp = {divisor} devices")
        self.total_steps = cfg.max_steps or self._epoch_steps() * (cfg.data.num_epochs or 1)
        model_cfg = load_config(cfg.model.policy)
        self.learner = Learner(model_cfg, cfg.learner, self.mesh, self.total_steps)
        self.policy = load_pretrained(cfg.model.policy, dtype=cfg.learner.dtype, param_dtype=cfg.learner.param_dtype,
                                      place=placer(self.learner.param_shardings))
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        s = cfg.sampling
        self.sample_cfg = SamplingConfig(max_new_tokens=s.max_new_tokens, eos_ids=(eos,), pad_id=self.tokenizer.pad_token_id,
                                         temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, n=s.n)
        self.sampler = Sampler(self.policy.module, self.sample_cfg, self.mesh)
        self.greedy_sampler = Sampler(self.policy.module, dataclasses.replace(
            self.sample_cfg, temperature=0.0, top_p=1.0, top_k=0, n=1), self.mesh)
        self.judge = None
        if cfg.reward.weights.get(VISUAL, 0.0) and not cfg.model.judge:
            raise configlib.ConfigError("reward.weights.visual > 0 needs model.judge (a Qwen2 checkpoint dir)")
        if cfg.model.judge:  # with reward.weights.visual=0 the visual reward is measured, not trained on
            self.judge = Judge.load(cfg.model.judge, cfg.judge, mesh=self.mesh,
                                    tokenizer_path=cfg.model.judge_tokenizer or cfg.model.judge, dtype=cfg.model.judge_dtype)
        self.scorer = RewardScorer(cfg.reward)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.keep_checkpoints)
        self.metrics = MetricsLogger(self.run_dir, self.total_steps)
        # The KL term's reference is the starting policy; it is reloaded from its checkpoint on
        # resume, so it is not part of the train state.
        self.ref_params = None
        if cfg.learner.loss.kl_coef:
            self.ref_params = jax.tree.map(jnp.copy, self.policy.params)
        self.state = self.learner.init_state(self.policy.params)
        self.policy.params = None  # the learner's state owns the params now
        self.key = jax.random.key(cfg.seed)
        self.data_state = None
        self.consecutive_bad = 0
        self._stop_requested = False
        if cfg.resume or cfg.resume_step is not None:
            self._restore()
        self.data = make_iterator(cfg.data, self.tokenizer, self.data_state)

    # -- set-up --

    def _resolve_models(self, cfg: TrainConfig) -> TrainConfig:
        """For the tiny default: build the synthetic task, tokenizer and models, warm-start them,
        and point the config at them. Real runs pass through unchanged."""
        if not cfg.tiny.enabled:
            if not cfg.model.policy:
                raise configlib.ConfigError("model.policy is required (or tiny.enabled=true)")
            return cfg
        from pr1_jax.tiny import build_tiny_assets
        from pr1_jax.warm_start import judge_accuracy, warm_start_judge, warm_start_policy

        t, root = cfg.tiny, self.run_dir
        assets = build_tiny_assets(root, seed=t.seed)
        policy = warm_start_policy(assets, root / "warm_start" / "policy", steps=t.policy_steps,
                                   batch_size=t.policy_batch_size, lr=t.policy_lr, seed=t.seed, p_state=t.policy_p_state,
                                   p_true=t.policy_p_true)
        judge = warm_start_judge(assets, root / "warm_start" / "judge", cfg.judge, steps=t.judge_steps,
                                 batch_size=t.judge_batch_size, lr=t.judge_lr, seed=t.seed)
        from pr1_jax import synthetic

        held_out = synthetic.judge_pairs(np.random.default_rng([t.seed, 99]), t.judge_eval_pairs)
        acc = judge_accuracy(Judge.load(judge, cfg.judge, tokenizer_path=assets.tokenizer, dtype="float32"), held_out)
        log.info("judge verdict accuracy on %d held-out synthetic pairs: %.3f", len(held_out), acc)
        data = dataclasses.replace(cfg.data, paths=(assets.train,), tokenizer_path=assets.tokenizer)
        return dataclasses.replace(
            cfg, data=data, val_paths=(assets.val,),
            model=dataclasses.replace(cfg.model, policy=str(policy), judge=str(judge), tokenizer=assets.tokenizer,
                                      judge_tokenizer=assets.tokenizer))

    def _epoch_steps(self) -> int:
        n = len(RecordSource(self.cfg.data)) // max(jax.process_count(), 1)
        return max(n // self.cfg.data.batch_size, 1)

    def _abstract_state(self) -> TrainState:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.state)

    def _restore(self) -> None:
        step = self.cfg.resume_step
        if step is None and self.checkpointer.latest_step() is None:
            return
        self.state, meta = self.checkpointer.restore(self._abstract_state(), step)
        self.key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        # One iterator state per process (each reads its own shard); the run must resume on as
        # many processes as it was saved with.
        states = meta["data"]
        if len(states) != jax.process_count():
            raise configlib.ConfigError(f"the checkpoint holds the data positions of {len(states)} processes; "
                                        f"this run has {jax.process_count()}")
        self.data_state = states[jax.process_index()]
        self.consecutive_bad = meta.get("consecutive_bad", 0)
        log.info("resumed from step %d of %s", int(self.state.step + self.state.skipped),
                 self.checkpointer.directory)

    def save(self, step: int) -> None:
        meta = dict(data=allgather_json(self.data.get_state()), rng=np.asarray(jax.random.key_data(self.key)).tolist(),
                    consecutive_bad=self.consecutive_bad, step=step)
        self.checkpointer.save(step, self.state, meta)

    # -- one step --

    def _score(self, ro: Rollout, batch: dict) -> tuple[list[dict], dict]:
        """Host rewards in worker processes while the judge runs on the device; the score dicts
        (row-aligned with the samples) and timing/diagnostic metrics."""
        n = ro.n
        answers = [a for a in batch["answer"] for _ in range(n)]
        annotations = [a for a in batch["annotations"] for _ in range(n)]
        t0 = time.perf_counter()
        pending = self.judge.submit(ro.texts, annotations, params=self.judge.params) if self.judge else None
        future = self.scorer.submit([dict(response=r, ground_truth=g) for r, g in zip(ro.texts, answers)])
        host: BatchScores = future.result()
        t_reward = time.perf_counter() - t0
        visual = pending.result() if pending else None
        t_judge = time.perf_counter() - t0
        scores = []
        for i, terms in enumerate(host.scores):
            v = float(visual["visual"][i]) if visual is not None and visual["has_visual"][i] else None
            raw = {k: terms[k] for k in self.cfg.reward.reward_names}
            scores.append(combine(raw, v, self.cfg.reward.weights))
        extra = dict(sec_reward=t_reward, sec_judge=t_judge, reward_timeouts=host.timeouts, reward_errors=host.errors)
        return scores, extra

    def learner_batch(self, tb: dict) -> dict:
        """This process's host learner batch -> the global batch the update takes, with the
        reference policy's log-probs when there is a KL term."""
        gb = self.learner.global_batch(tb)
        if self.ref_params is not None:
            gb["ref_logprobs"] = self.learner.logprobs(self.ref_params, gb)[0]
        return gb

    def train_step(self, step: int, batch: dict) -> dict:
        self.key, sample_key = jax.random.split(self.key)
        t0 = time.perf_counter()
        ro = rollout(self.policy, self.state.params, self.sampler, self.tokenizer, batch, sample_key, self.mesh,
                     self.cfg.data.patch_limit_per_record)
        t_sample = time.perf_counter() - t0
        scores, extra = self._score(ro, batch)
        overall = np.array([s["overall"] for s in scores], np.float32)
        adv = np.asarray(group_advantages(overall, ro.n))
        tb = train_batch_from_samples(self.policy.config, ro.prompt_inputs, ro.samples, ro.n, advantages=adv,
                                      example_valid=batch["example_valid"])
        t1 = time.perf_counter()
        skipped_before = int(self.state.skipped)
        self.state, m = self.learner.step(self.state, self.learner_batch(tb))
        m = jax.device_get(m)
        t_update = time.perf_counter() - t1
        if int(self.state.skipped) > skipped_before:
            self.consecutive_bad += 1
            log.warning("step %d skipped: non-finite loss or gradient (records %s)", step, batch["record_id"])
            if self.consecutive_bad >= self.cfg.max_consecutive_bad_steps:
                raise Stop(f"step {step}: {self.consecutive_bad} consecutive steps with a non-finite loss or "
                           f"gradient (last batch records {batch['record_id']}); stopping with the last good state")
        else:
            self.consecutive_bad = 0
        lengths = np.asarray(ro.samples.lengths)
        max_new = self.sample_cfg.max_new_tokens
        out = {**mean_metrics(_all_processes(scores)), **{k: v for k, v in m.items()}, **extra}
        out.update(response_len=float(lengths.mean()), response_len_max=float(lengths.max()),
                   clipped_frac=float(np.mean(lengths >= max_new)), adv_mean=float(adv.mean()),
                   adv_std=float(adv.std()), sec_sample=t_sample, sec_update=t_update,
                   sec_step=time.perf_counter() - t0,
                   tokens_per_sec=float(lengths.sum()) / max(t_sample, 1e-9))
        out.pop("has_visual", None)
        for reason, count in self.data.skip_counts.items():
            out[f"skipped_{reason}"] = count
        return out

    def validate(self, step: int) -> dict | None:
        if not self.cfg.val_paths:
            return None
        val_cfg = dataclasses.replace(self.cfg.data, paths=tuple(self.cfg.val_paths), batch_size=self.cfg.val_batch_size,
                                      shuffle=False, num_epochs=1, drop_remainder=False, shard_index=None,
                                      shard_count=None)
        scores, it, last = [], iter(make_iterator(val_cfg, self.tokenizer)), None
        for i in itertools.count():
            if self.cfg.val_max_batches is not None and i >= self.cfg.val_max_batches:
                break
            batch = next(it, None)
            # Every process must make the same device calls: one whose shard ran out (shards
            # differ by a record) feeds its last batch again, marked invalid, until all are done.
            if not any(allgather_json(batch is not None)):
                break
            if batch is None:
                batch = dict(last, example_valid=np.zeros_like(last["example_valid"]))
            last = batch
            valid = np.asarray(batch["example_valid"], bool)
            ro = self._greedy(batch)
            s, _ = self._score(ro, batch)
            scores += [x for x, v in zip(s, valid) if v]
            if i == 0:  # what the policy writes now, to read beside the numbers
                log.info("val sample %s (answer %s): %r", batch["record_id"][0], batch["answer"][0], ro.texts[0])
        scores = _all_processes(scores)
        out = mean_metrics(scores) if scores else {}
        out["samples"] = len(scores)
        self.metrics.write(step, out, prefix="val")
        return out

    def _greedy(self, batch: dict) -> Rollout:
        return rollout(self.policy, self.state.params, self.greedy_sampler, self.tokenizer, batch, jax.random.key(0),
                       self.mesh, self.cfg.data.patch_limit_per_record)

    # -- the run --

    def _on_sigterm(self, *_):
        log.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting")
        self._stop_requested = True

    def fit(self) -> dict | None:
        """Runs to `total_steps` (or the end of the data, or SIGTERM); returns the last validation."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        step = int(self.state.step + self.state.skipped)
        val = None
        try:
            if self.cfg.val_before_train and step == 0:
                val = self.validate(step)
            while step < self.total_steps and not self._stop_requested:
                try:
                    batch = next(self.data)
                except StopIteration:
                    log.info("data exhausted after %d steps", step)
                    break
                step += 1
                self.metrics.write(step, self.train_step(step, batch))
                if step % self.cfg.save_freq == 0:
                    self.save(step)
                if self.cfg.val_freq and step % self.cfg.val_freq == 0:
                    val = self.validate(step)
            if not self._stop_requested and self.cfg.val_freq and step % self.cfg.val_freq:
                val = self.validate(step)
        finally:
            if step not in self.checkpointer.steps():
                self.save(step)
            self.scorer.close()
            self.metrics.close()
        return val


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def parse_config(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m pr1_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run directory has checkpoints")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    path = args.config or DEFAULT_CONFIG
    if not Path(path).exists():
        raise configlib.ConfigError(f"{path}: config file not found")
    cfg = configlib.load(TrainConfig, path, args.overrides)
    if args.no_resume:
        cfg = dataclasses.replace(cfg, resume=False)
    return cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
    except configlib.ConfigError as e:
        log.error("config error: %s", e)
        return 2
    if cfg.distributed:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    try:
        trainer = Trainer(cfg)
    except USER_ERRORS as e:  # a bad path or config: one clear line, not a traceback
        log.error("%s: %s", type(e).__name__, e)
        return 2
    try:
        trainer.fit()
    except Stop as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
