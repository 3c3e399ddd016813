"""The stage loop: resume, step, log, checkpoint, and roll back loss spikes.

    state, summary = run_stage(stage_dir, state, shardings, step_fn, loader, mesh, train_cfg)

Re-running the same stage resumes from its newest readable checkpoint with the
data iterator where it was, so an interrupted run ends bitwise where an
uninterrupted one does (on CPU). A `loader` is any iterator of host-local
numpy batches that follows `data.loader.StageLoader` (next, get/set_state,
restore from every process's saved state, metrics to log).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from llm_jax import sharding
from llm_jax.cli import signals_deferred
from llm_jax.checkpoint import Checkpoints, abstract_like
from llm_jax.config import TrainConfig
from llm_jax.data.loader import restore_per_process
from llm_jax.errors import ConfigError, DataError, TrainingDiverged
from llm_jax.rundir import MetricsLog, is_primary

# tensorboardX's writer module imports torch whenever torch is installed (to accept
# torch tensors), which costs every process that runs a stage about 0.8 s and a few
# hundred MB; we log Python floats only, so torch is hidden while it is imported
# (a missing torch is a case tensorboardX handles) unless something already loaded it.
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
    sys.modules["torch"] = None  # `import torch` raises ImportError
try:
    from tensorboardX import SummaryWriter
finally:
    if _HIDE_TORCH:
        del sys.modules["torch"]
# A NaN scalar (the loss of a spike being rolled back) is logged on purpose, and the
# loop's own text line reports it; tensorboardX would add a bare "NaN or Inf found".
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)


@dataclasses.dataclass
class SpikeGuard:
    """Decides whether a step's loss is a spike, and whether rollbacks are too frequent."""

    factor: float
    min_increase: float
    window: int
    max_rollbacks: int
    rollback_window: int
    history: list = dataclasses.field(default_factory=list)  # recent good losses
    rollbacks: list = dataclasses.field(default_factory=list)  # steps that spiked

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if self.factor <= 0 or len(self.history) < self.window:
            return False
        median = float(np.median(self.history[-self.window:]))
        return loss > self.factor * median and loss - median >= self.min_increase

    def record(self, loss: float) -> None:
        self.history = (self.history + [loss])[-self.window:]

    def too_many(self, step: int) -> bool:
        recent = [s for s in self.rollbacks if step - s < self.rollback_window]
        return len(recent) > self.max_rollbacks

    def to_json(self) -> dict:
        return {"history": self.history, "rollbacks": self.rollbacks}

    def load_json(self, d: dict) -> None:
        self.history, self.rollbacks = list(d.get("history", [])), list(d.get("rollbacks", []))


MAX_LOADER_STATE = 64 * 1024  # bytes of JSON per process


def all_loader_states(loader) -> list[str]:
    """Every process's loader state (JSON), gathered so process 0's checkpoint holds
    them all: each process reads its own shard and so has its own position."""
    mine = json.dumps(loader.get_state(), sort_keys=True).encode()
    if jax.process_count() == 1:
        return [mine.decode()]
    if len(mine) > MAX_LOADER_STATE:
        raise DataError(f"loader state of {len(mine)} bytes exceeds {MAX_LOADER_STATE}")
    buf = np.zeros(MAX_LOADER_STATE, np.uint8)
    buf[:len(mine)] = np.frombuffer(mine, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf))  # [processes, MAX]
    return [bytes(r).rstrip(b"\0").decode() for r in rows]


def restore_loader(loader, saved: list[str]) -> None:
    """Gives the loader its saved position: every saving process's state (JSON), in
    process order, to the loader's own `restore` if it has one (`data.loader.StageLoader`),
    else its own process's state (which needs the same process count)."""
    states = [json.loads(x) for x in saved]
    if hasattr(loader, "restore"):
        loader.restore(states)
    else:
        restore_per_process(loader, states)


def data_metrics(loader) -> dict:
    """What the loader counted (this process's shard): skipped records, packing."""
    stats = getattr(loader, "stats", None)
    if not stats:
        return {}
    return {"data_skipped": sum(stats.get("skipped", {}).values()),
            "data_truncated": stats.get("truncated", 0),
            "packing_efficiency": stats.get("packing_efficiency", 0.0)}


def _skip(loader, n: int) -> None:
    for _ in range(n):
        next(loader)


class _StepBar(tqdm):
    """tqdm that is told the step reached rather than the steps done, so a rollback
    moves the bar back (tqdm takes a negative update)."""

    # No monitor thread: it only re-tunes miniters for bars updated from another
    # thread, and a stopped stage must leave no thread of its own behind.
    monitor_interval = 0

    def update(self, step: int, loss: float | None = None) -> None:
        if self.disable:
            return
        if loss is not None:
            self.set_postfix(loss=f"{loss:.4g}", refresh=False)
        super().update(step - self.n)


class _Reporter:
    """Where a stage's numbers go besides metrics.jsonl: a per-step progress bar and
    TensorBoard scalars in DIR/<stage>/tensorboard (both on the primary process only),
    and the caller's `progress` text lines, printed around the bar."""

    def __init__(self, stage_dir: str, total: int, initial: int, progress: Callable[[str], None],
                 show_progress: bool):
        primary = is_primary()
        name = os.path.basename(os.path.normpath(stage_dir))
        # A terminal redraws in place 10 times a second; a log file or pipe gets an
        # update every 30 s (and the last step on close), not one per step.
        tty = sys.stderr.isatty()
        self.bar = _StepBar(total=total, initial=initial, desc=name, unit="step",
                            disable=not (show_progress and primary), mininterval=0.1 if tty else 30.0)
        self.tb = SummaryWriter(os.path.join(stage_dir, "tensorboard")) if primary else None
        self.progress = progress

    def say(self, message: str) -> None:
        with tqdm.external_write_mode():  # clears the bar, prints, draws it again
            self.progress(message)

    def scalars(self, step: int, metrics: dict) -> None:
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
            self.tb.flush()

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _close_quietly(ckpts: Checkpoints) -> None:
    """Waits for pending saves and closes the manager on every exit path, so an
    error or Ctrl-C never leaves Orbax's background thread holding the process
    open (an exit that hung) or a save half-finished. A failure here is reported
    but does not hide the error that got us here. A second stop signal waits too."""
    with signals_deferred():
        try:
            ckpts.wait()
        except Exception as e:  # noqa: BLE001 - the original error matters more
            print(f"warning: a pending checkpoint save in {ckpts.directory} failed: {e}", flush=True)
        try:
            ckpts.close()
        except Exception as e:  # noqa: BLE001
            print(f"warning: closing the checkpoints in {ckpts.directory} failed: {e}", flush=True)


def run_stage(stage_dir: str, state: Any, shardings: Any, step_fn: Callable, loader, mesh,
              cfg: TrainConfig, *, progress: Callable[[str], None] = print,
              show_progress: bool = True, evaluate: Callable[[Any], dict] | None = None) -> tuple[Any, dict]:
    """Trains `state` to cfg.steps, resuming from DIR/<stage>/checkpoints if present.

    `progress` gets the text lines (every log_every steps, resume, rollback);
    `show_progress` adds a progress bar on stderr updated every step. Logged metrics
    also go to TensorBoard under DIR/<stage>/tensorboard.
    `evaluate(params) -> {name: number}` runs every `cfg.eval_every` steps (0: never);
    its numbers are logged as "eval_<name>" beside the training metrics.
    """
    cfg.validate()  # before anything is written: a zero log_every or negative steps is a ConfigError
    if cfg.eval_every and evaluate is None:
        raise ConfigError(f"train.eval_every={cfg.eval_every}: the {os.path.basename(os.path.normpath(stage_dir))} "
                          "stage has no in-loop evaluation (it is evaluated when it ends); set "
                          "train.eval_every=0")
    ckpts = Checkpoints(os.path.join(stage_dir, "checkpoints"), save_every=cfg.checkpoint_every,
                        keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
    abstract = abstract_like(state, shardings)
    guard = SpikeGuard(cfg.spike_factor, cfg.spike_min_increase, cfg.spike_window, cfg.max_rollbacks,
                       cfg.rollback_window)
    log = MetricsLog(os.path.join(stage_dir, "metrics.jsonl"))

    def restore(before: int | None = None) -> tuple[int, Any]:
        found = ckpts.restore_latest(abstract, before=before)
        if found is None:
            return 0, None
        step, restored, data = found
        restore_loader(loader, data["loaders"])
        guard.load_json(data.get("guard", {}))
        return step, restored

    step, restored = restore()
    last_good = step  # the checkpoint a rollback would return to
    if restored is not None:
        state = restored
        progress(f"resumed from step {step} ({ckpts.directory})")
    else:
        # Step 0 on disk: a rollback before the first periodic save has somewhere to go.
        with signals_deferred():
            ckpts.save(0, state, {"loaders": all_loader_states(loader), "guard": guard.to_json()}, force=True)

    report = _Reporter(stage_dir, cfg.steps, step, progress, show_progress)
    progress = report.say  # the text lines, printed around the bar
    t0, steps_done = time.time(), 0
    summary = {"rollbacks": []}
    last = min(cfg.steps, cfg.stop_after) if cfg.stop_after > 0 else cfg.steps
    try:
        while step < last:
            batch = next(loader)
            state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
            step += 1
            steps_done += 1
            loss = float(metrics["loss"])  # one host sync per step: the guard needs it
            report.bar.update(step, loss=loss)
            if guard.is_spike(loss):
                guard.rollbacks.append(step)
                if guard.too_many(step):
                    ckpts.wait()
                    targets = {e["rollback_to"] for e in summary["rollbacks"]}
                    same = (f" Every rollback returned to the checkpoint at step {targets.pop()}, which "
                            "may itself be the suspect." if len(targets) == 1 and last_good > 0 else "")
                    raise TrainingDiverged(
                        f"{len(guard.rollbacks)} loss spikes (steps {guard.rollbacks}) within "
                        f"{cfg.rollback_window} steps; last loss {loss} vs median "
                        f"{np.median(guard.history) if guard.history else float('nan'):.4g}. "
                        f"Checkpoints in {ckpts.directory}; lower optim.lr or check the data.{same}")
                ckpts.wait()
                spikes = list(guard.rollbacks)
                # Spiking again before the next save, after a rollback to the same
                # checkpoint, makes that checkpoint the suspect (its state, not the
                # batches skipped since, may be what spikes): go back one further.
                suspect = bool(summary["rollbacks"]) and summary["rollbacks"][-1]["rollback_to"] == last_good
                back, state_back = restore(before=last_good) if suspect else (0, None)
                if state_back is None:  # not suspect, or nothing older: the newest checkpoint
                    suspect = False
                    back, state_back = restore()
                else:  # out of the way (kept), so the retrained step can be saved again
                    aside = ckpts.set_aside(last_good)
                guard.rollbacks = spikes  # restore() reset the guard; keep counting this spike
                skipped = step - back
                _skip(loader, skipped)  # skip the batches that led up to the spike
                event = {"rollback_from": step, "rollback_to": back, "skipped_batches": skipped,
                         "spike_loss": loss}
                summary["rollbacks"].append(event)
                log.write(step, {k: v for k, v in event.items() if k != "rollback_from"})
                report.scalars(step, {k: v for k, v in event.items() if k != "rollback_from"})
                progress(f"loss spike at step {step} (loss {loss:.4g}): rolled back to step "
                         f"{back}, skipped {skipped} batches"
                         + (f" (the checkpoint at step {last_good} is the suspect: it spiked again; "
                            f"moved to {aside})" if suspect else ""))
                state, step, last_good = state_back, back, back
                continue
            guard.record(loss)
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = dict(jax.device_get(metrics), **data_metrics(loader))
                log.write(step, metrics)
                report.scalars(step, metrics)
                rate = steps_done / max(time.time() - t0, 1e-9)
                progress(f"step {step:6d}/{cfg.steps}  loss {loss:.4f}  "
                         + (f"lr {float(metrics['lr']):.2e}  " if "lr" in metrics else "")
                         + f"{rate:.2f} steps/s  eta {(cfg.steps - step) / rate:.0f}s")
            if cfg.eval_every and step % cfg.eval_every == 0:
                scores = {f"eval_{k}": float(v) for k, v in evaluate(state.params).items()}
                log.write(step, scores)
                report.scalars(step, scores)
                progress(f"step {step:6d}/{cfg.steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            if step % cfg.checkpoint_every == 0 or step == last:  # gathering states is a collective
                with signals_deferred():  # a stop signal waits for the save to be handed to Orbax
                    ckpts.save(step, state,
                               {"loaders": all_loader_states(loader), "guard": guard.to_json()}, force=True)
                last_good = step
        with signals_deferred():
            ckpts.wait()
        ckpts.check_for_errors()  # the last save is asynchronous too
    finally:
        report.close()  # also when the run diverges or is interrupted
        _close_quietly(ckpts)
    summary["seconds"] = time.time() - t0
    summary["steps_run"] = steps_done
    summary["finished"] = step >= cfg.steps
    return state, summary
