#!/usr/bin/env bash
# Follow the log of a job started by tpu/run.sh (~/llm_jax_logs/LOG.log on each worker).
#
# Usage: tpu/logs.sh --name NAME --zone ZONE [options]
#
#   --name NAME        TPU name (env LLM_JAX_TPU_NAME)
#   --zone ZONE        its zone (env LLM_JAX_TPU_ZONE)
#   --project PROJECT  Google Cloud project (env LLM_JAX_TPU_PROJECT)
#   --worker WORKER    0 (default: process 0 prints the metrics), another
#                      index, a list/range like 1-3, or all (lines are then
#                      prefixed with the worker's hostname)
#   --log LOG          which log (default: the newest ~/llm_jax_logs/*.log)
#   --lines N          lines of history to show first (default 100)
#   --no-follow        print the last N lines and exit
#   --dry-run          print the gcloud command, run nothing
#   -h, --help         this help
#
# Ctrl-C stops following; the job keeps running.
#
# Example:
#   tpu/logs.sh --name llm --zone us-central2-b --log pretrain --worker all
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="0"
LOG_NAME=""
LINES="100"
FOLLOW=1

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  if common_opt "$@"; then shift "$SHIFT_N"; continue; fi
  case "$1" in
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --log|--log-name) need_value "$@"; LOG_NAME="${2%.log}"; shift 2 ;;
    --lines) need_value "$@"; LINES="$2"; shift 2 ;;
    --no-follow) FOLLOW=0; shift ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
check_common
if [[ ! "$WORKER" =~ ^(all|[0-9]+([-,][0-9]+)*)$ ]]; then
  die "--worker must be all, an index, or a list/range like 1,3 or 0-3 (got '$WORKER')"
fi
if [[ -n "$LOG_NAME" && ! "$LOG_NAME" =~ ^[A-Za-z0-9_.-]+$ ]]; then
  die "--log may only use letters, digits and . _ - (got '$LOG_NAME')"
fi
if [[ ! "$LINES" =~ ^[0-9]+$ ]]; then
  die "--lines takes a number (got '$LINES')"
fi

if [[ -n "$LOG_NAME" ]]; then
  pick="f=\"\$HOME/$REMOTE_LOGS/$LOG_NAME.log\""
else
  pick="f=\$(ls -t \"\$HOME/$REMOTE_LOGS\"/*.log 2>/dev/null | head -n 1)"
fi
tail_cmd="tail -n $LINES"
if [[ "$FOLLOW" == 1 ]]; then
  tail_cmd="$tail_cmd -F"
fi
show="$tail_cmd \"\$f\""
if [[ "$WORKER" == all || "$WORKER" == *[-,]* ]]; then
  show="$show | sed -u \"s/^/[\$(hostname)] /\""
fi
remote="$pick
if [ -z \"\$f\" ] || [ ! -e \"\$f\" ]; then echo \"[\$(hostname)] no log \${f:-in ~/$REMOTE_LOGS} (has tpu/run.sh started a job?)\" >&2; exit 1; fi
$show"

ssh_all "$WORKER" "$remote"
