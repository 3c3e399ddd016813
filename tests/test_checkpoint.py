"""Checkpoints that protect progress: a configuration mismatch is not corruption,
corrupted bytes are caught, and every exit path leaves the saves complete.

Each test here failed on the code before these guarantees (noted per test)."""

import glob
import os
import threading

import jax
import numpy as np
import pytest

from llm_jax import checkpoint, model, sharding, train
from llm_jax.config import MeshConfig, OptimizerConfig, preset

CFG = preset("tiny")


def make_state(model_cfg=CFG, optim=OptimizerConfig(), seed=0):
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx, _ = train.make_optimizer(optim, 10)
    state, shardings = train.create_train_state(lambda r: model.init(model_cfg, r), tx, mesh, seed=seed)
    return state, checkpoint.abstract_like(state, shardings)


def saved_steps(directory, steps, state):
    ckpts = checkpoint.Checkpoints(directory, save_every=1, keep=5)
    for step in steps:
        ckpts.save(step, state, {"position": step}, force=True)
    ckpts.wait()
    ckpts.close()


def listing(root):
    return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**"), recursive=True))


@pytest.mark.parametrize("change", ["optimizer", "model"])
def test_other_configuration_stops_and_touches_nothing(tmp_path, change):
    # Before: the shape/tree mismatch was taken for corruption; every valid step
    # was moved to checkpoints-unreadable/ and the next correct run started at 0.
    state, _ = make_state()
    directory = str(tmp_path / "checkpoints")
    saved_steps(directory, [0, 5, 10], state)
    before = listing(tmp_path)
    if change == "optimizer":  # --set optim.clip_norm=none: another optax chain
        _, other = make_state(optim=OptimizerConfig(clip_norm=None))
        expect = "opt_state"
    else:  # --set model.d_model=32
        _, other = make_state(model_cfg=preset("tiny", d_model=32))
        expect = "params/embed: this run has shape (256, 32) float32, the checkpoint (256, 64) float32"
    ckpts = checkpoint.Checkpoints(directory, save_every=1, keep=5)
    with pytest.raises(checkpoint.CheckpointMismatch, match="step 10") as info:
        ckpts.restore_latest(other)
    assert expect in str(info.value) and "Nothing was changed on disk" in str(info.value)
    assert listing(tmp_path) == before  # nothing moved aside, nothing deleted
    ckpts.close()
    # The run with the right configuration still resumes from the newest step.
    state_again, abstract = make_state()
    ckpts = checkpoint.Checkpoints(directory, save_every=1, keep=5)
    step, restored, data = ckpts.restore_latest(abstract)
    ckpts.close()
    assert step == 10 and data == {"position": 10}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state_again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _flip_bytes(step_dir):
    """Overwrites 8 bytes in the middle of the largest array file (same size)."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True) if os.path.isfile(f)]
    big = max(files, key=os.path.getsize)
    data = bytearray(open(big, "rb").read())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0x5A
    with open(big, "wb") as f:
        f.write(bytes(data))


def test_corrupted_bytes_are_caught_and_fall_back(tmp_path, capsys):
    # Before: the changed bytes restored without complaint (and the NaNs that
    # followed rolled back to the same corrupted step again and again).
    state, abstract = make_state()
    directory = str(tmp_path / "checkpoints")
    saved_steps(directory, [0, 5], state)
    _flip_bytes(os.path.join(directory, "5"))
    ckpts = checkpoint.Checkpoints(directory, save_every=1, keep=5)
    step, _, data = ckpts.restore_latest(abstract)
    ckpts.close()
    assert step == 0 and data == {"position": 0}
    out = capsys.readouterr().out
    assert "checkpoint step 5" in out and "fingerprint" in out
    assert os.listdir(str(tmp_path / "checkpoints-unreadable"))[0].startswith("5-")


def test_fingerprint_sees_one_changed_word_and_a_swap():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    base = checkpoint.fingerprint({"x": x, "b": np.ones(3, bool), "h": x.astype(jax.numpy.bfloat16)})
    changed = x.copy()
    changed[1, 2] = np.nextafter(changed[1, 2], np.float32(100))  # one bit
    swapped = x.copy()
    swapped[0, 0], swapped[2, 3] = x[2, 3], x[0, 0]
    for other in (changed, swapped):
        fp = checkpoint.fingerprint({"x": other, "b": np.ones(3, bool), "h": x.astype(jax.numpy.bfloat16)})
        assert fp[2] != base[2]  # leaves in key order: b, h, x
        assert fp[:2] == base[:2]
    # The plain sum, independently: the uint32 words of x added modulo 2^32.
    words = x.view(np.uint32).astype(np.uint64).ravel()
    assert base[2][0] == int(words.sum() % 2 ** 32)
    assert base[2][1] == int((words * (2 * np.arange(words.size, dtype=np.uint64) + 1)).sum() % 2 ** 32)


def test_failed_async_save_stops_at_the_next_save(tmp_path, monkeypatch):
    # Before: a background save that failed (e.g. a full disk) went unnoticed;
    # training went on and the errors surfaced as hundreds of lines at exit.
    state, _ = make_state()
    ckpts = checkpoint.Checkpoints(str(tmp_path / "checkpoints"), save_every=1, keep=5)
    ckpts.save(0, state, force=True)
    ckpts.wait()

    def failed():
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpts.manager, "check_for_errors", failed)
    with pytest.raises(checkpoint.CheckpointError, match=r"No space left on device.*newest complete "
                                                         r"checkpoint is step 0.*rerun the same command"):
        ckpts.save(1, state, force=True)
    monkeypatch.undo()
    ckpts.close()


def test_an_error_mid_stage_leaves_saves_finished_and_threads_closed(tmp_path):
    # Before: an exception inside the loop skipped wait()/close(): an async save
    # could still be running when the process tried to exit (a hang, 1 run in 5).
    from llm_jax import loop
    from llm_jax.config import TrainConfig
    from llm_jax.stages import pretrain

    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx, sched = train.make_optimizer(OptimizerConfig(), 10)
    state, shardings = train.create_train_state(lambda r: model.init(CFG, r), tx, mesh, seed=0)
    inner = train.jit_train_step(train.make_train_step(pretrain.clm_loss_fn(CFG), pretrain.weight_sum, tx,
                                                       sched), mesh, shardings)
    calls = []

    def step_fn(state, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C between steps, right after an async save
        return inner(state, batch)

    class Loader:
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            tok = np.random.default_rng(self.i).integers(0, 256, (4, 17)).astype(np.int32)
            return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "weights": np.ones((4, 16), np.float32)}

        def get_state(self):
            return {"i": self.i}

        def set_state(self, s):
            self.i = s["i"]

    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        loop.run_stage(str(tmp_path / "s"), state, shardings, step_fn, Loader(), mesh,
                       TrainConfig(steps=10, checkpoint_every=2, log_every=1), show_progress=False)
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads still running after the stage stopped: {left}"
    ckpts = checkpoint.Checkpoints(str(tmp_path / "s" / "checkpoints"), save_every=1)
    assert ckpts.steps() == [0, 2, 4]  # the step-4 save, in flight at the interrupt, is complete
    ckpts.close()


def test_keep_checkpoints_prunes_the_oldest(tmp_path):
    state, abstract = make_state()
    directory = str(tmp_path / "checkpoints")
    ckpts = checkpoint.Checkpoints(directory, save_every=1, keep=2)
    for step in range(6):
        ckpts.save(step, state, {"position": step}, force=True)
    ckpts.wait()
    assert ckpts.steps() == [4, 5]
    assert sorted(int(d) for d in os.listdir(directory) if d.isdigit()) == [4, 5]
    ckpts.close()
