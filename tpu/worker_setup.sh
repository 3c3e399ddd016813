#!/usr/bin/env bash
# Runs on each TPU worker, copied there (as ~/llm_jax_setup.sh) by tpu/setup.sh:
# unpacks the code into ~/DIR and installs it, with EXTRAS, into the virtual
# environment ~/VENV, made with a Python >= 3.11 (installed from apt if the
# image has none). Safe to run again: the code is replaced, the venv reused.
#
# Usage: bash llm_jax_setup.sh TARBALL DIR VENV EXTRAS [PYTHON]
set -euo pipefail

if [[ $# -lt 4 ]]; then
  echo "usage: $0 TARBALL DIR VENV EXTRAS [PYTHON]" >&2
  exit 2
fi
tarball="$1"
dir="$2"
venv="$3"
extras="$4"
python="${5:-}"
host="$(hostname)"
cd "$HOME"
case "$dir" in /*) ;; *) dir="$HOME/$dir" ;; esac
case "$venv" in /*) ;; *) venv="$HOME/$venv" ;; esac

log() {
  echo "[$host] $*"
}

new_enough() {  # pyproject.toml: requires-python >= 3.11
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

apt_install() {
  local try
  for try in 1 2 3 4 5; do
    # A fresh VM may still be running unattended-upgrades, which holds the apt lock.
    if sudo apt-get -q -o DPkg::Lock::Timeout=300 update &&
       sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 install "$@"; then
      return 0
    fi
    log "apt-get install $* failed (try $try of 5); retrying in 30 s"
    sleep 30
  done
  return 1
}

if [[ -z "$python" ]]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 && new_enough "$candidate"; then
      python="$candidate"
      break
    fi
  done
fi
if [[ -z "$python" ]]; then
  log "no Python >= 3.11 on this image; installing python3.11 from apt"
  apt_install python3.11 python3.11-venv
  python=python3.11
fi
if ! new_enough "$python"; then
  log "$python is not a Python >= 3.11"
  exit 1
fi
# Debian/Ubuntu ship venv's pip bootstrap separately, as pythonX.Y-venv.
if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  apt_install "$("$python" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')"
fi

log "unpacking $tarball into $dir"
rm -rf "$dir.new"
mkdir -p "$dir.new"
tar -xzf "$tarball" -C "$dir.new"
rm -rf "$dir"
mv "$dir.new" "$dir"
rm -f "$tarball"

if [[ ! -x "$venv/bin/python" ]] || ! new_enough "$venv/bin/python"; then
  log "creating the virtual environment $venv with $python ($("$python" --version 2>&1))"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
log "pip install -e '.[$extras]'"
(cd "$dir" && "$venv/bin/python" -m pip install -q -e ".[$extras]")
log "ready: $("$venv/bin/python" -c 'import jax; print("jax", jax.__version__)')"
