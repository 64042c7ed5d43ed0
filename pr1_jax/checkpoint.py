"""Training checkpoints: Orbax `CheckpointManager` around the train state and a JSON sidecar.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous step as the latest one; we never read a partial step. The JSON part
carries what is not an array: the data iterator state, the config, the RNG seed lineage.

Saves are asynchronous: `save(..., block=False)` returns once every array is copied to the host
(Orbax's synchronous device-to-host transfer, so the caller may donate or overwrite the state
right after) and the write and the rename go on in a background thread; the next save, `wait()`
and `close()` wait for it. A crash before the rename leaves the temporary directory only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointRestoreError(RuntimeError):
    """A step that cannot be restored; the message names it and the other steps on disk."""


def _first_line(e: Exception) -> str:
    """Orbax's errors can run to pages (a tree of every array): the first line says what failed."""
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else ""


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Complete steps on disk, and the one this checkpointer is writing (if any)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, block: bool = True) -> None:
        """Writes `step`. block: return when it is complete on disk; else once the state is copied
        to the host (after waiting for the previous save), the write finishing in the background
        (`wait` before exiting)."""
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )
        if block:
            self.wait()
        log.info("checkpoint step %d %s %s", step, "saved to" if block else "being written to", self.directory)

    def wait(self) -> None:
        """Blocks until the last save is complete on disk."""
        self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: the latest). `abstract_state` gives shapes, dtypes and
        shardings (a tree of jax.ShapeDtypeStruct with `sharding`), so arrays land where they
        belong without a host copy of the whole state."""
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointRestoreError(f"{self.directory}: no complete checkpoint")
            step = steps[-1]
        if step not in steps:
            raise CheckpointRestoreError(f"{self.directory}: no complete checkpoint for step {step}; have {steps}")
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
            )
            state = out["state"]
            # Reading is lazy in places; touch every array so corruption surfaces here, not mid-step.
            jax.block_until_ready(state)
        except Exception as e:  # noqa: BLE001 - any failure to read a step is reported the same way
            raise CheckpointRestoreError(
                f"{self.directory}: step {step} cannot be restored: {type(e).__name__}: {_first_line(e)}"
                f"{self._earlier(step)}") from e
        return state, dict(out["meta"])

    def _earlier(self, step: int) -> str:
        """A hint naming the complete steps before `step` (one of them is likely intact)."""
        earlier = [s for s in self.steps() if s < step]
        return (f"; earlier complete steps: {earlier} (resume one with resume_step=<step>, export one as "
                f"RUN_DIR/<step>)" if earlier else "")

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the `params` of a train state (e.g. to export): the optimizer state stays on disk."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.steps():
            raise CheckpointRestoreError(f"{self.directory}: no complete checkpoint for step {step}; have {self.steps()}")
        # Leaves without a sharding land on this host's first device, so a run saved on a pod slice
        # restores on a workstation (orbax would otherwise insist on the saved device layout).
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract_params = jax.tree.map(
            lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here),
            abstract_params)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"params": abstract_params},
                restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract_params)},
                partial_restore=True)))
        except Exception as e:  # noqa: BLE001
            raise CheckpointRestoreError(f"{self.directory}: params of step {step} cannot be restored: "
                                         f"{type(e).__name__}: {_first_line(e)}{self._earlier(step)}") from e
        return out["state"]["params"]

    def close(self) -> None:
        """Waits for a save in flight and stops Orbax's threads (left running, they print
        tracebacks when the interpreter exits)."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
