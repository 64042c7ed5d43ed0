"""Rule-based rewards of Perception-R1 (arXiv 2506.07218) over decoded response text.

Per response: ``overall = 0.9*accuracy + 0.1*format + 0.7*visual + 1.0*ngram_penalty``.

* ``accuracy``: the text inside ``<answer>...</answer>`` (whole response when there are
  no tags) checked against the ground truth by math-verify; 1.0 or 0.0. Two modes
  (``RewardConfig.accuracy_mode``): ``paper`` reads any answer block and the gold as math;
  ``reference`` reproduces the reference code (an answer block on one line only, bare gold).
* ``format``: the reference regex must match the *whole* response; 1.0 or 0.0.
* ``ngram_penalty``: share of repeated word 20-grams times ``max_penalty`` (-2.0).
* ``visual``: the judge's score, computed elsewhere and passed in; ``None`` when the sample
  has no visual annotations, which scores 0 and is left out of the logged visual mean.

Reward terms are plain functions ``fn(response, ground_truth, *, option_or_field=...) -> float``
registered by name, or a user's own in a file of theirs (``RewardConfig.functions``, loaded by
``pr1_jax.reward_plugins``); ``RewardConfig.weights`` names the ones to use. A term receives the record
fields and the options it declares by keyword, nothing else: an option or field that no
configured term declares is an error, not silently dropped (``RewardConfig.reward_kwargs``).
``score`` runs them
in-process with no time bound, for trusted text. Policy samples go through
``RewardScorer``, which runs every term call in a spawned worker process under a wall-clock
deadline, so a hostile answer (``9^{9^{9^{9}}}``) costs one timeout, not a stalled trainer;
it returns raw terms, and ``combine_batch`` (the one reward path) weighs them with the judge's
verdicts into each sample's reward.

This module must stay free of JAX imports: worker processes import it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import multiprocessing
import pickle
import queue
import re
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from math_verify import parse, verify

from pr1_jax.reward_plugins import PluginReward, check_call

logger = logging.getLogger(__name__)

RewardFn = Callable[..., float]

VISUAL = "visual"
"""Reserved weight name: the externally computed judge score, not a registered function."""

NGRAM = "ngram_penalty"
"""Left out of the reference run's logged ``overall`` (it adds the penalty to the reward only)."""

OVERLONG = "overlong"
"""DAPO's soft overlong punishment; takes the response's token count from the trainer."""

ACCURACY_MODES = ("paper", "reference")

DEFAULT_WEIGHTS = {"accuracy": 0.9, "format": 0.1, "ngram_penalty": 1.0, VISUAL: 0.7}

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(response, ground_truth, *, ...) -> float`` as ``name``.

    The keyword parameters after the first two are the record fields and options ``fn``
    takes (a ``**kwargs`` parameter takes every record field). Functions used by
    ``RewardScorer`` must be defined at module level, because worker processes receive them
    by pickled reference (module and name).
    """

    def decorator(fn: RewardFn) -> RewardFn:
        if name == VISUAL:
            raise ValueError(f"{VISUAL!r} is reserved for the judge score passed to score()")
        if _REGISTRY.get(name, fn) is not fn:
            raise ValueError(f"a different reward is already registered as {name!r}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}") from None


@functools.cache
def _keywords(fn: RewardFn) -> frozenset[str] | None:
    """The keyword names ``fn`` takes after ``(response, ground_truth)``; None: any (``**``)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


@dataclass(frozen=True)
class RewardConfig:
    """Which rewards to combine, with what weights, and how ``RewardScorer`` bounds them.

    ``weights`` maps registered reward names (plus ``"visual"``) to their weight in
    ``overall``. ``options`` holds per-reward keyword arguments, e.g. the n-gram size; each
    must be a parameter of that reward. ``accuracy_mode`` is the accuracy reward's mode
    (``paper`` or ``reference``, see ``accuracy_reward``). ``timeout_s`` bounds each reward
    call in a worker; ``num_workers`` is the pool size. ``functions`` maps further reward names
    to the user's functions, ``"path/to/file.py:function"`` (``pr1_jax.reward_plugins``); each
    needs a weight (0: logged, not trained on), and the paths are kept absolute.
    """

    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    options: Mapping[str, Mapping[str, object]] = field(
        default_factory=lambda: {NGRAM: {"n": 20, "max_penalty": -2.0}}
    )
    accuracy_mode: str = "paper"
    timeout_s: float = 5.0
    num_workers: int = 4
    functions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.timeout_s <= 0 or self.num_workers < 1:
            raise ValueError("timeout_s must be > 0 and num_workers >= 1")
        if self.accuracy_mode not in ACCURACY_MODES:
            raise ValueError(f"accuracy_mode must be one of {ACCURACY_MODES}, got {self.accuracy_mode!r}")
        resolved = {}
        for name, spec in self.functions.items():
            if name == VISUAL or name in _REGISTRY:
                raise ValueError(f"functions.{name}: {name!r} is a built-in reward's name; choose another")
            if name not in self.weights:
                raise ValueError(f"functions.{name} has no weight: set weights.{name} (0 logs it without training on it)")
            try:
                resolved[name] = str(_plugin(spec))
            except ValueError as exc:
                raise ValueError(f"functions.{name}: {exc}") from None
        object.__setattr__(self, "functions", resolved)  # absolute paths: a resumed run finds them from anywhere
        for name in [*self.reward_names, *self.options]:
            if name not in _REGISTRY and name not in self.functions:
                raise ValueError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}; "
                                 f"from functions: {sorted(self.functions)}")
        for name, opts in self.options.items():
            takes = _keywords(self.reward_fn(name))
            if name == "accuracy" and "mode" in opts:
                raise ValueError("set the accuracy mode as accuracy_mode, not options.accuracy.mode")
            unknown = sorted(set(opts) - takes) if takes is not None else []
            if unknown:
                raise ValueError(f"options.{name}: unknown option(s) {unknown}; {name} takes {sorted(takes)}")
        for name in self.functions:
            try:
                check_call(self.reward_fn(name), _keywords(self.reward_fn(name)), self.options.get(name, {}))
            except ValueError as exc:
                raise ValueError(f"functions.{name}: {exc}") from None

    def reward_fn(self, name: str) -> RewardFn:
        """The function of reward ``name``: a registered one, or the user's from ``functions``."""
        if name in self.functions:
            return _plugin(self.functions[name])
        return get_reward(name)

    @property
    def reward_names(self) -> list[str]:
        """The rewards to compute, registered or ``functions`` (every weighted name but ``"visual"``)."""
        return [name for name in self.weights if name != VISUAL]

    def _options(self, name: str) -> dict:
        mode = {"mode": self.accuracy_mode} if name == "accuracy" else {}
        return {**self.options.get(name, {}), **mode}

    def declared_fields(self, fields: Mapping[str, object]) -> dict:
        """The part of ``fields`` that some configured reward declares: a caller offers what it
        knows of a sample (its record's fields, its token count) and passes only what a term
        takes, since ``reward_kwargs`` rejects a field no term takes."""
        takes = [_keywords(self.reward_fn(name)) for name in self.reward_names]
        return {k: v for k, v in fields.items() if any(t is None or k in t for t in takes)}

    def reward_kwargs(self, fields: Mapping[str, object] | None = None) -> dict[str, dict]:
        """Keyword arguments of each configured reward for one record: the record ``fields``
        that reward declares, then its options. A field that no configured reward declares,
        or one that is also an option of the reward taking it, is an error naming it."""
        fields = fields or {}
        out, used = {}, set()
        for name in self.reward_names:
            takes = _keywords(self.reward_fn(name))
            mine = {k: v for k, v in fields.items() if takes is None or k in takes}
            options = self._options(name)
            if set(mine) & set(options):
                raise ValueError(f"record field(s) {sorted(set(mine) & set(options))} are also options of {name!r}")
            out[name] = {**mine, **options}
            used |= set(mine)
        unknown = sorted(set(fields) - used)
        if unknown:
            raise ValueError(f"record field(s) {unknown} are taken by none of the rewards {self.reward_names}")
        return out


@functools.cache
def _plugin(spec: str) -> PluginReward:
    """One loaded plug-in per spec, so that ``_keywords`` reads its signature once."""
    return PluginReward.parse(spec)


# --- built-in rewards ------------------------------------------------------------------

def first_block(text: str, open_tag: str, close_tag: str, *, one_line: bool = False, min_len: int = 0) -> str | None:
    """What `re.search(open_tag + "(.{min_len,}?)" + close_tag, text, DOTALL unless one_line)`
    captures, in linear time. The regex retries from every `open_tag` and scans to the end of the
    text each time: minutes on a response of 40000 repeated tags. The leftmost match starts at the
    first `open_tag` (of the first line that has one, for `one_line`) and ends at the first
    `close_tag` far enough after it; when that one has none, no later `open_tag` has one either."""
    for part in text.split("\n") if one_line else (text,):
        start = part.find(open_tag)
        if start < 0:
            continue
        start += len(open_tag)
        end = part.find(close_tag, start + min_len)
        if end >= 0:
            return part[start:end]
    return None



# The reference pattern verbatim. It is applied with fullmatch to the raw decoded text, as
# the reference does: a trailing newline or any text after </answer> fails the format.
# Lazy DOTALL groups may span tags, so repeated or nested tags inside still match.
_FORMAT_RE = re.compile(
    r"^<think>\n.*?\n</think>\n<answer>\n.*?\\boxed{.+?}.*?\n</answer>$", re.DOTALL
)


def _check_mode(mode: str) -> None:
    if mode not in ACCURACY_MODES:
        raise ValueError(f"accuracy mode must be one of {ACCURACY_MODES}, got {mode!r}")


def extract_answer(response: str, mode: str = "paper") -> str:
    """The first ``<answer>`` block's contents (``reference``: one on a single line), or the
    whole response; stripped."""
    _check_mode(mode)
    # "paper" spans lines on purpose; the reference's regex has no DOTALL, so its multi-line answer
    # blocks (the very format it rewards) never match and it verifies the whole response, think
    # block included: math-verify then reads the last \boxed{} of the text.
    block = first_block(response, "<answer>", "</answer>", one_line=mode == "reference")
    return (block if block is not None else response).strip()


def gold_text(ground_truth: str, mode: str = "paper") -> str:
    """The gold as math-verify gets it. ``paper`` wraps bare gold in ``$...$``, because
    math-verify reads bare ``2\\sqrt{3}`` as ``2`` and bare ``\\sqrt{3}`` as nothing;
    ``reference`` passes it bare, as the reference code does."""
    _check_mode(mode)
    gold = ground_truth.strip()
    if mode == "reference" or "$" in gold or "\\boxed" in gold:
        return gold
    return f"${gold}$"


@register_reward("accuracy")
def accuracy_reward(response: str, ground_truth: str, *, mode: str = "paper", float_rounding: int = 6) -> float:
    """1.0 if the extracted answer is mathematically equivalent to the ground truth.

    mode: ``paper`` (any ``<answer>`` block, gold read as math) or ``reference`` (the reference
    code's ``boxed_math_verify_accuracy_reward``: its regex without DOTALL, so a multi-line
    block falls back to the whole response, and the gold parsed bare).
    float_rounding: decimals numbers are compared at (math-verify's default 6; a benchmark's
    stated precision in evaluation).

    math-verify's own signal-based timeouts are disabled (they fail off the main thread and
    cannot interrupt C code); the caller bounds the time, see ``RewardScorer``. Errors
    raise so that they can be counted instead of silently scoring 0 (the reference scores
    them 0 uncounted; under ``RewardScorer`` the value is the same).
    """
    gold = parse(gold_text(ground_truth, mode), parsing_timeout=None, raise_on_error=True)
    pred = parse(extract_answer(response, mode), parsing_timeout=None, raise_on_error=True)
    return float(verify(gold, pred, float_rounding=float_rounding, timeout_seconds=None, raise_on_error=True))


@register_reward("format")
def format_reward(response: str, ground_truth: str = "") -> float:
    """1.0 if the response is exactly ``<think>`` block, then ``<answer>`` block with ``\\boxed{}``."""
    return 1.0 if _FORMAT_RE.fullmatch(response) else 0.0


@register_reward(NGRAM)
def ngram_penalty(response: str, ground_truth: str = "", *, n: int = 20, max_penalty: float = -2.0) -> float:
    """``(1 - unique/total)`` word n-grams, lower-cased, times ``max_penalty``; 0 below n words.

    Penalises degenerate looping generations, which GRPO otherwise reinforces once a
    looping sample happens to be correct.
    """
    words = response.lower().split()
    if len(words) < n:
        return 0.0
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty


@register_reward(OVERLONG)
def overlong_penalty(response: str, ground_truth: str = "", *, response_length: int, max_length: int,
                     buffer: int = 256) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, section 3.4): 0 up to ``max_length - buffer``
    tokens, then linear down to -1 at ``max_length`` (the sampler's cap): a response cut by the
    cap scores -1, one that ends just in time barely less than 0, so the policy learns to stop
    without the noise of punishing every long but finished answer as hard as a truncated one.

    response_length / max_length: the response's tokens and the cap, given by the trainer
    (record fields); buffer: the option, ``0 < buffer <= max_length``. Off unless weighted.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    return max(min((max_length - buffer - response_length) / buffer, 0.0), -1.0)


# --- combining -------------------------------------------------------------------------


def _call(fn: RewardFn, response: str, ground_truth: str, kwargs: Mapping) -> float:
    """One reward term as a finite float: a NaN would poison the group advantages."""
    value = float(fn(response, ground_truth, **kwargs))
    if not math.isfinite(value):
        raise ValueError(f"reward returned {value}")
    return value


def combine(terms: Mapping[str, float], visual: float | None, weights: Mapping[str, float]) -> dict:
    """Score dict of one sample from its raw reward terms and the judge score (None: no
    annotations, or no judge): the terms, visual, has_visual, the weighted ``overall`` (the
    reward trained on) and ``overall_reference``, the reference run's logged ``overall``: the
    same sum without the n-gram penalty, which it adds to the reward only."""
    scores = dict(terms)
    scores[VISUAL] = 0.0 if visual is None else float(visual)
    scores["has_visual"] = visual is not None
    scores["overall"] = sum(w * scores[name] for name, w in weights.items())
    scores["overall_reference"] = sum(w * scores[name] for name, w in weights.items() if name != NGRAM)
    return scores


def combine_batch(terms: Sequence[Mapping[str, float]], judged: Mapping | None,
                  weights: Mapping[str, float]) -> list[dict]:
    """THE reward of a batch of samples: host terms (`RewardScorer`'s `BatchScores.terms`, row
    by row) and the judge's result (`PendingVerdicts.result()`: `visual` [N], `has_visual` [N];
    None without a judge) -> one `combine` score dict per sample. Train, evaluate and the
    benches all call this, so the reward a run trains on is the reward they report."""
    if judged is None:
        return [combine(t, None, weights) for t in terms]
    if len(judged["visual"]) != len(terms):
        raise ValueError(f"{len(terms)} samples but {len(judged['visual'])} judge verdicts")
    return [combine(t, float(v) if has else None, weights)
            for t, v, has in zip(terms, judged["visual"], judged["has_visual"])]


def score(
    response: str,
    ground_truth: str,
    *,
    visual: float | None = None,
    config: RewardConfig = RewardConfig(),
    accuracy_mode: str | None = None,
    fields: Mapping[str, object] | None = None,
) -> dict:
    """All configured rewards for one response, in-process and unbounded in time.

    accuracy_mode: ``paper`` or ``reference`` (None: ``config.accuracy_mode``). fields: the
    record's further fields, for rewards that declare them (see ``RewardConfig.reward_kwargs``).
    Returns the raw value of each reward term, ``visual`` (0.0 when None), ``has_visual``,
    ``overall`` and ``overall_reference`` (``combine``). Errors propagate; use
    ``RewardScorer`` for policy samples.
    """
    if accuracy_mode is not None:
        config = dataclasses.replace(config, accuracy_mode=accuracy_mode)
    kwargs = config.reward_kwargs(fields)
    terms = {name: _call(config.reward_fn(name), response, ground_truth, kwargs[name]) for name in config.reward_names}
    return combine(terms, visual, config.weights)


def _reference_names(means: Mapping[str, float], split: str) -> dict[str, float]:
    """The reference run's names for the same reward means (verl ray_trainer: ``reward/{key}``
    at a training step; ``val/{key}_reward`` and ``val/reward_score`` at validation, where
    our logger adds the ``val/`` itself). Its ``overall`` is our ``overall_reference``; the
    reward it trains on (our ``overall``) it logs as ``critic/score/mean`` / ``reward_score``."""
    terms = {k: v for k, v in means.items() if k not in ("overall", "overall_reference")}
    terms["overall"] = means["overall_reference"]
    if split == "train":
        return {**{f"reward/{k}": v for k, v in terms.items()}, "critic/score/mean": means["overall"]}
    if split == "val":
        return {**{f"{k}_reward": v for k, v in terms.items()}, "reward_score": means["overall"]}
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def mean_metrics(scores: Sequence[Mapping], split: str | None = None) -> dict[str, float]:
    """Batch means for logging; ``visual`` averages only samples that have annotations.
    split ``"train"`` / ``"val"``: the reference run's names for the same numbers are added
    beside ours (``_reference_names``)."""
    keys = [k for k in scores[0] if k not in (VISUAL, "has_visual")] if scores else []
    means = {k: statistics.fmean(s[k] for s in scores) for k in keys}
    visual = [s[VISUAL] for s in scores if s["has_visual"]]
    if visual:
        means[VISUAL] = statistics.fmean(visual)
    if split is not None and scores:
        means.update(_reference_names(means, split))
    return means


# --- bounded parallel scoring ------------------------------------------------------------

_READY = "ready"


def _worker_loop(conn, plugins: Sequence[PluginReward] = ()) -> None:
    """Worker process: evaluate pickled ``(fn, response, ground_truth, kwargs)`` calls until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which closes us
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we bound it
    accuracy_reward("\\boxed{1}", "1")  # warm up, so start-up never eats a task's deadline
    for plugin in plugins:  # imported now for the same reason
        try:
            plugin.load()
        except ValueError:
            pass  # the trainer loaded it at start-up; if it fails now, each call fails and is counted
    try:
        conn.send(_READY)
        while True:
            payload = conn.recv_bytes()
            try:
                fn, response, ground_truth, kwargs = pickle.loads(payload)
                conn.send((True, _call(fn, response, ground_truth, kwargs)))
            except Exception as exc:
                conn.send((False, f"{type(exc).__name__}: {exc}"))
    except (EOFError, BrokenPipeError):
        return  # the parent closed the pipe


class _Worker:
    """Parent-side handle of one worker process and the task it is running."""

    def __init__(self, ctx, plugins: Sequence[PluginReward] = ()):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_loop, args=(child, tuple(plugins)), daemon=True)
        self.proc.start()
        child.close()  # so that the worker's death reads as EOF here
        self.ready = False
        self.task: tuple[int, str] | None = None
        self.deadline = math.inf

    def run(self, task: tuple[int, str], payload: bytes, timeout_s: float) -> None:
        self.conn.send_bytes(payload)
        self.task, self.deadline = task, time.monotonic() + timeout_s

    def finish(self) -> tuple[int, str]:
        task, self.task, self.deadline = self.task, None, math.inf
        return task

    def stop(self, kill: bool = False) -> None:
        """Close the pipe (an idle worker exits on EOF); kill it if busy, booting or asked to."""
        self.conn.close()
        if kill or self.task is not None or not self.ready:
            self.proc.kill()
        self.proc.join(timeout=2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


@dataclass
class BatchScores:
    """The raw reward terms of each sample of one batch (``{name: value}`` for every configured
    reward; ``combine_batch`` weighs them), and how many reward calls timed out or failed."""

    terms: list[dict[str, float]]
    timeouts: int = 0
    errors: int = 0


class RewardScorer:
    """Scores batches on a pool of worker processes while the caller keeps working.

    Each reward term of each sample is one task with a ``config.timeout_s`` deadline. A
    worker past its deadline is killed and replaced; an exception or a crash counts as an
    error; either way that term scores 0.0 and the rest of the batch is unaffected.
    Workers are spawned, never forked: forking a process with JAX's threads is unsafe, and
    spawning works from any thread. Batches are scored in submission order by one
    dispatcher thread. A worker that dies while starting up would fail again, so it breaks
    the scorer for good: its batch and all later ones raise.

    Use as a context manager, or call ``close()``, which waits for submitted batches.
    """

    def __init__(self, config: RewardConfig = RewardConfig()):
        self.config = config
        self._fns = {name: config.reward_fn(name) for name in config.reward_names}
        self._plugins = [fn for fn in self._fns.values() if isinstance(fn, PluginReward)]
        for name, fn in self._fns.items():
            try:
                pickle.dumps(fn)
            except Exception as exc:
                raise ValueError(f"reward {name!r} must be a module-level function") from exc
        self._ctx = multiprocessing.get_context("spawn")
        # Started now, so that they boot while the caller compiles; the dispatcher owns them.
        self._workers = [_Worker(self._ctx, self._plugins) for _ in range(config.num_workers)]
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name="reward-scorer", daemon=True)
        self._thread.start()

    def submit(self, records: Sequence[Mapping]) -> Future:
        """Queue a batch; the future's result is a ``BatchScores``.

        Each record has ``response``, ``ground_truth`` and any further fields, each passed to
        the rewards that declare it (``RewardConfig.reward_kwargs``). Records are validated and
        pickled here, so bad input (a missing key, a field no reward takes) raises in the
        caller, naming the record.
        """
        tasks = []
        for i, record in enumerate(records):
            fields = dict(record)
            response, ground_truth = fields.pop("response"), fields.pop("ground_truth")
            try:
                kwargs = self.config.reward_kwargs(fields)
            except ValueError as exc:
                raise ValueError(f"record {i}: {exc}") from None
            for name, fn in self._fns.items():
                tasks.append((i, name, pickle.dumps((fn, response, ground_truth, kwargs[name]))))
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardScorer is closed")
            self._jobs.put((tasks, len(records), future))
        return future

    def close(self) -> None:
        """Finish the submitted batches, then stop the dispatcher and the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._thread.join()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _dispatch(self) -> None:
        failure: BaseException | None = None
        try:
            while (job := self._jobs.get()) is not None:
                tasks, size, future = job
                if not future.set_running_or_notify_cancel():
                    continue
                if failure is not None:
                    future.set_exception(RuntimeError(f"RewardScorer is broken: {failure}"))
                    continue
                try:
                    future.set_result(self._score_batch(tasks, size))
                except BaseException as exc:
                    failure = exc
                    future.set_exception(exc)
        finally:
            for worker in self._workers:
                worker.stop()

    def _score_batch(self, tasks: list, size: int) -> BatchScores:
        """Run every task on the workers, replacing dead and hung ones."""
        workers, timeout_s = self._workers, self.config.timeout_s
        terms: list[dict[str, float]] = [{} for _ in range(size)]
        pending = deque(tasks)
        timeouts = errors = 0

        def replace(worker: _Worker) -> None:
            worker.stop(kill=True)
            workers[workers.index(worker)] = _Worker(self._ctx, self._plugins)

        while pending or any(w.task is not None for w in workers):
            for worker in workers:
                if pending and worker.ready and worker.task is None:
                    i, name, payload = pending.popleft()
                    worker.run((i, name), payload, timeout_s)
            deadline = min(w.deadline for w in workers)
            readable = wait(
                [w.conn for w in workers],
                timeout=None if deadline == math.inf else max(0.0, deadline - time.monotonic()),
            )
            for worker in list(workers):
                if worker.conn in readable:
                    try:
                        message = worker.conn.recv()
                    except EOFError:
                        if not worker.ready:
                            raise RuntimeError(
                                f"a reward worker exited with code {worker.proc.exitcode} while "
                                "starting; is the main module guarded by "
                                "`if __name__ == '__main__'`?"
                            ) from None
                        if worker.task is not None:
                            i, name = worker.finish()
                            logger.warning("reward %r crashed on sample %d", name, i)
                            terms[i][name] = 0.0
                            errors += 1
                        replace(worker)
                        continue
                    if message == _READY:
                        worker.ready = True
                        continue
                    (i, name), (ok, value) = worker.finish(), message
                    if not ok:
                        logger.warning("reward %r failed on sample %d: %s", name, i, value)
                        errors += 1
                    terms[i][name] = value if ok else 0.0
                elif time.monotonic() >= worker.deadline:
                    i, name = worker.finish()
                    logger.warning("reward %r timed out after %.1fs on sample %d", name, timeout_s, i)
                    terms[i][name] = 0.0
                    timeouts += 1
                    replace(worker)
        return BatchScores([{name: t[name] for name in self._fns} for t in terms], timeouts, errors)
