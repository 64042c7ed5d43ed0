"""Warm starts of the embedded default: the stand-ins for "Instruct" checkpoints.

Both are saved as Hugging Face checkpoints in the run directory and reused when present (a
killed warm start leaves no half checkpoint: it is written under `<out>.tmp` and renamed).

Policy (`warm_start_policy`): SFT on `synthetic.sft_pairs`, prompts exactly as the data pipeline
builds them (`TinyAssets.data_config`), targets = response + EOS. The responses have the paper's
exact output format, state facts in the annotation sentences the judge was taught, and give
answers that are random rather than read from the image, so the policy starts with format
reward ~1 and accuracy ~chance (0.25), and RL has the grounding to learn.

Judge (`warm_start_judge`): trained on `synthetic.judge_examples` in exactly the layout the
judge reads at inference: `Judge.prompt_ids` rows packed by `pr1_jax.judge.pack` (one row per response,
one prefix-sharing branch per annotation), and on exactly the quantity its verdicts threshold
(the yes-minus-no logit margin at each branch's last token, logistic loss). Deciding whether a
response states an annotation is a comparison (the statement's value against the value the
response gives for that fact), which gives no first-order gradient: trained on the verdict
alone, the tiny judge stays at chance for hundreds of steps (it only learns "is the fact
mentioned at all"). Two things make it learn in ~2 CPU minutes:

- a copy loss: inside the statement of a *positive* branch, every next statement token is
  predictable from the response, so next-token loss there teaches the judge to look the fact
  up in the response (an induction head); the verdict then only compares;
- a curriculum: the first `curriculum` fraction of the steps uses responses that state one
  fact and nothing else (`judge_examples(single=True)`), so the comparison is learned before
  the distractor facts, repeats and hedges come in.

The second stage's responses repeat sentences and hedge (state a fact's true value and another)
because an RL policy finds such responses: a judge trained only on clean responses (one
sentence per fact) accepted every annotation of a response that repeated one sentence, and the
policy learned exactly that within 60 GRPO steps.

Paper-format judge (`warm_start_paper_judge`, not part of the default run): a judge trained to
answer the reference's prompt (`JudgeConfig.prompt = "paper"`) in its `<infoK>d</infoK>` format,
on the rows the paper judge reads (the system turn's cache shared, each row on top of it); the
stand-in for an instruct judge when the constrained decode is compared with free generation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.causal_lm import QwenCausalLM
from models.pretrained import Model, load_pretrained
from models.weights import copy_side_files
from pr1_jax.data.batching import collate
from pr1_jax.data.config import DataConfig
from pr1_jax.data.processing import ExampleProcessor, load_tokenizer
from pr1_jax.judge import (Judge, JudgeBatch, JudgeConfig, judge_hidden_states, margins_from_hidden, pack,
                           skeleton_text, system_cache, tokenize)
from pr1_jax.learner import LearnerConfig, make_optimizer
from pr1_jax.rollout import LearnerBatch, policy_inputs
from pr1_jax.tiny import synthetic
from pr1_jax.tiny.assets import TinyAssets, judge_prompt_config, spec_hash_of
from pr1_jax.tiny.sft import SFTTrainer, pad_targets, sft_batch, token_ids

log = logging.getLogger(__name__)

SPEC_FILE = "warm_start.json"


def _spec(assets: TinyAssets, **args) -> dict:
    """What a warm start is a function of: its arguments, the assets (their manifest) and this
    module's and the task's code; a cached warm start is reused only when all are equal."""
    manifest = (Path(assets.policy).parent / "manifest.json").read_text()
    digest = spec_hash_of(dict(args, assets=manifest), __file__)
    return json.loads(json.dumps(dict(args, spec_hash=digest), default=str))  # as read back


def _cached(out: Path, spec: dict, what: str) -> bool:
    try:
        if json.loads((out / SPEC_FILE).read_text()) == spec:
            log.info("%s warm start: reusing %s", what, out)
            return True
    except (OSError, ValueError):
        pass
    if out.exists():
        log.info("%s warm start: %s was made with other settings or code; redoing it", what, out)
        shutil.rmtree(out)
    return False


def _save(model: Model, params, out: Path, tokenizer_dir: str, spec: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Model(model.config, params).save_pretrained(tmp)
    copy_side_files([tokenizer_dir], tmp)
    (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    tmp.rename(out)  # a killed warm start leaves no half checkpoint under the final name


def policy_sft_batch(model: Model, proc: ExampleProcessor, data_cfg: DataConfig, pairs,
                     response_tokens: int) -> LearnerBatch:
    """The learner batch of (record, response) pairs: each record's prompt exactly as the data
    pipeline builds it (chat template, format prompt, image), the response's ids then EOS."""
    tok = proc.tokenizer
    batch = collate([proc.process(rec) for rec, _ in pairs], data_cfg, proc.pad_token_id)
    inputs, pv, grids = policy_inputs(model, batch)
    ids = token_ids(tok, [r for _, r in pairs], tok.convert_tokens_to_ids("<|im_end|>"))
    if max(map(len, ids)) > response_tokens:
        raise ValueError(f"a warm-start response of {max(map(len, ids))} tokens exceeds {response_tokens}")
    targets = pad_targets(ids, response_tokens, proc.pad_token_id)
    return sft_batch(model.config, inputs, targets, pv, grids, data_cfg.patch_limit_per_record)


def warm_start_policy(assets: TinyAssets, out: Path, *, steps: int = 60, batch_size: int = 16, lr: float = 3e-3,
                      seed: int = 0, response_tokens: int = 48, warmup_ratio: float = 0.1,
                      p_state: float = 0.6, p_true: float = 0.0) -> Path:
    """SFT of the policy on `synthetic.sft_pairs`: the exact output format, facts stated in the
    judge's sentences (each with probability `p_state`) and answers that are random, not read
    from the image, so it starts at about chance accuracy and RL has the grounding to learn."""
    out = Path(out)
    spec = _spec(assets, kind="policy", steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 response_tokens=response_tokens, warmup_ratio=warmup_ratio, p_state=p_state, p_true=p_true)
    if _cached(out, spec, "policy"):
        return out
    t0 = time.perf_counter()
    model = load_pretrained(assets.policy)
    data_cfg = assets.data_config("train", batch_size=batch_size)
    proc = ExampleProcessor(data_cfg)
    pairs = synthetic.sft_pairs(steps * batch_size, seed, p_true=p_true, p_state=p_state)
    # The vision tower stays as initialised (a stand-in for a pretrained encoder): its random
    # features separate the colours well, but trained on answers that ignore the image it learns
    # to drown them (feature norms grow ~50x and stop depending on the pixels), after which not
    # even supervised answers are learnable in 800 steps.
    trainer = SFTTrainer(model.module, steps, lr=lr, warmup_ratio=warmup_ratio, freeze_vision=True)
    params = model.params
    opt = trainer.init(params)
    for s in range(steps):
        b = policy_sft_batch(model, proc, data_cfg, pairs[s * batch_size:(s + 1) * batch_size], response_tokens)
        params, opt, m = trainer.step(params, opt, b)
        if s % max(1, steps // 10) == 0 or s == steps - 1:
            log.info("policy warm start %d/%d: loss %.3f (%.0f s)", s + 1, steps, float(m["loss"]),
                     time.perf_counter() - t0)
    _save(model, params, out, assets.tokenizer, spec)
    log.info("policy warm start: %d steps in %.0f s -> %s", steps, time.perf_counter() - t0, out)
    return out


def judge_batch(judge: Judge, examples, length: int, k: int, copy_slots: int = 32):
    """(packed batch, labels [B, k], copy) of (response, annotations, labels) examples.

    The rows are `Judge.prompt_ids` packed by `pr1_jax.judge.pack`: exactly what the judge reads at
    inference (one row per response, one prefix-sharing branch per annotation, the verdict at
    each branch's last token). copy = (index [B, C], target [B, C], valid [B, C]): inside each
    positive branch's statement, the positions that predict the next statement token, and that
    token (a statement the response states is predictable from the response)."""
    rows, labels = [], np.zeros((len(examples), k), np.float32)
    index = np.zeros((len(examples), copy_slots), np.int32)
    target = np.zeros((len(examples), copy_slots), np.int32)
    valid = np.zeros((len(examples), copy_slots), bool)
    for i, (response, notes, ys) in enumerate(examples):
        row, truncated, dropped = judge.prompt_ids(response, notes)
        if truncated or dropped or len(row.branches) > k or row.length > length:
            raise ValueError(f"judge warm-start example {i} does not fit ({length}, {k}): {row.length} tokens, "
                             f"{len(row.branches)} annotations, truncated={truncated}, dropped={dropped}")
        rows.append(row)
        labels[i, :len(ys)] = ys
        at, c = len(row.prefix), 0
        for branch, y in zip(row.branches, ys):
            n = len(branch) - row.tail  # the statement's tokens
            for j in range(n - 1 if y else 0):
                if c == copy_slots:
                    raise ValueError(f"more than copy_slots={copy_slots} copy targets in example {i}")
                index[i, c], target[i, c], valid[i, c] = at + j, branch[j + 1], True
                c += 1
            at += len(branch)
    return pack(rows, length, k, len(rows)), labels, (index, target, valid)


def judge_loss(params, batch: JudgeBatch, labels, copy, module, yes_ids, no_ids, copy_weight: float = 0.0):
    """Mean logistic loss of the judge's margin (lse yes - lse no at each branch's last token,
    as `judge.margins_from_hidden`: the very quantity its verdicts threshold) against the labels,
    over valid annotation slots, i.e. the cross-entropy of the verdict token restricted to
    {yes, no}; plus `copy_weight` times the mean next-token loss at the copy slots."""
    h = judge_hidden_states(module, params, batch)
    margin = margins_from_hidden(module, params, h, batch, yes_ids, no_ids)
    sign = 2.0 * labels - 1.0
    nll = -jax.nn.log_sigmoid(sign * margin)
    valid = batch.valid
    n = jnp.maximum(valid.sum(), 1)
    verdict_loss = jnp.where(valid, nll, 0.0).sum() / n
    acc = jnp.where(valid, (margin > 0) == (labels > 0.5), False).sum() / n
    metrics = {"verdict_loss": verdict_loss, "accuracy": acc}
    loss = verdict_loss
    if copy_weight:
        index, target, cvalid = copy
        hc = jnp.take_along_axis(h, index[..., None], axis=1)  # [B, C, E]
        logp = jax.nn.log_softmax(module.apply({"params": params}, hc, method=QwenCausalLM.logits).astype(jnp.float32))
        tok = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        metrics["copy_loss"] = -jnp.where(cvalid, tok, 0.0).sum() / jnp.maximum(cvalid.sum(), 1)
        loss = loss + copy_weight * metrics["copy_loss"]
    metrics["loss"] = loss
    return loss, metrics


def judge_accuracy(judge: Judge, pairs) -> float:
    """Fraction of (response, annotation, label) pairs whose hard verdict equals the label."""
    out = judge([r for r, _, _ in pairs], [[a] for _, a, _ in pairs])
    verdicts = np.array([float(v[0] > 0.5) for v in out["verdicts"]])
    return float(np.mean(verdicts == np.array([label for _, _, label in pairs])))


def warm_start_judge(assets: TinyAssets, out: Path, config: JudgeConfig | None = None, *, steps: int = 400,
                     batch_size: int = 32, lr: float = 1e-3, seed: int = 0, warmup_ratio: float = 0.05,
                     weight_decay: float = 0.0, schedule: str = "cosine", copy_weight: float = 1.0,
                     curriculum: float = 0.3, p_omit: float = 0.5) -> Path:
    """Trains the judge's verdicts (see the module docstring) and saves it to `out`.

    config: the JudgeConfig the run's judge will use (default `tiny.judge_prompt_config()`);
        the prompts are built with it, so it must be the same at inference.
    steps x batch_size: responses seen (each with its annotations: 3 verdicts a response, 1 in
        the curriculum's first stage); lr, warmup_ratio, weight_decay, schedule: the learner's
        AdamW (grad-norm clip 1.0); copy_weight: weight of the copy loss (0 = verdicts only);
        curriculum: fraction of the steps on single-fact responses; p_omit: share of the
        negatives that leave the fact out (the others state another value).
    """
    out = Path(out)
    config = config or judge_prompt_config()
    spec = _spec(assets, kind="judge", config=dataclasses.asdict(config), steps=steps, batch_size=batch_size, lr=lr,
                 seed=seed, warmup_ratio=warmup_ratio, weight_decay=weight_decay, schedule=schedule,
                 copy_weight=copy_weight, curriculum=curriculum, p_omit=p_omit)
    if _cached(out, spec, "judge"):
        return out
    t0 = time.perf_counter()
    model = load_pretrained(assets.judge)
    judge = Judge.from_model(load_tokenizer(assets.tokenizer), model, config)
    rng = np.random.default_rng([seed, 1])
    easy = int(round(curriculum * steps))  # the curriculum's first stage
    stages = [synthetic.judge_examples(rng, easy * batch_size, single=True),
              synthetic.judge_examples(rng, (steps - easy) * batch_size, p_omit=p_omit)]
    # Each batch is padded to a multiple of 32 of its own longest row, not to the stage's longest:
    # rows average ~90 tokens, the longest ~160; a few shapes, each compiled once.
    lengths = [[judge.prompt_ids(r, notes)[0].length for r, notes, _ in examples] for examples in stages]
    slots = [max((len(notes) for _, notes, _ in examples), default=0) for examples in stages]
    cfg = LearnerConfig(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, max_grad_norm=1.0,
                        schedule=schedule)
    tx = make_optimizer(cfg, steps)
    loss_fn = functools.partial(judge_loss, module=model.module, yes_ids=judge.yes_ids, no_ids=judge.no_ids,
                                copy_weight=copy_weight)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, batch, labels, copy):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, labels, copy)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    params = model.params
    opt = tx.init(params)
    for s in range(steps):
        stage = int(s >= easy)
        i = s - easy * stage
        part = slice(i * batch_size, (i + 1) * batch_size)
        length = -(-max(lengths[stage][part]) // 32) * 32
        batch, labels, copy = judge_batch(judge, stages[stage][part], length, slots[stage])
        params, opt, m = update(params, opt, batch, labels, copy)
        if s % max(1, steps // 10) == 0 or s == steps - 1:
            log.info("judge warm start %d/%d: verdict loss %.3f, accuracy %.3f, copy loss %.3f (%.0f s)", s + 1,
                     steps, float(m["verdict_loss"]), float(m["accuracy"]), float(m.get("copy_loss", 0.0)),
                     time.perf_counter() - t0)
    _save(model, params, out, assets.tokenizer, spec)
    log.info("judge warm start: %d steps in %.0f s -> %s", steps, time.perf_counter() - t0, out)
    return out


def paper_judge_batch(judge: Judge, examples, length: int | None = None, slots: int | None = None):
    """(rows, target) of (response, annotations, labels) examples in the paper judge's format
    (`JudgeConfig.prompt = "paper"`), laid out as it reads them: after the system turn (shared, see
    `paper_judge_loss`), one row per example, the judge's own row ids (`PaperScheme.rows`: user
    turn, generation prompt, `<info1>`) followed by the rest of its answer `skeleton_text(labels)`
    and <|im_end|>. rows = (input_ids [B, T], attention_mask [B, T]) int32, right-padded;
    target = (index [B, A], token [B, A], valid [B, A]): the positions that predict the answer's
    tokens (from `<info1>` on), so that greedy generation learns to write the whole skeleton and
    stop. length (T, default: the longest row rounded up to 16) and slots (A, default: the longest
    answer) pad the batch to one shape."""
    scheme = judge.scheme
    pr, tok = scheme.prompt, judge.tokenizer
    rows, info = scheme.rows([r for r, _, _ in examples], [notes for _, notes, _ in examples])
    if len(rows) != len(examples) or info["truncated"].any() or info["dropped"].any():
        raise ValueError(f"paper judge warm-start examples do not fit its config: {len(examples) - len(rows)} not "
                         f"judged, {int(info['truncated'].sum())} truncated, {int(info['dropped'].sum())} dropped")
    seqs, answers = [], []
    for row, (_, _, labels) in zip(rows, examples):
        start = len(row.ids) - len(pr.segments[0])  # the answer starts at its first tag
        answers.append(tokenize(tok, skeleton_text([str(y) for y in labels[:row.k]]), plain=True) + [tok.eos_token_id])
        seqs.append(row.ids[:start] + answers[-1])
    length = length or -(-max(map(len, seqs)) // 16) * 16
    slots = slots or max(map(len, answers))
    b = len(seqs)
    ids, mask = np.zeros((b, length), np.int32), np.zeros((b, length), np.int32)
    index, target, valid = (np.zeros((b, slots), t) for t in (np.int32, np.int32, bool))
    for r, (seq, answer) in enumerate(zip(seqs, answers)):
        if len(seq) > length or len(answer) > slots:
            raise ValueError(f"example {r}: {len(seq)} tokens, {len(answer)} answer tokens exceed ({length}, {slots})")
        ids[r, :len(seq)], mask[r, :len(seq)] = seq, 1
        a = len(answer)
        index[r, :a] = len(seq) - a - 1 + np.arange(a)
        target[r, :a], valid[r, :a] = answer, True
    return (ids, mask), (index, target, valid)


def paper_judge_loss(params, rows, target, module, prompt):
    """Mean next-token loss over the answer tokens of `paper_judge_batch`, computed as the paper
    judge computes its rows: the system turn prefilled once into a cache (no gradient flows into
    it: the task is the rows', and the backward pass then costs rows x (system + row) attention
    rather than a whole 1.4k-token sequence per example), the rows on top of it."""
    ids, mask = rows
    index, tokens, valid = target
    b, t = ids.shape
    s = len(prompt.system_ids)
    cache = system_cache(module, jax.lax.stop_gradient(params), prompt, b, s + t)
    positions = s + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = module.apply({"params": module.decode_params(params)}, ids, positions, mask, cache,
                        method=QwenCausalLM.decode)
    hk = jnp.take_along_axis(h, index[..., None], axis=1)  # [B, A, E]
    logp = jax.nn.log_softmax(module.apply({"params": params}, hk, method=QwenCausalLM.logits).astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def warm_start_paper_judge(judge: Judge, examples, *, steps: int, batch_size: int, lr: float = 3e-3):
    """Params of `judge` (a paper-prompt judge) trained to answer (response, annotations, labels)
    examples in the reference's format, `batch_size` examples a step (cycling over them), AdamW
    with the learner's schedule. A stand-in for an instruct judge that follows the paper's prompt,
    to compare the constrained decode with free generation (tests/test_judge_paper.py).

    Trained as a model of the sub-vocabulary the examples and the prompt use (token ids remapped
    to it, the embedding / LM-head rows cut to it; the softmax over it), then merged back: the
    other rows of a 150k vocabulary never occur, stay as initialised, and their logits stay far
    below the trained ones; a step then never touches a [150k, E] array."""
    module, prompt = judge.module, judge.scheme.prompt
    tx = make_optimizer(LearnerConfig(lr=lr, weight_decay=0.0, warmup_ratio=0.05, max_grad_norm=1.0), steps)
    parts = [examples[s:s + batch_size] for s in range(0, len(examples), batch_size)]
    shapes = [(r[0].shape[1], t[0].shape[1]) for r, t in (paper_judge_batch(judge, p) for p in parts)]
    length, slots = (max(x) for x in zip(*shapes))
    batches = [paper_judge_batch(judge, p, length, slots) for p in parts]
    vocab = np.unique(np.concatenate([np.ravel(r[0]) for r, _ in batches] + [prompt.system_ids]))
    local = lambda x: np.searchsorted(vocab, x).astype(np.int32)  # noqa: E731
    batches = [((local(ids), mask), (i, local(t), v)) for (ids, mask), (i, t, v) in batches]
    local_prompt = dataclasses.replace(prompt, system_ids=tuple(local(prompt.system_ids)))
    rows = jnp.asarray(vocab, jnp.int32)
    text = dataclasses.replace(module.cfg.text, vocab_size=len(vocab))
    local_module = module.clone(cfg=dataclasses.replace(module.cfg, text=text), parent=None)
    full = judge.params
    out = dict(full, embed_tokens={"embedding": full["embed_tokens"]["embedding"][rows]})
    if "lm_head" in full:
        out["lm_head"] = {"kernel": full["lm_head"]["kernel"][:, rows]}
    part = jax.tree.map(jnp.copy, out)  # donated: never the judge's own arrays

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(part, opt_state, batch, target):
        loss, grads = jax.value_and_grad(paper_judge_loss)(part, batch, target, local_module, local_prompt)
        updates, opt_state = tx.update(grads, opt_state, part)
        return optax.apply_updates(part, updates), opt_state, loss

    opt = tx.init(part)
    for s in range(steps):
        part, opt, loss = update(part, opt, *batches[s % len(batches)])
        if s % max(1, steps // 5) == 0 or s == steps - 1:
            log.info("paper judge warm start %d/%d: answer loss %.3f", s + 1, steps, float(loss))
    merged = dict(part, embed_tokens={"embedding": full["embed_tokens"]["embedding"].at[rows].set(
        part["embed_tokens"]["embedding"])})
    if "lm_head" in full:
        merged["lm_head"] = {"kernel": full["lm_head"]["kernel"].at[:, rows].set(part["lm_head"]["kernel"])}
    return merged
