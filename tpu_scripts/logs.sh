#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Tail the log of worker 0 (metrics JSONL and TensorBoard files are in the run directory).
set -euo pipefail
source "$(dirname "$0")/common.sh"
gtpu ssh "$TPU_NAME" --worker=0 --command "tail -n ${LINES:-50} ~/$REPO_DIR/train.log"
