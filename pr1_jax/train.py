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
import os
import shutil
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
from pr1_jax import configlib
from pr1_jax.checkpoint import Checkpointer, CheckpointRestoreError
from pr1_jax.config import TrainConfig
from pr1_jax.data.order import DataStateError, state_for_process, steps_per_epoch
from pr1_jax.data.pipeline import NoValidRecordError, make_iterator
from pr1_jax.data.processing import load_tokenizer
from pr1_jax.data.records import BadRecordError, RecordSource
from pr1_jax.dynamic_sampling import fill_step
from pr1_jax.grpo import group_advantages
from pr1_jax.judge import Judge
from pr1_jax.learner import Learner, TrainState
from pr1_jax.metrics import MetricsLogger, PhaseTimes
from pr1_jax.multihost import allgather_json
from pr1_jax.packing import PackedBatch, pack, plan
from pr1_jax.reward_plugins import RECORD_FIELDS, SAMPLE_FIELDS
from pr1_jax.rewards import RewardConfig, RewardScorer, combine_batch, mean_metrics
from pr1_jax.rollout import LearnerBatch, Rollout, response_bucket, rollout, train_batch_from_samples
from pr1_jax.sampling import Sampler
from pr1_jax.sharding import MeshError, batch_axis_size, global_batch, load_model, make_mesh

log = logging.getLogger("pr1_jax")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

# Errors that mean "fix your config or paths"; reported in one line.
USER_ERRORS = (configlib.ConfigError, ModelConfigError, CheckpointError, CheckpointRestoreError, BadRecordError,
               FileNotFoundError, MeshError, DataStateError)


class Stop(Exception):
    """The run cannot go on; the message says why and names the step."""


def _all_processes(scores: list[dict]) -> list[dict]:
    """Every process's score dicts (each scored its own rows), so logged means are global."""
    if jax.process_count() == 1:
        return scores
    plain = [{k: (bool(v) if k == "has_visual" else float(v)) for k, v in x.items()} for x in scores]
    return [x for part in allgather_json(plain) for x in part]


def reward_records(reward: RewardConfig, texts: list[str], batch: dict, n: int, lengths, cap: int) -> list[dict]:
    """The reward scorer's records of a batch's n samples per prompt: response, gold answer and
    what the configured rewards declare of the record's fields (a plug-in's `problem`, ...) and of
    the sample (its token count ``lengths[i]`` and the response cap, for the overlong term)."""
    # Which fields some reward declares depends on the config only: asked once, not per sample.
    declared = reward.declared_fields(dict.fromkeys(RECORD_FIELDS + SAMPLE_FIELDS))

    def offered(i: int, k) -> dict:
        return {**{f: batch[f][i // n] for f in RECORD_FIELDS}, "response_length": int(k), "max_length": cap}

    return [dict(response=text, ground_truth=batch["answer"][i // n],
                 **{f: v for f, v in offered(i, k).items() if f in declared})
            for i, (text, k) in enumerate(zip(texts, np.asarray(lengths)))]


class Trainer:
    def __init__(self, cfg: TrainConfig):
        t0 = time.perf_counter()
        self.times = PhaseTimes()
        if cfg.tiny.enabled:
            from pr1_jax.tiny import prepare_run

            with self.times("tiny assets and warm starts"):
                cfg = prepare_run(cfg)
        elif not cfg.model.policy:
            raise configlib.ConfigError("model.policy is required (or tiny.enabled=true)")
        # seq-mean-token-sum-norm's constant defaults to the sampler's response cap.
        cfg = dataclasses.replace(cfg, learner=dataclasses.replace(
            cfg.learner, loss=cfg.learner.loss.with_norm_length(cfg.sampling.max_new_tokens)))
        self.cfg = cfg
        metric = cfg.data.dynamic_sampling.metric
        if cfg.data.dynamic_sampling.enabled and metric not in {"overall", "overall_reference", *cfg.reward.weights}:
            raise configlib.ConfigError(f"data.dynamic_sampling.metric={metric!r} is not a score: use overall, "
                                        f"overall_reference or a reward.weights name {sorted(cfg.reward.weights)}")
        self.run_dir = Path(cfg.run_dir)
        self.mesh = make_mesh(cfg.mesh)
        divisor = batch_axis_size(self.mesh)
        rows = cfg.data.batch_size * jax.process_count() * cfg.sampling.n
        if rows % divisor:
            raise configlib.ConfigError(
                f"data.batch_size x processes x sampling.n = {rows} sequences is not divisible by the mesh's "
                f"data x fsdp = {divisor} devices")
        self.total_steps = cfg.max_steps or self._epoch_steps() * (cfg.data.num_epochs or 1)
        model_cfg = load_config(cfg.model.policy)
        if model_cfg.vision is not None and model_cfg.vision.patch_size != cfg.data.patch_size:
            # A Qwen2-VL processor feeding a Qwen3-VL tower (or back) would fail on shapes deep in jit.
            raise configlib.ConfigError(
                f"data.image_processor {cfg.data.image_processor!r} makes {cfg.data.patch_size}-pixel patches; the "
                f"policy's vision tower ({model_cfg.model_type}) takes {model_cfg.vision.patch_size}-pixel ones")
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
        try:
            self.sample_cfg = cfg.sampling.with_tokenizer(self.tokenizer)
        except ValueError as e:
            raise configlib.ConfigError(str(e)) from None
        longest = cfg.data.max_prompt_length + self.sample_cfg.max_new_tokens
        self._micro_high = 0  # the most micro-batches a packed step has needed (`_pack`)
        self._pairs_high = 0  # the most attention block pairs a packed row has needed (`_pack`)
        if cfg.learner.packing != "off" and cfg.learner.max_tokens_per_micro_batch < longest:
            raise configlib.ConfigError(
                f"learner.max_tokens_per_micro_batch={cfg.learner.max_tokens_per_micro_batch} cannot hold a prompt of "
                f"data.max_prompt_length + sampling.max_new_tokens = {longest} tokens")
        self.learner = Learner(model_cfg, cfg.learner, self.mesh, self.total_steps,
                               temperature=self.sample_cfg.score_temperature, attention=cfg.model.attention,
                               seed=cfg.seed)
        # LoRA keeps the base frozen in the compute dtype: loaded so, it is never held twice.
        lora_on = cfg.learner.lora.enabled
        self.policy = load_model(cfg.model.policy, self.mesh, dtype=cfg.learner.dtype,
                                 param_dtype=cfg.learner.dtype if lora_on else cfg.learner.param_dtype,
                                 attention=cfg.model.attention)
        self.sampler = Sampler(self.policy.module, self.sample_cfg, self.mesh)
        self.greedy_sampler = Sampler(self.policy.module, dataclasses.replace(
            self.sample_cfg, temperature=0.0, top_p=1.0, top_k=0, n=1), self.mesh)
        self.judge = None
        if cfg.reward.weights.get("visual", 0.0) and not cfg.model.judge:
            raise configlib.ConfigError("reward.weights.visual > 0 needs model.judge (a Qwen2 / Qwen3 checkpoint dir)")
        if cfg.model.judge:  # with reward.weights.visual=0 the visual reward is measured, not trained on
            self.judge = Judge.load(cfg.model.judge, cfg.judge, mesh=self.mesh,
                                    tokenizer_path=cfg.model.judge_tokenizer or cfg.model.judge, dtype=cfg.model.judge_dtype,
                                    attention=cfg.model.attention)
        self.scorer = RewardScorer(cfg.reward)
        ckpt_dir = self.run_dir / "checkpoints"
        self.checkpointer = Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints) if ckpt_dir.is_dir() else None
        # The KL term's reference is the starting policy; it is reloaded from its checkpoint on
        # resume, so it is not part of the train state. With LoRA it is the frozen base itself.
        self.ref_params = None
        if cfg.learner.loss.kl_coef and not lora_on:
            self.ref_params = jax.tree.map(jnp.copy, self.policy.params)
        self.state = self.learner.init_state(self.policy.params)
        if cfg.learner.loss.kl_coef and lora_on:
            self.ref_params = self.learner.base
        self.policy.params = None  # the learner's state (with LoRA: its adapters and base) owns the params now
        self.key = jax.random.key(cfg.seed)
        self.data_state = None
        self.consecutive_bad = 0
        self._dropped_warned: set[str] = set()  # records the judge dropped annotations of, already named
        self._stop_requested = False
        try:
            if cfg.resume or cfg.resume_step is not None:
                self._restore()
            self.data = make_iterator(cfg.data, self.tokenizer, self.data_state)
        except BaseException:
            # Orbax's threads and the reward workers, left running, print tracebacks at exit.
            if self.checkpointer is not None:
                self.checkpointer.close()
            self.scorer.close()
            raise
        # Every start-up check passed: only now is the run directory written, so a start that
        # fails (another model size, a bad path) leaves an existing run as it was.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(_yaml(configlib.to_dict(cfg)))
        if not (cfg.resume or cfg.resume_step is not None) and self.checkpointer and self.checkpointer.steps():
            # Starting over: the run before's checkpoints would otherwise collide with this run's
            # saves (Orbax refuses a step that exists) after its first `save_freq` steps of work.
            log.warning("resume=false (--no-resume): starting over; removing the run before's checkpoints %s in %s",
                        self.checkpointer.steps(), ckpt_dir)
            self.checkpointer.close()
            shutil.rmtree(ckpt_dir)
            self.checkpointer = None
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints)
        self.metrics = MetricsLogger(self.run_dir, self.total_steps, cfg.logging, configlib.to_dict(cfg))
        self.times.add("start-up", time.perf_counter() - t0 - self.times.total)

    # -- set-up --

    def _epoch_steps(self) -> int:
        return max(steps_per_epoch(len(RecordSource(self.cfg.data)), self.cfg.data, jax.process_count()), 1)

    def _abstract_state(self) -> TrainState:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.state)

    def _restore(self) -> None:
        step = self.cfg.resume_step
        if self.checkpointer is None:
            if step is not None:
                raise CheckpointRestoreError(f"resume_step={step}: {self.run_dir / 'checkpoints'} does not exist")
            return
        if step is None and self.checkpointer.latest_step() is None:
            return
        self.state, meta = self.checkpointer.restore(self._abstract_state(), step)
        self.key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        # One iterator state per process; the streaming order resumes on as many processes only.
        self.data_state = state_for_process(meta["data"], jax.process_index(), jax.process_count())
        self.consecutive_bad = meta.get("consecutive_bad", 0)
        log.info("resumed from step %d of %s", int(self.state.step + self.state.skipped),
                 self.checkpointer.directory)

    def save(self, step: int, data_state: dict) -> None:
        """Writes the train state as `step`, with `data_state` (the data position after the batches
        the state has been trained on)."""
        meta = dict(data=allgather_json(data_state), rng=np.asarray(jax.random.key_data(self.key)).tolist(),
                    consecutive_bad=self.consecutive_bad, step=step)
        # Returns once the state is on the host: the write goes on under the next steps (the
        # state can be donated), and `fit` waits for it before it returns.
        self.checkpointer.save(step, self.state, meta, block=False)

    # -- one step --

    def _produce(self, batch: dict) -> tuple[Rollout, list[dict], dict]:
        """One rollout of a data batch and its scores: (rollout, score dicts, extra metrics)."""
        self.key, sample_key = jax.random.split(self.key)
        t0 = time.perf_counter()
        ro = rollout(self.policy, self.learner.policy_params(self.state), self.sampler, self.tokenizer, batch,
                     sample_key, self.mesh, self.cfg.data.patch_limit_per_record)
        t_sample = time.perf_counter() - t0
        scores, extra = self._score(ro, batch)
        return ro, scores, dict(extra, sec_sample=t_sample)

    def _score(self, ro: Rollout, batch: dict) -> tuple[list[dict], dict]:
        """Host rewards in worker processes while the judge runs on the device, combined by the
        one reward path; the score dicts (row-aligned with the samples) and timing/diagnostic
        metrics."""
        n = ro.n
        # The stored text where there is one: the paper judge quotes it as the reference does.
        annotations = [t or a for a, t in zip(batch["annotations"], batch["annotations_text"]) for _ in range(n)]
        t0 = time.perf_counter()
        pending = self.judge.submit(ro.texts, annotations) if self.judge else None
        future = self.scorer.submit(reward_records(self.cfg.reward, ro.texts, batch, n, ro.samples.lengths,
                                                   self.sample_cfg.max_new_tokens))
        host = future.result()
        t_reward = time.perf_counter() - t0
        judged = pending.result() if pending else None
        t_judge = time.perf_counter() - t0
        scores = combine_batch(host.terms, judged, self.cfg.reward.weights)
        extra = dict(sec_reward=t_reward, sec_judge=t_judge, reward_timeouts=host.timeouts, reward_errors=host.errors)
        if judged:
            extra.update(self._judge_losses(judged, batch["record_id"], n))
        return scores, extra

    def _judge_losses(self, judged: dict, record_ids: list[str], n: int) -> dict:
        """What the judge could not read, over all processes: responses it saw truncated and
        annotations it dropped (metrics); a warning naming each record whose annotations were
        dropped, the first time."""
        truncated, dropped = (sum(x) for x in zip(*allgather_json([judged["n_truncated"], judged["n_dropped"]])))
        rows = np.flatnonzero(np.asarray(judged["dropped"]) > 0)
        new = sorted({record_ids[i // n] for i in rows} - self._dropped_warned)
        if new:
            self._dropped_warned.update(new)
            log.warning("judge: annotations of records %s dropped (not judged: beyond the largest annotation or length "
                        "bucket); counted per step in judge_dropped_annotations, named here once", new)
        return dict(judge_truncated_responses=truncated, judge_dropped_annotations=dropped)

    def learner_batch(self, tb: LearnerBatch) -> LearnerBatch:
        """This process's host learner batch -> the global batch the update takes, with the
        reference policy's log-probs when there is a KL term."""
        gb = global_batch(self.mesh, tb)
        if self.ref_params is not None:
            gb = gb.replace(ref_logprobs=self.learner.logprobs(self.ref_params, gb)[0])
        return gb

    def _pack(self, tb: LearnerBatch, n: int, shards: int) -> tuple[PackedBatch, float] | None:
        """With `learner.packing`, this process's per-sequence batch packed into rows of the token
        budget (`pr1_jax.packing`), every process with the same number of rows; and the share of
        the rows' slots its real tokens fill (all processes).

        The micro-batch count and the block pairs per row never fall below the largest of the run
        so far: a step that needs fewer rows pads with empty ones (fewer pairs, with padding pairs)
        instead of compiling the update for another shape, so the update compiles only when a step
        needs more than any before it (a few times early in a run: the step's tokens vary little
        with hundreds of responses)."""
        lc = self.cfg.learner
        if lc.packing == "off":
            return None
        planned = plan(tb, n, lc.packing, lc.max_tokens_per_micro_batch, shards)
        highs = allgather_json([planned.num_micro, planned.num_pairs])
        num_micro = self._micro_high = max(max(h[0] for h in highs), self._micro_high)
        num_pairs = self._pairs_high = max(max(h[1] for h in highs), self._pairs_high)
        groups = 0 if tb.vision is None else tb.vision.pixel_values.shape[0]
        packed = pack(self.policy.config, tb, n, lc.packing, lc.max_tokens_per_micro_batch, shards, num_micro,
                      first_group=jax.process_index() * groups, num_pairs=num_pairs, planned=planned)
        tokens = sum(allgather_json(int(np.asarray(packed.attention_mask).sum())))
        return packed, tokens / (packed.input_ids.size * jax.process_count())

    def train_step(self, step: int, batch: dict) -> dict:
        t0 = time.perf_counter()
        dynamic = self.cfg.data.dynamic_sampling
        if dynamic.enabled:
            filled = fill_step(batch, lambda: next(self.data, None), self._produce, dynamic)
            ro, batch, scores, extra = filled.rollout, filled.batch, filled.scores, {**filled.extra, **filled.metrics}
        else:
            ro, scores, extra = self._produce(batch)
        t_sample = extra.pop("sec_sample")
        overall = np.array([s["overall"] for s in scores], np.float32)
        adv = np.asarray(group_advantages(overall, ro.n, mean_only=self.cfg.learner.advantage == "drgrpo"))
        lengths = np.asarray(ro.samples.lengths)
        longest = max(allgather_json(int(lengths.max(initial=0))))
        bucket = response_bucket(longest, self.cfg.learner.response_buckets, self.sample_cfg.max_new_tokens)
        shards = max(batch_axis_size(self.mesh) // jax.process_count(), 1)
        tb = train_batch_from_samples(self.policy.config, ro.prompt_inputs, ro.samples, ro.n, advantages=adv,
                                      example_valid=batch["example_valid"], response_length=bucket, shards=shards)
        packing = self._pack(tb, ro.n, shards)
        if packing is not None:
            tb, fill = packing
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
        max_new = self.sample_cfg.max_new_tokens
        # Rows of skipped records (the reference epoch order keeps their places) carry no loss and no metrics.
        valid = np.repeat(np.asarray(batch["example_valid"], bool), ro.n)
        kept = _all_processes([x for x, v in zip(scores, valid) if v])
        out = {**(mean_metrics(kept, split="train") if kept else {}), **{k: v for k, v in m.items()}, **extra}
        lengths, adv = lengths[valid], adv[valid]
        if lengths.size:  # none when every record of this process's batch was skipped
            out.update(response_len=float(lengths.mean()), response_len_max=float(lengths.max()),
                       clipped_frac=float(np.mean(lengths >= max_new)), adv_mean=float(adv.mean()),
                       adv_std=float(adv.std()))
        if packing is not None:
            out.update(update_rows=tb.num_rows * jax.process_count(), update_fill=fill)
        out.update(response_bucket=bucket, sec_sample=t_sample, sec_update=t_update, sec_step=time.perf_counter() - t0,
                   tokens_per_sec=float(lengths.sum()) / max(t_sample, 1e-9))
        out.pop("has_visual", None)
        for reason, count in self.data.skip_counts.items():
            out[f"skipped_{reason}"] = count
        out["truncated_prompts"] = self.data.truncation_count
        return out

    def validate(self, step: int) -> dict | None:
        if not self.cfg.val_paths:
            return None
        # Every validation record once (the streaming order, the last batch padded), its image first
        # where its problem has no placeholder (our Geometry3K converter writes none).
        val_cfg = dataclasses.replace(self.cfg.data, paths=tuple(self.cfg.val_paths), batch_size=self.cfg.val_batch_size,
                                      shuffle=False, num_epochs=1, drop_remainder=False, epoch_order="streaming",
                                      unplaced_images="first", shard_index=None, shard_count=None)
        scores, samples, it, last = [], [], iter(make_iterator(val_cfg, self.tokenizer)), None
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
            # What the policy writes now, to read beside the numbers: this process's first samples.
            samples += [dict(record_id=batch["record_id"][j], problem=batch["problem"][j], answer=batch["answer"][j],
                             response=ro.texts[j], **s[j])
                        for j in np.flatnonzero(valid)[:self.cfg.logging.val_samples - len(samples)]]
        scores = _all_processes(scores)
        out = mean_metrics(scores, split="val") if scores else {}
        out["samples"] = len(scores)
        self.metrics.write(step, out, prefix="val")
        self.metrics.write_samples(step, samples)
        return out

    def _greedy(self, batch: dict) -> Rollout:
        return rollout(self.policy, self.learner.policy_params(self.state), self.greedy_sampler, self.tokenizer,
                       batch, jax.random.key(0), self.mesh, self.cfg.data.patch_limit_per_record)

    # -- the run --

    def _on_sigterm(self, *_):
        log.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting")
        self._stop_requested = True

    def _steps_taken(self) -> int | None:
        """Steps in the train state (updates and skipped ones); None when its arrays are gone (donated
        to an update that raised)."""
        if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(self.state)):
            return None
        return int(self.state.step + self.state.skipped)

    def fit(self) -> dict | None:
        """Runs to `total_steps` (or the end of the data, or SIGTERM); returns the last validation.
        However it ends, the last good state is saved under its own step: a step that raised
        before its update is not saved (its batch is read again on resume)."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        step = self._steps_taken()
        data_state = self.data.get_state()  # the data position of the batches the state was trained on
        val = None
        try:
            if self.cfg.val_before_train and step == 0:
                with self.times("validation"):
                    val = self.validate(step)
            while step < self.total_steps and not self._stop_requested:
                try:
                    batch = next(self.data)
                except StopIteration:
                    log.info("data exhausted after %d steps", step)
                    break
                step += 1
                after = self.data.get_state()
                try:
                    with self.times("train step"):
                        metrics = self.train_step(step, batch)
                    self.metrics.write(step, metrics)
                finally:
                    if self._steps_taken() == step:  # the update ran (also before a Stop of the NaN guard)
                        data_state = after
                if step % self.cfg.save_freq == 0:
                    with self.times("checkpoint"):
                        self.save(step, data_state)
                if self.cfg.val_freq and step % self.cfg.val_freq == 0:
                    with self.times("validation"):
                        val = self.validate(step)
            if not self._stop_requested and self.cfg.val_freq and step % self.cfg.val_freq:
                with self.times("validation"):
                    val = self.validate(step)
        finally:
            taken = self._steps_taken()
            if taken is None:
                log.error("the train state was lost in the failed update; the last checkpoint is step %s",
                          self.checkpointer.latest_step())
            elif taken not in self.checkpointer.steps():
                self.save(taken, data_state)
            with self.times("checkpoint"):
                self.checkpointer.wait()  # the last save is complete on disk before the run ends (SIGTERM too)
            self.scorer.close()
            self.metrics.close()
            log.info("%s", self.times.summary())
        return val


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pr1_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run directory has checkpoints")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every section and default, overrides applied) as YAML and exit")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    return p


def parse_config(argv: list[str]) -> TrainConfig:
    return _config(_parser().parse_intermixed_args(argv))


def _config(args: argparse.Namespace) -> TrainConfig:
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
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = _config(args)
    except configlib.ConfigError as e:
        log.error("config error: %s", e)
        return 2
    if args.print_config:
        print(_yaml(configlib.to_dict(cfg)), end="")
        return 0
    if cfg.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)  # most of the tiny run's take < 1 s
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
    except (*USER_ERRORS, NoValidRecordError) as e:  # e.g. data with no usable record: one line
        log.error("%s: %s", type(e).__name__, e)
        return 2
    finally:
        trainer.checkpointer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
