"""Ahead-of-time TPU compiles (llm_jax.aot) with the real TPU compiler on this CPU host.

Independent checks: the argument bytes of a TPU-aligned model against the
partitioning table's sharded bytes of the state and batch written here from
the model's shapes (plan.sharded_bytes); the compiled FLOPs of an unrolled model
against 6 * N * tokens / chips; each topology's chip count and device kind
against the topology's name; the LoRA step's outputs (its new state) against the
adapters' and Adam's bytes.

libtpu comes with `pip install -e ".[tpu]"`; without it these tests skip with
that command, except under CI (env var CI set), where a skip would hide them.
"""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from llm_jax import aot, cli, lora, model, plan, sharding, train
from llm_jax.config import ConfigError, MeshConfig, OptimizerConfig, preset
from llm_jax.stages.grpo import GRPOConfig
from llm_jax.stages.ppo import PPOConfig

from tpu_compiler import require_libtpu

require_libtpu(module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain", "mlm", "sft", "sft_kl", "rm", "dpo", "ppo", "generate", "grpo")
B, T = 8, 32
# PPO with one update per iteration: the same program, a shorter compile.
SMALL_PPO = PPOConfig(epochs=1, minibatches=1)
# Every dimension a multiple of the TPU's (8, 128) f32 tile per chip (fsdp 4 splits
# D = 512 into 128; q/k/v [L, D/4, 8 heads, 128]), so XLA's argument bytes carry almost no
# layout padding and can be compared with the sharded bytes (tiny's 16-wide heads are
# padded 8x). Unrolled: XLA's cost analysis counts a scanned layer once.
ALIGNED = preset("tiny", vocab_size=256, d_model=512, num_heads=8, num_kv_heads=8, head_dim=128, d_ff=512,
                 num_layers=2, max_len=64, scan_layers=False)
ALIGNED_T = 64


def settings(stage, **kw):
    cfg = preset("tiny", causal=False) if stage == "mlm" else preset("tiny")
    base = dict(stage=stage, topology="v5p:2x2x1", mesh=MeshConfig(1, 4, 1), batch_size=B, seq_len=T, model=cfg,
                ppo=SMALL_PPO, max_segments=4)
    return aot.AOTSettings(**{**base, **kw})


def check_contract(r, *, chips, kind, stage):
    """The JSON fields every result carries, and their arithmetic."""
    json.loads(json.dumps(r))  # JSON-ready
    assert (r["chips"], r["device_kind"], r["stage"]) == (chips, kind, stage)
    b = r["per_chip_bytes"]
    assert set(b) == {"arguments", "outputs", "temp", "alias", "total"}
    assert all(isinstance(v, int) and v >= 0 for v in b.values())
    assert b["total"] == b["arguments"] + b["outputs"] + b["temp"] - b["alias"]
    assert r["hbm_bytes"] == aot.chip_for_kind(kind).usable_hbm_bytes
    assert r["hbm_capacity_bytes"] == aot.chip_for_kind(kind).hbm_bytes
    assert r["fits"] == (b["total"] + r["resident_bytes"] <= r["hbm_bytes"]) and r["compile_error"] is None
    assert r["flops_per_chip"] > 0 and r["model_flops"] > 0 and r["compile_s"] > 0
    roof = r["roofline"]
    chip = aot.chip_for_kind(kind)
    flops = max(r["flops_per_chip"], r["model_flops"] / chips)
    assert roof["step_s_lower_bound"] >= flops / chip.peak_flops * (1 - 1e-9)
    assert roof["step_s_lower_bound"] >= r["bytes_accessed_per_chip"] / chip.hbm_bandwidth * (1 - 1e-9)
    assert 0 < roof["mfu_upper_bound"] <= 1.0
    if stage in ("generate", "ppo"):
        assert r["planned_total_bytes"] is None and r["planned_as"].startswith("not modelled")
    else:
        assert r["planned_total_bytes"] > 0


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_on_v5p_through_the_cli(stage, capsys):
    argv = ["--preset", "tiny", "--stage", stage, "--topology", "v5p:2x2x1", "--mesh", "1,4,1",
            "--batch-size", str(B), "--seq-len", str(T), "--set", "ppo.epochs=1", "--set", "ppo.minibatches=1",
            "--set", "max_segments=4"] + (["--set", "model.causal=false"] if stage == "mlm" else [])
    assert aot.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])  # the last line is the JSON object
    check_contract(r, chips=4, kind="TPU v5", stage=stage)
    assert r["topology"] == "v5p:2x2x1" and r["num_slices"] == 1
    assert out[0].startswith(f"tiny {stage} on v5p:2x2x1") and any("compile:" in line for line in out)
    if stage == "ppo":  # the frozen reference and reward model sit beside the update
        assert r["resident_bytes"] > 0
    if stage == "grpo":  # no KL penalty by default: no reference held; 8 prompts x 8 completions
        assert r["resident_bytes"] == 0 and "rows = 8 prompts x 8" in r["flops_formula"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_on_v6e(stage):
    r = aot.compile_stage(settings(stage, topology="v6e:2x2", mesh=MeshConfig(1, 2, 2)))
    check_contract(r, chips=4, kind="TPU v6 lite", stage=stage)
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_on_two_slices(stage):
    r = aot.compile_stage(settings(stage, num_slices=2, mesh=MeshConfig(2, 4, 1)))
    check_contract(r, chips=8, kind="TPU v5", stage=stage)
    assert r["num_slices"] == 2


def test_two_slice_mesh_puts_data_across_the_slices():
    _, devices = aot.topology_devices("v5p:2x2x1", num_slices=2)
    mesh = aot.make_mesh(MeshConfig(2, 2, 2), devices, 2, "v5p:2x2x1")
    slices = [[d.slice_index for d in mesh.devices[i].flat] for i in range(2)]
    assert slices == [[0] * 4, [1] * 4]  # data index i holds slice i's chips only


def test_known_topologies_are_what_libtpu_makes():
    """Every example the error message offers is a topology libtpu accepts, with one
    device per chip and the device kind the table maps to that generation."""
    for chip in aot.CHIPS.values():
        for name in chip.examples:
            got, devices = aot.topology_devices(name)
            assert got is chip, name
            assert len(devices) == math.prod(int(d) for d in name.split(":")[1].split("x")), name
            assert devices[0].device_kind == chip.device_kinds[0], name
    assert aot.topology_devices("v5litepod:2x2")[0] is aot.CHIPS["v5e"]


@pytest.fixture(scope="module")
def full_sft():
    return aot.compile_stage(settings("sft", model=ALIGNED, seq_len=ALIGNED_T))


def batch_bytes_per_chip():
    return 5 * (B // 4) * ALIGNED_T * 4  # inputs, targets, weights, positions, segment_ids: 4 bytes each


def test_arguments_are_the_sharded_state_and_batch_and_flops_are_per_chip(full_sft):
    """A full SFT step of the TPU-aligned model: XLA's argument bytes against the
    partitioning table's bytes of TrainState + batch, computed here from shapes; its
    FLOPs against 6 N tokens / chips."""
    tx, _ = train.make_optimizer(OptimizerConfig(), 1000)

    def init(rng):
        p = model.init(ALIGNED, rng)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=rng)

    state = jax.eval_shape(init, jax.random.PRNGKey(0))
    want = plan.sharded_bytes(state, plan.abstract_mesh(1, 4, 1)) + batch_bytes_per_chip()
    got = full_sft["per_chip_bytes"]["arguments"]
    assert want <= got <= 1.005 * want, (got, want)  # layout padding of the [L, D] norm scales only
    # Tied embeddings: every parameter is a matmul weight (the embedding is the LM head).
    n = sum(x.size for x in jax.tree.leaves(state.params))
    tokens = B * ALIGNED_T
    ratio = full_sft["flops_per_chip"] / (6 * n * tokens / 4)
    assert 1.0 <= ratio < 1.1, ratio  # + attention's T^2 terms and the elementwise work: per chip, not global
    assert full_sft["model_flops"] == 6 * n * tokens
    # Without loops, the traced matmul FLOPs (split over the chips) are XLA's count
    # less its elementwise work.
    traced = full_sft["traced_flops"] / 4
    assert 0.97 < traced / full_sft["flops_per_chip"] <= 1.0


def test_traced_flops_count_what_xla_counts_once():
    """Scanned layers and microbatches: XLA's count covers one loop body (here about
    half, 2 layers / 2 microbatches); the traced count stays the unrolled one. Remat
    recomputes the forward: 8 N per token instead of 6 N, in both counts."""
    scanned = aot.compile_stage(settings("sft", model=dataclasses.replace(ALIGNED, scan_layers=True),
                                         seq_len=ALIGNED_T, microbatches=2))
    remat = aot.compile_stage(settings("sft", model=dataclasses.replace(ALIGNED, remat="full"), seq_len=ALIGNED_T))
    n = aot.matmul_params(ALIGNED)
    plain = 6 * n * B * ALIGNED_T
    assert scanned["traced_flops"] >= plain and scanned["flops_per_chip"] < 0.6 * scanned["traced_flops"] / 4
    assert 0.97 < remat["traced_flops"] / 4 / remat["flops_per_chip"] <= 1.0
    assert 1.25 < remat["traced_flops"] / scanned["traced_flops"] < 8 / 6 * 1.05


def test_lora_step_holds_the_base_once_and_trains_only_adapters(full_sft):
    lcfg = lora.LoRAConfig(rank=8, targets=("q", "v"))
    adapted = aot.compile_stage(settings("sft", model=ALIGNED, seq_len=ALIGNED_T, lora=lcfg))
    mesh = plan.abstract_mesh(1, 4, 1)
    base = jax.eval_shape(lambda r: model.init(ALIGNED, r), jax.random.PRNGKey(0))
    adapters = jax.eval_shape(lambda r: lora.init_adapters(lcfg, ALIGNED, r), jax.random.PRNGKey(0))
    a, f = adapted["per_chip_bytes"], full_sft["per_chip_bytes"]
    # Arguments: the frozen base (no Adam moments for it) + adapters and their two moments + batch.
    want = plan.sharded_bytes(base, mesh) + 3 * plan.sharded_bytes(adapters, mesh) + batch_bytes_per_chip()
    assert want <= a["arguments"] <= 1.01 * want, (a["arguments"], want)
    assert a["arguments"] < 0.4 * f["arguments"]  # full: params + 2 moments
    # Outputs are the new state: adapters and their two moments (+ step, rng, metrics), no base.
    adapter_state = 3 * plan.sharded_bytes(adapters, mesh)
    assert adapter_state <= a["outputs"] <= 1.02 * adapter_state, (a["outputs"], adapter_state)
    assert a["outputs"] < 0.05 * f["outputs"]
    assert adapted["planned_total_bytes"] is None and "LoRA" in adapted["flops_formula"]


# A GRPO update of the aligned model on rows of a 128-token prompt + 128 new tokens:
# every per-chip array of the rollout is a whole number of (8, 128) tiles.
GRPO_MODEL = dataclasses.replace(ALIGNED, max_len=256)
GRPO_T, GRPO_N = 256, 128


def grpo_settings(**grpo):
    return settings("grpo", model=GRPO_MODEL, seq_len=GRPO_T, max_new_tokens=GRPO_N, grpo=GRPOConfig(**grpo))


def test_grpo_update_arguments_are_the_state_and_the_sampled_rows():
    """The GRPO update's arguments against the sharded TrainState and the rows of
    B prompts x G completions written here from shapes; with several optimizer steps
    and a KL penalty the scored log-probs come with the rows and the reference sits
    beside the step; each pass over the batch counts in the traced and model FLOPs
    but once in XLA's (a loop body)."""
    G = 4  # 32 rows: 8 per chip, one sublane tile
    rows_per_chip = B * G // 4

    def rollout_bytes(scored):
        # tokens, positions, segment_ids [T] int32; response [N] int32, weights [N] float32,
        # + the scored log-probs [N] float32; the reward of each row (float32).
        return rows_per_chip * 4 * (3 * GRPO_T + (2 + scored) * GRPO_N + 1)

    tx, _ = train.make_optimizer(OptimizerConfig(), 1000)

    def init(rng):
        p = model.init(GRPO_MODEL, rng)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=rng)

    state = jax.eval_shape(init, jax.random.PRNGKey(0))
    mesh = plan.abstract_mesh(1, 4, 1)
    state_bytes = plan.sharded_bytes(state, mesh)
    n = sum(x.size for x in jax.tree.leaves(state.params))  # tied: every weight is a matmul weight

    one = aot.compile_stage(grpo_settings(group_size=G))
    want = state_bytes + rollout_bytes(0) + 8  # + the shuffle key
    got = one["per_chip_bytes"]["arguments"]
    assert want <= got <= 1.005 * want, (got, want)  # layout padding of the [L, D] norm scales and [rows] rewards
    assert one["resident_bytes"] == 0
    assert one["model_flops"] == 6 * n * B * G * GRPO_T
    # One pass, no loop to miss: the traced matmuls are XLA's count less its elementwise
    # work. The LM head reads only the response's states (ppo.action_logits), so both
    # counts fall a little below 6 N per token.
    assert 0.97 < one["traced_flops"] / 4 / one["flops_per_chip"] <= 1.0
    assert 0.97 < one["traced_flops"] / one["model_flops"] <= 1.0

    two = aot.compile_stage(grpo_settings(group_size=G, updates=2, kl_coef=0.1))
    want = state_bytes + rollout_bytes(2) + 8
    got = two["per_chip_bytes"]["arguments"]
    assert want <= got <= 1.005 * want, (got, want)
    assert two["resident_bytes"] == plan.sharded_bytes(state.params, mesh)  # the frozen reference
    assert two["model_flops"] == 2 * one["model_flops"]
    assert two["traced_flops"] == pytest.approx(2 * one["traced_flops"], rel=1e-3)
    assert two["flops_per_chip"] == pytest.approx(one["flops_per_chip"], rel=0.02)  # the scan's body once


def test_fits_follows_the_chip_hbm(monkeypatch):
    r = aot.compile_stage(settings("generate"))
    assert r["fits"] and r["hbm_bytes"] == int(95.74 * 1024 ** 3)
    small = dataclasses.replace(aot.CHIPS["v5p"], usable_hbm_bytes=r["per_chip_bytes"]["total"] - 1)
    monkeypatch.setitem(aot.CHIPS, "v5p", small)
    r = aot.compile_stage(settings("generate"))
    assert not r["fits"] and r["hbm_bytes"] == small.usable_hbm_bytes
    assert "does NOT fit" in aot.format_table(r, settings("generate"))


def test_a_step_the_compiler_refuses_is_a_result(capsys):
    """The TPU compiler refuses a program whose temporaries exceed HBM (f32 logits of
    1024 x 64 x 65536 = 17 GB on one v5e chip): fits false, its message kept, exit 1.
    The HBM it says is available is the table's usable figure."""
    code = aot.main(["--preset", "tiny", "--stage", "pretrain", "--topology", "v5e:1x1", "--mesh", "1,1,1",
                     "--batch-size", "1024", "--seq-len", "64", "--set", "model.vocab_size=65536"])
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    assert code == 1 and not r["fits"] and r["per_chip_bytes"] is None and r["flops_per_chip"] is None
    assert r["compile_error"].startswith("RESOURCE_EXHAUSTED")
    available = float(re.search(r"available HBM \(([\d.]+)G\)", r["compile_error"]).group(1))
    assert available * 1024 ** 3 == pytest.approx(r["hbm_bytes"], rel=1e-3) and r["hbm_bytes"] < 16 * 1024 ** 3
    assert r["roofline"]["step_s_lower_bound"] > 0
    assert any("refused the step" in line for line in out)


# ---------------------------------------------------------------------------
# Errors: one line on stderr, exit 2, before anything is compiled


@pytest.fixture
def no_compile(monkeypatch):
    """Stage builders that fail the test if reached: the error must come first."""
    def reached(*_):
        raise AssertionError("a stage builder ran: the check did not come before compiling")
    monkeypatch.setattr(aot, "STAGES", {k: reached for k in aot.STAGES})


def run_cli(capsys, *args, preset_name="tiny", stage="pretrain", topology="v5p:2x2x1", mesh="1,4,1",
            batch=str(B), seq=str(T)):
    argv = ["--preset", preset_name, "--stage", stage, "--topology", topology, "--mesh", mesh,
            "--batch-size", batch, "--seq-len", seq, *args]
    code = cli.run(lambda: aot.main(argv))  # as `python -m llm_jax.aot` runs it
    captured = capsys.readouterr()
    return code, captured.err.strip()


def test_unknown_topology_lists_the_known_ones(capsys, no_compile):
    code, err = run_cli(capsys, topology="v9x:2x2")
    assert code == 2 and err.startswith("error: --topology 'v9x:2x2': unknown TPU topology")
    for name in ("v4:2x2x1", "v5e:2x2", "v5litepod", "v5p:2x2x1", "v6e:2x2"):
        assert name in err
    assert len(err.splitlines()) == 1
    code, err = run_cli(capsys, topology="v5p:3x3x3")  # the name is known, the shape is not
    assert code == 2 and "libtpu cannot make it" in err and "v5p:2x2x1" in err


def test_mesh_that_does_not_cover_the_slice_fails_before_compiling(capsys, no_compile):
    code, err = run_cli(capsys, mesh="1,2,1")
    assert code == 2 and "2 chips, but v5p:2x2x1 x 1 slice(s) has 4 x 1 = 4" in err
    code, err = run_cli(capsys, "--num-slices", "2", mesh="1,4,1")
    assert code == 2 and "has 4 x 2 = 8" in err
    code, err = run_cli(capsys, "--num-slices", "2", mesh="1,8,1")
    assert code == 2 and "data axis spans the slices" in err


def test_existing_sharding_checks_apply(capsys, no_compile):
    code, err = run_cli(capsys, mesh="1,1,4")  # tiny: 2 KV heads
    assert code == 2 and "model.num_kv_heads=2 is not divisible by mesh.tensor=4" in err


def test_batch_not_divisible(capsys):
    code, err = run_cli(capsys, batch="6")
    assert code == 2 and "cannot be split over data x fsdp = 4 devices" in err


def test_settings_errors_name_the_field(capsys, no_compile):
    code, err = run_cli(capsys, "--set", "model.nope=1")
    assert code == 2 and "no field 'nope' in ModelConfig" in err
    code, err = run_cli(capsys, "--set", "lora.rank=8")
    assert code == 2 and "LoRA applies to sft, sft_kl, rm, dpo" in err
    code, err = run_cli(capsys, stage="reinforce")
    assert code == 2 and "--stage 'reinforce'" in err and "grpo" in err
    code, err = run_cli(capsys, stage="mlm")
    assert code == 2 and "model.causal=True" in err
    code, err = run_cli(capsys, seq="128")
    assert code == 2 and "exceeds model.max_len=64" in err
    code, err = run_cli(capsys, "--set", "ppo.rollout_batch=64", stage="ppo")
    assert code == 2 and "ppo.rollout_batch" in err and "--batch-size" in err
    code, err = run_cli(capsys, "--set", "grpo.prompts=64", stage="grpo")
    assert code == 2 and "grpo.prompts" in err and "--batch-size" in err
    code, err = run_cli(capsys, "--set", "grpo.max_new_tokens=8", stage="grpo")
    assert code == 2 and "grpo.max_new_tokens" in err
    code, err = run_cli(capsys, "--set", "model.causal=false", stage="grpo")
    assert code == 2 and "stage grpo samples text" in err
    code, err = run_cli(capsys, "--set", "grpo.group_size=1", stage="grpo")
    assert code == 2 and "grpo.group_size=1" in err
    for mesh in ("1,4", "1,x,1"):
        code, err = run_cli(capsys, mesh=mesh)
        assert code == 2 and err == f"error: --mesh {mesh!r}: expected three sizes DATA,FSDP,TENSOR (one may be -1), e.g. 1,4,1"


def test_missing_tpu_compiler_says_how_to_install(capsys, monkeypatch, no_compile):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    code, err = run_cli(capsys)
    assert code == 2
    assert err == (f'error: the TPU compiler (libtpu) is not installed: pip install "jax[tpu]=={jax.__version__}" '
                   '(or pip install -e ".[tpu]" in this repository)')
    with pytest.raises(ConfigError):
        aot.require_tpu_compiler()


def test_command_line_is_quiet_and_ends_with_json():
    """A fresh process as a user starts it (no TPU_* variables, no JAX_PLATFORMS, so
    jax's default backend would probe for a TPU too, and libtpu prints its host
    warnings), while this process holds libtpu (its lockfile would refuse a second
    one): stderr stays empty, the JSON object is the last line. A LoRA stage: its
    settings check runs a PRNG op before any topology is made."""
    drop = ("ALLOW_MULTIPLE_LIBTPU_LOAD", "JAX_PLATFORMS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k not in drop}
    proc = subprocess.run([sys.executable, "-m", "llm_jax.aot", "--preset", "tiny", "--stage", "sft",
                           "--topology", "v6e:2x2", "--mesh", "1,4,1", "--batch-size", "4", "--seq-len", "32",
                           "--set", "lora.rank=4", "--set", 'lora.targets=["q","v"]'],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout.strip().splitlines()
    r = json.loads(out[-1])
    assert r["device_kind"] == "TPU v6 lite" and r["stage"] == "sft"
    assert "LoRA rank 4 on q,v" in out[0]
    assert r["model_flops"] == 4 * aot.matmul_params(preset("tiny")) * 4 * 32


def test_jaxpr_flops_counts_loops_branches_and_shards():
    x, y = jax.ShapeDtypeStruct((16, 32), jnp.float32), jax.ShapeDtypeStruct((32, 8), jnp.float32)
    mm = 2 * 16 * 32 * 8

    def flops(fn, *args):
        return aot.jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)

    assert flops(jnp.matmul, x, y) == mm
    assert flops(lambda a, b: jax.lax.scan(lambda c, _: (c, a @ b), 0.0, None, length=5)[1], x, y) == 5 * mm
    assert flops(lambda a, b: jax.lax.cond(True, lambda: a @ b @ b.T, lambda: a), x, y) == mm + 2 * 16 * 8 * 32
    assert flops(jax.jit(lambda a, b: jax.checkpoint(jnp.matmul)(a, b)), x, y) == mm
    mesh = sharding.make_mesh(MeshConfig(8, 1, 1), jax.devices()[:8])
    split = jax.shard_map(jnp.matmul, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
    with jax.set_mesh(mesh):
        assert flops(split, x, y) == mm  # each of 8 shards does 1/8 of the rows


def test_known_stages_table_is_the_cli_choices():
    assert tuple(aot.STAGES) == STAGES
    assert set(aot.LORA_STAGES) <= set(aot.STAGES)
    with pytest.raises(sharding.MeshError):
        aot.resolve_mesh(MeshConfig(-1, -1, 1), 4)
