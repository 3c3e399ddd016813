"""LoRA: adapters on chosen projections, the base frozen, merge for export.

Reference numbers: the merge is checked against W + (alpha / r) * A @ B written
in float64 numpy, and the merged model against the plain-numpy transformer of
tests/reference_model.py run on hand-merged weights; adapter and optimizer
sizes against counts written from the model's shapes; the DPO loss at the start
against log 2 (policy == reference).
"""

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_model as ref
from experiments import llama_sft_dpo
from llm_jax import checkpoint, generate, hf, lora, model, sharding, train
from llm_jax.config import ConfigError, MeshConfig, OptimizerConfig, apply_overrides, preset
from llm_jax.data import builtin, preferences
from llm_jax.data.loader import DataConfig, Loader
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.stages import dpo, reward, sft
from jsonl_files import write_jsonl

TOK = ByteTokenizer()
CFG = preset("tiny", vocab_size=TOK.vocab_size, max_len=128)  # D 64, N 4, G 2, H 16, F 128, L 2
ALL = ("q", "k", "v", "o", "up", "gate", "down")
# (in, out) of each per-layer matrix, from the weight layouts in llm_jax/model.py.
MATRIX = {"q": (64, 4 * 16), "k": (64, 2 * 16), "v": (64, 2 * 16), "o": (4 * 16, 64),
          "up": (64, 128), "gate": (64, 128), "down": (128, 64)}
GROUP = {t: "attn" if t in ("q", "k", "v", "o") else "mlp" for t in ALL}
# float32 vs float64 reference (see tests/test_model.py for the derivation).
REF_RTOL, REF_ATOL = 1e-4, 1e-5
APPLY = jax.jit(lambda params, tokens: model.apply(CFG, params, tokens))


def mesh1():
    return sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def random_adapters(lcfg, cfg, seed):
    """Adapters with B random too (a fresh B is zero and would hide a wrong merge)."""
    tree = lora.init_adapters(lcfg, cfg, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32) if p[-1].key == "b" else x, tree)


def sft_batches(n, rows=4):
    cfg = DataConfig(source="builtin:sft", seq_len=64, batch_size=rows, size=50, seed=0)
    it = Loader(cfg, TOK, shard_index=0, shard_count=1)
    return [next(it) for _ in range(n)]


def pref_batches(n, rows=4, segments=4):
    cfg = DataConfig(source="builtin:preferences", seq_len=128, batch_size=rows, size=100, max_segments=segments)
    it = Loader(cfg, TOK, shard_index=0, shard_count=1)
    return [next(it) for _ in range(n)]


def snapshot(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def train_adapters(loss_fn, normalizer_fn, trainable, base, batches, steps, lr=3e-3):
    """`steps` LoRA steps through the generic train step: (state, metrics history)."""
    mesh = mesh1()
    tx, schedule = train.make_optimizer(OptimizerConfig(lr=lr, warmup_steps=0, weight_decay=0.0), steps)
    state, shardings = train.state_from_params(trainable, tx, mesh, seed=0)
    step = train.jit_train_step(train.make_train_step(loss_fn, normalizer_fn, tx, schedule), mesh, shardings)
    history = []
    for i in range(steps):
        state, m = step(state, sharding.shard_batch(batches[i % len(batches)], mesh), base)
        history.append(jax.device_get(m))
    return state, history


# ---------------------------------------------------------------------------
# Config


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match=r"lora\.rank=-1"):
        lora.LoRAConfig(rank=-1).validate()
    with pytest.raises(ConfigError, match=r"lora\.targets.*'x'"):
        lora.LoRAConfig(rank=4, targets=("q", "x")).validate()
    with pytest.raises(ConfigError, match=r"lora\.targets is empty"):
        lora.LoRAConfig(rank=4, targets=()).validate()
    with pytest.raises(ConfigError, match=r"lora\.targets.*twice"):
        lora.LoRAConfig(rank=4, targets=("q", "q")).validate()
    with pytest.raises(ConfigError, match=r"lora\.alpha"):
        lora.LoRAConfig(rank=4, alpha=0.0).validate()
    gelu = preset("tiny", mlp="gelu")
    with pytest.raises(ConfigError, match=r"'gate', which this model has not got \(model\.mlp='gelu'"):
        lora.LoRAConfig(rank=4, targets=("gate",)).validate(gelu)
    with pytest.raises(ConfigError, match=r"lora\.rank=33 exceeds the v projection's 64 x 32"):
        lora.LoRAConfig(rank=33, targets=("q", "v")).validate(CFG)
    with pytest.raises(ConfigError, match=r"lora\.rank=0"):
        lora.init_adapters(lora.LoRAConfig(), CFG, jax.random.PRNGKey(0))
    lora.LoRAConfig(rank=4, targets=("up", "down")).validate(gelu)  # fine without the gate
    lora.LoRAConfig(rank=0, targets=()).validate()  # off: nothing else is read


def test_experiment_refuses_bad_lora_settings_before_any_work(tmp_path):
    base = ["--workdir", str(tmp_path / "run"), "--set", "model=tiny"]
    with pytest.raises(ConfigError, match=r"lora\.rank=-2"):
        llama_sft_dpo.main(base + ["--set", "lora.rank=-2"])
    with pytest.raises(ConfigError, match="'gate'"):
        llama_sft_dpo.main(base + ["--set", "model.mlp=gelu", "--set", "lora.rank=2",
                                   "--set", 'lora.targets=["q","gate"]'])
    assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------
# Shapes, init, merge


def test_adapter_shapes_and_count_follow_the_weights():
    lcfg = lora.LoRAConfig(rank=3, targets=ALL)
    adapters = lora.init_adapters(lcfg, CFG, jax.random.PRNGKey(0))
    for t in ALL:
        ab = adapters["layers"][GROUP[t]][t]
        assert ab["a"].shape == (2, MATRIX[t][0], 3) and ab["b"].shape == (2, 3, MATRIX[t][1]), t
        assert ab["a"].dtype == ab["b"].dtype == jnp.float32
    assert model.count_params(adapters) == 2 * 3 * sum(i + o for i, o in MATRIX.values())


def test_fresh_adapters_leave_the_model_exactly_as_it_was():
    params = model.init(CFG, jax.random.PRNGKey(0))
    lcfg = lora.LoRAConfig(rank=4, targets=ALL)
    adapters = lora.init_adapters(lcfg, CFG, jax.random.PRNGKey(1))
    assert all(float(jnp.abs(ab["a"]).max()) > 0 for g in adapters["layers"].values() for ab in g.values())
    merged = lora.merge(params, adapters, lcfg)
    assert_tree_equal(merged, params)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, CFG.vocab_size)
    np.testing.assert_array_equal(APPLY(merged, tokens), APPLY(params, tokens))


def test_merge_is_w_plus_scaled_low_rank_product_on_every_target():
    params = model.init(CFG, jax.random.PRNGKey(0))
    lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=ALL)  # scale 2
    adapters = random_adapters(lcfg, CFG, 1)
    merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, lcfg)
    expected = ref.lora_merged(params, adapters, 2.0)
    for t in ALL:
        got = np.asarray(merged["layers"][GROUP[t]][t], np.float64)
        want = expected["layers"][GROUP[t]][t]
        assert got.shape == want.shape and merged["layers"][GROUP[t]][t].dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=t)
        assert np.abs(want - np.asarray(params["layers"][GROUP[t]][t])).max() > 1e-3  # the update is real
    assert_tree_equal(merged["layers"]["attn_norm"], params["layers"]["attn_norm"])
    # Called eagerly, the weights without an adapter are the very same arrays (no copy).
    eager = lora.merge(params, lora.init_adapters(lora.LoRAConfig(rank=2), CFG, jax.random.PRNGKey(0)),
                       lora.LoRAConfig(rank=2))
    assert eager["embed"] is params["embed"] and eager["layers"]["mlp"]["up"] is params["layers"]["mlp"]["up"]
    assert eager["layers"]["attn"]["q"] is not params["layers"]["attn"]["q"]


def test_merged_projection_equals_the_unmerged_computation():
    """x @ merge(W) == x @ W + scale * (x @ A) @ B for the q projection, as the
    model's einsum applies it, against float64 numpy."""
    params = model.init(CFG, jax.random.PRNGKey(0))
    lcfg = lora.LoRAConfig(rank=4, alpha=16.0, targets=("q",))
    adapters = random_adapters(lcfg, CFG, 3)
    x = np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32)
    wq = lora.merge(params, adapters, lcfg)["layers"]["attn"]["q"][1]  # layer 1: [D, N, H]
    got = np.asarray(jnp.einsum("btd,dnh->btnh", x, wq, precision="highest"), np.float64)
    x64 = x.astype(np.float64)
    w64 = np.asarray(params["layers"]["attn"]["q"][1], np.float64).reshape(64, 64)
    a = np.asarray(adapters["layers"]["attn"]["q"]["a"][1], np.float64)
    b = np.asarray(adapters["layers"]["attn"]["q"]["b"][1], np.float64)
    want = (x64 @ w64 + 4.0 * (x64 @ a) @ b).reshape(2, 5, 4, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_merged_model_matches_numpy_reference_on_hand_merged_weights():
    params = model.init(CFG, jax.random.PRNGKey(0))
    lcfg = lora.LoRAConfig(rank=4, alpha=16.0, targets=("q", "v", "o", "gate", "down"))
    adapters = random_adapters(lcfg, CFG, 5)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, CFG.vocab_size))
    got = np.asarray(APPLY(lora.merge(params, adapters, lcfg), tokens), np.float64)
    want = ref.reference_logits(CFG, ref.lora_merged(params, adapters, 4.0), tokens)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=REF_RTOL, atol=REF_ATOL * scale)
    base = ref.reference_logits(CFG, ref.to_numpy(params), tokens)
    assert np.abs(base - want).max() > 1e-2 * scale  # the adapters do change the model


def test_attached_adapters_compute_the_merged_model_and_its_gradient():
    """Training applies adapters unmerged (`attach`: x @ W + (x @ A) @ B' in the
    block); it must be the same model as the hand merge, with the same adapter
    gradient as differentiating through `merge`."""
    params = model.init(CFG, jax.random.PRNGKey(0))
    lcfg = lora.LoRAConfig(rank=4, alpha=16.0, targets=ALL)
    adapters = random_adapters(lcfg, CFG, 7)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, CFG.vocab_size))
    got = np.asarray(APPLY(lora.attach(params, adapters, lcfg), tokens), np.float64)
    want = ref.reference_logits(CFG, ref.lora_merged(params, adapters, 4.0), tokens)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=REF_RTOL, atol=REF_ATOL * scale)

    def loss(ad, combine):
        return jnp.mean(jax.nn.log_softmax(model.apply(CFG, combine(params, ad, lcfg), tokens))[..., 7])
    g_attach = jax.grad(loss)(adapters, lora.attach)
    g_merge = jax.grad(loss)(adapters, lora.merge)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g_attach), jax.tree.leaves(g_merge)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * np.abs(y).max(),
                                   err_msg=jax.tree_util.keystr(path))
        assert np.abs(y).max() > 0, jax.tree_util.keystr(path)


# ---------------------------------------------------------------------------
# Training: only the adapters move


def test_sft_with_lora_trains_adapters_and_never_touches_the_base():
    base = model.init(CFG, jax.random.PRNGKey(0))
    before = snapshot(base)
    lcfg = lora.LoRAConfig(rank=4, targets=("q", "v"))
    adapters = lora.init_adapters(lcfg, CFG, jax.random.PRNGKey(1))
    fresh = snapshot(adapters)
    # kl_coef > 0: the frozen base is also the KL reference (no second copy passed).
    loss_fn = lora.lora_loss_fn(sft.sft_loss_fn(CFG, kl_coef=0.1), lcfg, base_as_reference=True)
    state, history = train_adapters(loss_fn, sft.weight_sum, adapters, base, sft_batches(2), steps=8)
    assert_tree_equal(base, before)  # bitwise, and still readable (never donated)
    assert float(history[0]["kl"]) == 0.0  # step 0: base + (A @ 0) is the base exactly
    assert float(history[-1]["kl"]) > 0 and history[-1]["loss"] < history[0]["loss"]
    for t in ("q", "v"):
        new, old = state.params["layers"]["attn"][t], fresh["layers"]["attn"][t]
        assert np.abs(np.asarray(new["b"])).max() > 0, t
        assert not np.array_equal(np.asarray(new["a"]), old["a"]), t


def test_reward_model_with_lora_trains_adapters_and_head_only():
    S = 4
    base = model.init(CFG, jax.random.PRNGKey(0))
    before = snapshot(base)
    lcfg = lora.LoRAConfig(rank=2, targets=("q", "v", "up"))
    trainable = lora.init_reward_trainable(lcfg, CFG, jax.random.PRNGKey(1))
    fresh = snapshot(trainable)
    loss_fn = lora.lora_reward_loss_fn(reward.rm_loss_fn(CFG, S), lcfg)
    batches = pref_batches(2, segments=S)
    state, history = train_adapters(loss_fn, reward.pair_count, trainable, base, batches, steps=4)
    assert_tree_equal(base, before)
    assert not np.array_equal(np.asarray(state.params["head"]["kernel"]), fresh["head"]["kernel"])
    assert np.abs(np.asarray(state.params["adapters"]["layers"]["mlp"]["up"]["b"])).max() > 0
    # The trained reward model reads as an ordinary {"model", "head"} one.
    merged = lora.merged_reward_params(base, state.params, lcfg)
    assert set(merged) == {"model", "head"} and merged["head"] is state.params["head"]


def test_dpo_with_lora_uses_the_base_as_reference():
    """Reference log-probs from the base alone (as the cache would store them);
    the policy is base + adapters, so at the start h = 0 and the loss is log 2."""
    S = 4
    base = model.init(CFG, jax.random.PRNGKey(0))
    before = snapshot(base)
    lcfg = lora.LoRAConfig(rank=4, targets=("q", "v"))
    adapters = lora.init_adapters(lcfg, CFG, jax.random.PRNGKey(1))
    refs = jax.jit(lambda p, b: tuple(dpo.pair_logps(CFG, p, b, x, S) for x in dpo.PREFIXES))
    batches = [dict(b, **dict(zip(dpo.REF_KEYS, map(np.asarray, refs(base, b))))) for b in pref_batches(2)]
    loss_fn = lora.lora_loss_fn(dpo.dpo_loss_fn(CFG, S, beta=0.5), lcfg)
    state, history = train_adapters(loss_fn, reward.pair_count, adapters, base, batches, steps=6, lr=1e-2)
    np.testing.assert_allclose(history[0]["loss"], np.log(2.0), rtol=1e-6)
    assert history[0]["reward_margin"] == 0.0
    assert history[-1]["loss"] < history[0]["loss"]
    assert_tree_equal(base, before)


# ---------------------------------------------------------------------------
# Optimizer state: the adapters' size, not the model's


@pytest.mark.parametrize("layers,d_ff", [(2, 128), (2, 512), (4, 128)])
def test_optimizer_state_is_two_moments_of_the_adapters(layers, d_ff):
    cfg = preset("tiny", num_layers=layers, d_ff=d_ff)
    lcfg = lora.LoRAConfig(rank=4, targets=("q", "v"))
    tx, _ = train.make_optimizer(OptimizerConfig(), 10)
    state, _ = train.state_from_params(lora.init_adapters(lcfg, cfg, jax.random.PRNGKey(0)), tx, mesh1(), 0)
    n_adapters = layers * 4 * ((64 + 4 * 16) + (64 + 2 * 16))  # L r ((D + N H) + (D + G H))
    assert model.count_params(state.params) == n_adapters
    leaves = jax.tree.leaves(state.opt_state)
    assert sum(x.size for x in leaves if x.ndim > 0) == 2 * n_adapters  # Adam's mu and nu
    assert sum(1 for x in leaves if x.ndim == 0) <= 4  # step counters only
    # The model grows with d_ff and depth; the state follows only the adapters.
    full = model.count_params(jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0))))
    assert 2 * n_adapters < full / 10


# ---------------------------------------------------------------------------
# The experiment with LoRA


def test_llama_sft_dpo_with_lora_smoke(tmp_path, capsys):
    rng = random.Random(0)
    sft_rows = [{k: builtin.sft_record(rng, "train")[k] for k in ("prompt", "response")} for _ in range(40)]
    pref_rows = [{k: v for k, v in preferences.preference_record(rng, "train").items()
                  if k in ("prompt", "chosen", "rejected")} for _ in range(40)]
    paths = {n: str(tmp_path / f"{n}.jsonl") for n in ("sft", "prefs", "sft_eval", "prefs_eval")}
    write_jsonl(paths["sft"], sft_rows[:32])
    write_jsonl(paths["sft_eval"], sft_rows[32:])
    write_jsonl(paths["prefs"], pref_rows[:32])
    write_jsonl(paths["prefs_eval"], pref_rows[32:])
    sets = ["model.vocab_size=300", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
            "model.num_kv_heads=1", "model.d_ff=64", "model.max_len=128",
            "lora.rank=2", "lora.alpha=4", 'lora.targets=["q","v","down"]', "sft.kl_coef=0.1",
            f"sft.data.source=jsonl:{paths['sft']}", f"dpo.data.source=jsonl:{paths['prefs']}",
            f"sft_eval=jsonl:{paths['sft_eval']}", f"dpo_eval=jsonl:{paths['prefs_eval']}",
            "sft.optim.lr=1e-2", "sft.optim.warmup_steps=0",
            "sft.train.steps=2", "sft.train.batch_size=8", "sft.train.seq_len=128", "sft.data.max_segments=8",
            "dpo.train.steps=1", "dpo.train.batch_size=8", "dpo.train.seq_len=128", "dpo.data.max_segments=8",
            "eval_batches=1", f"sft.data.cache_dir={tmp_path / 'cache'}", f"dpo.data.cache_dir={tmp_path / 'cache'}"]
    workdir = str(tmp_path / "run")
    argv = ["--workdir", workdir] + [x for s in sets for x in ("--set", s)]
    assert llama_sft_dpo.main(argv + ["--set", "sft.train.stop_after=1"]) == 0  # interrupted after step 1
    assert not os.path.exists(os.path.join(workdir, "sft", "eval.json"))
    capsys.readouterr()
    assert llama_sft_dpo.main(argv) == 0  # resumes the adapter state, then DPO
    assert "resumed from step 1" in capsys.readouterr().out

    mcfg = preset("llama", vocab_size=300, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64,
                  max_len=128)
    # adapters: q (32 -> 2*16), v (32 -> 1*16), down (64 -> 32), rank 2, one layer
    n_adapters = 2 * ((32 + 32) + (32 + 16) + (64 + 32))
    n_model = model.count_params(jax.eval_shape(lambda: model.init(mcfg, jax.random.PRNGKey(0))))
    for stage in ("sft", "dpo"):
        ev = json.load(open(os.path.join(workdir, stage, "eval.json")))
        assert ev["lora"]["adapter_params"] == n_adapters, stage
        assert ev["lora"]["model_params"] == n_model, stage
    sft_ev = json.load(open(os.path.join(workdir, "sft", "eval.json")))
    assert sft_ev["heldout_response_loss_after"] < sft_ev["heldout_response_loss_before"]
    dpo_ev = json.load(open(os.path.join(workdir, "dpo", "eval.json")))
    assert dpo_ev["heldout_pair_accuracy_before"] == 0.5  # fresh adapters: policy == reference

    # The checkpoints hold adapters only: they restore as adapters, not as a model.
    mesh = mesh1()
    lcfg = lora.LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "down"))
    like = sharding.abstract_params(lambda r: model.init(mcfg, r), mesh, jax.random.PRNGKey(0))
    for stage in ("sft", "dpo"):
        ckpt = os.path.join(workdir, stage, "checkpoints")
        got = checkpoint.load_params(ckpt, lora.abstract_adapters(lcfg, mcfg, mesh))
        assert model.count_params(got) == n_adapters
        with pytest.raises(checkpoint.CheckpointError, match="missing from the checkpoint"):
            checkpoint.load_params(ckpt, like)
        # Generating from or exporting such a stage says why and what to use instead.
        lora_stage = r"trained with LoRA \(lora.rank=2 .*adapters over a frozen base.*--set export_dir=DIR"
        with pytest.raises(ConfigError, match=lora_stage):
            generate.load_stage(workdir, stage)
        with pytest.raises(ConfigError, match=lora_stage):
            hf.export_stage(workdir, stage, str(tmp_path / "exported"))
    # Hand-off: the SFT model DPO starts from = its random init (sft.train.seed 0) + its adapters.
    sft_adapters = checkpoint.load_params(os.path.join(workdir, "sft", "checkpoints"),
                                          lora.abstract_adapters(lcfg, mcfg, mesh))
    assert np.abs(np.asarray(sft_adapters["layers"]["mlp"]["down"]["b"])).max() > 0
    cfg = apply_overrides(llama_sft_dpo.Config(), sets)
    handed = llama_sft_dpo.sft_final(workdir, cfg, like, mesh)
    want = ref.lora_merged(model.init(mcfg, jax.random.PRNGKey(0)), sft_adapters, 2.0)
    for path, x in jax.tree_util.tree_leaves_with_path(handed):
        y = want
        for k in path:
            y = y[k.key]
        np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=1e-6, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
