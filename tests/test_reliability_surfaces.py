"""Reliability of the newer surfaces (issue 30): evaluate, export, train start-up and resume,
configlib, the audit, mcnemar and tpu_scripts under hostile input and faults. Each test is one
finding of the issue's sweep: nothing mixed (stale weights, rows of another model), nothing
stale, nothing hangs, and every expected error is one line naming the file, key or flag.

The counts (faults injected and survived, bad inputs tried) join test_reliability.py's in the
terminal summary (tests/conftest.py). The promises are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import collections

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
