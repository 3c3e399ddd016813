"""What every stage of an experiment does around its loss.

    done = finished(stage_dir, steps)          # eval.json of a finished stage, or None
    params = stage_params(workdir, "sft", like)  # the previous stage's weights (hand-off)
    state, shardings = train.state_from_params(params, tx, mesh, seed)
    state, summary = loop.run_stage(...)
    record(stage_dir, result)                  # eval.json: the stage is finished

A stage is finished when its eval.json exists and was written for the same
number of steps; rerunning an experiment skips finished stages and resumes an
interrupted one from its checkpoints (`loop.run_stage`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from jax.experimental import multihost_utils

from llm_jax import checkpoint, sharding
from llm_jax.config import ConfigError
from llm_jax.rundir import write_json


def finished(stage_dir: str, steps: int) -> dict | None:
    """The stage's recorded evaluation if it finished `steps` steps, else None."""
    path = os.path.join(stage_dir, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    return done if done.get("steps") == steps else None


# Settings that may change between invocations of one stage without changing what
# it computes: when to stop this invocation, how often to log, which checkpoints
# to keep, and the mesh (a checkpoint restores onto any mesh shape).
RESUMABLE = ("stop_after", "log_every", "keep_checkpoints", "async_checkpoints")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _resumable(key: str) -> bool:
    return key.split(".")[-1] in RESUMABLE or key.startswith("mesh.") or ".mesh." in key


def _started(stage_dir: str) -> bool:
    if os.path.exists(os.path.join(stage_dir, "eval.json")):
        return True
    ckpts = os.path.join(stage_dir, "checkpoints")
    return os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts))


def check_same_config(stage_dir: str, config: dict) -> None:
    """Raises ConfigError if the stage was started (checkpoints or eval.json) with
    other settings than `config`: resuming would silently mix two configurations,
    and a finished stage would be reused as if it had the new ones."""
    path = os.path.join(stage_dir, "config.json")
    if not (os.path.exists(path) and _started(stage_dir)):
        return
    with open(path) as f:
        saved = _flat(json.load(f))
    now = _flat(json.loads(json.dumps(config, default=str)))  # as written: tuples are lists
    # Keys only one side has are a newer or older code's fields, not the user's change.
    diffs = [f"{k}: {saved[k]!r} then, {now[k]!r} now" for k in sorted(saved.keys() & now.keys())
             if saved[k] != now[k] and not _resumable(k)]
    if diffs:
        name = os.path.basename(os.path.normpath(stage_dir))
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise ConfigError(
            f"the {name} stage in {stage_dir} was started with other settings:\n  {shown}\n"
            "Resuming would mix two configurations (and a finished stage would be reused as it is). "
            f"Rerun with the settings it was started with ({path}), or remove {stage_dir} to train "
            "this stage again with the new ones, or use a new --workdir.")


def begin(stage_dir: str, steps: int, config: dict) -> dict | None:
    """A stage's start: checks `config` against the one it was started with
    (`check_same_config`), then returns its eval.json if it already finished
    `steps` steps, else writes config.json and returns None."""
    check_same_config(stage_dir, config)
    done = finished(stage_dir, steps)
    if done is None:
        write_json(os.path.join(stage_dir, "config.json"), config)
    return done


def record(stage_dir: str, result: dict) -> None:
    """Writes eval.json (process 0), which marks the stage finished."""
    write_json(os.path.join(stage_dir, "eval.json"), result)


def abstract_params(init_fn, mesh, *args) -> Any:
    """Shapes/dtypes of `init_fn(*args)` with the shardings of the partitioning table:
    the target a stage's weights are restored onto (any mesh shape)."""
    shapes = jax.eval_shape(init_fn, *args)
    shards = sharding.tree_shardings(shapes, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards)


def stage_params(workdir: str, stage: str, like: Any, key: str | None = None) -> Any:
    """The final params of `workdir/stage`, checked against and placed like `like`
    (an abstract tree from `abstract_params`). `key` picks a subtree of the saved
    params (e.g. "policy" from PPO's {"policy", "value"})."""
    return checkpoint.load_params(os.path.join(workdir, stage, "checkpoints"), like, key=key)


def host_params(params: Any) -> Any:
    """A full host copy (numpy) of possibly multi-host-sharded params, for evaluation
    code that runs the same small model on every process."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)
