"""The reference epoch order: which record each position of a process's record stream reads.

`DataConfig.epoch_order` picks one of two orders:

* ``streaming`` (`pipeline.make_example_dataset`): each process its own contiguous shard
  (an even split, the remainder dropped), shuffled with seed + epoch and repeated; the batcher
  takes `batch_size` records at a time from that flat stream, drawing on past a skipped record.
  A batch can straddle two epochs (and then hold a record twice), and a process never sees the
  other shards' records.
* ``reference`` (here): what the reference run's loader does (verl's `RandomSampler` over all
  records and a `DataLoader` with `drop_last=True`, one loader feeding every GPU), spread over
  processes. Each epoch is one permutation of *all* records, the same on every process; it is
  cut into global batches of `batch_size x processes` records, the epoch's remainder dropped;
  process p reads slice p of each global batch. So every step's global batch is
  `permutation[s * G:(s + 1) * G]` of its epoch: no record twice in a step, every record
  reachable, `num_epochs` whole epochs of `records // G` steps. A record that fails to
  process leaves its row in the batch, marked invalid (`example_valid` False), instead of
  drawing on: every step keeps its place in the epoch on every process.

The permutation is grain's `shuffle` (index_shuffle seeded with seed + epoch, the streaming
order's too): the same records in the same order on every process, whatever the process count.
The iterator's state for this order is a count of global batches delivered (`ReferencePlan.
state`), so a run resumes mid-epoch exactly, also on another number of processes as long as the
global batch is the same (`state_for_process`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import grain

from pr1_jax.data.config import DataConfig


class DataStateError(ValueError):
    """A saved data position that this pipeline cannot resume from (the message says why)."""


def steps_per_epoch(num_records: int, config: DataConfig, process_count: int) -> int:
    """Batches per process in one epoch of `num_records` records (each a step of the run)."""
    if config.epoch_order == "reference":
        return num_records // (config.batch_size * process_count)
    return num_records // process_count // config.batch_size


@dataclasses.dataclass(frozen=True)
class ReferencePlan:
    """The reference order's arithmetic for one process (pure, no records)."""

    records: int
    batch_size: int  # per process
    process_index: int
    process_count: int
    seed: int
    shuffle: bool
    num_epochs: int | None

    def __post_init__(self):
        if self.records < self.global_batch:
            raise ValueError(f"epoch_order 'reference': {self.records} records do not fill one global batch of "
                             f"{self.batch_size} x {self.process_count} processes = {self.global_batch}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return self.records // self.global_batch

    @property
    def length(self) -> int:
        """Positions of this process's stream (sys.maxsize when the epochs never end)."""
        if self.num_epochs is None:
            return sys.maxsize
        return self.num_epochs * self.steps_per_epoch * self.batch_size

    def position(self, index: int) -> int:
        """Stream position `index` -> position in the epoch-repeated permutation: epoch e's
        permutation holds positions [e * records, (e + 1) * records)."""
        epoch, k = divmod(index, self.steps_per_epoch * self.batch_size)
        step, j = divmod(k, self.batch_size)
        return epoch * self.records + step * self.global_batch + self.process_index * self.batch_size + j

    def state(self, batches: int) -> dict:
        """The iterator's position after `batches` batches: global, the same on every process."""
        return dict(epoch_order="reference", batches=batches, records=self.records, global_batch=self.global_batch,
                    seed=self.seed, shuffle=self.shuffle)

    def start(self, state: dict) -> int:
        """Batches already delivered by `state` (a `state(...)` dict), checked against this plan."""
        if state.get("epoch_order") != "reference":
            raise DataStateError("the saved data position is of the streaming order (data.epoch_order: streaming); "
                                 "this pipeline reads the reference order")
        saved = (state["records"], state["seed"], state["shuffle"])
        if saved != (self.records, self.seed, self.shuffle):
            raise DataStateError(f"the saved data position is for {state['records']} records, seed {state['seed']}, "
                                 f"shuffle {state['shuffle']}; this pipeline has {self.records}, {self.seed}, "
                                 f"{self.shuffle}")
        if state["global_batch"] != self.global_batch:
            raise DataStateError(
                    f"the saved data position is in global batches of {state['global_batch']} records; this run's "
                    f"are {self.batch_size} x {self.process_count} processes = {self.global_batch} (set "
                    f"data.batch_size = {state['global_batch']} / processes to resume)")
        return int(state["batches"])


class ReferenceOrder(grain.MapDataset):
    """One process's stream in the reference order: position -> the record `plan` puts there.
    `parent`: the records (a MapDataset of length `plan.records`)."""

    def __init__(self, parent: grain.MapDataset, plan: ReferencePlan):
        if len(parent) != plan.records:
            raise ValueError(f"the plan is for {plan.records} records, the dataset has {len(parent)}")
        super().__init__(parent.shuffle(seed=plan.seed) if plan.shuffle else parent)
        self._plan = plan

    def __len__(self) -> int:
        return self._plan.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._plan.position(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._plan.position(i) for i in indices])  # noqa: SLF001 (grain's protocol)

    def __str__(self) -> str:
        return f"ReferenceOrder(batch_size={self._plan.batch_size}, process {self._plan.process_index} of " \
               f"{self._plan.process_count})"


def state_for_process(states: Sequence[dict], process_index: int, process_count: int) -> dict:
    """This process's iterator state from a checkpoint's per-process states. On as many
    processes as saved: its own. On another count: the reference order's shared position (the
    skip and truncation counters summed into process 0, so the run's totals carry on); the
    streaming order cannot move (each process's position is in its own shard)."""
    if len(states) == process_count:
        return states[process_index]
    if not all(s.get("epoch_order") == "reference" for s in states):
        raise DataStateError(f"the checkpoint holds the data positions of {len(states)} processes; this run has "
                             f"{process_count}: the streaming order (each process its own shard) resumes on as many "
                             f"processes only (data.epoch_order: reference resumes on any count)")
    if len({s["batches"] for s in states}) != 1:
        raise DataStateError(f"the checkpoint's processes stand at different batches "
                             f"{[s['batches'] for s in states]}")
    skips: dict[str, int] = {}
    for s in states:
        for reason, n in s.get("skip_counts", {}).items():
            skips[reason] = skips.get(reason, 0) + int(n)
    mine = process_index == 0
    return dict(states[0], skip_counts=skips if mine else {},
                truncation_count=sum(int(s.get("truncation_count", 0)) for s in states) if mine else 0)
