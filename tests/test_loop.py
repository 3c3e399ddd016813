"""Checkpoints, resume, hand-off and the loss-spike guard.

The reference for every resume test is the same run done without interruption.
"""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint, loop, model, sharding, train
from llm_jax.config import MeshConfig, OptimizerConfig, TrainConfig, preset
from llm_jax.stages import pretrain

CFG = preset("tiny")
B, T = 8, 16


class RowLoader:
    """A minimal resumable loader: batch i of epoch e is rows perm(seed, e)[8i : 8i+8]."""

    def __init__(self, rows: dict, batch_size: int, seed: int):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.per_epoch = len(rows["inputs"]) // batch_size
        self.epoch, self.index = 0, 0

    def get_state(self):
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state):
        self.epoch, self.index = state["epoch"], state["index"]

    def __next__(self):
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows["inputs"]))
        idx = np.sort(perm[self.index * self.batch_size:(self.index + 1) * self.batch_size])
        self.index += 1
        return {k: v[idx] for k, v in self.rows.items()}


def packed_rows(n=64, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(6, CFG.vocab_size, (n, T + 1)).astype(np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "weights": np.ones((n, T), np.float32),
            "poison": np.zeros((n, 1), np.float32)}


def poisoned_loss_fn(poison_value):
    """The CLM loss, times `poison_value` for any batch that carries a poison row."""
    base = pretrain.clm_loss_fn(CFG)

    def loss_fn(params, batch, rng, normalizer):
        loss, m = base(params, {k: v for k, v in batch.items() if k != "poison"}, rng, normalizer)
        # Scale by a constant chosen by `where`: a NaN inside the unchosen branch of
        # where(c, loss * nan, loss) would still poison every gradient.
        return loss * jnp.where(batch["poison"].sum() > 0, poison_value, 1.0), m
    return loss_fn


def setup(mesh_shape=(1, 1, 1), loss_fn=None, steps=8):
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))])
    tx, sched = train.make_optimizer(OptimizerConfig(lr=3e-3, warmup_steps=2), steps)
    state, shardings = train.create_train_state(lambda r: model.init(CFG, r), tx, mesh, seed=0)
    step_fn = train.jit_train_step(
        train.make_train_step(loss_fn or pretrain.clm_loss_fn(CFG), pretrain.weight_sum, tx, sched),
        mesh, shardings)
    return mesh, state, shardings, step_fn


def losses_logged(stage_dir):
    rows = [json.loads(line) for line in open(os.path.join(stage_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run(stage_dir, steps, data, *, mesh_shape=(1, 1, 1), loss_fn=None, **train_kw):
    cfg = TrainConfig(steps=steps, batch_size=B, seq_len=T, log_every=1, checkpoint_every=2, **train_kw)
    mesh, state, shardings, step_fn = setup(mesh_shape, loss_fn, steps=8)
    loader = RowLoader(data, B, seed=0)
    state, summary = loop.run_stage(stage_dir, state, shardings, step_fn, loader, mesh, cfg,
                                    progress=lambda s: None)
    return jax.device_get(state.params), summary


def test_interrupted_run_resumes_bitwise(tmp_path):
    data = packed_rows()
    full, _ = run(str(tmp_path / "full"), 8, data)
    run(str(tmp_path / "split"), 4, data)  # "stopped" after step 4
    resumed, summary = run(str(tmp_path / "split"), 8, data)
    assert summary["steps_run"] == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full)):
        np.testing.assert_array_equal(a, b)
    assert losses_logged(str(tmp_path / "split")) == losses_logged(str(tmp_path / "full"))


def test_unreadable_latest_checkpoint_falls_back(tmp_path, capsys):
    data = packed_rows()
    stage = str(tmp_path / "s")
    run(stage, 6, data)
    # Corrupt every data file of the newest checkpoint (step 6).
    for f in glob.glob(os.path.join(stage, "checkpoints", "6", "state", "**", "*"), recursive=True):
        if os.path.isfile(f) and "ocdbt" in f or f.endswith("manifest.ocdbt"):
            with open(f, "wb") as fh:
                fh.write(b"garbage")
    _, summary = run(stage, 6, data, async_checkpoints=False)
    out = capsys.readouterr().out
    assert "checkpoint step 6" in out and "falling back" in out
    assert summary["steps_run"] == 2  # resumed from step 4, redid 5 and 6


@pytest.mark.parametrize("poison_value", [1e4, float("nan")], ids=["spike", "nan"])
def test_loss_spike_rolls_back_and_skips_the_batch(tmp_path, poison_value):
    # Enough rows that 8 steps stay inside one epoch: a poisoned row comes back next epoch.
    data = packed_rows(n=256)
    # RowLoader draws batch i (0-based) from rows perm[8i : 8i+8] of a permutation seeded by
    # (seed, epoch); poison exactly the rows of the 6th batch (step 6).
    perm = np.random.default_rng([0, 0]).permutation(256)
    data["poison"][perm[40:48]] = 1
    probe = RowLoader(data, B, seed=0)
    assert [next(probe)["poison"].sum() > 0 for _ in range(8)] == [False] * 5 + [True] + [False] * 2
    stage = str(tmp_path / "s")
    params, summary = run(stage, 8, data, loss_fn=poisoned_loss_fn(poison_value), spike_window=3)
    (event,) = summary["rollbacks"]
    assert event["rollback_from"] == 6 and event["rollback_to"] == 4 and event["skipped_batches"] == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    logged = losses_logged(stage)
    assert max(logged) == 8 and all(np.isfinite(v) and v < 10 for v in logged.values())


def test_spike_rule_needs_ratio_and_absolute_increase():
    # The SFT run that stopped: median 0.077, ordinary harder batches at 0.19-0.20 (2.5x).
    guard = loop.SpikeGuard(factor=2.5, min_increase=0.5, window=4, max_rollbacks=3, rollback_window=100)
    for x in (0.07, 0.08, 0.075, 0.079):
        guard.record(x)
    assert not guard.is_spike(0.20)  # 2.6x the median but only 0.12 nats above it
    assert guard.is_spike(0.7)  # 9x and 0.62 nats above
    assert guard.is_spike(float("nan")) and guard.is_spike(float("inf"))
    high = loop.SpikeGuard(factor=2.5, min_increase=0.5, window=4, max_rollbacks=3, rollback_window=100)
    for x in (3.0, 3.1, 2.9, 3.0):
        high.record(x)
    assert not high.is_spike(6.0)  # 3 nats above but only 2x: the ratio rule still applies
    assert high.is_spike(8.0)


def test_repeated_spikes_stop_the_run(tmp_path):
    data = packed_rows()
    data["poison"][:] = 1  # every batch explodes
    with pytest.raises(loop.TrainingDiverged, match="loss spikes"):
        run(str(tmp_path / "s"), 8, data, loss_fn=poisoned_loss_fn(float("nan")), max_rollbacks=2)


def test_restore_onto_other_meshes(tmp_path):
    data = packed_rows()
    stage = str(tmp_path / "s")
    saved, _ = run(stage, 2, data, mesh_shape=(1, 8, 1))
    for shape in [(1, 1, 1), (2, 4, 1)]:
        mesh = sharding.make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
        abstract = jax.eval_shape(lambda r: model.init(CFG, r), jax.random.PRNGKey(0))
        abstract = checkpoint.abstract_like(abstract, sharding.tree_shardings(abstract, mesh))
        params = checkpoint.load_params(os.path.join(stage, "checkpoints"), abstract)
        assert params["layers"]["mlp"]["up"].sharding.mesh.shape == mesh.shape
        for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(a, b)
    # The full train state (optimizer included) also resumes on another mesh.
    _, summary = run(stage, 4, data, mesh_shape=(2, 4, 1))
    assert summary["steps_run"] == 2


def test_handoff_names_the_mismatching_weight(tmp_path):
    stage = str(tmp_path / "s")
    run(stage, 2, packed_rows())
    other = preset("tiny", d_ff=96)
    abstract = jax.eval_shape(lambda r: model.init(other, r), jax.random.PRNGKey(0))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"\['layers'\]\['mlp'\]\['up'\]: expected shape \(2, 64, 96\), checkpoint has \(2, 64, 128\)"):
        checkpoint.load_params(os.path.join(stage, "checkpoints"), abstract)
    with pytest.raises(checkpoint.CheckpointError, match="has that stage run"):
        checkpoint.load_params(str(tmp_path / "nowhere"), abstract)
    shutil.rmtree(stage)


def test_half_written_checkpoint_is_never_taken(tmp_path):
    """Orbax writes a step into '<step>.orbax-checkpoint-tmp-*' and renames it when
    complete; a crash mid-save leaves such a directory, which must be ignored."""
    stage = str(tmp_path / "s")
    run(stage, 4, packed_rows())
    half = os.path.join(stage, "checkpoints", "6.orbax-checkpoint-tmp-1700000000")
    os.makedirs(os.path.join(half, "state"))
    open(os.path.join(half, "state", "manifest.ocdbt"), "wb").write(b"partial")
    ckpts = checkpoint.Checkpoints(os.path.join(stage, "checkpoints"), save_every=2)
    assert ckpts.steps() == [0, 2, 4]
    ckpts.close()
    _, summary = run(stage, 6, packed_rows())
    assert summary["steps_run"] == 2  # continued from 4, not from the half-written 6


def test_load_one_part_of_the_params(tmp_path):
    """Hand-off of one subtree (PPO's policy out of {"policy", "value"}): only that
    part is checked and restored; a missing part is named."""
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = train.make_optimizer(OptimizerConfig(), 10)[0]
    state, shardings = train.create_train_state(
        lambda r: {"policy": model.init(CFG, r), "value": {"w": jnp.ones((3,))}}, tx, mesh, seed=0)
    ckpts = checkpoint.Checkpoints(str(tmp_path / "c"), save_every=1)
    ckpts.save(1, state, {"loaders": []}, force=True)
    ckpts.wait()
    ckpts.close()
    abstract = jax.eval_shape(lambda r: model.init(CFG, r), jax.random.PRNGKey(0))
    abstract = checkpoint.abstract_like(abstract, sharding.tree_shardings(abstract, mesh))
    got = checkpoint.load_params(str(tmp_path / "c"), abstract, key="policy")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state.params["policy"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(checkpoint.CheckpointError, match=r"no 'actor' part \(found \['policy', 'value'\]\)"):
        checkpoint.load_params(str(tmp_path / "c"), abstract, key="actor")


def test_a_checkpoint_that_spikes_again_is_the_suspect(tmp_path, capsys):
    # The saved state at step 4 is "bad": any step taken from exactly that state
    # spikes (as a corrupted or poisoned checkpoint would). The first spike rolls
    # back to it; the second must fall back one checkpoint further (to 2) instead
    # of returning to step 4 until the rollback limit (the old behaviour, which
    # ended in TrainingDiverged blaming the learning rate).
    data = packed_rows(n=256)
    mesh, state, shardings, inner = setup(steps=8)
    bad = {}

    def step_fn(state, batch):
        key = np.asarray(jax.device_get(state.params["embed"])).tobytes()
        if int(state.step) == 4 and not bad:
            bad["params"] = key  # the state the step-4 checkpoint holds
        new_state, metrics = inner(state, batch)
        if bad.get("params") == key:
            metrics = dict(metrics, loss=jax.numpy.float32(float("nan")))
        return new_state, metrics

    cfg = TrainConfig(steps=8, batch_size=B, seq_len=T, log_every=1, checkpoint_every=2, max_rollbacks=3)
    _, summary = loop.run_stage(str(tmp_path / "s"), state, shardings, step_fn, RowLoader(data, B, seed=0),
                                mesh, cfg, progress=print, show_progress=False)
    assert [(e["rollback_from"], e["rollback_to"]) for e in summary["rollbacks"]] == [(5, 4), (5, 2)]
    assert summary["finished"]
    assert "the checkpoint at step 4 is the suspect" in capsys.readouterr().out


# --- the reporter: TensorBoard scalars, the progress bar, text lines -------------------

import io  # noqa: E402 - imports of the part appended here
import sys  # noqa: E402


class TTY(io.StringIO):
    def isatty(self):
        return True


def tensorboard_scalars(logdir):
    """(step, tag, value) of every scalar in the stage's event file, in file order, as
    TensorBoard's own loader reads it (the test extra installs TensorBoard)."""
    # Imported, not importorskip'd: the test extra declares tensorboard, so a missing one is a
    # broken install to report, not a reason to pass without reading the file.
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util.tensor_util import make_ndarray
    (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    # The loader hands scalars on as TensorBoard stores them: a float32 tensor per value.
    return [(e.step, v.tag, make_ndarray(v.tensor).item()) for e in event_file_loader.EventFileLoader(path).Load()
            if e.HasField("summary") for v in e.summary.value]


def jsonl_scalars(stage_dir):
    rows = [json.loads(line) for line in open(os.path.join(stage_dir, "metrics.jsonl"))]
    return [(r["step"], k, float(v)) for r in rows for k, v in r.items() if k != "step"]


def test_stage_reports_to_tensorboard_the_bar_and_text_lines(tmp_path, monkeypatch):
    """A run with a loss spike: its event file holds metrics.jsonl's scalars at the same
    steps (the rollback's included), the bar is drawn on stderr, and each text line is
    printed on a cleared line, not after the bar. show_progress=False and a non-primary
    process draw no bar (the latter writes no event file); both still print the lines."""
    data = packed_rows(n=256)
    perm = np.random.default_rng([0, 0]).permutation(256)
    data["poison"][perm[40:48]] = 1  # step 6 spikes, as in test_loss_spike_rolls_back_and_skips_the_batch
    mesh, state, shardings, step_fn = setup(loss_fn=poisoned_loss_fn(float("nan")))

    def run_reported(name, steps, state, **kw):
        err, said = TTY(), []
        monkeypatch.setattr(sys, "stderr", err)

        def say(message):  # into the bar's own stream, where a collision would show
            said.append(message)
            err.write(message + "\n")

        cfg = TrainConfig(steps=steps, batch_size=B, seq_len=T, log_every=1, checkpoint_every=4, spike_window=3)
        state, summary = loop.run_stage(str(tmp_path / name), state, shardings, step_fn,
                                        RowLoader(data, B, seed=0), mesh, cfg, progress=say, **kw)
        return err.getvalue(), said, summary, state

    text, said, summary, state = run_reported("spiky", 6, state)
    assert [e["rollback_to"] for e in summary["rollbacks"]] == [4]
    stage = str(tmp_path / "spiky")
    got, want = tensorboard_scalars(os.path.join(stage, "tensorboard")), jsonl_scalars(stage)
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want]
    assert {"loss", "lr", "rollback_to", "skipped_batches", "spike_loss"} <= {k for _, k, _ in got}
    np.testing.assert_array_equal([v for *_, v in got], np.float32([v for *_, v in want]))  # NaN == NaN
    assert "spiky: 100%" in text and "6/6" in text and text.endswith("\n")
    assert any(m.startswith("loss spike at step 6") for m in said) and said[-1].startswith("step      6/6")
    for message in said:
        assert "\r" + message + "\n" in text, message  # the bar was cleared first

    # The next runs start from the state the last one returned (its input was donated):
    # a new state would cost a compile of the initializer each.
    text, said, _, state = run_reported("quiet", 2, state, show_progress=False)
    assert text == "".join(m + "\n" for m in said) and len(said) == 2
    assert os.listdir(str(tmp_path / "quiet" / "tensorboard"))

    monkeypatch.setattr(loop, "is_primary", lambda: False)
    text, said, _, _ = run_reported("worker", 2, state)
    assert text == "".join(m + "\n" for m in said) and len(said) == 2
    assert not os.path.exists(str(tmp_path / "worker" / "tensorboard"))


def test_eval_every_on_a_stage_without_one_is_an_error(tmp_path):
    from llm_jax import loop
    from llm_jax.config import ConfigError, TrainConfig
    with pytest.raises(ConfigError, match=r"train\.eval_every=5: the sft stage has no in-loop evaluation"):
        loop.run_stage(str(tmp_path / "sft"), None, None, None, None, None, TrainConfig(eval_every=5))
    assert not os.path.exists(tmp_path / "sft")  # stopped before writing anything
