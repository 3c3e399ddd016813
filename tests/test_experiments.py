"""Every experiment module runs one step end to end with tiny overrides."""

import json
import os

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
