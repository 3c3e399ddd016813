"""benchmarks.sft_demos at tiny settings: SFT runs of 1 and 2 steps from a tiny SFT stage.

Checked: each step count trained that many steps in its own stage directory, from
the SFT stage's weights (near them after a step or two, far from another random
start), on the task's instructions, and was judged on every task; the
demonstrations are what each stage's loader counted and grow with the steps; the
SFT stage directory is left as it was; the report has the start and one row per
step count and re-renders from its JSON byte for byte; bad arguments stop before
anything trains. No number of the tiny run means anything and none is asserted.
"""

import hashlib
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from benchmarks import sft_demos as bench
from llm_jax import sharding
from llm_jax.config import MeshConfig
from llm_jax.data import builtin
from llm_jax.stages import runner

TESTS = pathlib.Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
import tiny_sft  # noqa: E402

TINY = tiny_sft.TINY


def tree_hash(path: str) -> str:
    """A hash of every file under `path` (names and bytes)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            h.update(os.path.relpath(os.path.join(root, name), path).encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(params)])


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A tiny model's SFT stage (a few steps: only its weights and layout matter), with the
    run's tokenizer beside it, as the main job leaves them."""
    return tiny_sft.sft_stage(str(tmp_path_factory.mktemp("run")), steps=5, records=100)


@pytest.fixture(scope="module")
def run(sft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "DEMOS.md"
    before = tree_hash(sft_dir)
    assert bench.main(["--sft", sft_dir, "--steps", "1,2", "--eval-per-task", "1", "--out", str(out)]) == 0
    with open(bench.common.json_beside(str(out))) as f:
        results = json.load(f)
    return {"out": str(out), "results": results, "hash_before": before}


def test_each_step_count_trained_its_steps_from_the_sft_weights_on_the_task(run, sft_dir):
    r = run["results"]
    mesh = sharding.make_mesh(MeshConfig())
    like = runner.model_like(TINY, mesh)
    start = flat(runner.stage_params(os.path.dirname(sft_dir), "sft", like))
    elsewhere = np.linalg.norm(flat(runner.fresh_params(TINY, mesh, 1)) - start)
    assert list(r["runs"]) == ["1", "2"]
    for n, x in r["runs"].items():
        stage_dir = os.path.join(r["workdir"], f"sft_{n}")
        with open(os.path.join(stage_dir, "eval.json")) as f:
            done = json.load(f)
        with open(os.path.join(stage_dir, "config.json")) as f:
            config = json.load(f)
        assert done["steps"] == x["steps"] == int(n)
        assert config["data"]["source"] == "builtin:sft/add"
        assert x["demonstrations"] == done["data"]["records_used"] > 0
        moved = np.linalg.norm(flat(runner.stage_params(r["workdir"], f"sft_{n}", like)) - start)
        assert 0 < moved < elsewhere / 10, (n, moved, elsewhere)
        assert set(x["by_task"]) == set(builtin.TASKS)
    assert r["runs"]["2"]["demonstrations"] > r["runs"]["1"]["demonstrations"]
    assert set(r["start"]["by_task"]) == set(builtin.TASKS)


def test_the_sft_stage_is_only_read(run, sft_dir):
    assert tree_hash(sft_dir) == run["hash_before"]


def test_the_grpo_yardstick_is_the_main_jobs_stage(run):
    from experiments import pipeline
    cfg = pipeline.Config()
    g = run["results"]["grpo"]
    assert g["tasks"] == list(cfg.grpo_tasks) and "add" in g["tasks"]
    assert g["task_prompts"] == cfg.grpo.train.steps * cfg.grpo.prompts / len(cfg.grpo_tasks)
    assert g["task_prompts_at_most"] == g["task_prompts"] * (1 + cfg.grpo.max_refill_rounds)
    assert bench.grpo_prompts("format")["task_prompts"] == 0  # not a GRPO task of the main job


def test_report_has_the_start_and_a_row_per_step_count_and_rerenders(run, tmp_path):
    text = open(run["out"]).read()
    table = [line for line in text.splitlines() if line.startswith("| ") and "demonstrations" not in line]
    assert [line.split(" | ")[0] for line in table[:3]] == ["| 0 (the SFT model)", "| 1", "| 2"]
    again = tmp_path / "again.md"
    assert bench.main(["--report-only", bench.common.json_beside(run["out"]), "--out", str(again)]) == 0
    assert again.read_text() == text


@pytest.mark.parametrize("args, says", [
    (["--task", "ad"], "['ad']: not built-in instruction tasks"),
    (["--steps", "0"], "at least 1"),
    (["--steps", "4O"], "comma-separated integers"),
    (["--eval-per-task", "0"], "--eval-per-task 0: must be at least 1"),
])
def test_bad_arguments_stop_before_anything_trains(args, says, sft_dir, tmp_path, capsys):
    out = tmp_path / "x.md"
    with pytest.raises(SystemExit):
        bench.main(["--sft", sft_dir, "--out", str(out), *args])
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_sft_stage_or_a_used_workdir_is_an_error(sft_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sft", str(tmp_path / "nope"), "--out", str(tmp_path / "x.md")])
    assert "not a stage directory" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    with pytest.raises(SystemExit):
        bench.main(["--sft", sft_dir, "--workdir", str(tmp_path / "used"), "--out", str(tmp_path / "x.md")])
    assert "exists" in capsys.readouterr().err
