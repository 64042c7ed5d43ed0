"""The training run end to end on prebuilt tiny assets: metrics, checkpoints, TensorBoard, export,
resume after SIGKILL, checkpoint on SIGTERM, one-line config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from models import load_pretrained
from pr1_jax import train
from pr1_jax.checkpoint import Checkpointer
from pr1_jax.export import export
from pr1_jax.tiny import build_tiny_assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("tiny"), seed=0, n_train=64, n_val=16)


def _args(assets, run_dir, *extra):
    """A short run on the tiny assets without warm starts (tested elsewhere)."""
    return [f"run_dir={run_dir}", "tiny.enabled=false", f"model.policy={assets.policy}", f"model.judge={assets.judge}",
            f"model.tokenizer={assets.tokenizer}", f"model.judge_tokenizer={assets.tokenizer}",
            f"data.paths=[{assets.train}]", f"val_paths=[{assets.val}]", "val_max_batches=1", "val_batch_size=8",
            "data.batch_size=2", "sampling.n=4", "sampling.max_new_tokens=12", "reward.num_workers=1", *extra]


def test_short_run_writes_everything_and_exports(assets, tmp_path):
    run = tmp_path / "run"
    # Weight decay moves the params even when a random policy's rewards tie (zero advantages).
    cfg = train.parse_config(_args(assets, run, "max_steps=2", "val_freq=2", "save_freq=1", "learner.weight_decay=0.1"))
    val = train.Trainer(cfg).fit()
    assert val is not None and val["samples"] == 8
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in steps] == [1, 2]
    for key in ("overall", "accuracy", "format", "visual", "ngram_penalty", "response_len", "response_len_max",
                "clipped_frac", "adv_mean", "loss", "approx_kl", "entropy", "clip_frac", "grad_norm", "lr",
                "sec_sample", "sec_judge", "sec_reward", "sec_update", "tokens_per_sec"):
        assert key in steps[-1], key
    assert [x["step"] for x in lines if x["split"] == "val"] == [0, 2]
    assert Checkpointer(run / "checkpoints").steps() == [1, 2]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    out = export(run, tmp_path / "hf")
    ours = load_pretrained(out)
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    ids = np.array([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours(ids)) - ref).max() <= 1e-4
    # The exported weights are the trained ones, not the base model's.
    base = load_pretrained(assets.policy)
    assert not np.allclose(np.asarray(base(ids)), np.asarray(ours(ids)))


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
    return subprocess.Popen([sys.executable, "-m", "pr1_jax.train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def _final_params(run, policy):
    ck = Checkpointer(run / "checkpoints")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), load_pretrained(policy).params)
    return ck.steps()[-1], ck.restore_params(abstract)


def test_sigkill_mid_run_resumes_to_the_same_params(assets, tmp_path):
    # Soft verdicts of the untrained judge differ per response: non-zero advantages, real updates.
    common = ("max_steps=4", "save_freq=2", "val_freq=0", "val_before_train=false", "judge.mode=soft")
    ref_run, killed_run = tmp_path / "ref", tmp_path / "killed"
    ref = _run(_args(assets, ref_run, *common))
    assert ref.wait(600) == 0, ref.stdout.read()[-3000:]

    proc = _run(_args(assets, killed_run, *common))
    # Kill right after step 2's checkpoint is complete (orbax writes commit_success.txt last).
    _wait_for(lambda: (killed_run / "checkpoints" / "2" / "commit_success.txt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _run(_args(assets, killed_run, *common))
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from step 2" in out

    (s1, a), (s2, b) = _final_params(ref_run, assets.policy), _final_params(killed_run, assets.policy)
    assert s1 == s2 == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    base = jax.tree.leaves(load_pretrained(assets.policy).params)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), base))


def test_sigterm_saves_a_checkpoint_before_exit(assets, tmp_path):
    run = tmp_path / "run"
    proc = _run(_args(assets, run, "max_steps=50", "save_freq=100", "val_freq=0", "val_before_train=false"))
    _wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip(), proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    steps = Checkpointer(run / "checkpoints").steps()
    assert len(steps) == 1 and 1 <= steps[0] < 50


@pytest.mark.parametrize("args,message", [
    (["learner.lrr=1"], "unknown key(s) ['lrr']"),
    (["max_steps=ten"], "max_steps: "),
    (["tiny.enabled=false", "model.policy=/no/such/dir"], "/no/such/dir: not found"),
    (["tiny.enabled=false", "model.policy=/no/such/dir", "mesh=[3,-1,1]"], "devices are not a multiple of 3"),
])
def test_config_errors_are_one_line(args, message, capsys, tmp_path):
    assert train.main([f"run_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " E " in line]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
