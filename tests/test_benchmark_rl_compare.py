"""benchmarks.rl_compare at tiny settings: every method from one tiny SFT stage.

A tiny model gets a short SFT stage (a real stage directory, read as the
benchmark reads the main job's), then the comparison runs every method for two
steps in this process (`run_here`; the SFT row also in its own process, as the
real run does every method). No timing is asserted. Checked: each method trained
from the SFT weights with its own algorithm and was judged on every task; every
method sampled the same number of completions and token positions, and the real
tokens counted from the logged metrics agree with tokens counted from samples
themselves (DPO's, and PPO's first rollout redone here); the DPO pairs are
(right, wrong) by the verifier and come from the shared prompts; the table has
one row per method. The verifier is a toy one whose rewards differ within most
groups (`flat_or_parity`), so a random model gets pairs and non-zero advantages.
"""

import dataclasses
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from benchmarks import rl_compare as bench
from llm_jax import generate, verifiers
from llm_jax.data import formats
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.stages import ppo

TESTS = pathlib.Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
import tiny_sft  # noqa: E402

TINY = tiny_sft.TINY
S = bench.Settings(steps=2, prompts=2, group_size=4, max_new_tokens=4, records=100,
                   verifier="tests.grpo_verifiers:flat_or_parity", eval_per_task=1, kl_per_task=1,
                   kl_max_new_tokens=8)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A tiny model's SFT stage with the run's tokenizer beside it: 150 steps on the built-in
    instructions, whose answers are short, so that its samples end with an eos after 1 to 4
    tokens, not always at the budget (the token counts below would not tell an eos apart)."""
    return tiny_sft.sft_stage(str(tmp_path_factory.mktemp("run")), steps=150, records=200)


@pytest.fixture(scope="module")
def results(sft_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("compare") / "work"
    r = bench.measure(sft_dir, str(work), S, run=bench.run_here, progress=lambda _: None)
    r["command"] = "python -m benchmarks.rl_compare (the test's settings)"
    return r


def trained(results) -> dict:
    return {k: v for k, v in results["methods"].items() if k != bench.REFERENCE}


def test_each_method_trained_from_the_sft_model_with_its_own_algorithm_and_was_judged(results, sft_dir):
    assert list(results["methods"]) == [bench.REFERENCE, *bench.METHODS]
    work = results["workdir"]
    _, sft_params, _ = bench.load_sft(sft_dir)
    for name, x in results["methods"].items():
        assert "error" not in x, (name, x.get("error"))
        e = x["evaluation"]
        assert set(e["by_task"]) == set(bench.ALL_TASKS) and 0.0 <= e["accuracy"] <= 1.0, name
        if name == bench.REFERENCE:
            continue
        done = json.loads(open(os.path.join(work, name, "eval.json")).read())
        assert done["steps"] == S.steps, name
        with open(os.path.join(work, name, "metrics.jsonl")) as f:
            assert sum("loss" in json.loads(line) for line in f) == S.steps, name
        assert isinstance(e["kl_to_sft"], float) and 0.0 <= e["win_rate"] <= 1.0, name
        # Judged on the trained policy: the SFT model against itself has a KL of exactly 0 (the
        # same samples and log-probs); the policy after two updates has not.
        assert e["kl_to_sft"] != 0.0, name
        # Trained: the final policy is not the SFT model it started from.
        final = generate.load_stage(work, name)[1]
        moved = max(float(np.max(np.abs(np.asarray(a) - b)))
                    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(sft_params)))
        assert moved > 0, name
    config = {name: json.loads(open(os.path.join(work, name, "config.json")).read()) for name in bench.METHODS}
    for name in bench.GRPO_METHODS:  # each its own algorithm, not the same one four times
        assert config[name]["algorithm"] == name and config[name]["dynamic_sampling"] is False
        assert config[name]["prompts"] == S.prompts and config[name]["group_size"] == S.group_size
    assert config["ppo"]["ppo"]["rollout_batch"] == S.rows
    assert config["ppo"]["value_model"] == "the SFT model with a fresh scalar head"
    # Every win rate sampled the SFT model on the same prompts with the same keys.
    assert len({x["evaluation"]["sampled_accuracy_sft"] for x in trained(results).values()}) == 1


def test_every_method_sampled_the_same_budget_counted_from_its_own_run(results, sft_dir):
    sampled = {name: x["sampled"] for name, x in trained(results).items()}
    for name, c in sampled.items():
        assert c["completions"] == S.steps * S.rows, name
        assert c["token_slots"] == c["completions"] * S.max_new_tokens, name
        assert len(c["tokens_by_step"]) == S.steps and c["tokens"] == sum(c["tokens_by_step"]), name
        # Some completions stopped at an eos, some ran to the budget: the counts can tell.
        assert S.rows < c["tokens"] < c["token_slots"], name
    # Step 0 of every GRPO-family run sampled what DPO's sampling of the SFT model did (same
    # weights, prompts and keys): the count from the logged metrics equals the count of the
    # sampled arrays themselves.
    assert {sampled[name]["tokens_by_step"][0] for name in (*bench.GRPO_METHODS, "dpo")} == \
        {sampled["dpo"]["tokens_by_step"][0]}
    # PPO's first rollout, redone here from the SFT weights on the shared stream's first
    # prompts (each repeated group_size times) with the stage's key: its real tokens are
    # what PPO's metrics say it sampled.
    cfg, params, tok = bench.load_sft(sft_dir)
    p = bench.stage_configs(S)["ppo"]
    batch = next(bench.RepeatedPrompts(bench.prompt_loader(bench.training_records(S), tok, S), S.group_size))
    rng = jax.random.split(jax.random.PRNGKey(p.train.seed))[1]  # as ppo.create_ppo_state
    rollout = ppo.rollout(cfg, p.ppo, params, batch["tokens"], batch["mask"], ppo.iteration_keys(rng, 0)[0],
                          eos_id=tok.eos_id, pad_id=tok.pad_id)
    assert int(np.sum(rollout["weights"])) == sampled["ppo"]["tokens_by_step"][0]


def test_the_dpo_pairs_are_right_and_wrong_by_the_verifier_and_from_the_shared_prompts(results):
    d = results["methods"]["dpo"]
    with open(d["pairs_file"]) as f:
        pairs = [json.loads(line) for line in f]
    assert len(pairs) == d["sampled"]["pairs"] >= 1
    assert d["sampled"]["pairs"] + sum(d["sampled"]["groups_without_pair"].values()) == S.steps * S.prompts
    fn = verifiers.load_verifier(S.verifier)
    threshold = verifiers.success_threshold(fn)
    records = bench.training_records(S)
    tok = ByteTokenizer()
    loader = bench.prompt_loader(records, tok, S)
    shared = {records[int(i)]["prompt"] for _ in range(S.steps) for i in next(loader)["index"]}
    for p in pairs:
        record = records[p["record"]]
        assert p["prompt"] == record["prompt"] and p["prompt"] in shared
        assert fn(p["prompt"], p["chosen"], record) >= threshold, p
        assert fn(p["prompt"], p["rejected"], record) < threshold, p
        assert p["chosen"].strip() and p["rejected"].strip(), p


def test_pair_up_with_the_builtin_verifier():
    records = verifiers.builtin_records(5, 0, "train", ("add", "copy", "sort"))
    answers = [r["answer"] for r in records]
    groups = [  # (record, its group's completions)
        (0, ["no idea", answers[0], "also wrong"]),  # a pair: the right one and the first wrong one
        (1, [answers[1]] * 3),  # all right
        (2, ["x", "y", "z"]),  # all wrong
        (3, ["", " ", answers[3]]),  # the wrong ones are blank
        (4, ["", answers[4], "zzz"]),  # the blank wrong one passed over
    ]
    index = [i for i, texts in groups for _ in texts]
    texts = [t for _, ts in groups for t in ts]
    rewards = verifiers.rewards(verifiers.builtin_verifier, "builtin", records, index, texts)
    pairs, none = bench.pair_up(records, index, texts, rewards, 3, 1.0)
    assert [(p["record"], p["chosen"], p["rejected"]) for p in pairs] == [(0, answers[0], "no idea"),
                                                                          (4, answers[4], "zzz")]
    assert none == {"all right": 1, "all wrong": 1, "blank text": 1}
    assert all(p["chosen_reward"] == 1.0 and p["rejected_reward"] == 0.0 for p in pairs)


def test_ppo_scores_each_row_by_its_own_prompt_with_the_verifier():
    tok = ByteTokenizer()
    records = verifiers.builtin_records(4, 1, "train", ("add", "copy", "sort"))
    N = 12
    prompts = [formats.prompt_tokens(tok, r["prompt"]) for r in records]
    width = max(map(len, prompts))
    replies = [records[0]["answer"], "wrong", records[2]["answer"], records[0]["answer"]]  # the last: not its own
    tokens = np.full((4, width + N), tok.pad_id, np.int32)
    mask = np.zeros((4, width + N), np.float32)
    for i, (p, text) in enumerate(zip(prompts, replies)):
        reply = tok.encode(text) + [tok.eos_id]
        tokens[i, width - len(p):width] = p
        tokens[i, width:width + len(reply)] = reply
        mask[i, width:width + len(reply)] = 1.0
    want = [verifiers.builtin_verifier(r["prompt"], t, r) for r, t in zip(records, replies)]
    assert want == [1.0, 0.0, 1.0, 0.0]
    got = bench.program_scores(tok, records, "builtin", N)(tokens, mask)
    np.testing.assert_array_equal(got, want)
    # PPO's rollout batch: the GRPO batch's prompts, each repeated group_size times in a row.
    s = dataclasses.replace(S, prompts=4, group_size=3)
    grpo_batch = next(bench.prompt_loader(records, tok, s))
    ppo_batch = next(bench.RepeatedPrompts(bench.prompt_loader(records, tok, s), 3))
    np.testing.assert_array_equal(ppo_batch["tokens"], np.repeat(grpo_batch["tokens"], 3, axis=0))


def test_the_table_has_one_row_per_method_and_renders_from_the_json(results):
    md = bench.report(results)
    table = md.split("## Results\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header, rows = table[0], table[2:]
    assert [r.split("|")[1].strip() for r in rows] == [bench.REFERENCE, *bench.METHODS]
    assert all(r.count("|") == header.count("|") for r in rows)
    assert md == bench.report(json.loads(json.dumps(results, default=str)))  # --report-only gives the same
    for needle in (results["command"], "load average", f"jax {jax.__version__}", results["date"]):
        assert needle in md


def test_a_method_in_its_own_process_gives_what_it_gives_here(results, sft_dir, tmp_path):
    with open(tmp_path / "settings.json", "w") as f:
        json.dump({"sft": sft_dir, "settings": dataclasses.asdict(S)}, f)
    got = bench.run_worker(bench.REFERENCE, str(tmp_path), timeout=600)
    assert "error" not in got, got.get("error")
    want = results["methods"][bench.REFERENCE]["evaluation"]
    keys = ("accuracy", "by_task", "evaluated", "samples")  # the items it judged and what the model said
    assert {k: got["evaluation"][k] for k in keys} == {k: want[k] for k in keys}
    assert got["process_seconds"] > 0 and os.path.exists(got["log"])
