#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start training on every worker (one process per host; jax.distributed finds its peers on TPU).
# Usage: bash tpu_scripts/launch.sh configs/paper_qwen25vl7b_v5p.yaml [key=value ...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
config="${1:?usage: launch.sh CONFIG [key=value ...]}"; shift
args="$*"
on_all "cd ~/$REPO_DIR && . .venv/bin/activate && \
  nohup python -m pr1_jax.train --config $config distributed=true $args > train.log 2>&1 &"
