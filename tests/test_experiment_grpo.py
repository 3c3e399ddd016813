"""experiments.grpo end to end on tiny settings: the built-in tasks with their
scorers, and a user's JSONL with a `module:function` verifier and held-out records."""

import json

import pytest

from experiments import grpo as experiment
from llm_jax.errors import ConfigError

TINY = ["--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.num_layers=1",
        "--set", "model.num_heads=2", "--set", "grpo.train.steps=2", "--set", "grpo.train.log_every=1",
        "--set", "grpo.prompts=8", "--set", "grpo.group_size=2", "--set", "grpo.max_new_tokens=4"]


def test_builtin_tasks_smoke(tmp_path):
    args = ["--workdir", str(tmp_path), *TINY, "--set", "builtin_prompts=50", "--set", "eval_per_task=1",
            "--set", 'tasks=["add", "reverse"]']
    assert experiment.main(args) == 0
    result = json.loads((tmp_path / "grpo" / "eval.json").read_text())
    assert set(result["by_task_before"]) == set(result["by_task_after"]) == {"add", "reverse"}
    assert 0.0 <= result["instruction_accuracy_after"] <= 1.0
    assert json.loads((tmp_path / "grpo" / "config.json").read_text())["verifier"] == "builtin"
    assert len((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()) == 2


def test_jsonl_with_a_user_verifier_and_heldout_records(tmp_path):
    data, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {c}.", "answer": c}) + "\n" for c in "abcd")
                    + "not json\n")
    heldout.write_text("".join(json.dumps({"prompt": f"Say {c}.", "answer": c}) + "\n" for c in "ef"))
    args = ["--workdir", str(tmp_path / "run"), *TINY, "--set", f"data=jsonl:{data}",
            "--set", "verifier=tests.grpo_verifiers:answer_share", "--set", f"heldout=jsonl:{heldout}",
            "--set", "eval_max_new_tokens=4"]
    assert experiment.main(args) == 0
    result = json.loads((tmp_path / "run" / "grpo" / "eval.json").read_text())
    assert {"heldout_reward_before", "heldout_reward_after", "heldout_accuracy_after"} <= set(result)
    assert result["preflight"] == {"verifier": "tests.grpo_verifiers:answer_share", "records": 4}

    with pytest.raises(ConfigError, match="does not import"):
        experiment.main(["--workdir", str(tmp_path / "bad"), *TINY, "--set", f"data=jsonl:{data}",
                         "--set", "verifier=no_such_module_xyz:score"])
    assert not (tmp_path / "bad").exists()  # before anything is written
