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
from llm_jax.rundir import write_json


def finished(stage_dir: str, steps: int) -> dict | None:
    """The stage's recorded evaluation if it finished `steps` steps, else None."""
    path = os.path.join(stage_dir, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    return done if done.get("steps") == steps else None


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
