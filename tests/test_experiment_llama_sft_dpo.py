"""experiments.llama_sft_dpo: one tiny SFT -> DPO run on JSONL files written here."""

import json
import os
import random

from experiments import llama_sft_dpo
from llm_jax.data import builtin, preferences
from jsonl_files import write_jsonl


def test_llama_sft_dpo_smoke(tmp_path, capsys):
    rng = random.Random(0)
    sft_rows = [{k: v for k, v in builtin.sft_record(rng, "train").items() if k in ("prompt", "response")}
                for _ in range(60)]
    pref_rows = [{k: v for k, v in preferences.preference_record(rng, "train").items()
                  if k in ("prompt", "chosen", "rejected")} for _ in range(60)]
    paths = {name: str(tmp_path / f"{name}.jsonl") for name in ("sft", "prefs", "sft_eval", "prefs_eval")}
    write_jsonl(paths["sft"], sft_rows[:50], bad_line=True)
    write_jsonl(paths["sft_eval"], sft_rows[50:])
    write_jsonl(paths["prefs"], pref_rows[:50])
    write_jsonl(paths["prefs_eval"], pref_rows[50:])
    sets = ["model.vocab_size=300", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
            "model.num_kv_heads=1", "model.d_ff=64", "model.max_len=128",
            f"sft.data.source=jsonl:{paths['sft']}", f"dpo.data.source=jsonl:{paths['prefs']}",
            f"sft_eval=jsonl:{paths['sft_eval']}", f"dpo_eval=jsonl:{paths['prefs_eval']}",
            "sft.train.steps=2", "sft.train.batch_size=8", "sft.train.seq_len=128", "sft.data.max_segments=8",
            # The Llama defaults (lr 2e-5 after 100 warmup steps) moved the tiny model's held-out
            # loss by 0.0002-0.0006 in 2 steps: a float-rounding margin, not a test.
            "sft.optim.lr=3e-3", "sft.optim.warmup_steps=0",
            "dpo.train.steps=2", "dpo.train.batch_size=8", "dpo.train.seq_len=128", "dpo.data.max_segments=8",
            "eval_batches=2", f"sft.data.cache_dir={tmp_path / 'cache'}", f"dpo.data.cache_dir={tmp_path / 'cache'}"]
    workdir = str(tmp_path / "run")
    argv = ["--workdir", workdir] + [x for s in sets for x in ("--set", s)]
    assert llama_sft_dpo.main(argv) == 0
    sft_ev = json.load(open(os.path.join(workdir, "sft", "eval.json")))
    # Measured with the JSONL rows, train and data seeds of seeds 0 (this test) and 1-4
    # (2026-12): held-out response loss fell by 0.149, 0.110, 0.179, 0.167, 0.051 (the last
    # closest to 0.02), and DPO's held-out implicit-reward accuracy (10 pairs) was 0.8, 0.9,
    # 0.9, 0.8, 1.0 after its one update (the lr of step 0 is 0 in warmup).
    assert sft_ev["heldout_response_loss_after"] < sft_ev["heldout_response_loss_before"] - 0.02, sft_ev
    dpo_ev = json.load(open(os.path.join(workdir, "dpo", "eval.json")))
    assert dpo_ev["heldout_pair_accuracy_before"] == 0.5  # policy == reference: every pair a tie
    assert 0.6 < dpo_ev["heldout_pair_accuracy_after"] <= 1.0, dpo_ev
    assert os.path.exists(os.path.join(workdir, "dpo", "reference", "manifest.json"))
    assert os.path.exists(os.path.join(workdir, "tokenizer", "meta.json"))
    built = sft_ev["data"]["skipped_when_built"]  # the malformed line, counted with its place
    assert sum(built["counts"].values()) == 1
    assert any(p.endswith("sft.jsonl:5") for ps in built["places"].values() for p in ps), built
    capsys.readouterr()
    assert llama_sft_dpo.main(argv) == 0  # rerun: both stages finished, nothing trains
    assert "step " not in capsys.readouterr().out.replace("steps", "")
