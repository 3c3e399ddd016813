#!/usr/bin/env bash
# Create a Cloud TPU VM or multi-host pod slice for llm_jax.
#
# Usage: tpu/create.sh --name NAME --zone ZONE --type TYPE [options] [-- GCLOUD_FLAGS...]
#
#   --name NAME        TPU name (env LLM_JAX_TPU_NAME); with --queued also the
#                      queued resource's id
#   --zone ZONE        zone that has TYPE, e.g. us-central2-b (env LLM_JAX_TPU_ZONE)
#   --type TYPE        accelerator type: v4-8, v4-32, v5litepod-16, v5p-32, v6e-8, ...
#   --version VERSION  TPU software (runtime) version; default by generation:
#                      v2/v3/v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
#                      v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   --project PROJECT  Google Cloud project (env LLM_JAX_TPU_PROJECT; default:
#                      gcloud's core/project)
#   --queued           request it as a queued resource (waits in a queue for
#                      capacity instead of failing when there is none)
#   --spot             Spot capacity: much cheaper, can be preempted at any time
#   --preemptible      legacy preemptible TPU (not with --queued; prefer --spot)
#   --best-effort      legacy best-effort tier of queued resources (gcloud
#                      alpha; implies --queued; prefer --spot)
#   --reserved         use the project's reserved capacity
#   --wait             with --queued: poll until the resource is ACTIVE
#   --dry-run          print the gcloud commands, run nothing
#   -h, --help         this help
#
# Flags after `--` go to the gcloud create command as they are, e.g.
#   -- --service-account=SA@PROJECT.iam.gserviceaccount.com --scopes=cloud-platform
#
# Examples:
#   tpu/create.sh --name llm --zone us-central2-b --type v4-32
#   tpu/create.sh --name llm --zone us-east5-b --type v6e-16 --queued --spot --wait
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TYPE=""
VERSION=""
QUEUED=0
SPOT=0
PREEMPTIBLE=0
BEST_EFFORT=0
RESERVED=0
WAIT=0
EXTRA=()

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  if common_opt "$@"; then shift "$SHIFT_N"; continue; fi
  case "$1" in
    --type|--accelerator-type) need_value "$@"; TYPE="$2"; shift 2 ;;
    --version|--runtime-version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --best-effort) BEST_EFFORT=1; QUEUED=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --wait) WAIT=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require "$TYPE" --type
check_common

if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v2-*|v3-*|v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) die "no default runtime version for --type $TYPE: pass --version (see 'gcloud compute tpus tpu-vm versions list --zone $ZONE')" ;;
  esac
fi

n_tiers=$((SPOT + PREEMPTIBLE + BEST_EFFORT + RESERVED))
if [[ "$n_tiers" -gt 1 ]]; then
  die "choose at most one of --spot, --preemptible, --best-effort, --reserved"
fi
if [[ "$QUEUED" == 1 && "$PREEMPTIBLE" == 1 ]]; then
  die "--preemptible is for plain TPU VMs; queued resources take --spot (or --best-effort)"
fi
if [[ "$WAIT" == 1 && "$QUEUED" != 1 ]]; then
  die "--wait is for --queued (a plain create already waits until the TPU is ready)"
fi

TIER=()
[[ "$SPOT" == 1 ]] && TIER=(--spot)
[[ "$PREEMPTIBLE" == 1 ]] && TIER=(--preemptible)
[[ "$BEST_EFFORT" == 1 ]] && TIER=(--best-effort)
[[ "$RESERVED" == 1 ]] && TIER=(--reserved)

if [[ "$QUEUED" != 1 ]]; then
  run_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
    --accelerator-type="$TYPE" --version="$VERSION" \
    ${TIER[@]+"${TIER[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  note "next: tpu/setup.sh --name $TPU_NAME --zone $ZONE"
  exit 0
fi

# --best-effort exists only in the alpha track of gcloud.
TRACK=()
[[ "$BEST_EFFORT" == 1 ]] && TRACK=(alpha)
run_cmd gcloud ${TRACK[@]+"${TRACK[@]}"} compute tpus queued-resources create "$TPU_NAME" "${LOCATION[@]}" \
  --node-id="$TPU_NAME" --accelerator-type="$TYPE" --runtime-version="$VERSION" \
  ${TIER[@]+"${TIER[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}

describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}" --format='value(state.state)')
if [[ "$WAIT" != 1 ]]; then
  note "queued; the TPU exists once this says ACTIVE (then run tpu/setup.sh):"
  note "  $(quote_words "${describe[@]}")"
  exit 0
fi

# Poll until the queued resource is ACTIVE (its TPU VM is up) or gives up.
printf '+ %s   # every 30 s until ACTIVE\n' "$(quote_words "${describe[@]}")"
if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi
while true; do
  state="$("${describe[@]}")" || state=""
  note "$(date '+%H:%M:%S') $TPU_NAME: ${state:-UNKNOWN}"
  case "$state" in
    ACTIVE) break ;;
    FAILED|SUSPENDING|SUSPENDED)
      die "queued resource $TPU_NAME is $state; delete it (tpu/delete.sh --queued) and create it again" ;;
  esac
  sleep 30
done
note "next: tpu/setup.sh --name $TPU_NAME --zone $ZONE"
