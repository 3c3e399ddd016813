#!/usr/bin/env bash
# Delete a TPU VM / pod slice, or a queued resource together with its TPU.
#
# Usage: tpu/delete.sh --name NAME --zone ZONE [options]
#
#   --name NAME        TPU name, or queued resource id with --queued (env LLM_JAX_TPU_NAME)
#   --zone ZONE        its zone (env LLM_JAX_TPU_ZONE)
#   --project PROJECT  Google Cloud project (env LLM_JAX_TPU_PROJECT)
#   --queued           it was made with tpu/create.sh --queued: delete the queued
#                      resource and (--force) the TPU it holds
#   --yes              do not ask for confirmation (gcloud --quiet)
#   --async            return without waiting for the deletion to finish
#   --dry-run          print the gcloud command, run nothing
#   -h, --help         this help
#
# Only the VMs go; the run directory in the bucket stays (checkpoints included).
#
# Example:
#   tpu/delete.sh --name llm --zone us-east5-b --queued
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
FLAGS=()

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  if common_opt "$@"; then shift "$SHIFT_N"; continue; fi
  case "$1" in
    --queued) QUEUED=1; shift ;;
    --yes|--quiet|-q) FLAGS+=(--quiet); shift ;;
    --async) FLAGS+=(--async); shift ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
check_common

if [[ "$QUEUED" == 1 ]]; then
  run_cmd gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force ${FLAGS[@]+"${FLAGS[@]}"}
else
  run_cmd gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" ${FLAGS[@]+"${FLAGS[@]}"}
fi
