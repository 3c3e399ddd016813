"""The stage runner: one declaration, one lifecycle, one config.json shape.

Each test declares stages the way an experiment does and checks what the
runner promises: evaluation before and after recorded in eval.json, a finished
stage skipped without loading anything, an early stop resumed to the same
result, the config.json shape `generate.load_stage` reads back, LoRA training
only adapters over a frozen base (a loss's, or a step a stage builds), and the
config checks that run before any stage trains.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint, generate, lora, model, sharding, train
from llm_jax.config import MeshConfig, OptimizerConfig, TrainConfig, preset
from llm_jax.data.loader import DataConfig
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.errors import ConfigError
from llm_jax.lora import LoRAConfig
from llm_jax.stages import pretrain, runner, sft
from tests.reference_model import lora_merged

TOK = ByteTokenizer()
CFG = preset("tiny", vocab_size=TOK.vocab_size)
PRETRAIN = pretrain.PretrainConfig(optim=OptimizerConfig(lr=3e-3, warmup_steps=0),
                                   train=TrainConfig(steps=4, batch_size=8, seq_len=64, log_every=2),
                                   data=DataConfig(source="builtin:pretrain", size=100), eval_batches=1)
SFT = sft.SFTConfig(optim=OptimizerConfig(lr=3e-3, warmup_steps=0),
                    train=TrainConfig(steps=3, batch_size=8, seq_len=64, log_every=1, seed=1),
                    data=DataConfig(source="builtin:sft", size=100))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(MeshConfig())


def counted(fn):
    """fn, counting its calls in .calls."""
    def wrapper(*args):
        wrapper.calls += 1
        return fn(*args)
    wrapper.calls = 0
    return wrapper


def test_a_stage_runs_records_and_is_skipped_when_finished(tmp_path, mesh):
    workdir = str(tmp_path)
    stage = pretrain.stage(CFG, PRETRAIN, TOK, mesh)
    init = counted(stage.init)
    stage = dataclasses.replace(stage, init=init)
    result = runner.run(workdir, stage, mesh, progress=lambda _: None)
    assert init.calls == 1
    saved = json.load(open(os.path.join(workdir, "pretrain", "eval.json")))
    assert saved == json.loads(json.dumps(result))
    assert saved["steps"] == 4 and saved["heldout_loss_after"] < saved["heldout_loss_before"]
    assert np.isclose(saved["heldout_perplexity_after"], np.exp(saved["heldout_loss_after"]))
    assert saved["data"]["records_used"] > 0
    # The one config.json shape: model, lora, the stage's own settings, extras.
    config = json.load(open(os.path.join(workdir, "pretrain", "config.json")))
    assert {"model", "lora", "optim", "train", "data", "data_shards"} <= set(config)
    assert config["train"]["steps"] == 4 and config["lora"]["rank"] == 0
    # ... which generate reads back: the same model, the final params.
    TOK.save(os.path.join(workdir, "tokenizer"))
    cfg, params, _, step = generate.load_stage(workdir, "pretrain")
    assert cfg == CFG and step == 4
    # A finished stage is read, not rerun: its weights are not even loaded.
    again = runner.run(workdir, stage, mesh, progress=lambda _: None)
    assert again == saved and init.calls == 1


def test_an_early_stop_resumes_to_the_uninterrupted_result(tmp_path, mesh):
    whole = runner.run(str(tmp_path / "a"), pretrain.stage(CFG, PRETRAIN, TOK, mesh), mesh, progress=lambda _: None)
    stopped = dataclasses.replace(PRETRAIN, train=dataclasses.replace(PRETRAIN.train, stop_after=2))
    lines = []
    assert runner.run(str(tmp_path / "b"), pretrain.stage(CFG, stopped, TOK, mesh), mesh,
                      progress=lines.append) is None
    assert any("stop_after" in line for line in lines)
    resumed = runner.run(str(tmp_path / "b"), pretrain.stage(CFG, PRETRAIN, TOK, mesh), mesh,
                         progress=lines.append)
    assert resumed["heldout_loss_after"] == whole["heldout_loss_after"]  # bitwise on CPU


def test_a_changed_setting_on_rerun_is_refused(tmp_path, mesh):
    workdir = str(tmp_path)
    runner.run(workdir, pretrain.stage(CFG, PRETRAIN, TOK, mesh), mesh, progress=lambda _: None)
    changed = dataclasses.replace(PRETRAIN, optim=dataclasses.replace(PRETRAIN.optim, lr=1e-3))
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.003 then, 0\.001 now"):
        runner.run(workdir, pretrain.stage(CFG, changed, TOK, mesh), mesh, progress=lambda _: None)


def test_a_new_stage_is_a_declaration(tmp_path, mesh):
    """What adding a stage takes: its loss and how it is judged; the runner does the rest.
    Here a stage that trains only on the copy task, from fresh weights."""
    stage = runner.Stage(
        "copy", CFG, SFT, init=lambda: runner.fresh_params(CFG, mesh, seed=0),
        loader=lambda _: runner.stage_loader(dataclasses.replace(SFT.data, source="builtin:sft/copy"),
                                             SFT.train, TOK, kind="sft"),
        loss=sft.sft_loss_fn(CFG), normalizer=sft.weight_sum,
        after=lambda params: {"params": model.count_params(params)})
    result = runner.run(str(tmp_path), stage, mesh, progress=lambda _: None)
    assert result["params"] == model.count_params(jax.eval_shape(lambda: model.init(CFG, jax.random.PRNGKey(0))))
    rows = [json.loads(x) for x in open(tmp_path / "copy" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_fresh_params_are_create_train_states(mesh):
    """The runner's fresh init equals train.create_train_state's for the same seed, so a
    stage moved onto the runner trains from the same weights as before."""
    tx, _ = train.make_optimizer(PRETRAIN.optim, 4)
    state, _ = train.create_train_state(lambda r: model.init(CFG, r), tx, mesh, 7)
    fresh = runner.fresh_params(CFG, mesh, 7)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lora_trains_adapters_over_the_frozen_initial_weights(tmp_path, mesh):
    base = runner.fresh_params(CFG, mesh, seed=3)
    base_host = jax.device_get(base)
    lcfg = LoRAConfig(rank=2, alpha=4.0, targets=("q", "v"))
    seen = {}

    def after(params):
        seen["final"] = jax.device_get(params)
        return {}

    result = runner.run(str(tmp_path), sft.stage(CFG, SFT, TOK, init=lambda: base, lora=lcfg, after=after), mesh,
                        progress=lambda _: None)
    # Only adapters trained: q (64 -> 4x16) and v (64 -> 2x16) at rank 2, in 2 layers.
    assert result["lora"]["adapter_params"] == 2 * 2 * ((64 + 64) + (64 + 32))
    config = json.load(open(tmp_path / "sft" / "config.json"))
    assert config["lora"]["rank"] == 2
    # `after` got the merged model: only the adapted projections moved, and they did.
    final = seen["final"]
    flat_base = dict(jax.tree_util.tree_flatten_with_path(base_host)[0])
    moved = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(final)[0]
             if not np.array_equal(v, flat_base[k])}
    assert moved == {"['layers']['attn']['q']", "['layers']['attn']['v']"}


def test_checks_before_any_stage_trains(mesh):
    with pytest.raises(ConfigError, match=r"sft\.data\.seq_len=32: .* sft\.train\.seq_len"):
        runner.check("sft", dataclasses.replace(SFT, data=dataclasses.replace(SFT.data, seq_len=32)), CFG, mesh)
    with pytest.raises(ConfigError, match=r"sft\.train\.seq_len=999 exceeds model\.max_len"):
        runner.check("sft", dataclasses.replace(SFT, train=dataclasses.replace(SFT.train, seq_len=999)), CFG, mesh)
    with pytest.raises(ConfigError, match=r"data_shards=3"):
        runner.check("sft", SFT, CFG, mesh, data_shards=3)
    runner.check("sft", SFT, CFG, mesh, kind="sft")  # the defaults pass


def test_lora_on_a_stage_with_its_own_step_is_refused_before_anything_runs(tmp_path, mesh):
    """A build stage without `build_lora` (PPO) cannot train adapters."""
    stage = runner.Stage("ppo_like", CFG, SFT, init=lambda: pytest.fail("loaded weights"),
                         loader=lambda _: pytest.fail("opened data"), build=lambda *a: pytest.fail("built"),
                         lora=LoRAConfig(rank=2, alpha=4.0, targets=("q",)))
    with pytest.raises(ConfigError, match=r"ppo_like: LoRA \(lora.rank=2\) serves stages that give a loss"):
        runner.run(str(tmp_path), stage, mesh, progress=lambda _: None)
    assert not os.path.exists(tmp_path / "ppo_like")


class Counter:
    """A stage loader whose batches count up: {"x": [n] * 8} for the n-th batch (8 rows: one a device)."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return {"x": np.full([8], self.position, np.float32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_a_built_step_with_lora_trains_the_runners_adapters_over_the_frozen_base(tmp_path, mesh):
    """The `build_lora` contract (GRPO's): the runner hands the stage the initial params
    themselves (frozen, no copy) and fresh adapters (`lora.init_adapters`, train.seed);
    the checkpoints hold the adapters; `evaluate` and `after` see base + scale * A @ B."""
    base = runner.fresh_params(CFG, mesh, seed=3)
    base_host = jax.device_get(base)
    lcfg = LoRAConfig(rank=2, alpha=4.0, targets=("q", "v"))
    settings = dataclasses.replace(SFT, train=dataclasses.replace(SFT.train, eval_every=1, async_checkpoints=False))
    seen = {}

    def build_lora(frozen, adapters, tx, schedule):
        seen["frozen"], seen["adapters"] = frozen, jax.device_get(adapters)
        state, shardings = train.state_from_params(adapters, tx, mesh, settings.train.seed)

        @jax.jit
        def update(state, batch, frozen):  # a toy step that reads the base: A and B grow by x * 0.01
            grow = batch["x"][0] * 0.01 + 0.0 * jnp.sum(frozen["final_norm"]["scale"])
            return train.TrainState(step=state.step + 1, params=jax.tree.map(lambda p: p + grow, state.params),
                                    opt_state=state.opt_state, rng=state.rng), {"loss": grow}

        return state, shardings, lambda state, batch: update(state, batch, frozen)

    def evaluate(params):  # the merged model, each step: its q moved off the base's
        return {"q_moved": float(np.abs(np.asarray(params["layers"]["attn"]["q"])
                                        - base_host["layers"]["attn"]["q"]).max())}

    stage = runner.Stage("built", CFG, settings, init=lambda: base, loader=lambda _: Counter(),
                         build=lambda *a: pytest.fail("the full-parameter build"), build_lora=build_lora,
                         evaluate=evaluate, after=lambda params: seen.update(final=jax.device_get(params)) or {},
                         lora=lcfg)
    result = runner.run(str(tmp_path), stage, mesh, progress=lambda _: None)
    assert seen["frozen"] is base  # the initial params themselves, not a copy
    fresh = jax.device_get(lora.init_adapters(lcfg, CFG, jax.random.PRNGKey(settings.train.seed)))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(seen["adapters"]), jax.tree.leaves(fresh)))
    assert result["lora"]["adapter_params"] == 2 * 2 * ((64 + 64) + (64 + 32))
    # The checkpoint holds the adapters after 3 steps: each entry grew by 0.01 * (1 + 2 + 3).
    ckpt = str(tmp_path / "built" / "checkpoints")
    adapters = jax.device_get(checkpoint.load_params(ckpt, lora.abstract_adapters(lcfg, CFG, mesh)))
    for got, start in zip(jax.tree.leaves(adapters), jax.tree.leaves(fresh)):
        np.testing.assert_allclose(got, start + 0.06, rtol=1e-6, atol=1e-7)
    with pytest.raises(checkpoint.CheckpointError, match="missing from the checkpoint"):
        checkpoint.load_params(ckpt, runner.model_like(CFG, mesh))
    # `after` got the merged model, computed here independently; the base is untouched.
    want = lora_merged(base_host, adapters, lcfg.scale)
    for path, got in jax.tree_util.tree_leaves_with_path(seen["final"]):
        ref = want
        for k in path:
            ref = ref[k.key]
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-6, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(base)),
                                                    jax.tree.leaves(base_host)))
    evals = [r for r in map(json.loads, open(tmp_path / "built" / "metrics.jsonl")) if "eval_q_moved" in r]
    assert [r["step"] for r in evals] == [1, 2, 3] and all(r["eval_q_moved"] > 0 for r in evals)
