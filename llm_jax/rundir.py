"""The run directory contract (DESIGN.md "Runs, stages and checkpoints").

    DIR/run.json              what ran: config, package versions, git revision
    DIR/tokenizer/            the tokenizer every stage uses
    DIR/<stage>/config.json
    DIR/<stage>/metrics.jsonl one JSON object per logged step
    DIR/<stage>/eval.json     the stage's final evaluation
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

from llm_jax.config import apply_overrides, to_dict

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
            "tensorflow-datasets", "grain", "tokenizers")


def parse_args(description: str, default_cfg: Any, argv: list[str] | None = None):
    """--workdir DIR [--set key=value ...] -> (workdir, config)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", required=True, help="run directory (created; rerun to continue)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=100 (repeatable)")
    args = parser.parse_args(argv)
    return args.workdir, apply_overrides(default_cfg, args.overrides)


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


def write_run_json(workdir: str, cfg: Any, experiment: str) -> None:
    import jax
    write_json(os.path.join(workdir, "run.json"), {
        "experiment": experiment, "config": to_dict(cfg), "versions": versions(),
        "git_revision": git_revision(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
    })


def run_main(main) -> int:
    """Runs an experiment's main(); a config, mesh, data or checkpoint mistake (or a
    diverged run) prints what and where and exits 2, instead of a traceback from
    deep inside JAX."""
    from llm_jax.checkpoint import CheckpointError
    from llm_jax.config import ConfigError
    from llm_jax.data.errors import DataError
    from llm_jax.data.tokenizer import TokenizerError
    from llm_jax.hf import HFError
    from llm_jax.loop import TrainingDiverged
    from llm_jax.sharding import MeshError
    try:
        return main()
    except (ConfigError, MeshError, CheckpointError, DataError, TokenizerError, HFError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


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
