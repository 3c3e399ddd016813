"""llm_jax.stages.classify: pooling, the head, packed logits, config checks, and a short
training run that beats chance; and losses.classification_loss, which only this stage
uses (the task and its records are in test_data_classify.py, the experiment in
test_experiment_classify.py).

Expected numbers come from float64 numpy loops, hand arithmetic, or the model
run on one unpadded sequence at a time; never from the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from experiments import classify as classify_experiment
from llm_jax import losses, model, train
from llm_jax.config import ConfigError, ModelConfig, OptimizerConfig
from llm_jax.data.loader import DataConfig, Loader
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.stages import classify

RTOL, ATOL = 1e-5, 1e-6
TOK = ByteTokenizer()
TINY = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=64)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def np_classification_loss(logits, labels, weights=None, normalizer=None):
    """-sum_b w_b log softmax(logits_b)_{y_b} / normalizer, one row at a time in float64."""
    logits = np.asarray(logits, np.float64)
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
    total = 0.0
    for row, y, w in zip(logits, labels, weights):
        m = row.max()
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        total += w * -(row[y] - log_z)
    return total / (weights.sum() if normalizer is None else normalizer)


# ---------------------------------------------------------------------------
# The loss


@pytest.fixture
def class_batch():
    rng = np.random.default_rng(3)
    logits = (4.0 * rng.standard_normal((6, 5))).astype(np.float32)
    labels = rng.integers(0, 5, size=6).astype(np.int32)
    weights = np.array([1, 1, 0, 1, 0.5, 1], np.float32)
    return logits, labels, weights


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("normalizer", [None, 7.0])
def test_classification_loss_matches_numpy(class_batch, jit, use_weights, normalizer):
    logits, labels, weights = class_batch
    w = weights if use_weights else None
    fn = jax.jit(losses.classification_loss) if jit else losses.classification_loss
    assert_close(fn(logits, labels, w, normalizer=normalizer), np_classification_loss(logits, labels, w, normalizer))


def test_classification_loss_hand_example():
    # softmax([0, ln 3]) = [1/4, 3/4]: label 1 costs ln(4/3), label 0 costs ln 4; mean of the two.
    logits = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]], np.float32)
    assert_close(losses.classification_loss(logits, np.array([1, 0])), (math.log(4 / 3) + math.log(4)) / 2)


def test_classification_loss_stable_bf16_and_all_masked():
    logits = jnp.asarray([[1000.0, 0.0, -1000.0]], jnp.bfloat16)
    assert_close(losses.classification_loss(logits, jnp.array([1])), 1000.0, rtol=1e-3)
    loss, grad = jax.value_and_grad(losses.classification_loss)(
        jnp.ones((2, 3)), jnp.array([0, 2]), jnp.zeros(2))
    assert float(loss) == 0.0 and np.all(np.isfinite(grad))
    assert losses.LOSSES["classification"] is losses.classification_loss


@pytest.mark.parametrize("bad_label", [3, -1])
def test_classification_loss_out_of_range_label_at_weight_zero(bad_label):
    # A padding row with a label outside [0, C) and weight 0 must not turn the
    # loss into NaN (a gather of index C) or score a wrapped class (-1 -> C-1).
    logits = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0], [0.0, 0.0, 0.0]], np.float32)
    labels = np.array([2, 0, bad_label], np.int32)
    weights = np.array([1.0, 0.5, 0.0], np.float32)
    loss = losses.classification_loss(logits, labels, weights)
    grad = jax.grad(losses.classification_loss)(jnp.asarray(logits), labels, weights)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    assert_close(loss, np_classification_loss(logits[:2], labels[:2], weights[:2]))
    assert_close(losses.classification_loss(np.zeros((2, 3), np.float32), np.array([0, 3]), np.array([1.0, 0.0])),
                 math.log(3.0))


def test_classification_loss_grads():
    rng = np.random.default_rng(4)
    labels, weights = np.array([0, 3, 1]), np.array([1.0, 0.5, 2.0])
    with jax.enable_x64(True):
        fn = jax.jit(lambda x: losses.classification_loss(x, labels, weights))
        check_grads(fn, (jnp.asarray(rng.standard_normal((3, 4)), jnp.float64),), order=1, modes=["rev"])
        # d/dlogits = w (softmax - onehot) / sum w, row by row
        x = rng.standard_normal((3, 4))
        p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
        expected = weights[:, None] * (p - np.eye(4)[labels]) / weights.sum()
        assert_close(jax.grad(fn)(jnp.asarray(x)), expected)


def test_global_normalizer_makes_microbatch_grads_exact():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((6, 4)).astype(np.float32))
    labels = rng.integers(0, 4, size=8)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 0], np.float32)  # unequal microbatch counts

    def loss_fn(params, x, labels, mask, normalizer=None):
        return losses.classification_loss(x @ params, labels, mask, normalizer=normalizer)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    full_loss, full_grad = grad_fn(w, x, labels, mask)
    acc_loss, acc_grad = 0.0, np.zeros((6, 4))
    for mb in np.split(np.arange(8), 4):
        loss, grad = grad_fn(w, x[mb], labels[mb], mask[mb], mask.sum())
        acc_loss, acc_grad = acc_loss + float(loss), acc_grad + np.asarray(grad)
    assert_close(acc_loss, float(full_loss))
    assert_close(acc_grad, np.asarray(full_grad))


# ---------------------------------------------------------------------------
# Pooling and the head


def test_pool_matches_hand_computation():
    rng = np.random.default_rng(6)
    hidden = rng.standard_normal((2, 6, 3)).astype(np.float32)
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0]], np.int32)
    h = hidden.astype(np.float64)
    expected = {
        "first": [[h[0, 0], h[0, 2], 0 * h[0, 0]], [h[1, 0], 0 * h[0, 0], 0 * h[0, 0]]],
        "last": [[h[0, 1], h[0, 4], 0 * h[0, 0]], [h[1, 2], 0 * h[0, 0], 0 * h[0, 0]]],
        "mean": [[(h[0, 0] + h[0, 1]) / 2, (h[0, 2] + h[0, 3] + h[0, 4]) / 3, 0 * h[0, 0]],
                 [(h[1, 0] + h[1, 1] + h[1, 2]) / 3, 0 * h[0, 0], 0 * h[0, 0]]],
    }
    for pooling, want in expected.items():
        assert_close(jax.jit(classify.pool, static_argnums=(2, 3))(hidden, seg, pooling, 3), np.array(want))
    with pytest.raises(ValueError, match="pooling='max'"):
        classify.pool(hidden, seg, "max", 3)


@pytest.mark.parametrize("causal,pooling", [(True, "last"), (False, "first"), (False, "mean")])
def test_packed_logits_equal_each_sequence_alone(causal, pooling):
    cfg = ModelConfig(**{**TINY.__dict__, "causal": causal})
    params = classify.init_classifier_params(cfg, model.init(cfg, jax.random.PRNGKey(0)), 3,
                                             jax.random.PRNGKey(1))
    seqs = [[2, 40, 41, 42], [2, 50, 51], [2, 60, 61, 62, 63]]
    # Packed: two sequences in row 0, one in row 1, padding after.
    tokens, seg = np.zeros((2, 10), np.int32), np.zeros((2, 10), np.int32)
    tokens[0, :4], seg[0, :4] = seqs[0], 1
    tokens[0, 4:7], seg[0, 4:7] = seqs[1], 2
    tokens[1, :5], seg[1, :5] = seqs[2], 1
    got = jax.jit(classify.class_logits, static_argnums=(0, 5, 6))(cfg, params, tokens, None, seg, pooling, 2)
    forward = jax.jit(model.forward, static_argnums=0)
    head_w = np.asarray(params["head"]["kernel"], np.float64)
    for (r, s), seq in zip([(0, 0), (0, 1), (1, 0)], seqs):
        hidden = np.asarray(forward(cfg, params["model"], np.array([seq])), np.float64)[0]  # alone
        h = {"last": hidden[-1], "first": hidden[0], "mean": hidden.mean(0)}[pooling]
        assert_close(got[r, s], h @ head_w + np.asarray(params["head"]["bias"]), rtol=1e-4, atol=1e-5)
    assert_close(got[1, 1], np.asarray(params["head"]["bias"]))  # an absent segment: pooled zeros


def test_bad_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="decoder.pooling='max'"):
        classify.check_pooling("max", TINY, "decoder.pooling")
    with pytest.raises(ConfigError, match="'first' with model.causal=True"):
        classify.check_pooling("first", TINY)
    with pytest.raises(ConfigError, match="num_classes=1"):
        classify.init_head(TINY, 1, jax.random.PRNGKey(0))
    base = ["--set", "decoder.train.steps=1", "--set", "encoder.train.steps=1"]
    for bad, message in (("encoder.pooling=cls", "encoder.pooling='cls'"),
                         ("decoder.pooling=first", "'first' with model.causal=True"),
                         ("decoder.num_classes=4", "decoder.num_classes=4, but builtin:classify has 3"),
                         ("encoder.init_from=/nonexistent/pretrain", "encoder.init_from=/nonexistent")):
        with pytest.raises(ConfigError, match=message):
            classify_experiment.main(["--workdir", "/tmp/unused-classify"] + base + ["--set", bad])


# ---------------------------------------------------------------------------
# Training


def train_and_eval(seed: int, steps: int = 250) -> float:
    """Held-out accuracy of a tiny decoder ("last" pooling) trained `steps` steps on builtin:classify."""
    cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=64, num_layers=2, num_heads=4, d_ff=128, max_len=32)
    data = DataConfig(source="builtin:classify", size=5000, seq_len=32, batch_size=32, max_segments=1,
                      num_classes=3)
    tx, schedule = train.make_optimizer(OptimizerConfig(lr=3e-3, warmup_steps=20, weight_decay=0.01), steps)
    params = classify.init_classifier_params(cfg, model.init(cfg, jax.random.PRNGKey(seed)), 3,
                                             jax.random.PRNGKey(seed + 1))
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(2))
    step = jax.jit(train.make_train_step(classify.classify_loss_fn(cfg, "last"), classify.label_count,
                                         tx, schedule))
    loader = Loader(data, TOK, shard_index=0, shard_count=1)
    for _ in range(steps):
        state, _ = step(state, next(loader))
    held = Loader(DataConfig(**{**data.__dict__, "split": "eval", "shuffle": False, "num_epochs": 1,
                                "batch_size": 100}), TOK, shard_index=0, shard_count=1)
    fn = jax.jit(lambda p, b: classify.accuracy_counts(cfg, p, b, "last"))
    right = total = 0.0
    for batch in held:
        r, n = fn(state.params, batch)
        right, total = right + float(r), total + float(n)
    assert total == 500  # the whole held-out split, each item once
    return right / total


def test_short_training_beats_chance_on_heldout():
    # Chance is 1/3. Measured with this setup (250 steps, ~15 s on 2 CPU cores):
    # 0.580 (seed 0, this test), 0.564, 0.586, 0.572 (seeds 1-3): 0.45 is far from both
    # chance and the measured runs.
    accuracy = train_and_eval(seed=0)
    assert accuracy > 0.45, accuracy
