#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start training on every worker (one process per host; jax.distributed finds its peers on TPU).
# Usage: bash tpu_scripts/launch.sh configs/paper_qwen25vl7b_v5p.yaml [key=value ...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
config="${1:?usage: launch.sh CONFIG [key=value ...]}"; shift
# The remote shell reads the command line again: every argument goes quoted (printf %q), so an
# override with spaces or shell characters reaches the trainer as one argument, run as nothing.
args=$(printf '%q ' --config "$config" distributed=true "$@")
on_all "cd ~/$(printf '%q' "$REPO_DIR") && . .venv/bin/activate && \
  nohup python -m pr1_jax.train $args> train.log 2>&1 &"
