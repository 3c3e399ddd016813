"""The memory planner against real sharded states and XLA's own memory analysis."""

import jax
import numpy as np
import pytest

from llm_jax import cli, model, plan, sharding, train
from llm_jax.config import MeshConfig, OptimizerConfig, preset
from llm_jax.stages import pretrain
from tpu_compiler import require_libtpu


@pytest.mark.parametrize("shape,remat", [((1, 1, 1), "none"), ((1, 4, 2), "none"), ((2, 2, 2), "full")])
def test_plan_matches_a_real_run(shape, remat):
    cfg = preset("tiny", d_model=128, num_heads=4, num_kv_heads=4, d_ff=512, num_layers=2,
                 max_len=128, vocab_size=512, remat=remat)
    B, T = 16, 128
    mesh = sharding.make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
    tx, sched = train.make_optimizer(OptimizerConfig(), 10)
    state, shardings = train.create_train_state(lambda r: model.init(cfg, r), tx, mesh, seed=0)
    got = plan.plan(cfg, plan.abstract_mesh(*shape), B, T)
    # Params and optimizer state: exact, byte for byte.
    assert got.params == sharding.per_device_bytes(state.params)
    assert got.optimizer == sharding.per_device_bytes(state.opt_state)
    # Activations + gradients: an estimate; XLA's temp buffers for the same step are
    # the measured truth. Within 2x either way is what a plan is for.
    batch = {"inputs": np.zeros((B, T), np.int32), "targets": np.zeros((B, T), np.int32),
             "weights": np.ones((B, T), np.float32)}
    step = train.jit_train_step(train.make_train_step(pretrain.clm_loss_fn(cfg), pretrain.weight_sum,
                                                      tx, sched), mesh, shardings)
    temp = step.lower(state, sharding.shard_batch(batch, mesh)).compile().memory_analysis().temp_size_in_bytes
    ratio = (got.activations + got.gradients) / temp
    assert 0.5 < ratio < 2.0, ratio


def test_plan_cli(capsys):
    assert plan.main(["--preset", "llama7b", "--mesh", "1,64,4", "--batch-size", "256", "--seq-len",
                      "4096", "--dtype", "bfloat16", "--remat", "full", "--memory-gib", "95"]) == 0
    out = capsys.readouterr().out
    assert "6.738B params" in out and "fits in 95 GiB" in out
    assert plan.main(["--preset", "llama", "--mesh", "1,8,1", "--memory-gib", "1"]) == 1
    assert "does NOT fit" in capsys.readouterr().out



@pytest.mark.parametrize("argv, message", [
    (["--preset", "llama", "--mesh", "1,1,3"], "not divisible by mesh.tensor=3"),  # 32 heads over tensor=3
    (["--mesh", "1,8"], "error: --mesh '1,8': expected three positive sizes data,fsdp,tensor"),
    (["--mesh", "1,x,1"], "error: --mesh '1,x,1': expected three positive sizes"),
    (["--mesh", "1,0,1"], "error: --mesh '1,0,1': expected three positive sizes"),
    (["--preset", "nope"], "error: "),
])
def test_plan_cli_errors_are_one_line_exit_2(capsys, argv, message):
    """As `python -m llm_jax.plan` runs it (through llm_jax.cli.run)."""
    assert cli.run(lambda: plan.main(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and len(err.strip().splitlines()) == 1, err


def test_plan_cli_has_no_compile_flag(capsys):
    """The compiler's verdict is `python -m llm_jax.aot` (which builds on the planner:
    a planner that compiled would import it back)."""
    with pytest.raises(SystemExit) as e:
        plan.main(["--compile", "v5p:2x2x1"])
    assert e.value.code == 2 and "unrecognized arguments: --compile" in capsys.readouterr().err


# The activation estimate against the TPU compiler (libtpu on this CPU host; nothing
# runs on a TPU): small models with the real structure, bf16 compute and f32 master
# weights as the big runs use, so the same terms (saved residuals, the float32 logits,
# the gathered output matrix and its gradient, one layer's recomputation) dominate.
# benchmarks/PLAN_VS_COMPILER.md has the same check at real sizes.
TPU_ROWS = [
    # Llama-structured (RoPE, RMSNorm, SwiGLU, GQA, tied embeddings), FSDP over 4 chips, remat full.
    (dict(vocab_size=8192, d_model=512, num_heads=4, num_kv_heads=2, d_ff=1536, num_layers=4), "llama", "full",
     (1, 4, 1)),
]
# Where the estimate stays out of 20%: remat "none" keeps KEPT_PER_LAYER["none"] x
# Korthikanti's count per layer, a factor fitted on GPT-2-124M and Llama-3.2-1B
# (benchmarks/PLAN_VS_COMPILER.md); a 4-layer d=512 GPT-2-structured model keeps
# less, so the planner over-estimates it (measured +21% on data x fsdp = 2 x 2,
# +44% on fsdp = 4). It must at least stay on the safe side (never below the
# compiler), and `python -m llm_jax.aot` gives the exact figure.
TPU_OVER_ROWS = [
    (dict(vocab_size=8192, d_model=512, num_heads=4, d_ff=2048, num_layers=4), "gpt2", "none", (2, 2, 1)),
]


def planned_and_compiled(shape, base, remat, mesh):
    """(config, the planner's estimate, the TPU compiler's per-chip total bytes) of a
    pretraining step of 4 x 1024 tokens on a v5p 2x2x1 slice."""
    require_libtpu()
    from llm_jax import aot  # imports libtpu's settings: only after the check above
    cfg = preset(base, **shape, max_len=1024, dtype="bfloat16", param_dtype="float32", remat=remat)
    B, T = 4, 1024
    r = aot.compile_stage(aot.AOTSettings(stage="pretrain", topology="v5p:2x2x1", mesh=MeshConfig(*mesh),
                                          batch_size=B, seq_len=T, model=cfg))
    return cfg, plan.plan(cfg, plan.abstract_mesh(*mesh), B, T), r["per_chip_bytes"]["total"]


@pytest.mark.parametrize("shape,base,remat,mesh", TPU_ROWS)
def test_plan_within_20_percent_of_the_tpu_compiler(shape, base, remat, mesh):
    cfg, got, compiled = planned_and_compiled(shape, base, remat, mesh)
    assert abs(got.total / compiled - 1) <= 0.20, (got.total, compiled, plan.activation_terms(
        cfg, plan.abstract_mesh(*mesh), 4, 1024))


@pytest.mark.parametrize("shape,base,remat,mesh", TPU_OVER_ROWS)
def test_plan_without_remat_is_not_below_the_tpu_compiler(shape, base, remat, mesh):
    _, got, compiled = planned_and_compiled(shape, base, remat, mesh)
    assert got.total >= compiled
