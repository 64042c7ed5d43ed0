"""Checkpoints: keep-last-k, restore with shardings, corrupt and partial steps detected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1_jax.checkpoint import CheckpointRestoreError, Checkpointer
from pr1_jax.sharding import make_mesh
from jax.sharding import NamedSharding, PartitionSpec as P


def _state(x):
    return {"params": {"w": jnp.full((8, 4), float(x))}, "step": jnp.asarray(x, jnp.int32)}


def _abstract(state, sharding=None):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or a.sharding), state)


@pytest.mark.devices(8)
def test_keep_last_and_restore_sharded(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for s in (1, 2, 3):
        ck.save(s, _state(s), {"data": {"epoch": s}})
    assert ck.steps() == [2, 3]
    mesh = make_mesh((1, 8, 1))
    target = _abstract(_state(0), NamedSharding(mesh, P()))
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    state, meta = ck.restore(target)
    assert meta == {"data": {"epoch": 3}}
    assert int(state["step"]) == 3 and state["params"]["w"].sharding.spec == P("fsdp")
    np.testing.assert_array_equal(state["params"]["w"], np.full((8, 4), 3.0))


def test_partial_step_is_ignored(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, _state(1), {})
    # What a run killed mid-write leaves: orbax's temporary directory, never renamed.
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()
    ck2 = Checkpointer(tmp_path)
    assert ck2.steps() == [1]
    state, _ = ck2.restore(_abstract(_state(0)))
    assert int(state["step"]) == 1


def test_corrupt_array_is_reported_with_earlier_steps(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(1, _state(1), {})
    ck.save(2, _state(2), {})
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0garbage" * 4)
    with pytest.raises(CheckpointRestoreError, match=r"step 2 cannot be restored.*earlier complete steps: \[1\]"):
        Checkpointer(tmp_path).restore(_abstract(_state(0)))
    state, _ = Checkpointer(tmp_path).restore(_abstract(_state(0)), step=1)
    assert int(state["step"]) == 1


def test_missing_files_are_reported(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save(1, _state(1), {})
    ck.save(2, _state(2), {})
    import shutil
    shutil.rmtree(tmp_path / "2" / "state" / "d")
    with pytest.raises(CheckpointRestoreError, match=r"step 2 cannot be restored"):
        Checkpointer(tmp_path).restore(_abstract(_state(0)))
