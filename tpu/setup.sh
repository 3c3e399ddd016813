#!/usr/bin/env bash
# Copy this repository to every worker of a TPU VM / pod slice and install it.
#
# Usage: tpu/setup.sh --name NAME --zone ZONE [options]
#
#   --name NAME        TPU name (env LLM_JAX_TPU_NAME)
#   --zone ZONE        its zone (env LLM_JAX_TPU_ZONE)
#   --project PROJECT  Google Cloud project (env LLM_JAX_TPU_PROJECT)
#   --ref REF          git commit to ship (default HEAD: uncommitted changes
#                      are NOT copied; commit them first)
#   --extras EXTRAS    pip extras to install (default: tpu, i.e. jax[tpu])
#   --python PYTHON    Python for the venv on the workers (default: the first
#                      python >= 3.11 found; python3.11 from apt if none)
#   --worker WORKER    which workers: all (default), 0, 1-3, ...
#   --dry-run          print the commands, run nothing
#   -h, --help         this help
#
# On each worker this leaves the code in ~/llm_jax (replaced on every setup;
# do not re-run it under a running job) and a virtual environment in
# ~/llm_jax_venv with `pip install -e '.[tpu]'` done.
#
# Example:
#   tpu/setup.sh --name llm --zone us-central2-b
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REF="HEAD"
EXTRAS="tpu"
PYTHON=""
WORKER="all"

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  if common_opt "$@"; then shift "$SHIFT_N"; continue; fi
  case "$1" in
    --ref) need_value "$@"; REF="$2"; shift 2 ;;
    --extras) need_value "$@"; EXTRAS="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
check_common
if [[ ! "$EXTRAS" =~ ^[A-Za-z0-9_,-]+$ ]]; then
  die "--extras must look like tpu or tpu,test (got '$EXTRAS')"
fi

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$TPU_DIR")"

if command -v git >/dev/null 2>&1 && git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  if [[ "$REF" == HEAD && -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]]; then
    note "warning: the working tree has uncommitted changes; only committed files ($REF) are copied"
  fi
elif [[ "$DRY_RUN" != 1 ]]; then
  die "$ROOT is not a git checkout (git archive ships the committed tree)"
fi

if [[ "$DRY_RUN" == 1 ]]; then
  STAGE="$(mktemp -d -u "${TMPDIR:-/tmp}/llm_jax_setup.XXXXXX")"
else
  STAGE="$(mktemp -d "${TMPDIR:-/tmp}/llm_jax_setup.XXXXXX")"
  trap 'rm -rf "$STAGE"' EXIT
fi

# 1. The committed tree as a tarball, plus the per-worker install script.
run_cmd git -C "$ROOT" archive --format=tar.gz -o "$STAGE/llm_jax.tar.gz" "$REF"
run_cmd cp "$TPU_DIR/worker_setup.sh" "$STAGE/llm_jax_setup.sh"

# 2. Both to the home directory of every worker.
run_cmd gcloud compute tpus tpu-vm scp "$STAGE/llm_jax.tar.gz" "$STAGE/llm_jax_setup.sh" "$TPU_NAME:" \
  "${LOCATION[@]}" --worker="$WORKER"

# 3. On every worker at once: unpack to ~/llm_jax, venv ~/llm_jax_venv, pip install -e '.[EXTRAS]'.
remote="bash llm_jax_setup.sh llm_jax.tar.gz $REMOTE_DIR $REMOTE_VENV $EXTRAS"
if [[ -n "$PYTHON" ]]; then
  remote="$remote $(shquote "$PYTHON")"
fi
ssh_all "$WORKER" "$remote"
note "next: tpu/run.sh --name $TPU_NAME --zone $ZONE --experiment NAME --workdir gs://BUCKET/runs/RUN"
