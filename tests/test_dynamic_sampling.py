"""DAPO dynamic sampling (pr1_jax/dynamic_sampling.py) on fake rollouts: which groups a step keeps,
the cap, the data position across a resume, and several processes taking the same decisions."""

import threading

import numpy as np
import pytest

from pr1_jax.data.config import DynamicSamplingConfig
from pr1_jax.dynamic_sampling import fill_step, informative_groups
from pr1_jax.rollout import Rollout
from pr1_jax.sampling import SampleOutput

B, N, R = 2, 3, 4  # prompts per batch, samples per prompt, response length


def informative(record: int) -> bool:
    """The fake task: record i's samples disagree unless i % 3 == 0."""
    return record % 3 != 0


def data_batch(i: int, records=None) -> dict:
    """Data batch i: records (default 2i, 2i + 1), prompts of length 3 or 5 (batches of different
    length buckets), token ids that name the record."""
    records = records if records is not None else [B * i, B * i + 1]
    return dict(record_id=[f"r{r}" for r in records], problem=[""] * B, answer=[str(r) for r in records],
                annotations=[[] for _ in records], annotations_text=[""] * B, example_valid=np.ones(B, bool),
                length=3 + 2 * (i % 2))


def produce(batch: dict):
    records = [int(r[1:]) for r in batch["record_id"]]
    t = batch["length"]
    ids = np.array([[0] * (t - 2) + [100 + r, 200 + r] for r in records], np.int32)
    mask = (ids > 0).astype(np.int32)
    inputs = dict(input_ids=ids, attention_mask=mask, positions=np.cumsum(mask, 1) * mask, vision=None,
                  rope_deltas=np.zeros(B, np.int32))
    rows = [(r, j) for r in records for j in range(N)]
    tokens = np.array([[1000 * r + j] * R for r, j in rows], np.int32)
    samples = SampleOutput(tokens=tokens, logprobs=-tokens.astype(np.float32), mask=np.ones_like(tokens),
                           lengths=np.full(len(rows), R, np.int32), steps=np.asarray(R))
    scores = [dict(overall=float(j if informative(r) else 1.0), accuracy=float(j % 2 if informative(r) else 0))
              for r, j in rows]
    ro = Rollout(prompt_inputs=inputs, samples=samples, texts=[f"{r}.{j}" for r, j in rows], n=N)
    return ro, scores, dict(sec_sample=1.0, reward_errors=0)


class Data:
    """A data iterator whose state is its position, counting the batches drawn."""

    def __init__(self, position: int = 0):
        self.position = position

    def __next__(self):
        self.position += 1
        return data_batch(self.position - 1)


def test_informative_groups():
    v = [1, 1, 1, 0, 1, 0, 2, 2, 2]
    np.testing.assert_array_equal(informative_groups(v, 3, [True, True, True]), [False, True, False])
    np.testing.assert_array_equal(informative_groups(v, 3, [True, False, True]), [False, False, False])


def test_fill_keeps_the_first_informative_groups_and_merges_their_rows():
    data = Data(1)
    f = fill_step(data_batch(0), lambda: next(data), produce, DynamicSamplingConfig(enabled=True))
    # batch 0: record 0 dropped (its samples agree), 1 kept; one more batch: 2 kept, 3 dropped
    assert f.batch["record_id"] == ["r1", "r2"] and f.batch["example_valid"].tolist() == [True, True]
    assert f.metrics["rollouts_per_step"] == 2 and data.position == 2  # no batch drawn unused
    assert (f.metrics["groups_dropped"], f.metrics["groups_surplus"], f.metrics["groups_short"]) == (2, 0, 0)
    assert f.extra == dict(sec_sample=2.0, reward_errors=0)
    ro = f.rollout
    # prompts left-padded to the longer batch's length 5; each sample row follows its prompt
    assert ro.prompt_inputs["input_ids"].tolist() == [[0, 0, 0, 101, 201], [0, 0, 0, 102, 202]]
    assert ro.prompt_inputs["positions"].tolist() == [[0, 0, 0, 1, 2]] * 2
    assert ro.samples.tokens[:, 0].tolist() == [1000, 1001, 1002, 2000, 2001, 2002]
    assert ro.texts == ["1.0", "1.1", "1.2", "2.0", "2.1", "2.2"]
    assert [s["overall"] for s in f.scores] == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
    assert int(ro.samples.steps) == R


def test_metric_and_cap_and_short_steps():
    # accuracy: record 1's samples are 0, 1, 0 -> informative; with max_rollouts=1 the step is short
    f = fill_step(data_batch(0), lambda: pytest.fail("no second rollout"), produce,
                  DynamicSamplingConfig(enabled=True, metric="accuracy", max_rollouts=1))
    assert f.batch["record_id"] == ["r1", "r0"] and f.batch["example_valid"].tolist() == [True, False]
    assert (f.metrics["rollouts_per_step"], f.metrics["groups_short"]) == (1, 1)
    # the data ends: train on what there is
    f = fill_step(data_batch(0), lambda: None, produce, DynamicSamplingConfig(enabled=True))
    assert f.metrics["rollouts_per_step"] == 1 and f.batch["example_valid"].tolist() == [True, False]
    with pytest.raises(ValueError):
        DynamicSamplingConfig(max_rollouts=0)


def run_steps(data: Data, steps: int) -> list[list[str]]:
    out = []
    for _ in range(steps):
        first = next(data)
        f = fill_step(first, lambda: next(data), produce, DynamicSamplingConfig(enabled=True, max_rollouts=3))
        out.append(f.batch["record_id"])
    return out


def test_resume_continues_where_the_filling_left_off():
    whole = run_steps(Data(), 5)
    data = Data()
    first = run_steps(data, 2)
    saved = data.position  # the iterator state a checkpoint after step 2 holds
    resumed = run_steps(Data(saved), 3)
    assert first + resumed == whole
    assert whole[:2] == [["r1", "r2"], ["r4", "r5"]]


def test_processes_take_the_same_decisions():
    # process 0's groups are all informative; process 1's only from its third batch on: both run
    # three rollouts (process 0 discards its extra groups) and report the same global counts
    barrier = threading.Barrier(2)
    slots: list = [None, None]

    def allgather(rank):
        def gather(value):
            slots[rank] = value
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out
        return gather

    def records(rank, i):
        return [1, 2] if rank == 0 else ([0, 3] if i < 2 else [4, 5])

    results = [None, None]

    def process(rank):
        drawn = iter(range(1, 10))

        def more():
            i = next(drawn)
            return data_batch(i, records(rank, i))

        results[rank] = fill_step(data_batch(0, records(rank, 0)), more, produce,
                                  DynamicSamplingConfig(enabled=True), allgather=allgather(rank))

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results[0].metrics == results[1].metrics == dict(rollouts_per_step=3, groups_dropped=4,
                                                            groups_surplus=4, groups_short=0)
    assert results[0].batch["record_id"] == ["r1", "r2"] and results[1].batch["record_id"] == ["r4", "r5"]
