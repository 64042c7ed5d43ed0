"""Reward plug-ins (`reward.functions`): the example file, the calls they get in process and in the
reward workers (fields, options, time bound, errors counted), and the start-up errors."""

import pickle
from pathlib import Path

import pytest

from pr1_jax import configlib
from pr1_jax.config import TrainConfig
from pr1_jax.reward_plugins import RECORD_FIELDS
from pr1_jax.rewards import RewardConfig, RewardScorer, combine_batch, mean_metrics, score
from pr1_jax.train import reward_records

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reward_plugin.py"
GOOD = "<think>\nAC = 3 and BC = 4.\n</think>\n<answer>\n\\boxed{5}\n</answer>"

# A plug-in file whose behaviour a record's `problem` picks: the ways a user's function goes wrong.
FLAKY = '''
import math, os, time

def flaky(response, ground_truth, *, problem=""):
    if problem == "raise":
        raise RuntimeError("boom")
    if problem == "hang":
        time.sleep(60)
    if problem == "exit":
        os._exit(3)
    return math.nan if problem == "nan" else float(len(response))

def everything(response, ground_truth, **fields):
    return float(len(fields))
'''


@pytest.fixture(scope="module")
def flaky_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins") / "flaky.py"
    path.write_text(FLAKY)
    return path


def _example(**weights) -> RewardConfig:
    return RewardConfig(weights={"accuracy": 1.0, **weights},
                        functions={name: f"{EXAMPLE}:{name}" for name in weights},
                        options={"exact_box": {"ignore_case": True}} if "exact_box" in weights else {})


def test_example_plugins_score_in_process():
    config = _example(exact_box=0.5, numbers_seen=0.0)
    fields = {"annotations": ["AC = 3.", "BC = 4.", "AB = 5."]}
    s = score(GOOD, "5", config=config, fields=fields)
    assert (s["accuracy"], s["exact_box"], s["numbers_seen"]) == (1.0, 1.0, 1.0)
    assert s["overall"] == pytest.approx(1.5)  # a weight of 0 logs the term without training on it
    s = score(GOOD.replace("BC = 4", "BC = 7"), "5", config=config, fields=fields)
    assert s["numbers_seen"] == pytest.approx(2 / 3)
    assert score("\\boxed{B}", "b", config=config, fields=fields)["exact_box"] == 1.0  # options reach it
    assert config.declared_fields({f: "x" for f in RECORD_FIELDS}) == {"annotations": "x"}
    assert "reward/exact_box" in mean_metrics([s], split="train")


def test_the_trainer_passes_the_fields_the_rewards_declare(flaky_file):
    batch = {"answer": ["5", "6"], "problem": ["p0", "p1"], "record_id": ["r0", "r1"], "annotations": [["a"], []]}
    assert reward_records(RewardConfig(), ["x", "y", "z", "w"], batch, 2, [3, 1, 4, 1], 8) == [
        dict(response=t, ground_truth=g) for t, g in zip("xyzw", ["5", "5", "6", "6"])]
    flaky = RewardConfig(weights={"flaky": 1.0}, functions={"flaky": f"{flaky_file}:flaky"})
    assert [r["problem"] for r in reward_records(flaky, ["x", "y"], batch, 1, [3, 1], 8)] == ["p0", "p1"]
    every = RewardConfig(weights={"everything": 1.0}, functions={"everything": f"{flaky_file}:everything"})
    assert every.declared_fields({"problem": 1, "unknown": 2}) == {"problem": 1, "unknown": 2}
    records = reward_records(every, ["x"], batch, 1, [3], 8)
    assert (records[0]["response_length"], records[0]["max_length"]) == (3, 8)
    assert score(config=every, fields={k: v for k, v in records[0].items() if k not in ("response", "ground_truth")},
                 response="x", ground_truth="5")["everything"] == 5.0


def test_plugins_run_in_the_workers_bounded_and_counted(flaky_file):
    config = RewardConfig(weights={"format": 1.0, "flaky": 0.5}, functions={"flaky": f"{flaky_file}:flaky"},
                          timeout_s=1.0, num_workers=1)
    problems = ["ok", "raise", "hang", "exit", "nan", "ok"]
    with RewardScorer(config) as scorer:
        result = scorer.submit([dict(response=GOOD, ground_truth="5", problem=p) for p in problems]).result(timeout=120)
    assert (result.timeouts, result.errors) == (1, 3)
    assert [t["flaky"] for t in result.terms] == [float(len(GOOD)), 0.0, 0.0, 0.0, 0.0, float(len(GOOD))]
    assert [t["format"] for t in result.terms] == [1.0] * 6  # the other terms of a failed sample still count
    scores = combine_batch(result.terms, None, config.weights)
    assert scores[1]["overall"] == 1.0 and scores[0]["overall"] == pytest.approx(1.0 + 0.5 * len(GOOD))


def test_start_up_errors_name_the_key(tmp_path, flaky_file, monkeypatch):
    (tmp_path / "bad.py").write_text("def one(response):\n    return 1.0\n"
                                     "def needs(response, ground_truth, *, colour):\n    return 1.0\n"
                                     "NOT_A_FUNCTION = 3\n")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    cases = {
        f"{tmp_path}/missing.py:f": "no such file",
        f"{tmp_path}/bad.py": "expected 'path/to/file.py:function'",
        f"{tmp_path}/bad.py:nope": r"has no function 'nope'; it defines \['needs', 'one'\]",
        f"{tmp_path}/bad.py:NOT_A_FUNCTION": "has no function 'NOT_A_FUNCTION'",
        f"{tmp_path}/bad.py:one": r"cannot be called as fn\(response, ground_truth\)",
        f"{tmp_path}/bad.py:needs": "missing a required argument: 'colour'.*may declare are",
        f"{tmp_path}/broken.py:f": "importing it failed: ModuleNotFoundError",
    }
    for spec, message in cases.items():
        with pytest.raises(configlib.ConfigError, match=r"config\.reward: functions\.mine: .*" + message):
            configlib.from_dict(TrainConfig, {"reward": {"functions": {"mine": spec}, "weights": {"mine": 1.0}}})
    # An option makes the same function callable; unknown options still fail.
    assert RewardConfig(weights={"n": 1.0}, functions={"n": f"{tmp_path}/bad.py:needs"}, options={"n": {"colour": 1}})
    with pytest.raises(ValueError, match="unknown option"):
        RewardConfig(weights={"f": 1.0}, functions={"f": f"{flaky_file}:flaky"}, options={"f": {"colour": 1}})
    with pytest.raises(ValueError, match="built-in reward's name"):
        RewardConfig(functions={"accuracy": f"{flaky_file}:flaky"})
    with pytest.raises(ValueError, match="no weight: set weights.f"):
        RewardConfig(functions={"f": f"{flaky_file}:flaky"})
    # A relative path is read from the working directory and kept absolute in the resolved config.
    monkeypatch.chdir(flaky_file.parent)
    cfg = configlib.load(TrainConfig, overrides=["reward.functions.f=flaky.py:flaky", "reward.weights.f=1"])
    assert configlib.to_dict(cfg)["reward"]["functions"] == {"f": f"{flaky_file}:flaky"}


def test_plugin_file_is_plain_python_for_the_worker(flaky_file):
    """Workers get the path and the function's name, not the function (which has no importable module)."""
    fn = RewardConfig(weights={"f": 1.0}, functions={"f": f"{flaky_file}:flaky"}).reward_fn("f")
    assert f"{flaky_file}".encode() in pickle.dumps(fn)
    assert pickle.loads(pickle.dumps(fn))("ab", "c") == 2.0
    assert str(fn) == f"{flaky_file}:flaky"
