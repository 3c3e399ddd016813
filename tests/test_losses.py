"""Tests for llm_jax.losses.

Every expected number comes from an independent reference: float64 numpy,
plain Python loops over time, or hand arithmetic with `math`, never from the
code under test.
"""

import ast
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from llm_jax import losses

RTOL, ATOL = 1e-5, 1e-6
B, T, V = 4, 7, 11
LENGTHS = (7, 4, 1, 0)  # right padding; the last row is all padding


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def maybe_jit(fn, jit, **kwargs):
    fn = functools.partial(fn, **kwargs) if kwargs else fn
    return jax.jit(fn) if jit else fn


# ---------------------------------------------------------------------------
# Independent numpy / loop references (float64).
# ---------------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_token_logprobs(logits, targets):
    logp = np_log_softmax(logits)
    out = np.zeros(targets.shape)
    for index in np.ndindex(*targets.shape):
        out[index] = logp[index + (targets[index],)]
    return out


def np_weighted(values, weights, normalizer=None):
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    total = (weights * values).sum()
    return total / (weights.sum() if normalizer is None else normalizer)


def np_token_kl(logits, ref_logits):
    logp, logq = np_log_softmax(logits), np_log_softmax(ref_logits)
    return (np.exp(logp) * (logp - logq)).sum(axis=-1)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def right_padded(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def gae_loop(rewards, values, weights, gamma, lam):
    """GAE one row and one step at a time; real steps are a prefix of each row."""
    advantages = np.zeros(rewards.shape)
    returns = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        n = int((weights[b] > 0).sum())
        assert (weights[b, :n] > 0).all()  # the reference assumes right padding
        next_value, next_advantage = 0.0, 0.0  # the episode ends after step n-1
        for t in reversed(range(n)):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            next_advantage = delta + gamma * lam * next_advantage
            next_value = float(values[b, t])
            advantages[b, t] = next_advantage
            returns[b, t] = next_advantage + next_value
    return advantages, returns


def kl_rewards_loop(scores, logprobs, ref_logprobs, weights, kl_coef):
    out = np.zeros(logprobs.shape)
    for b in range(logprobs.shape[0]):
        last = None
        for t in range(logprobs.shape[1]):
            if weights[b, t] > 0:
                log_ratio = float(logprobs[b, t]) - float(ref_logprobs[b, t])
                out[b, t] = -kl_coef * log_ratio
                last = t
        if last is not None:
            out[b, last] += float(scores[b])
    return out


@pytest.fixture
def lm_batch():
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    weights = right_padded(LENGTHS, T)
    return logits, targets, weights


# ---------------------------------------------------------------------------
# Token log-probs and language-modelling losses.
# ---------------------------------------------------------------------------


def test_shift_for_clm():
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    weights = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], np.float32)
    inputs, targets = losses.shift_for_clm(tokens)
    np.testing.assert_array_equal(inputs, tokens[:, :-1])
    np.testing.assert_array_equal(targets, tokens[:, 1:])
    inputs, targets, target_weights = losses.shift_for_clm(tokens, weights)
    np.testing.assert_array_equal(targets, [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]])
    np.testing.assert_array_equal(
        target_weights, [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    )
    assert inputs.shape == targets.shape == target_weights.shape == (2, 5)


@pytest.mark.parametrize("jit", [False, True])
def test_token_and_sequence_logprobs(lm_batch, jit):
    logits, targets, weights = lm_batch
    expected = np_token_logprobs(logits, targets)
    got = maybe_jit(losses.token_logprobs, jit)(logits, targets)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    assert_close(got, expected)
    seq = maybe_jit(losses.sequence_logprobs, jit)(logits, targets, weights)
    assert seq.shape == (B,)
    assert_close(seq, (weights * expected).sum(axis=-1))
    assert float(seq[-1]) == 0.0  # all-padding row


def test_token_logprobs_bf16_logits_computed_in_float32():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(4.0 * rng.standard_normal((2, 3, 4096)), jnp.bfloat16)
    targets = rng.integers(0, 4096, size=(2, 3))
    got = losses.token_logprobs(logits, targets)
    assert got.dtype == jnp.float32
    # Reference on the exact bf16 values, in float64.
    expected = np_token_logprobs(np.asarray(logits.astype(jnp.float32)), targets)
    assert_close(got, expected)


def test_token_logprobs_large_logits_are_stable():
    logits = np.array([[[1e4, 1e4 - 1.0, -1e4]]], np.float32)
    got = losses.token_logprobs(logits, np.array([[1]]))
    assert_close(got, [[-1.0 - math.log1p(math.exp(-1.0))]])


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("normalizer", [None, 37.0])
def test_clm_loss_matches_numpy(lm_batch, jit, normalizer):
    logits, targets, weights = lm_batch
    expected = -np_weighted(np_token_logprobs(logits, targets), weights, normalizer)
    got = maybe_jit(losses.clm_loss, jit)(logits, targets, weights, normalizer)
    assert got.shape == () and got.dtype == jnp.float32
    assert_close(got, expected)


def test_clm_loss_real_valued_weights(lm_batch):
    logits, targets, _ = lm_batch
    # Weights summing to less than 1 must still be divided exactly (no max(., 1)).
    weights = np.zeros((B, T), np.float32)
    weights[0, :3] = [0.1, 0.2, 0.05]
    expected = -np_weighted(np_token_logprobs(logits, targets), weights)
    assert_close(losses.clm_loss(logits, targets, weights), expected)


def test_all_padding_gives_zero_loss_and_finite_grad(lm_batch):
    logits, targets, _ = lm_batch
    weights = np.zeros((B, T), np.float32)
    loss, grad = jax.jit(jax.value_and_grad(losses.clm_loss))(logits, targets, weights)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_clm_toy_example():
    # Context "the cat sat on the", next token "mat" with p(mat) = 0.75.
    probs = np.array([0.75, 0.15, 0.06, 0.04])  # mat, floor, rug, sofa
    logits = np.log(probs).astype(np.float32)[None, None, :]
    loss = float(losses.clm_loss(logits, np.array([[0]]), np.ones((1, 1))))
    assert round(loss, 2) == 0.29
    assert loss == pytest.approx(0.2877, abs=1e-4)
    assert loss == pytest.approx(-math.log(0.75), rel=RTOL)


def test_mlm_toy_example():
    # "the cat sat on the [MASK]": only position 2 is masked; the model predicts
    # mat .70, floor .15, chair .10, sofa .03, ground .02 there.
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((1, 4, 5)).astype(np.float32)
    logits[0, 2] = np.log([0.70, 0.15, 0.10, 0.03, 0.02])
    targets = np.array([[3, 1, 0, 4]])  # position 2 holds "mat" (id 0)
    weights = np.array([[0.0, 0.0, 1.0, 0.0]])
    loss = float(losses.mlm_loss(logits, targets, weights))
    assert round(loss, 3) == 0.357
    assert loss == pytest.approx(-math.log(0.70), rel=RTOL)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("normalizer", [None, 5.0])
def test_mlm_loss_matches_numpy(lm_batch, jit, normalizer):
    logits, targets, _ = lm_batch
    weights = (np.random.default_rng(3).random((B, T)) < 0.3).astype(np.float32)
    expected = -np_weighted(np_token_logprobs(logits, targets), weights, normalizer)
    got = maybe_jit(losses.mlm_loss, jit)(logits, targets, weights, normalizer)
    assert_close(got, expected)


def test_mlm_mask_statistics():
    vocab_size, mask_id = 30000, 103
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, vocab_size, size=(64, 512)).astype(np.int32)
    tokens[tokens == mask_id] = mask_id + 1  # originals never equal mask_id
    can_mask = rng.random(tokens.shape) > 0.2
    can_mask[:, 0] = False  # e.g. [CLS]
    mask_fn = jax.jit(
        functools.partial(losses.mlm_mask, mask_id=mask_id, vocab_size=vocab_size)
    )
    counts = dict(maskable=0, chosen=0, masked=0, random=0, kept=0)
    for seed in range(3):
        inputs, targets, weights = map(
            np.asarray, mask_fn(jax.random.key(seed), tokens, can_mask=can_mask)
        )
        assert inputs.dtype == tokens.dtype and weights.dtype == np.float32
        np.testing.assert_array_equal(targets, tokens)
        assert set(np.unique(weights)) <= {0.0, 1.0}
        chosen = weights == 1.0
        assert not chosen[~can_mask].any()
        np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
        assert inputs.min() >= 0 and inputs.max() < vocab_size
        # A random replacement equals the original or mask_id with probability
        # 2 / 30000 each; that bias (~0.001 pct points) is negligible here.
        masked = chosen & (inputs == mask_id)
        kept = chosen & (inputs == tokens)
        counts["maskable"] += can_mask.sum()
        counts["chosen"] += chosen.sum()
        counts["masked"] += masked.sum()
        counts["kept"] += kept.sum()
        counts["random"] += (chosen & ~masked & ~kept).sum()
    assert abs(counts["chosen"] / counts["maskable"] - 0.15) < 0.005
    assert abs(counts["masked"] / counts["chosen"] - 0.80) < 0.01
    assert abs(counts["random"] / counts["chosen"] - 0.10) < 0.01
    assert abs(counts["kept"] / counts["chosen"] - 0.10) < 0.01


def test_mlm_mask_default_can_mask_and_other_mask_prob():
    tokens = np.random.default_rng(5).integers(5, 1000, size=(32, 256))
    mask_fn = jax.jit(
        functools.partial(losses.mlm_mask, mask_id=0, vocab_size=1000, mask_prob=0.3)
    )
    _, _, weights = mask_fn(jax.random.key(7), tokens)
    assert abs(float(np.mean(weights)) - 0.3) < 0.01  # can_mask=None: all maskable
    _, _, other = mask_fn(jax.random.key(8), tokens)
    assert not np.array_equal(weights, other)  # a new key, a new mask


# ---------------------------------------------------------------------------
# SFT.
# ---------------------------------------------------------------------------


def test_sft_without_kl_equals_clm(lm_batch):
    logits, targets, weights = lm_batch
    expected = -np_weighted(np_token_logprobs(logits, targets), weights, 9.0)
    assert_close(losses.sft_loss(logits, targets, weights, normalizer=9.0), expected)
    assert_close(
        losses.sft_loss(logits, targets, weights),
        losses.clm_loss(logits, targets, weights),
    )


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("normalizer", [None, 9.0])
def test_sft_with_kl_matches_numpy(lm_batch, jit, normalizer):
    logits, targets, weights = lm_batch
    ref_logits = np.random.default_rng(6).standard_normal((B, T, V)).astype(np.float32)
    per_token = -np_token_logprobs(logits, targets) + 0.3 * np_token_kl(
        logits, ref_logits
    )
    expected = np_weighted(per_token, weights, normalizer)
    fn = maybe_jit(losses.sft_loss, jit, kl_coef=0.3, normalizer=normalizer)
    assert_close(fn(logits, targets, weights, ref_logits), expected)


def test_token_kl_matches_numpy_and_is_zero_for_identical_logits(lm_batch):
    logits, targets, weights = lm_batch
    ref_logits = np.random.default_rng(6).standard_normal((B, T, V)).astype(np.float32)
    assert_close(losses.token_kl(logits, ref_logits), np_token_kl(logits, ref_logits))
    assert_close(losses.token_kl(logits, logits), np.zeros((B, T)))
    assert_close(
        losses.sft_loss(logits, targets, weights, logits, kl_coef=5.0),
        losses.clm_loss(logits, targets, weights),
    )


def test_sft_ref_logits_get_no_gradient(lm_batch):
    logits, targets, weights = lm_batch
    ref_logits = jnp.zeros((B, T, V))
    grad = jax.jit(jax.grad(losses.sft_loss, argnums=3))(
        logits, targets, weights, ref_logits, 0.5
    )
    assert np.all(np.asarray(grad) == 0.0)


def test_sft_kl_coef_without_ref_logits_raises(lm_batch):
    with pytest.raises(ValueError):
        losses.sft_loss(*lm_batch, kl_coef=0.1)


# ---------------------------------------------------------------------------
# Preference losses.
# ---------------------------------------------------------------------------


@pytest.fixture
def pairs():
    rng = np.random.default_rng(7)
    return tuple(rng.normal(-20.0, 5.0, size=6).astype(np.float32) for _ in range(4))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "margin,normalizer", [(None, None), (0.5, 16.0), ("per_pair", None)]
)
def test_reward_model_loss_matches_numpy(pairs, jit, margin, normalizer):
    chosen, rejected = pairs[0] / 10, pairs[1] / 10
    if margin == "per_pair":
        margin = np.linspace(0.0, 1.0, 6).astype(np.float32)
    m = 0.0 if margin is None else margin
    per_pair = -np_log_sigmoid(chosen.astype(np.float64) - rejected - m)
    expected = per_pair.sum() / (6 if normalizer is None else normalizer)
    got = maybe_jit(losses.reward_model_loss, jit)(chosen, rejected, margin, normalizer)
    assert got.shape == ()
    assert_close(got, expected)


def test_reward_model_loss_is_stable_for_large_gaps():
    got = losses.reward_model_loss(np.array([0.0, 200.0]), np.array([200.0, 0.0]))
    assert_close(got, (200.0 + 0.0) / 2)  # -log sigmoid(-200) ~= 200


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("label_smoothing,normalizer", [(0.0, None), (0.1, 16.0)])
def test_dpo_loss_matches_numpy(pairs, jit, label_smoothing, normalizer):
    pc, pr, rc, rr = (x.astype(np.float64) for x in pairs)
    beta = 0.3
    h = (pc - pr) - (rc - rr)
    per_pair = -(1 - label_smoothing) * np_log_sigmoid(
        beta * h
    ) - label_smoothing * np_log_sigmoid(-beta * h)
    expected = per_pair.sum() / (6 if normalizer is None else normalizer)
    fn = maybe_jit(
        losses.dpo_loss,
        jit,
        beta=beta,
        label_smoothing=label_smoothing,
        normalizer=normalizer,
    )
    assert_close(fn(*pairs), expected)



@pytest.mark.parametrize("normalizer", [None, 8.0])
def test_pair_losses_weights_drop_padding_pairs(pairs, normalizer):
    """Weighted pair losses equal the loss over the kept pairs only (the empty slots
    of a packed preference batch must not count as pairs)."""
    keep = np.array([1, 0, 1, 1, 0, 1], np.float32)
    pc, pr, rc, rr = (x.astype(np.float64) for x in pairs)
    h = (pc - pr) - (rc - rr)
    denom = keep.sum() if normalizer is None else normalizer
    cases = [
        (losses.reward_model_loss(pairs[0] / 10, pairs[1] / 10, None, normalizer, weights=keep),
         -np_log_sigmoid((pc - pr) / 10)),
        (losses.dpo_loss(*pairs, beta=0.3, label_smoothing=0.1, normalizer=normalizer, weights=keep),
         -0.9 * np_log_sigmoid(0.3 * h) - 0.1 * np_log_sigmoid(-0.3 * h)),
        (losses.ipo_loss(*pairs, beta=0.3, normalizer=normalizer, weights=keep),
         (h - 1 / 0.6) ** 2),
    ]
    for got, per_pair in cases:
        assert_close(got, (per_pair * keep).sum() / denom)


def test_token_logprobs_out_of_range_and_masked_vocab():
    """An invalid target id (padding -1, or >= V) reads log-prob 0 instead of a wrapped
    index or NaN; a -inf logit elsewhere in the vocabulary does not poison the result."""
    logits = np.array([[[0.0, 1.0, 2.0], [0.0, -np.inf, 1.0]]], np.float32)
    got = np.asarray(losses.token_logprobs(logits, np.array([[-1, 2]])))
    want_second = 1.0 - np.log(1.0 + np.e)
    np.testing.assert_allclose(got, [[0.0, want_second]], rtol=1e-6)
    got = np.asarray(losses.token_logprobs(logits, np.array([[3, 0]])))
    np.testing.assert_allclose(got, [[0.0, -np.log(1.0 + np.e)]], rtol=1e-6)


def test_dpo_toy_example():
    pc, pr = math.log(0.65), math.log(0.20)  # policy pi(y_w), pi(y_l)
    rc, rr = math.log(0.42), math.log(0.38)  # reference
    assert pc - pr == pytest.approx(1.18, abs=0.005)
    assert rc - rr == pytest.approx(0.10, abs=0.005)
    beta = 0.1
    h = (pc - pr) - (rc - rr)
    by_hand = -math.log(1.0 / (1.0 + math.exp(-beta * h)))
    loss = float(
        losses.dpo_loss(
            *(np.array([x], np.float32) for x in (pc, pr, rc, rr)), beta=beta
        )
    )
    assert loss < math.log(2)
    assert loss == pytest.approx(by_hand, rel=RTOL)
    rounded = -math.log(1.0 / (1.0 + math.exp(-beta * (1.18 - 0.10))))
    assert round(loss, 2) == round(rounded, 2)


def test_dpo_zero_margin_difference_is_log2(pairs):
    pc, pr, _, _ = pairs
    # The policy's margin equals the reference's: h = 0 for every pair.
    for ls in (0.0, 0.2):
        loss = losses.dpo_loss(pc, pr, pc + 1.5, pr + 1.5, label_smoothing=ls)
        assert_close(loss, math.log(2))


def test_dpo_reference_gets_no_gradient(pairs):
    grads = jax.jit(jax.grad(losses.dpo_loss, argnums=(0, 1, 2, 3)))(*pairs)
    assert np.any(np.asarray(grads[0]) != 0) and np.any(np.asarray(grads[1]) != 0)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("normalizer", [None, 16.0])
def test_ipo_loss_matches_numpy(pairs, jit, normalizer):
    pc, pr, rc, rr = (x.astype(np.float64) for x in pairs)
    beta = 0.25
    per_pair = ((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2
    expected = per_pair.sum() / (6 if normalizer is None else normalizer)
    fn = maybe_jit(losses.ipo_loss, jit, beta=beta, normalizer=normalizer)
    assert_close(fn(*pairs), expected)


# ---------------------------------------------------------------------------
# PPO.
# ---------------------------------------------------------------------------


@pytest.fixture
def rollout():
    rng = np.random.default_rng(8)
    old_logprobs = -rng.random((B, T)).astype(np.float32) * 3
    # Ratios between ~0.6 and ~1.6: some tokens clipped on each side.
    logprobs = old_logprobs + rng.uniform(-0.5, 0.5, (B, T)).astype(np.float32)
    advantages = rng.standard_normal((B, T)).astype(np.float32)
    weights = right_padded(LENGTHS, T)
    return logprobs, old_logprobs, advantages, weights


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("normalizer", [None, 20.0])
def test_ppo_policy_loss_matches_numpy(rollout, jit, normalizer):
    logprobs, old_logprobs, advantages, weights = rollout
    eps = 0.2
    ratio = np.exp(logprobs.astype(np.float64) - old_logprobs)
    clipped = np.clip(ratio, 1 - eps, 1 + eps)
    per_token = -np.minimum(ratio * advantages, clipped * advantages)
    expected = np_weighted(per_token, weights, normalizer)
    fn = maybe_jit(losses.ppo_policy_loss, jit, clip_eps=eps, normalizer=normalizer)
    assert_close(fn(logprobs, old_logprobs, advantages, weights), expected)


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage(rollout):
    _, old_logprobs, advantages, weights = rollout
    got = losses.ppo_policy_loss(old_logprobs, old_logprobs, advantages, weights)
    assert_close(got, -(weights * advantages).sum() / weights.sum())


def test_ppo_policy_loss_clipping_gradients():
    old = np.zeros((1, 4), np.float32)
    # ratios: 1.5 (> 1 + eps), 1.5, 0.5 (< 1 - eps), 1.1 (inside)
    logprobs = np.log(np.array([[1.5, 1.5, 0.5, 1.1]], np.float32))
    advantages = np.array([[2.0, -2.0, -1.0, 3.0]], np.float32)
    weights = np.ones((1, 4), np.float32)
    loss, grad = jax.jit(jax.value_and_grad(losses.ppo_policy_loss))(
        logprobs, old, advantages, weights
    )  # default clip_eps=0.2
    grad = np.asarray(grad)[0]
    # A > 0, r > 1 + eps: the objective is the constant 1.2 * A, no gradient.
    assert grad[0] == 0.0
    # A < 0, r < 1 - eps: the constant 0.8 * A, no gradient.
    assert grad[2] == 0.0
    # A < 0, r > 1 + eps: the unclipped (pessimistic) term r * A stays active;
    # d(-r A / n)/d logp = -r A / n.
    assert_close(grad[1], -1.5 * -2.0 / 4)
    assert_close(grad[3], -1.1 * 3.0 / 4)
    assert_close(loss, -(1.2 * 2.0 + 1.5 * -2.0 + 0.8 * -1.0 + 1.1 * 3.0) / 4)


def test_ppo_rollout_inputs_get_no_gradient(rollout):
    logprobs, old_logprobs, advantages, weights = rollout
    grads = jax.jit(jax.grad(losses.ppo_policy_loss, argnums=(0, 1, 2)))(
        logprobs, old_logprobs, advantages, weights
    )
    assert np.any(np.asarray(grads[0]) != 0)
    assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)
    grads = jax.jit(jax.grad(losses.ppo_value_loss, argnums=(0, 1, 2)))(
        logprobs, old_logprobs, advantages, weights
    )
    assert np.any(np.asarray(grads[0]) != 0)
    assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)


@pytest.mark.parametrize("normalizer", [None, 20.0])
def test_ppo_clip_fraction(rollout, normalizer):
    logprobs, old_logprobs, _, weights = rollout
    ratio = np.exp(logprobs.astype(np.float64) - old_logprobs)
    clipped = (np.abs(ratio - 1) > 0.2).astype(np.float64)
    expected = np_weighted(clipped, weights, normalizer)
    assert 0.0 < expected < 1.0
    got = losses.ppo_clip_fraction(
        logprobs, old_logprobs, weights, clip_eps=0.2, normalizer=normalizer
    )
    assert_close(got, expected)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("normalizer", [None, 20.0])
def test_ppo_value_loss_matches_numpy(jit, normalizer):
    rng = np.random.default_rng(9)
    old_values = rng.standard_normal((B, T)).astype(np.float32)
    values = old_values + rng.uniform(-0.5, 0.5, (B, T)).astype(np.float32)
    returns = rng.standard_normal((B, T)).astype(np.float32)
    weights = right_padded(LENGTHS, T)
    eps = 0.2
    v, old = values.astype(np.float64), old_values.astype(np.float64)
    clipped = old + np.clip(v - old, -eps, eps)
    per_token = 0.5 * np.maximum((v - returns) ** 2, (clipped - returns) ** 2)
    expected = np_weighted(per_token, weights, normalizer)
    fn = maybe_jit(losses.ppo_value_loss, jit, clip_eps=eps, normalizer=normalizer)
    assert_close(fn(values, old_values, returns, weights), expected)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_python_loop(jit, gamma, lam):
    rng = np.random.default_rng(10)
    rewards = rng.standard_normal((B, T)).astype(np.float32)
    values = rng.standard_normal((B, T)).astype(np.float32)
    weights = right_padded(LENGTHS, T)
    # Garbage at the pads must not leak into real steps.
    rewards[weights == 0] = 1e3
    values[weights == 0] = -1e3
    exp_adv, exp_ret = gae_loop(rewards, values, weights, gamma, lam)
    fn = maybe_jit(losses.gae, jit, gamma=gamma, lam=lam)
    adv, ret = fn(rewards, values, weights)
    assert adv.shape == ret.shape == (B, T)
    assert_close(adv, exp_adv)
    assert_close(ret, exp_ret)
    assert np.all(np.asarray(adv)[weights == 0] == 0)
    assert np.all(np.asarray(ret)[weights == 0] == 0)


def test_gae_hand_example():
    # One row, 3 real steps then a pad; gamma = lam = 1 gives
    # A_t = sum_{k >= t} r_k - V_t (Monte-Carlo return minus baseline).
    rewards = np.array([[0.0, 0.0, 1.0, 9.0]], np.float32)
    values = np.array([[0.5, 0.25, 0.75, 9.0]], np.float32)
    weights = np.array([[1, 1, 1, 0]], np.float32)
    adv, ret = losses.gae(rewards, values, weights, gamma=1.0, lam=1.0)
    assert_close(adv, [[0.5, 0.75, 0.25, 0.0]])
    assert_close(ret, [[1.0, 1.0, 1.0, 0.0]])


@pytest.mark.parametrize("jit", [False, True])
def test_kl_penalized_rewards_matches_loop(jit):
    rng = np.random.default_rng(11)
    scores = rng.standard_normal(B).astype(np.float32)
    logprobs = -rng.random((B, T)).astype(np.float32)
    ref_logprobs = -rng.random((B, T)).astype(np.float32)
    weights = right_padded(LENGTHS, T)
    expected = kl_rewards_loop(scores, logprobs, ref_logprobs, weights, 0.05)
    fn = maybe_jit(losses.kl_penalized_rewards, jit, kl_coef=0.05)
    got = fn(scores, logprobs, ref_logprobs, weights)
    assert got.shape == (B, T)
    assert_close(got, expected)
    assert np.all(np.asarray(got)[-1] == 0)  # the all-padding row


# ---------------------------------------------------------------------------
# Gradients, the normalizer property, transformations.
# ---------------------------------------------------------------------------


def _grad_cases():
    """(name, function of the differentiable args, args) on smooth regions."""
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((2, 3, 5))
    ref_logits = rng.standard_normal((2, 3, 5))
    targets = rng.integers(0, 5, size=(2, 3))
    weights = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    pc, pr, rc, rr = rng.normal(-5.0, 1.0, size=(4, 3))
    old_logprobs = -rng.random((2, 3))
    # |log r| < 0.1, so r stays inside [0.8, 1.2] (no clipping kink).
    logprobs = old_logprobs + rng.uniform(-0.1, 0.1, (2, 3))
    advantages = rng.standard_normal((2, 3))
    old_values = rng.standard_normal((2, 3))
    # Tokens 0-2 move less than eps (v_clip == v); tokens 3-5 move 0.5 > eps
    # with the return far below, so the unclipped term is strictly larger.
    values = old_values + np.array([[0.05, -0.1, 0.15], [0.5, 0.5, 0.5]])
    returns = np.concatenate([rng.standard_normal(3), values[1] - 2.0]).reshape(2, 3)
    return [
        ("clm", lambda x: losses.clm_loss(x, targets, weights, 3.0), (logits,)),
        (
            "sft_kl",
            lambda x: losses.sft_loss(x, targets, weights, ref_logits, kl_coef=0.7),
            (logits,),
        ),
        (
            "reward_model",
            lambda c, r: losses.reward_model_loss(c, r, margin=0.3),
            (pc, pr),
        ),
        (
            "dpo",
            lambda c, r: losses.dpo_loss(c, r, rc, rr, beta=0.5, label_smoothing=0.1),
            (pc, pr),
        ),
        ("ipo", lambda c, r: losses.ipo_loss(c, r, rc, rr, beta=0.5), (pc, pr)),
        (
            "ppo_policy",
            lambda lp: losses.ppo_policy_loss(lp, old_logprobs, advantages, weights),
            (logprobs,),
        ),
        (
            "ppo_value",
            lambda v: losses.ppo_value_loss(v, old_values, returns, np.ones((2, 3))),
            (values,),
        ),
    ]


@pytest.mark.parametrize("case", _grad_cases(), ids=lambda case: case[0])
def test_check_grads(case):
    _, fn, args = case
    # float64 (the losses keep f64 inputs in f64) so finite differences are exact
    # enough for the default tolerances; jit keeps the many calls cheap.
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in args)
        check_grads(jax.jit(fn), args, order=1, modes=["rev"])


def test_global_normalizer_makes_microbatch_grads_exact():
    rng = np.random.default_rng(13)
    batch, t, d, v = 8, 6, 5, 7
    x = rng.standard_normal((batch, t, d)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((d, v)).astype(np.float32))
    targets = rng.integers(0, v, size=(batch, t))
    weights = right_padded([6, 1, 3, 6, 2, 5, 0, 4], t)  # unequal microbatch sums

    def loss_fn(params, x, targets, weights, normalizer=None):
        logits = x @ params  # a tiny linear "model": [b, t, D] @ [D, V]
        return losses.clm_loss(logits, targets, weights, normalizer)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    full_loss, full_grad = grad_fn(w, x, targets, weights)
    normalizer = weights.sum()
    acc_loss, acc_grad, naive_grad = 0.0, np.zeros((d, v)), np.zeros((d, v))
    for mb in np.split(np.arange(batch), 4):
        batch_mb = (w, x[mb], targets[mb], weights[mb])
        loss, grad = grad_fn(*batch_mb, normalizer)
        acc_loss += float(loss)
        acc_grad += np.asarray(grad)
        # The naive alternative: average the microbatches' own means.
        naive_grad += np.asarray(grad_fn(*batch_mb, weights[mb].sum())[1]) / 4
    assert_close(acc_loss, float(full_loss))
    assert_close(acc_grad, np.asarray(full_grad))
    # The per-microbatch mean would not give the full-batch gradient.
    assert not np.allclose(naive_grad, np.asarray(full_grad), rtol=1e-3, atol=1e-4)


def test_vmap(lm_batch):
    logits, targets, weights = lm_batch
    # An extra leading axis (e.g. several samples per prompt).
    stacked = np.stack([logits, logits[::-1], 2 * logits])
    seq = jax.jit(jax.vmap(losses.sequence_logprobs, in_axes=(0, None, None)))(
        stacked, targets, weights
    )
    for i in range(3):
        expected = (weights * np_token_logprobs(stacked[i], targets)).sum(axis=-1)
        assert_close(seq[i], expected)
    # Per-example losses: each example is [T, V] / [T] inside vmap.
    per_example = jax.jit(jax.vmap(losses.clm_loss))(logits, targets, weights)
    token_lp = np_token_logprobs(logits, targets)
    for b in range(B):
        expected = -np_weighted(token_lp[b], weights[b]) if weights[b].sum() else 0.0
        assert_close(per_example[b], expected)
    # gae over an extra axis matches the batched call.
    rewards = np.random.default_rng(14).standard_normal((2, B, T)).astype(np.float32)
    adv = jax.jit(jax.vmap(lambda r: losses.gae(r, r, weights)[0]))(rewards)
    for i in range(2):
        assert_close(adv[i], losses.gae(rewards[i], rewards[i], weights)[0])


def test_losses_registry():
    assert losses.LOSSES == {
        "clm": losses.clm_loss,
        "mlm": losses.mlm_loss,
        "sft": losses.sft_loss,
        "reward_model": losses.reward_model_loss,
        "dpo": losses.dpo_loss,
        "ipo": losses.ipo_loss,
        "ppo_policy": losses.ppo_policy_loss,
        "ppo_value": losses.ppo_value_loss,
        "classification": losses.classification_loss,
    }


def test_imports_only_jax():
    # No flax (or any other framework): the module imports jax and nothing else.
    tree = ast.parse(pathlib.Path(losses.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"jax"}
