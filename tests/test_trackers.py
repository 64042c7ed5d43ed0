"""`logging.backends`: every tracker offline (wandb's offline mode into the run directory, MLflow's
local file store): the config as params, metrics, validation samples as a table, a resumed run
going on in the same tracker run; and the start-up errors. Nothing is sent anywhere."""

import json
import math
import time

import pytest

from pr1_jax import configlib, trackers
from pr1_jax.config import TrainConfig
from pr1_jax.metrics import MetricsLogger
from pr1_jax.trackers import TrackerConfig, flatten

CONFIG = {"seed": 0, "reward": {"weights": {"accuracy": 0.9, "format": 0.1}, "functions": {}}, "mesh": [1, -1, 1]}
ROWS = [{"record_id": "r0", "answer": "5", "response": "<answer>\n\\boxed{5}\n</answer>", "accuracy": 1.0},
        {"record_id": "r1", "answer": "7", "response": "a | b", "accuracy": 0.0}]


def _run(cfg, run_dir, steps):
    logger = MetricsLogger(run_dir, 4, cfg, CONFIG)
    for step in steps:
        logger.write(step, {"loss": 1.0 / step, "grad_norm": math.nan, "samples": 2})
        logger.write(step, {"accuracy": 0.5}, prefix="val")
        logger.write_samples(step, ROWS)
    logger.close()


def test_every_backend_offline_and_resumed(offline, tmp_path):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    cfg = TrackerConfig(backends=("console", "jsonl", "tensorboard", "wandb", "mlflow"), wandb_mode="offline",
                        mlflow_tracking_uri=offline)
    _run(cfg, run, [1, 2])
    ids = json.loads((run / "trackers.json").read_text())
    # wandb names an offline session's directory by the second it starts: two sessions of one run
    # started within a second would share it.
    time.sleep(1.1)
    _run(cfg, run, [3])  # a resumed run: the same run directory
    assert json.loads((run / "trackers.json").read_text()) == ids

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["split"]) for x in lines] == [(1, "train"), (1, "val"), (2, "train"), (2, "val"),
                                                        (3, "train"), (3, "val")]
    assert lines[0] == {"step": 1, "split": "train", "loss": 1.0, "grad_norm": "nan", "samples": 2.0}
    samples = [json.loads(x) for x in (run / "val_samples.jsonl").read_text().splitlines()]
    assert samples[:2] == [{"step": 1, **r} for r in ROWS] and len(samples) == 6
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # wandb: both sessions wrote the same run id offline under the run directory.
    runs = sorted((run / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(runs) == 2, list((run / "wandb").iterdir())
    data = b"".join((r / f"run-{ids['wandb']}.wandb").read_bytes() for r in runs)
    for key in (b"train/loss", b"val/accuracy", b"val/samples", b"accuracy", b"weights"):
        assert key in data, key
    tables = [json.loads(p.read_text()) for r in runs for p in (r / "files" / "media" / "table").rglob("*.json")]
    assert len(tables) == 3 and tables[0]["columns"] == list(ROWS[0])
    assert tables[0]["data"] == [list(r.values()) for r in ROWS]
    assert wandb.run is None  # finished

    # MLflow: the config as params, metrics per step across the resume, samples as table artifacts.
    client = MlflowClient(tracking_uri=offline)
    result = client.get_run(ids["mlflow"])
    assert result.info.status == "FINISHED"
    assert {k: result.data.params[k] for k in ("seed", "reward.weights.accuracy", "reward.functions", "mesh")} == {
        "seed": "0", "reward.weights.accuracy": "0.9", "reward.functions": "{}", "mesh": "[1, -1, 1]"}
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "train/loss")] == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert math.isnan(client.get_metric_history(ids["mlflow"], "train/grad_norm")[0].value)
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"], "val_samples")}
    assert artifacts == {f"val_samples/step_00000{s}.json" for s in (1, 2, 3)}
    table = json.loads(open(client.download_artifacts(ids["mlflow"], "val_samples/step_000003.json")).read())
    assert table == {"columns": list(ROWS[0]), "data": [list(r.values()) for r in ROWS]}


def test_a_changed_param_on_resume_is_kept_and_named(offline, tmp_path, caplog):
    pytest.importorskip("mlflow")
    cfg = TrackerConfig(backends=("mlflow",), mlflow_tracking_uri=offline)
    MetricsLogger(tmp_path, None, cfg, {"seed": 0}).close()
    MetricsLogger(tmp_path, None, cfg, {"seed": 1, "new": 2}).close()
    assert "params ['seed'] differ" in caplog.text


def test_start_up_errors(monkeypatch):
    with pytest.raises(configlib.ConfigError, match=r"config.logging.backends\[1\]: 'neptune' is not one of"):
        configlib.load(TrainConfig, overrides=["logging.backends=[console,neptune]"])
    with pytest.raises(configlib.ConfigError, match="names one twice"):
        configlib.load(TrainConfig, overrides=["logging.backends=[jsonl,jsonl]"])
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name in ("wandb", "mlflow") else real(name))
    for backend in ("wandb", "mlflow"):
        with pytest.raises(configlib.ConfigError,
                           match=rf"config.logging: backends: {backend} needs the {backend} package: pip install "
                                 rf"'pr1-jax\[{backend}\]'"):
            configlib.load(TrainConfig, overrides=[f"logging.backends=[console,{backend}]"])
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(configlib.ConfigError, match="mlflow needs a tracking server or store"):
        configlib.load(TrainConfig, overrides=["logging.backends=[mlflow]"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # never contacted: nothing is opened
    assert configlib.load(TrainConfig, overrides=["logging.backends=[mlflow]"]).logging.backends == ("mlflow",)
    assert configlib.load(TrainConfig).logging.backends == ("console", "jsonl", "tensorboard")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1, "x"], "e": None}) == {"a.b": "1", "a.c": "{}", "d": '[1, "x"]',
                                                                         "e": "None"}
