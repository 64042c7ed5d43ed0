"""`bench/accelerator.py --size tiny` runs end to end on CPU (its numbers mean nothing here; the
script is for GPUs / TPUs) and prints what another engineer reads from it: decode rows, the
update's model TFLOP/s and MFU, the peaks."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accelerator.py"


def test_tiny_run_prints_rows_and_peaks():
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(BENCH), "--size", "tiny", "--rows", "16", "--repeats", "1", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row, update, peaks = (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))
    assert row["rows"] == 16 and row["ours_tok_s"] > 0 and row["hf_tok_s"] > 0 and row["ratio"] > 0
    assert 0 < row["pct_roofline"] and row["roofline_tok_s"] > 0
    update = update["learner"]
    assert update["sequences"] == 16 and update["step_s"] > 0 and update["model_TFLOP_s"] > 0
    # The issue's count takes the tower once per sequence; the work done takes it once per prompt.
    assert update["work_TFLOP"] < update["model_TFLOP"] and update["mfu_pct"] > 0
    assert peaks["bf16_matmul_TFLOP_s"] > 0 and peaks["copy_GB_s"] > 0


def test_model_flops_count_the_issue_config():
    """Issue 15's count for its config (64 x 522 tokens, 1.30 s = 274 TFLOP/s): ~356 TFLOP a step."""
    sys.path.insert(0, str(BENCH.parent))
    import accelerator

    cfg = accelerator.config_from_dict(accelerator.hf_config("1.5b").to_dict())
    batch = accelerator.learner_batch(cfg, "1.5b", 256, 256)
    assert batch.input_ids.shape == (64, 522) and batch.vision.pixel_values.shape[0] == 8
    flops = accelerator.learner_model_flops(cfg, batch, towers=64)
    assert 274e12 * 1.30 * 0.98 < flops < 274e12 * 1.30 * 1.02
