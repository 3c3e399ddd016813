# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this
# Shared helpers for the tpu/*.sh scripts; sourced, never run.
#
# Each script keeps its help text in its header comment (printed by --help),
# parses its own flags with `common_opt` + `need_value`, and runs every
# external command through `run_cmd`, which prints the exact command line and
# then runs it, or only prints it under --dry-run. Works on bash 3.2 (macOS).

TPU_NAME="${LLM_JAX_TPU_NAME:-}"
ZONE="${LLM_JAX_TPU_ZONE:-}"
PROJECT="${LLM_JAX_TPU_PROJECT:-}"
DRY_RUN=0
SHIFT_N=0
PROG="$(basename "$0")"

# Where the code, the virtual environment and the logs live on every worker
# (relative to the worker's home directory).
REMOTE_DIR="llm_jax"
REMOTE_VENV="llm_jax_venv"
REMOTE_LOGS="llm_jax_logs"

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

note() {
  echo "$PROG: $*" >&2
}

usage() {
  # The script's header comment, without the leading '# ', is its help.
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# shquote ARG: ARG quoted for a POSIX shell; unchanged when nothing needs quoting.
shquote() {
  case "$1" in
    '' ) printf "''" ;;
    *[!A-Za-z0-9_./:=@%+,-]* ) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    * ) printf '%s' "$1" ;;
  esac
}

# quote_words ARG...: the arguments as one shell-quoted command line.
quote_words() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" == --*=* ]]; then
      # --flag='value with spaces' reads better than '--flag=value with spaces'
      arg="${arg%%=*}=$(shquote "${arg#*=}")"
    else
      arg="$(shquote "$arg")"
    fi
    out="${out:+$out }$arg"
  done
  printf '%s' "$out"
}

# run_cmd CMD ARG...: prints the command (copy-pasteable), then runs it unless --dry-run.
run_cmd() {
  printf '+ %s\n' "$(quote_words "$@")"
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  "$@"
}

# need_value "$@": dies unless option $1 has a value in $2.
need_value() {
  if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
    die "$1 needs a value"
  fi
}

# split_eq ARG...: sets ARGS to the arguments with every --opt=value before a
# lone `--` split into --opt value (what follows `--` is kept as it is).
split_eq() {
  ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --) ARGS+=("$@"); return 0 ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# common_opt "$@": handles the flags every script takes (--name, --zone,
# --project, --dry-run, --help). Sets SHIFT_N; returns 1 when $1 is not one.
common_opt() {
  case "$1" in
    --name) need_value "$@"; TPU_NAME="$2"; SHIFT_N=2 ;;
    --zone) need_value "$@"; ZONE="$2"; SHIFT_N=2 ;;
    --project) need_value "$@"; PROJECT="$2"; SHIFT_N=2 ;;
    --dry-run) DRY_RUN=1; SHIFT_N=1 ;;
    -h|--help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

# require VALUE FLAG: dies naming FLAG when VALUE is empty.
require() {
  if [[ -z "$1" ]]; then
    die "missing required argument $2 (see --help)"
  fi
}

# check_common: validates --name/--zone, checks gcloud (unless --dry-run) and
# sets LOCATION to the --zone/--project flags every gcloud call gets.
check_common() {
  require "$TPU_NAME" --name
  require "$ZONE" --zone
  LOCATION=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    LOCATION+=(--project="$PROJECT")
  fi
  if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), or use --dry-run"
  fi
}

# ssh_all WORKER COMMAND: runs COMMAND (a shell string) on WORKER (0, 1-3, all, ...).
ssh_all() {
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}
