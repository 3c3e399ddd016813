"""The run directory contract (README "Runs: resume, spikes, several processes";
docs/reliability.md says what it promises).

    DIR/run.json              what ran: config, package versions, git revision
    DIR/tokenizer/            the tokenizer every stage uses
    DIR/<stage>/config.json
    DIR/<stage>/metrics.jsonl one JSON object per logged step
    DIR/<stage>/eval.json     the stage's final evaluation
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import importlib.metadata
import json
import math
import os
import socket
import subprocess
import sys
import time
from typing import Any

from llm_jax.config import apply_overrides, to_dict, validate_all
from llm_jax.errors import WorkdirError


PACKAGES = ("jax", "jaxlib", "optax", "orbax-checkpoint", "chex", "numpy",
            "tensorflow-datasets", "grain", "tokenizers")


def parse_args(description: str, default_cfg: Any, argv: list[str] | None = None):
    """--workdir DIR [--set key=value ...] -> (workdir, config)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", required=True, help="run directory (created; rerun to continue)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=100 (repeatable)")
    args = parser.parse_args(argv)
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise WorkdirError(f"--workdir {args.workdir} exists and is not a directory; give a directory "
                           "(created if missing)")
    return args.workdir, validate_all(apply_overrides(default_cfg, args.overrides))


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def is_primary() -> bool:
    """Process 0 writes the run directory's files; the others only compute."""
    import jax
    return jax.process_index() == 0


def say(*args, **kwargs) -> None:
    """print() on process 0 only, so N processes do not print N copies."""
    if is_primary():
        print(*args, **kwargs, flush=True)


def write_json(path: str, obj: Any) -> None:
    """Writes atomically (temp file + rename) so a crash never leaves half a file.
    Only process 0 writes."""
    if not is_primary():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


_LOCKS: dict[str, int] = {}  # workdir (real path) -> the open, locked DIR/.lock


def lock_workdir(workdir: str) -> None:
    """Claims `workdir` for this run until the process exits (process 0 only).

    Two runs on one workdir would overwrite each other's checkpoints and append
    to the same metrics, so the second one stops here and names the first. The
    lock is `flock` on DIR/.lock: the kernel drops it when its process dies, so
    a killed run never leaves the workdir locked. On a file system without
    locks (some network mounts) it warns and goes on."""
    if not is_primary():
        return
    real = os.path.realpath(workdir)
    if real in _LOCKS:  # this process already holds it (a second stage, a test)
        return
    path = os.path.join(workdir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"cannot write to the workdir {workdir} ({e.strerror}): a run writes its lock, "
                           "run.json, checkpoints and metrics there; use a writable --workdir (copy a "
                           "finished run elsewhere to read or resume it)") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise WorkdirError(f"the workdir {workdir} is in use by another run ({holder}); two runs on one "
                           "workdir would overwrite each other's checkpoints. Wait for it to finish or "
                           "stop it, or use another --workdir") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        print(f"warning: {workdir} is on a file system without file locks; nothing stops a second run "
              "from using it at the same time", file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
    _LOCKS[real] = fd


def write_run_json(workdir: str, cfg: Any, experiment: str) -> None:
    """Creates and claims the workdir (`lock_workdir`), then records what runs in it:
    the first thing a run writes, so a second run on the same workdir stops before
    any work (a tokenizer trained for minutes, a stage)."""
    import jax
    os.makedirs(workdir, exist_ok=True)
    lock_workdir(workdir)
    write_json(os.path.join(workdir, "run.json"), {
        "experiment": experiment, "config": to_dict(cfg), "versions": versions(),
        "git_revision": git_revision(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
    })




class MetricsLog:
    """Appends one JSON object per logged step to DIR/<stage>/metrics.jsonl (process 0)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not is_primary():
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN/inf
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
