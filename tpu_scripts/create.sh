#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a TPU VM pod slice (queued resources are better for large slices; see README).
set -euo pipefail
source "$(dirname "$0")/common.sh"
gtpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ${SPOT:+--spot}
