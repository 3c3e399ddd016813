"""The main job end to end with tiny overrides: every stage runs, hands its weights
to the next, records its evaluation, and a rerun skips what finished."""

import json
import os

from experiments import pipeline

TINY = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_ff=64", "model.max_len=96",
        "pretrain.train.steps=2", "pretrain.train.batch_size=8", "pretrain.train.seq_len=64",
        "pretrain.data.size=200", "pretrain.eval_batches=1",
        "sft.train.steps=2", "sft.train.batch_size=8", "sft.train.seq_len=64", "sft.data.size=200",
        "rm.train.steps=2", "rm.train.batch_size=8", "rm.train.seq_len=64", "rm.data.size=200",
        "rm.eval_batches=1",
        "ppo.train.steps=2", "ppo.ppo.rollout_batch=16", "ppo.ppo.max_new_tokens=8", "ppo.prompts=20",
        "ppo.ppo.minibatches=2",
        "dpo.train.steps=2", "dpo.train.batch_size=8", "dpo.train.seq_len=64", "dpo.data.size=200",
        "eval.icl_per_task=1", "eval.instruction_per_task=1", "eval.win_prompts=4", "eval.max_new_tokens=8",
        "eval.shots=1", "eval.rm_pairs=8"]


def test_pipeline_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = "run"  # relative, as in the README's quick start (runs/demo): the curves were once lost there
    argv = ["--workdir", workdir] + [x for s in TINY for x in ("--set", s)]
    assert pipeline.main(argv) == 0
    for stage in ("pretrain", "sft", "rm", "ppo", "dpo"):
        ev = json.load(open(os.path.join(workdir, stage, "eval.json")))
        assert ev["steps"] == 2, stage
        rows = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
        assert rows and all("loss" in r for r in rows if "rollback_to" not in r), stage
        assert os.listdir(os.path.join(workdir, stage, "tensorboard")), stage
    ppo_ev = json.load(open(os.path.join(workdir, "ppo", "eval.json")))
    assert 0.0 <= ppo_ev["win_rate"] <= 1.0 and ppo_ev["kl_to_base"] is not None
    rm_ev = json.load(open(os.path.join(workdir, "rm", "eval.json")))
    assert rm_ev["breakdown"]["pairs"] + rm_ev["breakdown"]["skipped"] == 8
    report = open(os.path.join(workdir, "report.md")).read()
    for stage in ("pretrain", "sft", "rm", "ppo", "dpo"):
        assert f"| {stage} |" in report, stage
    for png in ("loss.png", "ppo.png", "dpo.png"):
        assert os.path.exists(os.path.join(workdir, png)) and f"]({png})" in report, png
    capsys.readouterr()
    # A rerun finds every stage finished and trains nothing.
    assert pipeline.main(argv) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "step " not in out.replace("steps", "")
