"""benchmarks.core: its --tiny run writes valid JSON and the table from it.

No timing is asserted (the machine is shared). What is checked is what the
figures rest on: every contender ran in a process of its own that imported
only its own framework (torch never in the parent), the two frameworks started
from the same weights (same loss at step 1), each figure carries its spread and
the machine it ran on, and the table can be rendered again from the JSON alone.
"""

import json
import sys

import pytest

from benchmarks import core


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("core") / "RESULTS.md"
    torch_before = "torch" in sys.modules
    rc = core.main(["--tiny", "--out", str(out)])
    return rc, out, json.loads((out.parent / "results.json").read_text()), torch_before


def test_the_tiny_run_writes_every_figure_with_its_spread_and_machine(run):
    rc, out, data, _ = run
    md = out.read_text()
    assert rc == 0 and "--tiny" in md
    assert set(data["contenders"]) == set(core.TINY_CONTENDERS)
    for name, c in data["contenders"].items():
        assert not c["errors"], c["errors"]
        assert len(c["runs"]) == data["args"]["rounds"] == 2
        for key in ("step_s", "tokens_per_s", "cpu_s"):
            assert c[key]["min"] <= c[key]["median"] <= c[key]["max"]
        assert md.count(f"| {name} | {c['what']} |") == 1
    assert {"cpu_model", "cores", "loadavg_start"} <= set(data["machine"])
    assert data["machine"]["cpu_model"] in md and data["versions"]["jax"] in md
    assert [q["contender"] for q in data["ratios"]] == ["jax"]
    assert "**" in md.split("## Ratios", 1)[1]
    assert [row["n"] for row in data["fsdp"]["rows"]] == [1, 2]
    assert data["hlo"]["hlo_flops"] > 0 and len(data["compile_time"]) == 2


def test_each_framework_is_timed_in_a_process_of_its_own(run):
    _, _, data, torch_before = run
    for c in data["contenders"].values():
        for r in c["runs"]:
            assert (r["jax_imported"], r["torch_imported"]) == (c["framework"] == "jax", c["framework"] == "torch")
    if not torch_before:  # another test module may have imported torch into this process already
        assert not data["torch_in_parent"] and "torch" not in sys.modules


def test_both_frameworks_start_from_the_same_weights(run):
    _, _, data, _ = run
    (jax_vs_torch,) = data["ratios"]
    assert jax_vs_torch["first_loss_abs_diff"] < 1e-4
    c = data["contenders"]
    # the projection biases start at zero, so without them the first loss is the same
    assert abs(c["torch_nobias"]["losses"][0] - c["jax"]["losses"][0]) < 1e-4


def test_the_table_renders_again_from_the_json_alone(run, tmp_path):
    _, out, _, _ = run
    again = tmp_path / "RESULTS.md"
    assert core.main(["--report-only", str(out.parent / "results.json"), "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()
