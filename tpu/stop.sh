#!/usr/bin/env bash
# Stop the job tpu/run.sh started, on every worker: SIGTERM to its process
# group, then SIGKILL after a grace period.
#
# Usage: tpu/stop.sh --name NAME --zone ZONE [options]
#
#   --name NAME        TPU name (env LLM_JAX_TPU_NAME)
#   --zone ZONE        its zone (env LLM_JAX_TPU_ZONE)
#   --project PROJECT  Google Cloud project (env LLM_JAX_TPU_PROJECT)
#   --worker WORKER    which workers (default all)
#   --grace SECONDS    wait this long after SIGTERM before SIGKILL (default 30)
#   --dry-run          print the gcloud command, run nothing
#   -h, --help         this help
#
# The run directory is untouched: the same tpu/run.sh command resumes from the
# latest checkpoint.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="all"
GRACE="30"

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  if common_opt "$@"; then shift "$SHIFT_N"; continue; fi
  case "$1" in
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --grace) need_value "$@"; GRACE="$2"; shift 2 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
check_common
if [[ ! "$GRACE" =~ ^[0-9]+$ ]]; then
  die "--grace takes a number of seconds (got '$GRACE')"
fi

# alive: the process exists and is not a zombie waiting to be reaped.
remote="alive() { s=\$(ps -o stat= -p \"\$1\" 2>/dev/null) && [ -n \"\$s\" ] && [ \"\${s#Z}\" = \"\$s\" ]; }
pidfile=\"\$HOME/$REMOTE_LOGS/job.pid\"; pid=\$(cat \"\$pidfile\" 2>/dev/null)
if [ -z \"\$pid\" ] || ! ps -o args= -p \"\$pid\" 2>/dev/null | grep -q experiments; then
  echo \"[\$(hostname)] no job running\"; rm -f \"\$pidfile\"; exit 0
fi
kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\"; ticks=0
while alive \"\$pid\" && [ \$ticks -lt $((GRACE * 5)) ]; do sleep 0.2; ticks=\$((ticks + 1)); done
if alive \"\$pid\"; then kill -KILL -- \"-\$pid\" 2>/dev/null || kill -KILL \"\$pid\"; echo \"[\$(hostname)] killed pid \$pid (SIGKILL after ${GRACE}s)\"
else echo \"[\$(hostname)] stopped pid \$pid\"; fi
rm -f \"\$pidfile\""

ssh_all "$WORKER" "$remote"
