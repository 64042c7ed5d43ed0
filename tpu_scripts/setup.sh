#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Copy this checkout to every worker and install it with JAX for TPU.
set -euo pipefail
source "$(dirname "$0")/common.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
run tar -C "$root" --exclude=.git --exclude=runs --exclude=.venv -czf /tmp/pr1-jax.tgz .
gtpu scp /tmp/pr1-jax.tgz "$TPU_NAME":/tmp/pr1-jax.tgz --worker=all
on_all "mkdir -p ~/$REPO_DIR && tar -C ~/$REPO_DIR -xzf /tmp/pr1-jax.tgz && cd ~/$REPO_DIR && \
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
  pip install -q 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && pip install -q -e ."
