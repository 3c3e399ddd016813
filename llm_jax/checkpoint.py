"""Checkpoints: the full train state for resuming, params alone for hand-off.

Two different jobs, two functions:

* `Checkpoints` (resume): one Orbax `CheckpointManager` per stage directory
  holding the whole `TrainState` (params, optimizer state, step, rng) plus the
  data iterator's state as JSON. Saves are asynchronous; Orbax writes each step
  to a temporary directory and renames it only when complete, so a
  half-written checkpoint is never listed. Every save also records a
  fingerprint of the state (two wrapping uint32 sums per array, computed on
  device) that a restore recomputes, so bytes changed on disk after the save are
  caught, not trained on. If the newest checkpoint cannot be read (truncated,
  corrupted, fingerprint mismatch), `restore_latest` warns, names the step,
  moves it aside and falls back to the one before. A checkpoint that is
  readable but was written by another configuration (other shapes, another
  optimizer) is not corrupt: that stops with `CheckpointMismatch`, naming what
  differs, and nothing on disk is touched.
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
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llm_jax.errors import CheckpointError, CheckpointMismatch

log = logging.getLogger(__name__)

STATE, DATA = "state", "data"


FINGERPRINT = "_fingerprint"  # key in the saved data item


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as a flat uint32 vector (1-, 2-byte types widened, 8-byte split)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()  # 8 bytes -> [..., 2]


@jax.jit
def _fingerprint(tree: Any) -> jax.Array:
    """[leaves, 2] uint32: per array the wrapping sum of its 32-bit words and the
    sum weighted by (2i + 1), so a changed word, or two words swapped, changes it.
    On device and fused, so a save pays one read of the state, not a host copy."""
    def one(x):
        w = _words(x)
        i = jnp.arange(w.size, dtype=jnp.uint32)
        return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * i + 1), dtype=jnp.uint32)])
    leaves = jax.tree.leaves(tree)
    return jnp.stack([one(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree: Any) -> list[list[int]]:
    """The state's fingerprint as JSON-ready ints (see `_fingerprint`)."""
    return np.asarray(jax.device_get(_fingerprint(tree))).astype(np.int64).tolist()


def _path_key(path) -> str:
    """A key path as 'a/b/0/c', the same for a live tree (dataclass attributes,
    namedtuples) and for Orbax's metadata of it (dicts and lists)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def tree_differences(expected: Any, found: Any) -> list[str]:
    """Every leaf whose presence, shape or dtype differs between `expected` (what
    this run builds) and `found` (a checkpoint's metadata), by path."""
    def flat(tree):
        return {_path_key(p): (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", "?")))
                for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    want, have = flat(expected), flat(found)
    out = [(k, f"{k}: this run has shape {want[k][0]} {want[k][1]}, the checkpoint {have[k][0]} {have[k][1]}")
           for k in want.keys() & have.keys() if want[k] != have[k]]
    out += [(k, f"{k}: this run has it {want[k][0]} {want[k][1]}, the checkpoint does not")
            for k in want.keys() - have.keys()]
    out += [(k, f"{k}: in the checkpoint {have[k][0]} {have[k][1]}, not in this run")
            for k in have.keys() - want.keys()]
    # Weights first: the optimizer's moments repeat every weight's difference.
    return [line for k, line in sorted(out, key=lambda x: (not x[0].startswith("params"), x[0]))]


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
        """Saves if `step` is on the save interval (or `force`); returns whether it did.

        A failed earlier asynchronous save (a full disk, a lost bucket) raises here,
        at the next save, as a CheckpointError naming the directory, instead of
        training on with nothing being saved."""
        self.check_for_errors()
        if not (force or self.manager.should_save(int(step))):
            return False
        data = dict(data_state or {}, **{FINGERPRINT: fingerprint(state)})
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state), DATA: ocp.args.JsonSave(data)})
        try:
            return self.manager.save(int(step), args=args, force=force)
        except OSError as e:
            raise CheckpointError(f"saving step {step} to {self.directory} failed: {e}. The newest complete "
                                  f"checkpoint is step {self.latest()}; free space or fix the directory, "
                                  "then rerun the same command to resume") from e

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def check_for_errors(self) -> None:
        """Raises CheckpointError if an asynchronous save has failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # Orbax re-raises the background thread's error as is
            raise CheckpointError(f"an asynchronous save to {self.directory} failed: "
                                  f"{type(e).__name__}: {_short(e)}. The newest complete checkpoint is "
                                  f"step {self.latest()}; fix the cause (e.g. free disk space), then rerun "
                                  "the same command to resume") from e

    def saved_tree(self, step: int) -> Any:
        """The shapes and dtypes of the state saved at `step` (metadata; no array is read)."""
        meta = self.manager.item_metadata(int(step))[STATE]
        return getattr(meta, "tree", meta)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(abstract_state, restore_args),
                                     DATA: ocp.args.JsonRestore()})
        out = self.manager.restore(int(step), args=args)
        state, data = out[STATE], dict(out[DATA] or {})
        saved = data.pop(FINGERPRINT, None)
        if saved is not None and fingerprint(state) != saved:
            raise CheckpointError("its arrays do not match the fingerprint written when it was saved "
                                  "(the files changed on disk after the save)")
        return state, data

    def check_fits(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointMismatch if the state saved at `step` has other leaves,
        shapes or dtypes than `abstract_state` (this run's configuration)."""
        diffs = tree_differences(abstract_state, self.saved_tree(step))
        if diffs:
            shown = "\n  ".join(diffs[:12]) + (f"\n  ... {len(diffs) - 12} more" if len(diffs) > 12 else "")
            raise CheckpointMismatch(
                f"the checkpoint at step {step} in {self.directory} was written by a different "
                f"configuration than this run's ({len(diffs)} arrays differ):\n  {shown}\n"
                "Nothing was changed on disk. Rerun with the settings that wrote it (the stage's "
                "config.json), or start this stage elsewhere with a new --workdir.")

    def restore_latest(self, abstract_state: Any, before: int | None = None) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) from the newest readable checkpoint (older than
        `before` if given), or None if there is none.

        A checkpoint whose metadata does not match `abstract_state` raises
        CheckpointMismatch and moves nothing: it is another configuration's, not a
        damaged one. An unreadable checkpoint is moved aside with a warning naming
        its step; if none can be read, that is an error (silently starting over
        would waste the run)."""
        steps = [s for s in self.steps() if before is None or s < before]
        failures = []
        for step in reversed(steps):
            try:
                saved = self.saved_tree(step)
            except Exception as e:  # no readable metadata: damaged
                failures.append(self._unreadable(step, e))
                continue
            if tree_differences(abstract_state, saved):
                self.check_fits(step, abstract_state)  # raises, naming the differences
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # Orbax/tensorstore raise many types for bad files
                failures.append(self._unreadable(step, e))
                continue
            return step, state, data
        if failures:
            raise CheckpointError("no readable checkpoint:\n  " + "\n  ".join(failures))
        return None

    def _unreadable(self, step: int, error: Exception) -> str:
        aside = self._move_aside(step)
        msg = (f"checkpoint step {step} in {self.directory} is unreadable "
               f"({type(error).__name__}: {_short(error)}); moved to {aside}")
        log.warning("%s; falling back to an earlier one", msg)
        print(f"warning: {msg}; falling back to an earlier one", flush=True)
        return msg

    def _move_aside(self, step: int, why: str = "unreadable") -> str:
        """Moves a bad step out of the manager's sight, to DIR/checkpoints-<why>/
        (kept for a post-mortem, never deleted), so the run can save that step
        number again."""
        aside = os.path.join(f"{self.directory}-{why}", f"{step}-{int(time.time())}")
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        os.replace(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        return aside

    def set_aside(self, step: int) -> str:
        """Moves a readable but suspect step (training from it keeps spiking) to
        DIR/checkpoints-suspect/; returns where."""
        self.wait()
        return self._move_aside(step, "suspect")

    def wait(self) -> None:
        """Blocks until async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _short(e: Exception) -> str:
    """An Orbax/TensorStore message without its multi-kilobyte spec dump."""
    return str(e).split(" [tensorstore_spec")[0][:300]


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
