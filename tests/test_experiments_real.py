"""The real-corpus experiments (GPT-2 causal LM, BERT masked LM) run end to end
with tiny overrides on TFDS mock lm1b data (offline: `tfds.testing.mock_data`
serves random text in place of the prepared dataset)."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from experiments import bert_mlm, gpt2_pretrain
from llm_jax.config import ConfigError

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


def test_gpt2_pretrain_smoke(tmp_path, capsys):
    workdir = str(tmp_path / "gpt2")
    assert run_main(gpt2_pretrain, workdir, tmp_path, ["samples=2", "sample_tokens=4"]) == 0
    rows, ev = check_run_dir(workdir, "pretrain", "gpt2_pretrain")
    # Held-out loss drop in the 2 steps, measured with train.seed and data.seed 0 (this test)
    # and 1-4 (2026-12): 0.569, 0.519, 0.519, 0.531, 0.540.
    assert ev["steps"] == 2 and 0 < ev["heldout_loss_after"] < ev["heldout_loss_before"] - 0.25, ev
    assert ev["data"]["records_used"] > 0
    assert len(ev["samples"]) == 2 and all(s["original"].startswith(s["prompt"]) for s in ev["samples"])
    # Rerunning finds the stage finished: it reloads the saved tokenizer and trains nothing.
    before = os.path.getmtime(os.path.join(workdir, "pretrain", "eval.json"))
    capsys.readouterr()
    assert run_main(gpt2_pretrain, workdir, tmp_path, ["samples=2", "sample_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert f"from {workdir}/tokenizer" in out and "pretrain: already finished" in out
    assert os.path.getmtime(os.path.join(workdir, "pretrain", "eval.json")) == before
    assert len(read_rows(os.path.join(workdir, "pretrain", "metrics.jsonl"))) == 2


def test_bert_mlm_smoke(tmp_path):
    workdir = str(tmp_path / "bert")
    assert run_main(bert_mlm, workdir, tmp_path) == 0
    rows, ev = check_run_dir(workdir, "mlm", "bert_mlm")
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["normalizer"] >= 1 for r in rows)
    # Held-out masked-token loss drop in the 2 steps, measured with train.seed and data.seed 0
    # (this test) and 1-4 (2026-12): 0.243, 0.296, 0.264, 0.331, 0.322. The accuracy is not
    # asserted to move: one held-out batch has ~24 masked tokens, and it went 0 -> 0-3 of them.
    assert 0 < ev["heldout_mlm_loss_after"] < ev["heldout_mlm_loss_before"] - 0.12, ev
    for k in ("heldout_mlm_accuracy_before", "heldout_mlm_accuracy_after"):
        assert 0.0 <= ev[k] <= 1.0, k
    # The trained encoder exports as a BERT that transformers computes the same.
    import numpy as np
    import torch
    import transformers

    from llm_jax import generate, hf, model
    out = str(tmp_path / "hf_bert")
    assert hf.export_stage(workdir, "mlm", out) == "bert"
    cfg, params, _, _ = generate.load_stage(workdir, "mlm", decoder_only=False)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    want = np.asarray(model.apply(cfg, params, tokens))
    with torch.no_grad():
        got = transformers.BertForMaskedLM.from_pretrained(out).eval()(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_bert_refuses_a_causal_model_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="bidirectional encoder.*causal=True"):
        bert_mlm.main(["--workdir", str(tmp_path / "x"), "--set", "model.causal=true"])
    assert not os.path.exists(tmp_path / "x")  # refused before the run directory or tokenizer
