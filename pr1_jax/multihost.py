"""Moving per-process rows in and out of global computations (multi-host runs).

Each process reads its own shard of the data, so host values (prompts, responses, annotations)
are per process while the jitted sampler, judge and learner run on global arrays over the whole
mesh. `pr1_jax.learner.global_batch` builds global arrays from each process's rows;
`local_rows` reads a process's rows back; `allgather_json` gives every process every process's
host values (small ones: strings, iterator states). With one process all three are identities.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def local_rows(x: jax.Array, axis: int = 0) -> np.ndarray:
    """This process's rows of a global array sharded along `axis` (its addressable shards, in
    index order, replicas once). With one process: the whole array."""
    if x.is_fully_addressable:
        return np.asarray(x)
    blocks: dict[int, Any] = {}
    for shard in x.addressable_shards:
        blocks.setdefault(shard.index[axis].start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)], axis=axis)


def allgather_json(value: Any) -> list[Any]:
    """[value of process 0, value of process 1, ...] on every process, for JSON-able values."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(rows, sizes)]
