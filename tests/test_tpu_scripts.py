"""tpu_scripts/: shellcheck-clean, and dry-runnable (DRY_RUN=1 prints the gcloud commands)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "tpu_scripts"


def _dry(script, *args):
    env = dict(os.environ, DRY_RUN="1", TPU_NAME="t1", ZONE="z1", ACCELERATOR="v5p-16")
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    out = subprocess.run(["shellcheck", "-x", *sorted(map(str, SCRIPTS.glob("*.sh")))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_dry_runs_print_the_gcloud_commands():
    assert "gcloud compute tpus tpu-vm create t1 --accelerator-type v5p-16" in _dry("create.sh")
    launch = _dry("launch.sh", "configs/paper_qwen25vl7b_v5p.yaml", "seed=3")
    assert "--worker=all" in launch and "pr1_jax.train\\ --config\\ configs/paper_qwen25vl7b_v5p.yaml" in launch
    assert "seed=3" in launch and "--zone z1" in launch
    assert "pkill\\ -TERM" in _dry("stop.sh")
    setup = _dry("setup.sh")
    assert "tpu-vm scp" in setup and "pip\\ install" in setup
    assert "tpu-vm delete t1" in _dry("delete.sh")
    assert "--worker=0" in _dry("logs.sh")


def test_launch_needs_a_config():
    env = dict(os.environ, DRY_RUN="1")
    out = subprocess.run(["bash", str(SCRIPTS / "launch.sh")], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "usage: launch.sh CONFIG" in out.stderr
