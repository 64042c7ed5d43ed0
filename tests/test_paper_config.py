"""The paper configs resolve to the reference run's settings (docs/FIDELITY.md), and
`--print-config` prints the resolved config. No model or data is loaded."""

from pathlib import Path

import pytest
import yaml

from pr1_jax import configlib, reference, train
from pr1_jax.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PAPER = [ROOT / "configs" / "paper_qwen25vl7b_v5p.yaml", ROOT / "configs" / "paper_qwen2vl7b_v5p.yaml"]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_is_the_reference_run(path):
    cfg = configlib.load(TrainConfig, path)
    d, s, r, lr = cfg.data, cfg.sampling, cfg.reward, cfg.learner
    # prompt and data (verl/utils/dataset.py, the run script)
    assert d.format_prompt_text == reference.format_prompt()
    assert (d.format_prompt_placement, d.truncation, d.max_prompt_length) == ("user", "right", 4096)
    assert (d.min_pixels, d.max_pixels, d.num_epochs, d.shuffle, d.seed) == (3136, 1806336, 25, True, 1)
    assert (d.problem_column, d.answer_column, d.image_column, d.annotations_column) == (
        "problem", "answer", "images", "visual_key_info")
    # the loader's epochs (RandomSampler + drop_last), its convert("RGB") and its literal <image> split
    assert (d.epoch_order, d.batch_size, d.drop_remainder) == ("reference", 16, True)
    assert (d.image_alpha, d.image_placeholder, d.unplaced_images) == ("drop", "<image>", "skip")
    # rollout (the run script, RolloutConfig defaults, the policies' generation config)
    assert (s.n, s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (8, 1.0, 1.0, 0, 4096)
    assert s.eos_tokens == ("<|im_end|>", "<|endoftext|>")
    # reward (boxed_math_verify.py, custom.py, the run script)
    assert dict(r.weights) == {"accuracy": 0.9, "format": 0.1, "visual": 0.7, "ngram_penalty": 1.0}
    assert dict(r.options) == {"ngram_penalty": {"n": 20, "max_penalty": -2.0}}
    assert r.accuracy_mode == "reference"
    # update (ActorConfig / OptimConfig defaults and the run script's overrides)
    assert (lr.lr, lr.weight_decay, lr.b1, lr.b2, lr.eps) == (1e-6, 1e-3, 0.9, 0.999, 1e-8)
    assert (lr.warmup_ratio, lr.schedule, lr.max_grad_norm, lr.freeze_vision) == (0.05, "constant", 1.0, False)
    assert lr.recompute_old_logprobs
    loss = lr.loss
    assert (loss.clip_low, loss.clip_high, loss.dual_clip) == (0.2, 0.3, 3.0)
    assert (loss.loss_agg, loss.kl_coef, loss.entropy_coef) == ("token-mean", 0.0, 0.0)
    assert (cfg.val_freq, cfg.save_freq, cfg.val_before_train, cfg.seed) == (5, 10, True, 1)


def test_the_two_paper_configs_differ_in_the_policy_only():
    a, b = (configlib.to_dict(configlib.load(TrainConfig, p)) for p in PAPER)
    assert a["model"].pop("policy").endswith("Qwen2.5-VL-7B-Instruct")
    assert b["model"].pop("policy").endswith("Qwen2-VL-7B-Instruct")
    a.pop("run_dir"), b.pop("run_dir")
    assert a == b


def test_print_config_prints_the_resolved_config_and_exits(capsys, tmp_path):
    overrides = ["learner.lr=2e-6", "reward.accuracy_mode=paper"]
    assert train.main(["--config", str(PAPER[0]), "--print-config", *overrides]) == 0
    printed = capsys.readouterr().out
    want = configlib.load(TrainConfig, PAPER[0], overrides)
    assert yaml.safe_load(printed) == configlib.to_dict(want)
    assert set(yaml.safe_load(printed)) == {f for f in TrainConfig.__dataclass_fields__}  # every section
    (tmp_path / "printed.yaml").write_text(printed)
    assert configlib.load(TrainConfig, tmp_path / "printed.yaml") == want  # it reads back as the same run
    assert not Path(want.run_dir).exists()  # nothing was built

    assert train.main(["--print-config", "learner.loss.dual_clip=0.5"]) == 2  # config errors as before
    assert train.main(["--print-config"]) == 0  # the tiny default, without building its assets
    assert yaml.safe_load(capsys.readouterr().out)["tiny"]["enabled"] is True


def test_qwen3_paper_config_is_the_paper_run_on_qwen3(capsys):
    """Qwen3-VL-8B + Qwen3-32B: the paper's run but for the checkpoints and Qwen3-VL's image geometry
    (docs/FIDELITY.md), and `--print-config` resolves it."""
    path = ROOT / "configs" / "paper_qwen3vl8b_v5p.yaml"
    test_paper_config_is_the_reference_run(path)
    a, b = (configlib.to_dict(configlib.load(TrainConfig, p)) for p in (PAPER[0], path))
    assert b["model"].pop("policy").endswith("Qwen3-VL-8B-Instruct") and b["model"].pop("judge").endswith("Qwen3-32B")
    assert (b["data"].pop("image_processor"), a["data"].pop("image_processor")) == ("qwen3_vl", "qwen2_vl")
    for d in (a, b):
        d.pop("run_dir")
    a["model"].pop("policy"), a["model"].pop("judge")
    assert a == b
    assert train.main(["--config", str(path), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["judge"] == "/mnt/models/Qwen3-32B"
