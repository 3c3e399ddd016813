"""Checkpoints: the full train state for resuming, params alone for hand-off.

Two different jobs, two functions:

* `Checkpoints` (resume): one Orbax `CheckpointManager` per stage directory
  holding the whole `TrainState` (params, optimizer state, step, rng) plus the
  data iterator's state as JSON. Saves are asynchronous; Orbax writes each step
  to a temporary directory and renames it only when complete, so a
  half-written checkpoint is never listed. If the newest one cannot be read
  (truncated, corrupted), `restore_latest` warns, names the step, and falls
  back to the one before.
* `load_params` (hand-off between stages): restores only `params` from another
  stage's latest checkpoint, against the tree the new stage expects, after
  checking every weight's name and shape, so a mismatch is reported by name
  before any array is read (cf. maxtext `load_params_from_path`).

Both restore onto whatever shardings the target carries, so a checkpoint saved
on 8 devices with FSDP restores onto 1 device or a (2, 4) mesh.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE, DATA = "state", "data"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with target shardings) describing `tree`: what to restore into."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


def _handlers() -> dict:
    return {STATE: ocp.PyTreeCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()}


class Checkpoints:
    """Save / resume the full train state of one stage (DIR/<stage>/checkpoints)."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Saves if `step` is on the save interval (or `force`); returns whether it did."""
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state),
                                     DATA: ocp.args.JsonSave(data_state or {})})
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(abstract_state, restore_args),
                                     DATA: ocp.args.JsonRestore()})
        out = self.manager.restore(int(step), args=args)
        return out[STATE], dict(out[DATA] or {})

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) from the newest readable checkpoint, or None if there is none.

        An unreadable checkpoint is skipped with a warning naming its step; if none
        can be read, that is an error (silently starting over would waste the run)."""
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # Orbax/tensorstore raise many types for bad files
                reason = str(e).split(" [tensorstore_spec")[0][:300]
                aside = self._move_aside(step)
                msg = (f"checkpoint step {step} in {self.directory} is unreadable "
                       f"({type(e).__name__}: {reason}); moved to {aside}")
                log.warning("%s; falling back to an earlier one", msg)
                print(f"warning: {msg}; falling back to an earlier one", flush=True)
                failures.append(msg)
                continue
            return step, state, data
        if failures:
            raise CheckpointError("no readable checkpoint:\n  " + "\n  ".join(failures))
        return None

    def _move_aside(self, step: int) -> str:
        """Moves a bad step out of the manager's sight (kept for a post-mortem), so
        the run can save that step number again."""
        aside = os.path.join(self.directory + "-unreadable", f"{step}-{int(time.time())}")
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        os.replace(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        return aside

    def wait(self) -> None:
        """Blocks until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ---------------------------------------------------------------------------
# Hand-off: params only


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_tree_matches(expected: Any, found: Any, where: str) -> None:
    """Raises CheckpointError naming every weight whose presence or shape differs."""
    want, have = _flat_shapes(expected), _flat_shapes(found)
    problems = [f"{k}: expected shape {want[k]}, checkpoint has {have[k]}"
                for k in sorted(want.keys() & have.keys()) if want[k] != have[k]]
    problems += [f"{k}: expected shape {want[k]}, missing from the checkpoint"
                 for k in sorted(want.keys() - have.keys())]
    problems += [f"{k}: in the checkpoint (shape {have[k]}) but not expected by this model"
                 for k in sorted(have.keys() - want.keys())]
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise CheckpointError(f"weights in {where} do not fit this model config:\n  {shown}")


def load_params(checkpoint_dir: str, abstract_params: Any, step: int | None = None,
                key: str | None = None) -> Any:
    """Restores only `params` from a stage's checkpoints onto `abstract_params`' shardings.

    `abstract_params` is e.g. `abstract_like(...)` or `jax.eval_shape(init)` with
    shardings attached. The optimizer state in the checkpoint is never read.
    `key` restores one subtree of the saved params instead (e.g. "policy" of
    PPO's {"policy", "value"}); the rest is not read either."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"no checkpoints at {checkpoint_dir}: has that stage run?")
    manager = ocp.CheckpointManager(checkpoint_dir, item_handlers=_handlers(),
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no finished checkpoint in {checkpoint_dir}")
        meta = manager.item_metadata(step)[STATE]
        tree = getattr(meta, "tree", meta)
        saved = tree["params"] if isinstance(tree, dict) else getattr(tree, "params")
        where = f"{checkpoint_dir} step {step}"
        if key is not None:
            if not isinstance(saved, dict) or key not in saved:
                found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
                raise CheckpointError(f"{where}: params have no {key!r} part (found {found})")
            saved = saved[key]
        check_tree_matches(abstract_params, saved, where)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
        if key is not None:
            abstract_params, restore_args = {key: abstract_params}, {key: restore_args}
        target = {"params": abstract_params}
        out = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
            item=target, restore_args={"params": restore_args}, partial_restore=True)}))
        params = out[STATE]["params"]
        return params if key is None else params[key]
    finally:
        manager.close()
