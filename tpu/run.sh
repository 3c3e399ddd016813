#!/usr/bin/env bash
# Start an experiment on every worker of a TPU VM / pod slice, in the background.
#
# Usage: tpu/run.sh --name NAME --zone ZONE --experiment EXP --workdir gs://BUCKET/PATH
#                   [options] [-- EXPERIMENT_ARGS...]
#
#   --name NAME         TPU name (env LLM_JAX_TPU_NAME)
#   --zone ZONE         its zone (env LLM_JAX_TPU_ZONE)
#   --project PROJECT   Google Cloud project (env LLM_JAX_TPU_PROJECT)
#   --experiment EXP    runs `python -m experiments.EXP` (e.g. pretrain)
#   --workdir gs://...  the run directory: a bucket every worker can read and
#                       write; checkpoints go there, and the same command
#                       resumes from them
#   --log-name LOG      log file ~/llm_jax_logs/LOG.log on each worker
#                       (default: EXP); appended to, so resumes keep history
#   --env KEY=VALUE     extra environment for the job (repeatable), e.g.
#                       --env LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler=true
#   --worker WORKER     which workers (default all; a multi-host slice needs all)
#   --dry-run           print the gcloud command, run nothing
#   -h, --help          this help
#
# Everything after `--` is passed to the experiment as it is.
# Every worker runs, with LLM_JAX_DISTRIBUTED=1 (jax.distributed.initialize()):
#   cd ~/llm_jax && setsid nohup ~/llm_jax_venv/bin/python -m experiments.EXP
#       --workdir WORKDIR EXPERIMENT_ARGS >> ~/llm_jax_logs/LOG.log 2>&1 &
# and refuses to start while a job it started earlier is still running there
# (tpu/stop.sh stops it).
#
# Example:
#   tpu/run.sh --name llm --zone us-central2-b --experiment pretrain \
#       --workdir gs://my-bucket/runs/pt1 -- --set train.steps=10000
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

EXPERIMENT=""
WORKDIR=""
LOG_NAME=""
WORKER="all"
ENVS=()
EXP_ARGS=()

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  if common_opt "$@"; then shift "$SHIFT_N"; continue; fi
  case "$1" in
    --experiment) need_value "$@"; EXPERIMENT="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --log-name) need_value "$@"; LOG_NAME="$2"; shift 2 ;;
    --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --) shift; EXP_ARGS=("$@"); break ;;
    *) die "unknown argument: $1 (experiment arguments go after --; see --help)" ;;
  esac
done

require "$EXPERIMENT" --experiment
require "$WORKDIR" --workdir
check_common

EXPERIMENT="${EXPERIMENT#experiments.}"
if [[ ! "$EXPERIMENT" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
  die "--experiment must be a module name under experiments/, e.g. pretrain (got '$EXPERIMENT')"
fi
if [[ "$WORKDIR" != gs://?* ]]; then
  die "--workdir must be a gs:// bucket path that every worker can read and write (got '$WORKDIR'): a worker's local disk is not shared and is lost with the VM"
fi
LOG_NAME="${LOG_NAME:-$EXPERIMENT}"
if [[ ! "$LOG_NAME" =~ ^[A-Za-z0-9_.-]+$ ]]; then
  die "--log-name may only use letters, digits and . _ - (got '$LOG_NAME')"
fi
for arg in ${EXP_ARGS[@]+"${EXP_ARGS[@]}"}; do
  if [[ "$arg" == --workdir || "$arg" == --workdir=* ]]; then
    die "give the workdir with --workdir before --, not among the experiment arguments"
  fi
done

env_words="LLM_JAX_DISTRIBUTED=1"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  if [[ ! "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    die "--env takes KEY=VALUE (got '$kv')"
  fi
  env_words="$env_words ${kv%%=*}=$(shquote "${kv#*=}")"
done

# The job's command line (quoted for the worker's shell), and the script each worker runs.
job="\"\$HOME/$REMOTE_VENV/bin/python\" $(quote_words -m "experiments.$EXPERIMENT" --workdir "$WORKDIR" \
  ${EXP_ARGS[@]+"${EXP_ARGS[@]}"})"
log="\"\$logs/$LOG_NAME.log\""
remote="logs=\"\$HOME/$REMOTE_LOGS\"; mkdir -p \"\$logs\" && cd \"\$HOME/$REMOTE_DIR\" || exit 1
pid=\$(cat \"\$logs/job.pid\" 2>/dev/null)
if [ -n \"\$pid\" ] && ps -o args= -p \"\$pid\" 2>/dev/null | grep -q experiments; then
  echo \"[\$(hostname)] a job is still running (pid \$pid); stop it first with tpu/stop.sh\" >&2; exit 1
fi
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname): starting experiments.$EXPERIMENT\" >> $log
$env_words setsid nohup $job >> $log 2>&1 < /dev/null &
echo \$! > \"\$logs/job.pid\"
echo \"[\$(hostname)] started pid \$!, log ~/$REMOTE_LOGS/$LOG_NAME.log\""

ssh_all "$WORKER" "$remote"
note "follow it with: tpu/logs.sh --name $TPU_NAME --zone $ZONE --log $LOG_NAME"
