"""The grain pipeline: record files -> shuffled, sharded, static-shape batches.

::

    RecordSource (raw rows)                         grain.MapDataset.source
      epoch_order "streaming":
      -> this host's shard (even split, remainder dropped)          [start:end]
      -> shuffle(seed), reshuffled every epoch (seed + epoch)       .shuffle
      -> repeat(num_epochs)                                         .repeat
      epoch_order "reference" (`pr1_jax.data.order`):
      -> per epoch one permutation of all records, this host's      ReferenceOrder
         slice of each global batch, the epoch's remainder dropped
      -> ExampleProcessor: decode + resize + tokenize,              .map (1:1, never raises:
         bad rows become Skipped markers                              bad rows -> Skipped)
      -> threads / worker processes                                 .to_iter_dataset / .mp_prefetch
      -> SkipAndBatch: count + log skips (or raise when strict),    (main process)
         count + log truncated prompts,
         collate batch_size examples into static shapes (reference
         order: each batch is its batch_size positions, a skipped
         record an invalid row)

Every element before the batcher maps 1:1 to a shard position, so the batches do not depend
on `worker_count` or `read_threads`, and skip counting/logging/raising happens in the main
process whatever the workers do.

Use::

    ds = make_dataset(config)      # a grain.IterDataset of batch dicts
    it = iter(ds)                  # a BatchIterator (grain DatasetIterator)
    batch = next(it)
    state = it.get_state()         # JSON-serialisable; also Orbax-checkpointable (it.save/load)
    ...
    it = iter(make_dataset(config)); it.set_state(state)   # resumes with the same next batch
    it.skip_counts                 # {reason: count} over all batches delivered so far
    it.truncation_count            # prompts shortened by DataConfig.truncation so far

With `num_epochs=None` the stream is infinite (train for a number of steps). On several
hosts, in the streaming order each host reads its own shard and skips make hosts' streams
uneven (so train for a step count with `num_epochs=None`); in the reference order every host
delivers the same number of batches, and its state resumes on another host count with the same
global batch (`order.state_for_process`).
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any, Callable

import grain

from pr1_jax.data import records as rec
from pr1_jax.data.batching import collate
from pr1_jax.data.config import DataConfig
from pr1_jax.data.order import DataStateError, ReferenceOrder, ReferencePlan
from pr1_jax.data.processing import Example, ExampleProcessor, Skipped

logger = logging.getLogger(__name__)


class NoValidRecordError(ValueError):
    """A full pass over the records gave no usable one: an endless stream would read on forever."""


def shard_options(config: DataConfig) -> grain.sharding.ShardOptions:
    """This host's shard: the configured one, else jax.process_index() of jax.process_count()."""
    if config.shard_index is not None:
        return grain.sharding.ShardOptions(config.shard_index, config.shard_count, drop_remainder=True)
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)


def shard_bounds(num_records: int, options: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of this shard's records: contiguous, equal sizes, the remainder dropped
    (grain's even split with drop_remainder=True)."""
    per_shard = num_records // options.shard_count
    return per_shard * options.shard_index, per_shard * (options.shard_index + 1)


def reference_plan(config: DataConfig, num_records: int) -> ReferencePlan:
    """The reference epoch order's plan for this process (see `pr1_jax.data.order`)."""
    opts = shard_options(config)
    return ReferencePlan(records=num_records, batch_size=config.batch_size, process_index=opts.shard_index,
                         process_count=opts.shard_count, seed=config.seed, shuffle=config.shuffle,
                         num_epochs=config.num_epochs)


def make_example_dataset(config: DataConfig, tokenizer: Any = None, processor: ExampleProcessor | None = None,
                         position: int = 0, source: rec.RecordSource | None = None) -> grain.IterDataset:
    """The per-record stream (Example or Skipped), before batching; `position`: where to begin
    (the reference order resumes by position); `source`: the config's records, if read."""
    source = rec.RecordSource(config) if source is None else source
    ds = grain.MapDataset.source(source)
    if config.epoch_order == "reference":
        ds = ReferenceOrder(ds, reference_plan(config, len(source)))[position:]
    else:
        start, end = shard_bounds(len(source), shard_options(config))
        ds = ds[start:end]
        if len(ds) == 0:
            raise ValueError(f"shard {shard_options(config)} of {len(source)} records is empty")
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed)
        if config.num_epochs != 1:
            ds = ds.repeat(config.num_epochs)
    ds = ds.map(processor or ExampleProcessor(config, tokenizer))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads,
        prefetch_buffer_size=max(2 * config.read_threads, 1) if config.read_threads else 0))
    if config.worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return it_ds


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` nobody parses them,
    so take the defaults (what `app.run` would do with no command-line flags)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(config: DataConfig, tokenizer: Any = None) -> "SkipAndBatchIterDataset":
    """Batches of static shapes (see `pr1_jax.data.batching` for the dict)."""
    proc = ExampleProcessor(config, tokenizer)
    source = rec.RecordSource(config)
    stream = functools.partial(make_example_dataset, config, processor=proc, source=source)
    plan = reference_plan(config, len(source)) if config.epoch_order == "reference" else None
    if plan is not None:
        per_pass, reordered = plan.steps_per_epoch * plan.batch_size, plan.shuffle or plan.process_count > 1
    else:
        start, end = shard_bounds(len(source), shard_options(config))
        per_pass, reordered = end - start, config.shuffle
    # Consecutive skips that prove no record of this process's passes is usable: one pass when
    # every pass reads the same records in the same order; when passes are reordered, 2 passes - 1
    # (any run of that many consecutive positions holds a whole pass).
    limit = 2 * per_pass - 1 if reordered else per_pass
    return SkipAndBatchIterDataset(stream(), config, proc.pad_token_id, plan, stream, limit)


def make_iterator(config: DataConfig, tokenizer: Any = None, state: dict | None = None) -> "BatchIterator":
    """`iter(make_dataset(config))`, restored to `state` if given."""
    it = iter(make_dataset(config, tokenizer))
    if state is not None:
        it.set_state(state)
    return it


class SkipAndBatchIterDataset(grain.IterDataset):
    """Drops Skipped markers (counted, logged; raised when strict) and collates batches.
    `plan` and `stream` (`stream(position=k)`: the example stream from position k) for the reference order."""

    def __init__(self, parent: grain.IterDataset, config: DataConfig, pad_id: int, plan: ReferencePlan | None = None,
                 stream: Callable[..., grain.IterDataset] | None = None, skip_limit: int | None = None):
        super().__init__(parent)
        self._config = config
        self._pad_id = pad_id
        self._plan = plan
        self._stream = stream
        self._skip_limit = skip_limit

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self._parent.__iter__(), self._config, self._pad_id, self._plan, self._stream,
                             self._skip_limit)

    def __str__(self) -> str:
        return f"SkipAndBatchIterDataset(batch_size={self._config.batch_size})"


class BatchIterator(grain.DatasetIterator):
    """Iterator of batch dicts. State = the parent's state (the reference order: the batches
    delivered, `ReferencePlan.state`) + the skip and truncation counters. `skip_limit`
    consecutive skipped records raise `NoValidRecordError` (`make_dataset` sets it to a pass)."""

    def __init__(self, parent: grain.DatasetIterator, config: DataConfig, pad_id: int,
                 plan: ReferencePlan | None = None, stream: Callable[..., grain.IterDataset] | None = None,
                 skip_limit: int | None = None):
        super().__init__(parent)
        self._config = config
        self._pad_id = pad_id
        self._plan = plan
        self._stream = stream
        self._skip_limit = skip_limit
        self._skipped_in_a_row = 0
        self._batches = 0
        self._skips: collections.Counter = collections.Counter()
        self._truncations = 0

    @property
    def skip_counts(self) -> dict[str, int]:
        """{reason: number of skipped records} over everything consumed so far (a record
        skipped in several epochs counts once per epoch)."""
        return dict(self._skips)

    @property
    def truncation_count(self) -> int:
        """Prompts shortened by `DataConfig.truncation` so far (once per epoch, like skips)."""
        return self._truncations

    def __next__(self) -> dict:
        cfg = self._config
        examples: list[Example] = []
        skipped: list[tuple[str, str]] = []
        truncated: list[tuple[str, int]] = []
        taken = 0  # stream positions read: the reference order reads exactly batch_size
        aligned = self._plan is not None
        while len(examples) < cfg.batch_size and not (aligned and taken == cfg.batch_size):
            try:
                el = next(self._parent)
            except StopIteration:
                break
            taken += 1
            if isinstance(el, Skipped):
                if cfg.strict:
                    raise el.error()
                self._skips[el.reason] += 1
                skipped.append((el.record_id, el.reason))
                logger.warning("skipping record %r: %s (%s) [%s skipped so far: %d] at %s", el.record_id,
                               el.reason, el.detail, el.reason, self._skips[el.reason], el.location)
                self._skipped_in_a_row += 1
                if self._skip_limit is not None and self._skipped_in_a_row >= self._skip_limit:
                    raise NoValidRecordError(
                        f"{self._skipped_in_a_row} records in a row skipped, a whole pass over {cfg.paths} "
                        f"without a usable record (skips so far: {dict(self._skips)}); fix the data or the "
                        "data settings")
                continue
            self._skipped_in_a_row = 0
            if el.truncated_tokens:
                self._truncations += 1
                truncated.append((el.record_id, el.truncated_tokens))
                logger.info("truncating record %r: %d prompt tokens cut from its problem text (%s) "
                            "[truncated so far: %d]", el.record_id, el.truncated_tokens, cfg.truncation,
                            self._truncations)
            examples.append(el)
        if aligned and taken < cfg.batch_size:  # the stream ends at a batch boundary
            raise StopIteration
        if not aligned and (not examples or (len(examples) < cfg.batch_size and cfg.drop_remainder)):
            raise StopIteration
        self._batches += 1
        batch = collate(examples, cfg, self._pad_id)
        batch["skipped"] = skipped
        batch["truncated"] = truncated
        return batch

    def get_state(self) -> dict:
        position = {"parent": self._parent.get_state()} if self._plan is None else self._plan.state(self._batches)
        return {**position, "skip_counts": dict(self._skips), "truncation_count": self._truncations}

    def set_state(self, state: dict) -> None:
        if self._plan is not None:
            self._batches = self._plan.start(state)
            old = self._parent
            self._parents = (self._stream(position=self._batches * self._config.batch_size).__iter__(),)
            old.close()  # its worker processes, if it started any
        elif "parent" not in state:
            raise DataStateError("the saved data position is of the reference order (data.epoch_order: reference); "
                                 "this pipeline reads the streaming order")
        else:
            self._parent.set_state(state["parent"])
        self._skips = collections.Counter({k: int(v) for k, v in state.get("skip_counts", {}).items()})
        self._truncations = int(state.get("truncation_count", 0))

    def __str__(self) -> str:
        return f"BatchIterator(batch_size={self._config.batch_size})"
