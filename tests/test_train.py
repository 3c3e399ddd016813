"""The training step: optimizer, exact gradient accumulation, sharding on 8 host devices.

conftest.py gives this process 8 CPU devices. References here are independent:
the one-device, one-microbatch step is the reference for the sharded and
accumulated ones (the claim under test is that they are the same computation),
and the schedule is checked against its formula written out by hand.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from llm_jax import model, sharding, train
from llm_jax.config import ConfigError, MeshConfig, OptimizerConfig, preset
from llm_jax.stages import pretrain

CFG = preset("tiny")
B, T = 16, 16


def make_batches(n, seed=0, batch=B):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tok = rng.integers(0, CFG.vocab_size, (batch, T + 1)).astype(np.int32)
        # Uneven padding: microbatches hold different numbers of real tokens, which is
        # exactly where a per-microbatch mean would differ from the full-batch loss.
        lengths = rng.integers(1, T + 1, batch)
        w = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
        out.append({"inputs": tok[:, :-1], "targets": tok[:, 1:], "weights": w})
    return out


def run(mesh_shape, batches, microbatches=1, opt=OptimizerConfig(lr=1e-2, warmup_steps=1)):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape), devices)
    tx, schedule = train.make_optimizer(opt, 10)
    state, shardings = train.create_train_state(lambda r: model.init(CFG, r), tx, mesh, seed=0)
    step = train.jit_train_step(
        train.make_train_step(pretrain.clm_loss_fn(CFG), pretrain.weight_sum, tx, schedule, microbatches),
        mesh, shardings)
    losses = []
    for b in batches:
        state, metrics = step(state, sharding.shard_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), state


@pytest.fixture(scope="module")
def reference():
    batches = make_batches(3)
    losses, params, _ = run((1, 1, 1), batches)
    return batches, losses, params


def assert_same_run(got, want):
    (l1, p1), (l0, p0) = got, want
    # Different meshes sum the same float32 numbers in a different order; Adam's
    # first steps turn a relative gradient change of ~1e-7 into ~lr * 1e-6 in params.
    np.testing.assert_allclose(l1, l0, rtol=2e-6, atol=2e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_loss_matches_hand_computed_reference(reference):
    """First-step loss equals an independent numpy cross-entropy of the initial model."""
    batches, losses, _ = reference
    params = model.init(CFG, jax.random.split(jax.random.PRNGKey(0))[0])
    logits = np.asarray(model.apply(CFG, params, batches[0]["inputs"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batches[0]["targets"][..., None], -1)[..., 0]
    w = batches[0]["weights"]
    np.testing.assert_allclose(losses[0], (nll * w).sum() / w.sum(), rtol=1e-5)


def test_gradient_accumulation_is_exact(reference):
    batches, losses, params = reference
    for m in (2, 4):
        l, p, _ = run((1, 1, 1), batches, microbatches=m)
        assert_same_run((l, p), (losses, params))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)])
def test_meshes_match_one_device(reference, mesh_shape):
    batches, losses, params = reference
    l, p, state = run(mesh_shape, batches)
    assert_same_run((l, p), (losses, params))
    # The state really is sharded as the table says (not silently replicated).
    assert state.params["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    mu = state.opt_state[1][0].mu["layers"]["mlp"]["down"]
    assert mu.sharding.spec == P(None, "tensor", "fsdp")


def test_accumulation_on_a_mesh(reference):
    batches, losses, params = reference
    l, p, _ = run((2, 2, 2), batches, microbatches=2)
    assert_same_run((l, p), (losses, params))


def test_fsdp_state_is_split_not_copied():
    tx, _ = train.make_optimizer(OptimizerConfig(), 10)
    big = preset("tiny", d_model=128, d_ff=512, vocab_size=512)
    totals = {}
    for n in (1, 8):
        mesh = sharding.make_mesh(MeshConfig(1, n, 1), jax.devices()[:n])
        state, _ = train.create_train_state(lambda r: model.init(big, r), tx, mesh, seed=0)
        tree = (state.params, state.opt_state)
        totals[n] = sharding.per_device_bytes(tree)
    ideal = totals[1] / 8
    assert totals[8] <= 1.15 * ideal, (totals, ideal)


def test_sharding_spec_drops_axes_that_do_not_divide():
    mesh = sharding.make_mesh(MeshConfig(1, 2, 4), jax.devices())
    path = (jax.tree_util.DictKey("embed"),)
    assert sharding.spec_for(path, (50257, 768), mesh) == P(None, "fsdp")  # 50257 % 4 != 0
    assert sharding.spec_for(path, (50256, 768), mesh) == P("tensor", "fsdp")
    assert sharding.spec_for((jax.tree_util.DictKey("scale"),), (2, 64), mesh) == P()


def test_mesh_errors_are_clear():
    with pytest.raises(sharding.MeshError, match="8 are available"):
        sharding.make_mesh(MeshConfig(2, 2, 1), jax.devices())
    with pytest.raises(sharding.MeshError, match="not divisible"):
        sharding.make_mesh(MeshConfig(-1, 3, 1), jax.devices())
    mesh = sharding.make_mesh(MeshConfig(1, 1, 8), jax.devices())
    with pytest.raises(sharding.MeshError, match="num_heads=4 is not divisible by mesh.tensor=8"):
        sharding.check_model_fits_mesh(CFG, mesh)
    mesh = sharding.make_mesh(MeshConfig(2, 1, 4), jax.devices())
    with pytest.raises(sharding.MeshError, match="num_kv_heads=2"):
        sharding.check_model_fits_mesh(CFG, mesh)
    with pytest.raises(sharding.MeshError, match="multiple of 4"):
        sharding.check_batch_fits_mesh(6, 1, sharding.make_mesh(MeshConfig(4, 1, 2), jax.devices()))
    with pytest.raises(ConfigError, match="d_model"):
        preset("tiny", d_model=63)


def test_schedule_follows_its_formula():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=10, end_lr_ratio=0.1)
    sched = train.lr_schedule(cfg, 110)
    for step in (0, 5, 10, 60, 110):
        if step < 10:
            want = step / 10
        else:
            frac = (step - 10) / 100
            want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(sched(step)) == pytest.approx(want, abs=1e-6), step


def test_weight_decay_skips_norms_and_biases():
    params = model.init(preset("tiny", norm="layernorm", use_bias=True), jax.random.PRNGKey(0))
    mask = train.decay_mask(params)
    assert mask["layers"]["attn"]["q"] and mask["embed"] and mask["layers"]["mlp"]["down"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["layers"]["attn_norm"]["bias"]
    assert not mask["layers"]["attn"]["q_bias"] and not mask["final_norm"]["scale"]


def test_clipping_bounds_the_update():
    """With clip_norm, the first AdamW update of a huge gradient is still lr-sized,
    and the reported grad_norm is the unclipped global norm."""
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx, sched = train.make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0, clip_norm=1.0,
                                                     weight_decay=0.0), 10)
    scale = 1e6

    def loss_fn(params, batch, rng, normalizer):
        return scale * pretrain.clm_loss_fn(CFG)(params, batch, rng, normalizer)[0], {}
    state, shardings = train.create_train_state(lambda r: model.init(CFG, r), tx, mesh, seed=0)
    before = jax.device_get(state.params)
    step = train.jit_train_step(train.make_train_step(loss_fn, pretrain.weight_sum, tx, sched), mesh, shardings)
    state, metrics = step(state, make_batches(1)[0])
    assert float(metrics["grad_norm"]) > 1e3
    delta = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                           jax.tree.leaves(before)))
    assert delta <= 1.01e-3  # Adam's first step moves each weight by at most ~lr


def test_training_learns_a_pattern():
    """Loss on a fixed repeating sequence falls far below chance in a few steps."""
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx, sched = train.make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=5), 60)
    state, shardings = train.create_train_state(lambda r: model.init(CFG, r), tx, mesh, seed=0)
    step = train.jit_train_step(train.make_train_step(pretrain.clm_loss_fn(CFG), pretrain.weight_sum, tx, sched),
                                mesh, shardings)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(60):
        start = rng.integers(0, 5, B)
        tok = (start[:, None] + np.arange(T + 1)[None]) % 5 + 10  # 10 11 12 13 14 10 ...
        batch = {"inputs": tok[:, :-1].astype(np.int32), "targets": tok[:, 1:].astype(np.int32),
                 "weights": np.ones((B, T), np.float32)}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > math.log(CFG.vocab_size) - 0.5
    assert losses[-1] < 0.1, losses[-5:]


def test_split_microbatches_interleaves_rows():
    x = jnp.arange(8)
    np.testing.assert_array_equal(train.split_microbatches({"x": x}, 2)["x"], [[0, 2, 4, 6], [1, 3, 5, 7]])
    with pytest.raises(ValueError, match="does not split"):
        train.split_microbatches({"x": jnp.arange(6)}, 4)


def test_frozen_argument_reaches_the_loss_and_is_not_trained():
    """A frozen tree (e.g. a reference model) is passed to the loss, gets no update,
    and gives the same gradient with and without microbatching."""
    def loss_fn(params, batch, rng, normalizer, frozen):
        err = batch["x"] @ params["w"] - batch["x"] @ frozen["w"]
        return jnp.sum(err ** 2) / normalizer, {}

    mesh = sharding.make_mesh(MeshConfig(2, 1, 1), jax.devices()[:2])
    tx = optax.sgd(0.1)
    frozen = {"w": jnp.arange(3.0)}
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    got = []
    for micro in (1, 4):
        state, shardings = train.create_train_state(lambda r: {"w": jnp.zeros(3)}, tx, mesh, seed=0)
        step = train.jit_train_step(
            train.make_train_step(loss_fn, lambda b: jnp.float32(b["x"].shape[0]), tx, None, micro),
            mesh, shardings)
        state, metrics = step(state, sharding.shard_batch({"x": x}, mesh), frozen)
        got.append(np.asarray(state.params["w"]))
    # One SGD step from w=0 on mean ||x (w - f)||^2: w = 0.1 * 2 x^T x f / n.
    want = 0.1 * 2 * x.T @ x @ np.arange(3.0) / 8
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    np.testing.assert_allclose(got[1], want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(frozen["w"]), np.arange(3.0))


def test_state_from_params_keeps_the_weights_and_shards_them():
    """A stage that starts from given weights: same values, placed by the table,
    fresh (zero) Adam moments, and it trains like a state built by create_train_state."""
    mesh = sharding.make_mesh(MeshConfig(2, 4, 1), jax.devices())
    params = model.init(CFG, jax.random.PRNGKey(5))
    tx, schedule = train.make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=1), 10)
    state, shardings = train.state_from_params(params, tx, mesh, seed=0)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The table's entry for embed [V, D] is ("tensor", "fsdp"); 256 and 64 divide both axes.
    assert state.params["embed"].sharding.spec == P("tensor", "fsdp")
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state)
               if x.dtype == jnp.float32 and x.ndim > 0)
    ref_state, ref_shardings = train.create_train_state(
        lambda r: model.init(CFG, jax.random.PRNGKey(5)), tx, mesh, seed=0)
    step = train.make_train_step(pretrain.clm_loss_fn(CFG), pretrain.weight_sum, tx, schedule)
    batch = sharding.shard_batch(make_batches(1)[0], mesh)
    _, m1 = train.jit_train_step(step, mesh, shardings)(state, batch)
    _, m2 = train.jit_train_step(step, mesh, ref_shardings)(ref_state, batch)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
