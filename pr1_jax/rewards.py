"""Rule-based rewards of Perception-R1 (arXiv 2506.07218) over decoded response text.

Per response: ``overall = 0.9*accuracy + 0.1*format + 0.7*visual + 1.0*ngram_penalty``.

* ``accuracy``: the text inside ``<answer>...</answer>`` (whole response when there are
  no tags) checked against the ground truth by math-verify; 1.0 or 0.0.
* ``format``: the reference regex must match the *whole* response; 1.0 or 0.0.
* ``ngram_penalty``: share of repeated word 20-grams times ``max_penalty`` (-2.0).
* ``visual``: the judge's score, computed elsewhere and passed in; ``None`` when the sample
  has no visual annotations, which scores 0 and is left out of the logged visual mean.

Reward terms are plain functions ``fn(response, ground_truth, **record_fields) -> float``
registered by name; ``RewardConfig.weights`` names the ones to use. ``score`` runs them
in-process with no time bound, for trusted text. Policy samples go through
``RewardScorer``, which runs every term call in a spawned worker process under a wall-clock
deadline, so a hostile answer (``9^{9^{9^{9}}}``) costs one timeout, not a stalled trainer;
it returns raw terms, and ``combine_batch`` (the one reward path) weighs them with the judge's
verdicts into each sample's reward.

This module must stay free of JAX imports: worker processes import it.
"""

from __future__ import annotations

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

logger = logging.getLogger(__name__)

RewardFn = Callable[..., float]

VISUAL = "visual"
"""Reserved weight name: the externally computed judge score, not a registered function."""

DEFAULT_WEIGHTS = {"accuracy": 0.9, "format": 0.1, "ngram_penalty": 1.0, VISUAL: 0.7}

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(response, ground_truth, **record_fields) -> float`` as ``name``.

    Functions used by ``RewardScorer`` must be defined at module level, because worker
    processes receive them by pickled reference (module and name).
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


@dataclass(frozen=True)
class RewardConfig:
    """Which rewards to combine, with what weights, and how ``RewardScorer`` bounds them.

    ``weights`` maps registered reward names (plus ``"visual"``) to their weight in
    ``overall``. ``options`` holds per-reward keyword arguments, e.g. the n-gram size.
    ``timeout_s`` bounds each reward call in a worker; ``num_workers`` is the pool size.
    """

    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    options: Mapping[str, Mapping[str, object]] = field(
        default_factory=lambda: {"ngram_penalty": {"n": 20, "max_penalty": -2.0}}
    )
    timeout_s: float = 5.0
    num_workers: int = 4

    def __post_init__(self):
        if self.timeout_s <= 0 or self.num_workers < 1:
            raise ValueError("timeout_s must be > 0 and num_workers >= 1")

    @property
    def reward_names(self) -> list[str]:
        """The registered rewards to compute (every weighted name but ``"visual"``)."""
        return [name for name in self.weights if name != VISUAL]

    def kwargs_for(self, name: str, fields: Mapping[str, object]) -> dict:
        """Keyword arguments for reward ``name``: the record's fields, then its options."""
        return {**fields, **self.options.get(name, {})}


# --- built-in rewards ------------------------------------------------------------------

# DOTALL on purpose: the reference omits it, so its multi-line answer blocks (the very
# format it rewards) never match and it verifies the whole response, think block included.
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# The reference pattern verbatim. It is applied with fullmatch to the raw decoded text, as
# the reference does: a trailing newline or any text after </answer> fails the format.
# Lazy DOTALL groups may span tags, so repeated or nested tags inside still match.
_FORMAT_RE = re.compile(
    r"^<think>\n.*?\n</think>\n<answer>\n.*?\\boxed{.+?}.*?\n</answer>$", re.DOTALL
)


def extract_answer(response: str) -> str:
    """The first ``<answer>`` block's contents, or the whole response without tags."""
    match = _ANSWER_RE.search(response)
    return (match.group(1) if match else response).strip()


def _gold_latex(ground_truth: str) -> str:
    """Wrap bare gold in ``$...$``: math-verify reads bare ``2\\sqrt{3}`` as ``2``."""
    gold = ground_truth.strip()
    return gold if "$" in gold or "\\boxed" in gold else f"${gold}$"


@register_reward("accuracy")
def accuracy_reward(response: str, ground_truth: str, **_) -> float:
    """1.0 if the extracted answer is mathematically equivalent to the ground truth.

    math-verify's own signal-based timeouts are disabled (they fail off the main thread and
    cannot interrupt C code); the caller bounds the time, see ``RewardScorer``. Errors
    raise so that they can be counted instead of silently scoring 0.
    """
    gold = parse(_gold_latex(ground_truth), parsing_timeout=None, raise_on_error=True)
    pred = parse(extract_answer(response), parsing_timeout=None, raise_on_error=True)
    return float(verify(gold, pred, timeout_seconds=None, raise_on_error=True))


@register_reward("format")
def format_reward(response: str, ground_truth: str = "", **_) -> float:
    """1.0 if the response is exactly ``<think>`` block, then ``<answer>`` block with ``\\boxed{}``."""
    return 1.0 if _FORMAT_RE.fullmatch(response) else 0.0


@register_reward("ngram_penalty")
def ngram_penalty(
    response: str, ground_truth: str = "", *, n: int = 20, max_penalty: float = -2.0, **_
) -> float:
    """``(1 - unique/total)`` word n-grams, lower-cased, times ``max_penalty``; 0 below n words.

    Penalises degenerate looping generations, which GRPO otherwise reinforces once a
    looping sample happens to be correct.
    """
    words = response.lower().split()
    if len(words) < n:
        return 0.0
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty


# --- combining -------------------------------------------------------------------------


def _call(fn: RewardFn, response: str, ground_truth: str, kwargs: Mapping) -> float:
    """One reward term as a finite float: a NaN would poison the group advantages."""
    value = float(fn(response, ground_truth, **kwargs))
    if not math.isfinite(value):
        raise ValueError(f"reward returned {value}")
    return value


def combine(terms: Mapping[str, float], visual: float | None, weights: Mapping[str, float]) -> dict:
    """Score dict of one sample from its raw reward terms and the judge score (None: no
    annotations, or no judge): the terms, visual, has_visual, and the weighted overall."""
    scores = dict(terms)
    scores[VISUAL] = 0.0 if visual is None else float(visual)
    scores["has_visual"] = visual is not None
    scores["overall"] = sum(w * scores[name] for name, w in weights.items())
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
    **fields,
) -> dict:
    """All configured rewards for one response, in-process and unbounded in time.

    Returns the raw value of each reward term, ``visual`` (0.0 when None), ``has_visual``
    and the weighted ``overall``. Errors propagate; use ``RewardScorer`` for policy samples.
    """
    terms = {
        name: _call(get_reward(name), response, ground_truth, config.kwargs_for(name, fields))
        for name in config.reward_names
    }
    return combine(terms, visual, config.weights)


def mean_metrics(scores: Sequence[Mapping]) -> dict[str, float]:
    """Batch means for logging; ``visual`` averages only samples that have annotations."""
    keys = [k for k in scores[0] if k not in (VISUAL, "has_visual")] if scores else []
    means = {k: statistics.fmean(s[k] for s in scores) for k in keys}
    visual = [s[VISUAL] for s in scores if s["has_visual"]]
    if visual:
        means[VISUAL] = statistics.fmean(visual)
    return means


# --- bounded parallel scoring ------------------------------------------------------------

_READY = "ready"


def _worker_loop(conn) -> None:
    """Worker process: evaluate pickled ``(fn, response, ground_truth, kwargs)`` calls until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which closes us
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we bound it
    accuracy_reward("\\boxed{1}", "1")  # warm up, so start-up never eats a task's deadline
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

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_loop, args=(child,), daemon=True)
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
        self._fns = {name: get_reward(name) for name in config.reward_names}
        for name, fn in self._fns.items():
            try:
                pickle.dumps(fn)
            except Exception as exc:
                raise ValueError(f"reward {name!r} must be a module-level function") from exc
        self._ctx = multiprocessing.get_context("spawn")
        # Started now, so that they boot while the caller compiles; the dispatcher owns them.
        self._workers = [_Worker(self._ctx) for _ in range(config.num_workers)]
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name="reward-scorer", daemon=True)
        self._thread.start()

    def submit(self, records: Sequence[Mapping]) -> Future:
        """Queue a batch; the future's result is a ``BatchScores``.

        Each record has ``response``, ``ground_truth`` and any further fields, passed to every
        reward function as keyword arguments. Records are validated and pickled here, so bad
        input raises in the caller.
        """
        tasks = []
        for i, record in enumerate(records):
            fields = dict(record)
            response, ground_truth = fields.pop("response"), fields.pop("ground_truth")
            for name, fn in self._fns.items():
                kwargs = self.config.kwargs_for(name, fields)
                tasks.append((i, name, pickle.dumps((fn, response, ground_truth, kwargs))))
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
            workers[workers.index(worker)] = _Worker(self._ctx)

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
