"""Reliability of the newer surfaces (issue 30): evaluate, export, train start-up and resume,
configlib, the audit, mcnemar and tpu_scripts under hostile input and faults. Each test is one
finding of the issue's sweep: nothing mixed (stale weights, rows of another model), nothing
stale, nothing hangs, and every expected error is one line naming the file, key or flag.

The counts (faults injected and survived, bad inputs tried) join test_reliability.py's in the
terminal summary (tests/conftest.py). The promises are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import collections

import numpy as np

import pytest

COUNTS = collections.Counter()  # faults_injected, faults_survived, bad_inputs, steps_lost


@pytest.fixture(autouse=True)
def _report_counts(request):
    yield
    request.node.user_properties.append(("reliability_counts", dict(COUNTS)))


# ================================================================================================
# configlib: malformed YAML and overrides, duplicate keys, list item types, ranges (findings 8, 9)
# ================================================================================================

def test_config_errors_are_one_line_naming_the_file_or_key(tmp_path):
    from pr1_jax import configlib
    from pr1_jax.config import TrainConfig

    files = {  # file content -> what the one-line error names
        b"seed: 1\nseed: 2\n": "key 'seed' is given twice",
        b"data:\n  batch_size: 2\n  batch_size: 4\n": "key 'batch_size' is given twice",
        b"seed: 1\n\tdata: 2\n": "line 2, column 1",
        b"seed: \xff\xfe\n": "not UTF-8",
        b"seed: [1\n": "not valid YAML",
        b"learner: {lr: -1}\n": "config.yaml.learner.lr: -1.0 is out of range (must be > 0)",
    }
    for k, (content, expect) in enumerate(files.items()):
        path = tmp_path / str(k) / "config.yaml"
        path.parent.mkdir()
        path.write_bytes(content)
        with pytest.raises(configlib.ConfigError) as e:
            configlib.load(TrainConfig, path)
        assert expect in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    overrides = {
        "data.length_buckets=[64,": "override 'data.length_buckets=[64,': not valid YAML",
        "data.length_buckets=[64.5]": "length_buckets[0]: expected an integer, got 64.5",
        "data.length_buckets=[true]": "length_buckets[0]: expected an integer, got True",
        "mesh=[1,2.0,1]": "config.mesh[1]: expected an integer",
        "learner.lr=-1": "config.learner.lr: -1.0 is out of range (must be > 0)",
        "learner.lr=0": "(must be > 0)",
        "sampling.n=0": "config.sampling.n: 0 is out of range (must be >= 1)",
        "sampling.max_new_tokens=0": "config.sampling.max_new_tokens: 0",
        "sampling.top_p=1.5": "(must be <= 1)",
        "data.batch_size=0": "config.data.batch_size: 0",
        "save_freq=0": "config.save_freq: 0",
        "run_dir=": "run_dir is empty",
        "run_dir=' '": "run_dir is empty",
    }
    for item, expect in overrides.items():
        with pytest.raises(configlib.ConfigError) as e:
            configlib.load(TrainConfig, None, [item])
        assert expect in str(e.value) and "\n" not in str(e.value), (item, str(e.value))
    # What stays accepted: None where a bounded field allows it, the limits themselves.
    cfg = configlib.load(TrainConfig, None, ["sampling.n=1", "data.length_buckets=[64, 128]", "max_steps=0",
                                             "learner.micro_batch_size=null", "sampling.temperature=0"])
    assert cfg.data.length_buckets == [64, 128] and cfg.learner.micro_batch_size is None
    COUNTS["bad_inputs"] += len(files) + len(overrides)


# ================================================================================================
# A run directory on tiny random weights (the real architecture), shared by export and evaluate
# ================================================================================================

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(run dir with config.yaml and a checkpoint at step 1 of params unlike the base's, base dir,
    tokenizer dir)."""
    import jax
    import transformers
    import yaml

    from models import load_pretrained
    from pr1_jax import configlib
    from pr1_jax.checkpoint import Checkpointer
    from pr1_jax.config import ModelSection, TrainConfig
    from pr1_jax.data.config import DataConfig
    from pr1_jax.reference import format_prompt
    from pr1_jax.sampling import SamplingConfig
    from pr1_jax.tiny.assets import policy_config, save_tokenizer_dir, train_tokenizer

    tok_dir = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer([format_prompt(), "Choices: A. B. C. D. <answer> </answer> \\boxed{B}", "user",
                           "assistant", "system\nYou are a helpful assistant."] * 3, vocab_size=300)
    save_tokenizer_dir(tok, tok_dir)
    cfg = policy_config(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=48,
                        vision_depth=1, vision_width=32, vision_heads=2)
    base = tmp_path_factory.mktemp("base")
    transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(**cfg)).save_pretrained(base)
    run = tmp_path_factory.mktemp("run")
    data = DataConfig(tokenizer_path=str(tok_dir), format_prompt="paper", format_prompt_placement="user",
                      min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    config = TrainConfig(run_dir=str(run), model=ModelSection(policy=str(base), tokenizer=str(tok_dir)), data=data,
                         sampling=SamplingConfig(eos_tokens=("<|im_end|>",)))
    (run / "config.yaml").write_text(yaml.safe_dump(configlib.to_dict(config), sort_keys=False))
    params = jax.tree.map(lambda x: np.asarray(x) + 0.5, load_pretrained(base).params)
    with Checkpointer(run / "checkpoints") as ck:
        ck.save(1, {"params": params}, {})
    return run, base, tok_dir


def _one_line_error(capsys, rc: int, *expect: str) -> str:
    """The command's stderr: exit status 2, an error line naming `expect`, no traceback."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(("E ", "error"))]
    assert len(errors) == 1 and all(x in errors[0] for x in expect), err
    return errors[0]


# ================================================================================================
# export: nothing stale in --out (finding 1), one-line errors (finding 8)
# ================================================================================================

def test_export_replaces_an_earlier_sharded_export_and_refuses_to_mix(tiny_run, tmp_path, capsys):
    """An earlier *sharded* export in --out: refused without --overwrite; with it, the new export
    replaces the directory as a whole (no index, no old shard left for `load_pretrained` to read)
    and our loader reads the new weights. `save_params` itself clears weights it did not write."""
    import jax
    import yaml

    from models import load_pretrained
    from models.weights import checkpoint_files
    from pr1_jax import export as ex

    run, base, _ = tiny_run
    out = tmp_path / "hf"
    load_pretrained(base).save_pretrained(out, max_shard_bytes=20_000)  # the earlier export: sharded
    (out / "stale_side_file.txt").write_text("from the earlier export")
    assert (out / "model.safetensors.index.json").exists() and len(checkpoint_files(out)) > 1

    with pytest.raises(ex.ExportError, match="not empty; give --overwrite"):
        ex.export(run, out)
    _one_line_error(capsys, ex.main(["--checkpoint", str(run), "--out", str(out)]), "not empty")
    ex.export(run, out, overwrite=True)
    assert sorted(p.name for p in out.glob("*safetensors*")) == ["model.safetensors"]
    assert not (out / "stale_side_file.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary or replaced directory left
    new, old = load_pretrained(out).params, load_pretrained(base).params
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) + 0.5, rtol=1e-6)

    # The model layer alone: a single-file save over a sharded one leaves only its own file.
    again = tmp_path / "again"
    load_pretrained(base).save_pretrained(again, max_shard_bytes=20_000)
    load_pretrained(out).save_pretrained(again)
    assert sorted(p.name for p in again.glob("*safetensors*")) == ["model.safetensors"]
    # ... and a sharded save over a single file leaves only its shards and index.
    load_pretrained(base).save_pretrained(again, max_shard_bytes=20_000)
    assert "model.safetensors" not in {p.name for p in again.iterdir()}
    assert set(checkpoint_files(again)) == set(again.glob("*.safetensors"))

    # Expected errors: one line naming the file, key or flag.
    (tmp_path / "a_file").write_text("x")
    _one_line_error(capsys, ex.main(["--checkpoint", str(run), "--out", str(tmp_path / "a_file")]),
                    "a_file", "not a directory")
    _one_line_error(capsys, ex.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]),
                    "nowhere", "not a run directory")
    bad = tmp_path / "bad_run"
    (bad / "checkpoints").mkdir(parents=True)
    cfg_text = (run / "config.yaml").read_text()
    for broken, expect in ((cfg_text + "seed: 1\n", "key 'seed' is given twice"),
                           ("run_dir: [\n", "not valid YAML"),
                           (cfg_text.replace(str(base), str(tmp_path / "moved_base")), "model.policy")):
        (bad / "config.yaml").write_text(broken)
        _one_line_error(capsys, ex.main(["--checkpoint", str(bad), "--out", str(tmp_path / "x")]),
                        str(bad / "config.yaml"), expect)
    moved_tok = yaml.safe_load(cfg_text)
    moved_tok["model"]["tokenizer"] = str(tmp_path / "moved_tok")
    (bad / "config.yaml").write_text(yaml.safe_dump(moved_tok))
    (bad / "checkpoints").rmdir()
    (bad / "checkpoints").symlink_to(run / "checkpoints")
    _one_line_error(capsys, ex.main(["--checkpoint", str(bad), "--out", str(tmp_path / "x")]),
                    "model.tokenizer", "moved_tok")
    assert not (tmp_path / "x").exists()
    COUNTS["bad_inputs"] += 8
