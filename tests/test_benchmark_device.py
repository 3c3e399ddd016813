"""benchmarks.device: its --tiny dry run on the CPU writes the table and the JSON.

No timing is asserted (the machine is shared); what is checked is the shape of
the report, that cuDNN rows on a CPU say "not available" instead of carrying a
number, and that the FLOP count and the MFU computed from it agree with a
count done by hand for the tiny models.
"""

import itertools
import json
import math

import pytest

from benchmarks import device

# Both architectures the benchmark covers: GPT-2 (GELU, learned positions, biases)
# and Llama (SwiGLU, RoPE, GQA). gpt2_medium at tiny size is the same model as gpt2,
# and each model costs two train-step compiles; leaving it out keeps the test short.
MODELS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "device.md"
    rc = device.main(["--tiny", "--models", ",".join(MODELS), "--out", str(out)])
    return rc, out.read_text(), json.loads(out.with_suffix(".json").read_text())


def table_rows(md: str, section: str) -> list[list[str]]:
    """The body rows of the markdown table under `## section...`, split into cells."""
    lines = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| ---")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows[1:]]  # rows[0]: the header


def hand_count(mlp_matrices: int) -> int:
    """Model FLOPs of one tiny train step (batch 2 x seq 32), by hand: preset("tiny")
    has vocab 256, d_model 64, 2 layers, 4 query heads and 2 KV heads of 16, d_ff 128."""
    q, k, v, o = 64 * 64, 64 * 32, 64 * 32, 64 * 64
    mlp = mlp_matrices * 64 * 128  # GELU: up, down; SwiGLU: up, gate, down
    head = 64 * 256  # the tied embedding as the LM head
    n = 2 * (q + k + v + o + mlp) + head
    tokens = 2 * 32
    return 6 * n * tokens + 12 * 2 * 32 * 64 * tokens  # 6N + 12 L T d_model per token


def test_the_dry_run_writes_one_row_per_configuration(run):
    rc, md, data = run
    assert rc == 0
    want = set(itertools.product(MODELS, device.ATTENTIONS, device.REMATS))
    assert len(data["train"]) == len(want)
    assert {(r["model"], r["attention"], r["remat"]) for r in data["train"]} == want
    md_rows = table_rows(md, "Train step")
    assert {(c[0], c[2], c[3]) for c in md_rows} == want and len(md_rows) == len(want)
    assert [r["model"] for r in data["sampler"]] == list(MODELS)
    assert [c[0] for c in table_rows(md, "KV-cache sampler")] == list(MODELS)
    assert "python -m benchmarks.device --tiny" in md and data["device"]["device_kind"] in md


def test_cudnn_rows_on_a_cpu_say_not_available_and_carry_no_number(run):
    _, md, data = run
    for r in data["train"]:
        if r["attention"] == "cudnn":
            assert r["status"] == "n/a" and "not available" in r["note"]
            assert "tokens_per_s" not in r and "mfu_measured_peak" not in r
    for c in table_rows(md, "Train step"):
        if c[2] == "cudnn":
            assert c[5] == "not available" and c[7] == c[8] == "—" and "not available" in c[-1]


def test_xla_rows_ran_with_positive_throughput_and_same_first_loss_for_both_remats(run):
    _, _, data = run
    xla = [r for r in data["train"] if r["attention"] == "xla"]
    for r in xla:
        assert r["status"] == "ok", r.get("note")
        assert r["tokens_per_s"]["min"] > 0 and r["compile_s"] > 0
        assert r["cudnn_fmha_calls"] == {"forward": 0, "backward": 0}
        assert r["memory"]["temp"] > 0
    for m in MODELS:  # every configuration starts from the same weights; remat does not change the math
        none, dots = (next(r for r in xla if r["model"] == m and r["remat"] == k) for k in ("none", "dots"))
        assert none["loss_step1"] == pytest.approx(dots["loss_step1"], rel=1e-5)
    for r in data["sampler"]:
        assert r["status"] == "ok", r.get("note")
        assert r["tokens_per_s"]["min"] > 0


def test_flops_and_mfu_agree_with_a_hand_count(run):
    _, _, data = run
    peak = data["matmul"]["peak_flops_per_s"]
    assert peak > 0 and data["published_peak_flops_per_s"] is None  # no published peak for a CPU
    for r in data["train"]:
        if r["status"] != "ok":
            continue
        flops = hand_count(3 if r["model"] == "llama" else 2)
        assert r["flops"]["total_flops"] == flops
        median_s = r["step_s"]["median"]
        assert r["mfu_measured_peak"] == pytest.approx(flops / median_s / peak, rel=1e-9)
        assert r["mfu_published_peak"] is None
        assert math.isfinite(r["loss_step1"])


def test_without_an_accelerator_it_refuses_in_one_line(capsys):
    assert device.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no accelerator" in err and "--tiny" in err


def test_cudnn_custom_calls_are_counted_from_hlo_text():
    hlo = ('%a = (bf16[2,8,1024,64]) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"\n'
           '%b = (bf16[2,8,1024,64]) custom-call(%q, %k, %v, %o), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n'
           '%c = f32[8] custom-call(%x), custom_call_target="__cudnn$fusion"\n')
    assert device.cudnn_fmha_calls(hlo) == {"forward": 1, "backward": 1}
    assert device.cudnn_fmha_calls("%d = bf16[8,8] dot(%x, %y)") == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.05), ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0), ("cpu", None)])
def test_published_peak_is_looked_up_by_device_kind(kind, tflops):
    peak, source = device.published_peak(kind)
    assert (peak is None and tflops is None) or peak == pytest.approx(tflops * 1e12)
    assert source


def test_the_budget_keeps_time_for_more_important_configurations():
    jobs = device.make_jobs(["gpt2", "llama"], "gpu")
    assert [j.priority for j in jobs if j.model == "gpt2"] == [0, 2, 3, 3, 1]  # cudnn/none first, sampler 1
    est = device.Estimator(989.4e12, tiny=False)
    # gpt2's remat row (priority 3) must leave room for every later row of priority 0-2
    i = next(i for i, j in enumerate(jobs) if j.model == "gpt2" and j.remat == "dots")
    own, later = est.job_s(jobs[i]), sum(est.job_s(j) for j in jobs[i + 1:] if j.priority < 3)
    ok, estimate, reserve = device.fits_budget(i, jobs, est, elapsed=0.0, budget=own + later)
    assert ok and estimate == own and reserve == pytest.approx(later)
    assert not device.fits_budget(i, jobs, est, elapsed=1.0, budget=own + later)[0]
    # a priority-0 row sets nothing aside
    first_llama = next(i for i, j in enumerate(jobs) if j.model == "llama")
    assert device.fits_budget(first_llama, jobs, est, 0.0, est.job_s(jobs[first_llama]))[0]
    # compile guesses follow what was measured: twice the guess for gpt2 doubles llama's guess
    before = est.compile_s("train", "llama")
    est.record_compile("train", "gpt2", 2 * device.COMPILE_GUESS_S["gpt2"])
    assert est.compile_s("train", "llama") == pytest.approx(2 * before)


def test_out_of_memory_is_recorded_as_oom_other_errors_by_name():
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB\nmore")
    assert device.failure(oom)["status"] == "OOM" and "81.2GiB" in device.failure(oom)["note"]
    other = device.failure(ValueError("cuDNN does not support head dim 80"))
    assert other["status"] == "error" and "ValueError" in other["note"]
