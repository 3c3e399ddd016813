"""benchmarks.grpo: its --tiny run writes the table and the JSON it renders from.

No timing is asserted (the machine is shared). What is checked is what the
figures rest on: each model's iteration is split into the step's own sample /
verify / update seconds, which add up to the iteration's wall time within what
the report claims; the verify phase holds the verifier's time (a verifier that
sleeps a known time per completion); every figure carries its spread over the
timed iterations, with no compile among them; the report names the machine,
its load at start and end, the jax version, the date and, at its top, the
command that measures again; and it renders again from the JSON alone.
"""

import datetime
import json
import time

import jax
import pytest

from benchmarks import grpo as bench

SLEEP_S = 0.02  # per completion scored


def sleepy_verifier(prompt, completion, record):
    """Sleeps SLEEP_S, then the parity of the completion's length."""
    time.sleep(SLEEP_S)
    return float(len(completion) % 2)


VERIFIER = "tests.test_benchmark_grpo:sleepy_verifier"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "GRPO_RESULTS.md"
    rc = bench.main(["--tiny", "--verifier", VERIFIER, "--out", str(out)])
    return rc, out, json.loads(out.with_suffix(".json").read_text())


def test_the_split_adds_up_to_each_iteration_as_claimed(run):
    rc, out, data = run
    assert rc == 0
    g = data["grpo"]
    rows = g["prompts"] * g["group_size"]
    assert set(data["models"]) == set(bench.MODELS)
    for name, m in data["models"].items():
        assert len(m["iterations"]) == bench.TINY_ITERATIONS and m["compiles_in_timed_calls"] == 0
        for it in m["iterations"]:
            phases = it["sample"] + it["verify"] + it["update"]
            assert it["other"] == pytest.approx(it["wall"] - phases, abs=1e-12)
            # The report's claim, computed here from the constants it prints.
            assert abs(it["wall"] - phases) <= max(bench.SPLIT_REL * it["wall"], bench.SPLIT_ABS_S), (name, it)
            # The verify phase is where the verifier's time goes: one sleep per completion.
            assert rows * SLEEP_S <= it["verify"] < it["wall"], (name, it)
            assert it["sample"] > 0 and it["update"] > 0
            assert it["sampler_tokens_per_s"] == pytest.approx(rows * g["max_new_tokens"] / it["sample"])
        for key, s in m["stats"].items():
            assert s["n"] == bench.TINY_ITERATIONS and s["min"] <= s["median"] <= s["max"], (name, key)
    md = out.read_text()
    claim = (f"within the larger of {100 * bench.SPLIT_REL:g}% and {1000 * bench.SPLIT_ABS_S:g} ms in "
             f"{2 * bench.TINY_ITERATIONS} of the {2 * bench.TINY_ITERATIONS} timed iterations")
    assert claim in md


def test_the_table_names_the_machine_the_command_and_every_model(run):
    _, out, data = run
    md = out.read_text()
    # The command that measures again, first thing after the title line.
    head, command, _ = md.split("```", 2)
    assert head.count("\n\n") == 2 and command.strip() == data["command"]
    assert "-m benchmarks.grpo --tiny" in data["command"]
    m = data["machine"]
    assert m["cpu_model"] in md and f"{m['cores']} cores" in md
    assert len(m["loadavg_start"]) == len(data["loadavg_end"]) == 3
    for loads in (m["loadavg_start"], data["loadavg_end"]):
        assert "(" + ", ".join(f"{v:.2f}" for v in loads) + ")" in md
    assert data["versions"]["jax"] == jax.__version__ and f"jax {jax.__version__}" in md
    assert datetime.datetime.fromisoformat(data["date"]).tzinfo is not None and data["date"] in md
    assert f"`{VERIFIER}`" in md
    split, sampler = md.split("## The iteration")[1].split("## The sampler")
    for name in bench.MODELS:
        assert split.count(f"| {name} | {bench.TINY_ITERATIONS} |") == 1
        assert sampler.count(f"| {name} | {data['models'][name]['rows_per_iteration']} x 4 |") == 1


def test_the_table_renders_again_from_the_json_alone(run, tmp_path):
    _, out, _ = run
    again = tmp_path / "GRPO_RESULTS.md"
    assert bench.main(["--report-only", str(out.with_suffix(".json")), "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()
