"""A steady training run compiles everything in its first step and nothing after.

Counts XLA backend compilations with a `jax.monitoring` listener on
`/jax/core/compile/backend_compile_duration` (recorded once per compiled program, jitted
functions and eager ops alike) during each `Trainer.train_step` of a 3-step run on the prebuilt
tiny assets (no warm starts, no validation). The prompt bucket and the judge's buckets are pinned
to one value each, so every step has the same shapes by construction: any compile in steps 2-3
is a recompilation (a weak type, a changed static argument, a new Python object as a jit key,
an uncached `jax.jit` inside the step, ...), which would cost a full compile per step on a pod.
"""

import collections

import pytest
from jax import monitoring

from pr1_jax import train
from pr1_jax.tiny import build_tiny_assets

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("tiny_recompile"), seed=0, n_train=32, n_val=8, corpus_size=300)


class CompileCounter:
    """Names of the programs compiled, grouped by `label` (the step running, None outside steps)."""

    def __init__(self):
        self.label = None
        self.by_label = collections.defaultdict(list)

    def __call__(self, event, duration, **kw):
        if event == COMPILE_EVENT:
            self.by_label[self.label].append(kw.get("fun_name", "?"))


# Packed: the first steps' micro-batch count is the most the run needs here (a 160-token row
# holds a prompt of <= 128 tokens and 4 responses of <= 12), and a step needing fewer pads to it.
@pytest.mark.parametrize("packing", [["learner.packing=off"], ["learner.packing=groups", "learner.max_tokens_per_micro_batch=160"]],
                         ids=["off", "groups"])
def test_no_recompilation_after_the_first_step(assets, tmp_path, packing):
    args = packing + [f"run_dir={tmp_path / 'run'}", "tiny.enabled=false", f"model.policy={assets.policy}",
            f"model.judge={assets.judge}", f"model.tokenizer={assets.tokenizer}",
            f"model.judge_tokenizer={assets.tokenizer}", f"data.paths=[{assets.train}]", "val_paths=[]",
            "val_before_train=false", "val_freq=0", "save_freq=100", "max_steps=3", "data.batch_size=2",
            "sampling.n=4", "sampling.max_new_tokens=12", "reward.num_workers=1",
            # One bucket each: every step has the same shapes, so any compile after step 1 is a bug.
            "data.max_prompt_length=128", "data.length_buckets=[128]",
            "judge.length_buckets=[256]", "judge.annotation_buckets=[4]"]
    trainer = train.Trainer(train.parse_config(args))
    counter = CompileCounter()
    step_fn = trainer.train_step

    def counted(step, batch):
        counter.label = step
        try:
            return step_fn(step, batch)
        finally:
            counter.label = None

    trainer.train_step = counted
    trainer.save = lambda step, data_state=None: None  # checkpointing is tested elsewhere; it only costs time here
    monitoring.register_event_duration_secs_listener(counter)
    try:
        trainer.fit()
    finally:
        monitoring.unregister_event_duration_listener(counter)
    assert any("train_step" in name for name in counter.by_label[1]), \
        f"the listener did not see step 1 compile the update: {counter.by_label[1]}"
    later = {s: counter.by_label[s] for s in (2, 3) if counter.by_label[s]}
    assert not later, f"recompiled after step 1: {later} (step 1 compiled {counter.by_label[1]})"
    assert int(trainer.state.step + trainer.state.skipped) == 3
