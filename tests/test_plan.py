"""The memory planner against real sharded states and XLA's own memory analysis."""

import jax
import numpy as np
import pytest

from llm_jax import model, plan, sharding, train
from llm_jax.config import MeshConfig, OptimizerConfig, preset
from llm_jax.stages import pretrain


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
    assert plan.main(["--preset", "llama", "--mesh", "1,1,3"]) == 2  # 32 heads over tensor=3
    assert "not divisible by mesh.tensor=3" in capsys.readouterr().err
