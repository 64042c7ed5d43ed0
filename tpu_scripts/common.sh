# Shared settings for the pod scripts; override any of them in the environment.
# Example: TPU_NAME=pr1 ZONE=us-east5-a ACCELERATOR=v5p-64 bash tpu_scripts/create.sh
# DRY_RUN=1 prints the gcloud commands instead of running them.
# shellcheck shell=bash
: "${TPU_NAME:=pr1-jax}"
: "${ZONE:=us-east5-a}"
: "${ACCELERATOR:=v5p-64}"
: "${RUNTIME:=v2-alpha-tpuv5}"
: "${REPO_DIR:=pr1-jax}"
: "${DRY_RUN:=}"
if [ -z "${PROJECT:-}" ]; then
  if [ -n "$DRY_RUN" ]; then PROJECT=my-project; else PROJECT=$(gcloud config get-value project 2>/dev/null); fi
fi
run() {
  if [ -n "$DRY_RUN" ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
gtpu() { run gcloud compute tpus tpu-vm "$@" --zone "$ZONE" --project "$PROJECT"; }
on_all() { gtpu ssh "$TPU_NAME" --worker=all --command "$1"; }
