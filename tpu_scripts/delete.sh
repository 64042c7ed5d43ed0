#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "$0")/common.sh"
gtpu delete "$TPU_NAME" --quiet
