"""Shared by the real-corpus experiment tests (test_experiment_gpt2_pretrain.py,
test_experiment_bert_mlm.py): a tiny run on TFDS mock lm1b data (offline:
`tfds.testing.mock_data` serves random text in place of the prepared dataset),
and the checks of its run directory that both make."""

import json
import os

import tensorflow_datasets as tfds

TINY = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_ff=64", "model.max_len=32",
        "model.vocab_size=300", "train.steps=2", "train.batch_size=8", "train.seq_len=32",
        "train.log_every=1", "eval_batches=1", "tokenizer_sample=200", "optim.warmup_steps=0",
        "optim.lr=0.01"]


def run_main(module, workdir, tmp_path, extra=()):
    sets = TINY + [f"data.data_dir={tmp_path / 'tfds'}", *extra]
    argv = ["--workdir", workdir] + [x for s in sets for x in ("--set", s)]
    with tfds.testing.mock_data(num_examples=64):
        return module.main(argv)


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_run_dir(workdir, stage, experiment):
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["experiment"] == experiment
    assert run["config"]["model"]["d_model"] == 32 and run["config"]["data"]["source"] == "tfds:lm1b"
    meta = json.load(open(os.path.join(workdir, "tokenizer", "meta.json")))
    assert meta["kind"] == "bpe" and 262 < meta["vocab_size"] <= 300  # merges learned on the corpus
    assert json.load(open(os.path.join(workdir, stage, "config.json")))["train"]["steps"] == 2
    rows = read_rows(os.path.join(workdir, stage, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert os.listdir(os.path.join(workdir, stage, "checkpoints"))
    return rows, json.load(open(os.path.join(workdir, stage, "eval.json")))
