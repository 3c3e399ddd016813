"""SFT stage: completion-only CE + KL to a frozen reference, checked against numpy.

The reference numbers are a float64 numpy log-softmax, cross-entropy and
full-vocabulary KL computed from the model's logits; the claims under test are
the loss wiring (weights, KL term, normalizer, stop_gradient), not the model.
"""

import jax
import numpy as np
import pytest

from llm_jax import model, sharding, train
from llm_jax.config import MeshConfig, OptimizerConfig, preset
from llm_jax.data.loader import DataConfig, Loader
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.stages import sft

TOK = ByteTokenizer()
CFG = preset("tiny", vocab_size=TOK.vocab_size)
KL_COEF = 0.3
LOSS_KL = jax.jit(sft.sft_loss_fn(CFG, KL_COEF))  # compiled once per shape for all tests
LOSS_CE = jax.jit(sft.sft_loss_fn(CFG))


def sft_batches(n, seed=0, rows=4):
    cfg = DataConfig(source="builtin:sft", seq_len=64, batch_size=rows, size=50, seed=seed)
    loader = Loader(cfg, TOK, shard_index=0, shard_count=1)
    return [next(loader) for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    params = model.init(CFG, jax.random.PRNGKey(0))
    ref = model.init(CFG, jax.random.PRNGKey(1))
    return params, ref, sft_batches(1)[0]


def np_log_softmax(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@jax.jit
def np_logits(params, batch):
    return model.apply(CFG, params, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"])


def np_reference(params, ref, batch):
    """(ce, kl) per scored token: numpy CE on weighted tokens, KL(pi || ref) over the vocab."""
    logp, logq = np_log_softmax(np_logits(params, batch)), np_log_softmax(np_logits(ref, batch))
    w = batch["weights"].astype(np.float64)
    nll = -np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    return (w * nll).sum() / w.sum(), (w * kl).sum() / w.sum()


def test_loss_matches_numpy_reference(setup):
    params, ref, batch = setup
    # The loader's weights are completion-only: the prompt of every sequence is unscored.
    assert 0 < batch["weights"].sum() < (batch["segment_ids"] > 0).sum()
    ce_ref, kl_ref = np_reference(params, ref, batch)
    assert kl_ref > 1e-3  # two different random models: the KL term is not trivially 0

    norm = sft.weight_sum(batch)
    loss, m = LOSS_KL(params, batch, jax.random.PRNGKey(0), norm, ref)
    np.testing.assert_allclose(m["ce"], ce_ref, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl_ref, rtol=1e-4)
    np.testing.assert_allclose(loss, ce_ref + KL_COEF * kl_ref, rtol=1e-5)

    plain, m0 = LOSS_CE(params, batch, jax.random.PRNGKey(0), norm)
    np.testing.assert_allclose(plain, ce_ref, rtol=1e-5)
    assert set(m0) == {"ce"}

    # Metrics are sums over the global normalizer: two half batches add up to the whole.
    halves = [{k: v[i::2] for k, v in batch.items()} for i in (0, 1)]
    parts = [LOSS_KL(params, h, None, norm, ref) for h in halves]
    for k in ("ce", "kl"):
        np.testing.assert_allclose(parts[0][1][k] + parts[1][1][k], m[k], rtol=1e-5, err_msg=k)

    total, count = jax.jit(sft.eval_loss, static_argnums=0)(CFG, params, batch)
    assert float(count) == batch["weights"].sum()
    np.testing.assert_allclose(total, ce_ref * batch["weights"].sum(), rtol=1e-5)


def test_kl_is_zero_against_itself_and_frozen_gets_no_gradient(setup):
    params, ref, batch = setup
    loss_fn = sft.sft_loss_fn(CFG, KL_COEF)
    norm = sft.weight_sum(batch)
    loss, m = LOSS_KL(params, batch, jax.random.PRNGKey(0), norm, params)
    assert abs(float(m["kl"])) < 1e-7
    np.testing.assert_allclose(loss, m["ce"], rtol=1e-6)

    # Gradients w.r.t. (params, frozen): none reaches the frozen reference...
    grad = jax.jit(jax.grad(lambda p, f: loss_fn(p, batch, None, norm, f)[0], argnums=(0, 1)))
    g_kl, g_frozen = grad(params, ref)
    assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_frozen))
    # ...while the policy's gradient does include the KL term.
    g_ce = jax.jit(jax.grad(lambda p: sft.sft_loss_fn(CFG)(p, batch, None, norm)[0]))(params)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_kl), jax.tree.leaves(g_ce)))
    assert diff > 1e-6


def test_bad_arguments_are_refused(setup):
    params, ref, batch = setup
    norm = sft.weight_sum(batch)
    with pytest.raises(ValueError, match="kl_coef=-1"):
        sft.sft_loss_fn(CFG, -1.0)
    with pytest.raises(ValueError, match="needs the reference params"):
        sft.sft_loss_fn(CFG, 0.1)(params, batch, jax.random.PRNGKey(0), norm)
    with pytest.raises(ValueError, match="would not use"):
        sft.sft_loss_fn(CFG)(params, batch, jax.random.PRNGKey(0), norm, ref)


def test_training_lowers_the_loss_and_leaves_the_reference_alone():
    """A few steps on a handful of SFT records, with the KL to the initial model:
    the loss falls and the frozen tree is untouched."""
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx, schedule = train.make_optimizer(OptimizerConfig(lr=3e-3, warmup_steps=2), 20)
    state, shardings = train.create_train_state(lambda r: model.init(CFG, r), tx, mesh, seed=0)
    frozen = jax.tree.map(np.array, jax.device_get(state.params))  # the "pretrained" model
    frozen_before = jax.tree.map(np.copy, frozen)
    step = train.jit_train_step(train.make_train_step(sft.sft_loss_fn(CFG, kl_coef=0.1), sft.weight_sum,
                                                      tx, schedule), mesh, shardings)
    batches = sft_batches(2)
    history = []
    for i in range(20):
        state, m = step(state, sharding.shard_batch(batches[i % 2], mesh), frozen)
        history.append(float(m["loss"]))
    # Measured last/first loss with the init, state seed and data seed of seeds 0-4 (seed 0
    # is this test): 0.629, 0.601, 0.552, 0.558, 0.579; this test's own seed is the closest
    # to 0.7 (margin 0.07). Final KL 0.60-0.76.
    assert history[-1] < 0.7 * history[0], history
    assert float(m["kl"]) > 0  # the policy moved away from the frozen model
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(a, b)
