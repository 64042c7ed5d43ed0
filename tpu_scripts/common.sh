# Shared settings for the pod scripts; override any of them in the environment.
# Example: TPU_NAME=pr1 ZONE=us-east5-a ACCELERATOR=v5p-64 bash tpu_scripts/create.sh
: "${TPU_NAME:=pr1-jax}"
: "${ZONE:=us-east5-a}"
: "${ACCELERATOR:=v5p-64}"
: "${RUNTIME:=v2-alpha-tpuv5}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REPO_DIR:=pr1-jax}"
gtpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE" --project "$PROJECT"; }
on_all() { gtpu ssh "$TPU_NAME" --worker=all --command "$1"; }
