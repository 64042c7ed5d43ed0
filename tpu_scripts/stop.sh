#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SIGTERM every trainer: each saves a checkpoint at the next step boundary, then exits.
set -euo pipefail
source "$(dirname "$0")/common.sh"
on_all "pkill -TERM -f pr1_jax.train || true"
