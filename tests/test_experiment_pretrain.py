"""experiments.pretrain runs end to end with tiny overrides: a smoke run, a rerun with
changed settings, and in-loop evaluation (train.eval_every)."""

import json
import os

import pytest

from experiments import pretrain


def test_pretrain_smoke(tmp_path):
    workdir = str(tmp_path / "run")
    sets = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_ff=64",
            "model.max_len=64", "train.steps=2", "train.batch_size=8", "train.seq_len=64",
            "train.log_every=1", "data.size=200", "eval_batches=2"]
    argv = ["--workdir", workdir] + [x for s in sets for x in ("--set", s)]
    assert pretrain.main(argv) == 0
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["config"]["model"]["d_model"] == 32 and "jax" in run["versions"]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "pretrain", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and all("loss" in r for r in rows)
    ev = json.load(open(os.path.join(workdir, "pretrain", "eval.json")))
    assert ev["heldout_loss_after"] < ev["heldout_loss_before"]
    assert os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer.json"))


def test_rerun_with_changed_settings_stops_and_keeps_the_stage(tmp_path, capsys):
    # Before: a rerun with another optim.lr resumed silently under the new value
    # (and a finished stage was reused as if trained with it).
    workdir = str(tmp_path / "run")
    sets = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_ff=64",
            "model.max_len=64", "train.steps=3", "train.batch_size=8", "train.seq_len=64",
            "train.log_every=1", "train.checkpoint_every=1", "data.size=200", "eval_batches=2"]

    def argv(*extra):
        return ["--workdir", workdir] + [x for s in sets + list(extra) for x in ("--set", s)]

    from llm_jax.config import ConfigError
    assert pretrain.main(argv("train.stop_after=1")) == 0  # stopped after step 1
    listing = sorted(os.listdir(os.path.join(workdir, "pretrain", "checkpoints")))
    with pytest.raises(ConfigError, match=r"(?s)started with other settings:\n  optim\.lr: 0\.003 then, "
                                          r"0\.001 now.*Rerun with the settings it was started with"):
        pretrain.main(argv("optim.lr=1e-3"))
    assert sorted(os.listdir(os.path.join(workdir, "pretrain", "checkpoints"))) == listing
    assert pretrain.main(argv("train.stop_after=2", "train.log_every=2")) == 0  # allowed to change
    assert pretrain.main(argv()) == 0  # finishes
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.003 then, 0\.001 now"):
        pretrain.main(argv("optim.lr=1e-3"))  # a finished stage is not silently reused
    rows = [json.loads(line) for line in open(os.path.join(workdir, "pretrain", "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_eval_every_logs_heldout_loss_during_training(tmp_path):
    # Before: train.eval_every was read nowhere (silently ignored).
    workdir = str(tmp_path / "run")
    sets = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_ff=64",
            "model.max_len=64", "train.steps=4", "train.batch_size=8", "train.seq_len=64",
            "train.log_every=4", "train.eval_every=2", "data.size=200", "eval_batches=2"]
    assert pretrain.main(["--workdir", workdir] + [x for s in sets for x in ("--set", s)]) == 0
    rows = [json.loads(line) for line in open(os.path.join(workdir, "pretrain", "metrics.jsonl"))]
    evals = {r["step"]: r["eval_heldout_loss"] for r in rows if "eval_heldout_loss" in r}
    assert sorted(evals) == [2, 4]
    ev = json.load(open(os.path.join(workdir, "pretrain", "eval.json")))
    # The step-4 evaluation saw the final params on the same held-out batches.
    assert evals[4] == pytest.approx(ev["heldout_loss_after"], rel=1e-6)
    assert ev["heldout_loss_before"] > evals[2]


