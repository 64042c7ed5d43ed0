"""`bench/accelerator.py --size tiny` runs end to end on CPU (its numbers mean nothing here; the
script is for GPUs / TPUs) and prints what another engineer reads from it."""

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
    row, peaks = (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))
    assert row["rows"] == 16 and row["ours_tok_s"] > 0 and row["hf_tok_s"] > 0 and row["ratio"] > 0
    assert 0 < row["pct_roofline"] and row["roofline_tok_s"] > 0
    assert peaks["bf16_matmul_TFLOP_s"] > 0 and peaks["copy_GB_s"] > 0
