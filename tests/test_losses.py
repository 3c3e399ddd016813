"""Tests for llm_jax.losses.

Every expected number comes from an independent reference: float64 numpy,
plain Python loops over time, or hand arithmetic with `math`, never from the
code under test. The references run with and without jit (`chex.variants`).
"""

import ast
import functools
import inspect
import math
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from llm_jax import losses
from llm_jax.errors import InputError

RTOL, ATOL = 1e-5, 1e-6
B, T, V = 4, 7, 11
LENGTHS = (7, 4, 1, 0)  # right padding; the last row is all padding
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


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


def np_denominator(weights, normalizer=None):
    """The loss's denominator: the normalizer, else the weights' sum; 0 -> 1."""
    d = np.asarray(weights, np.float64).sum() if normalizer is None else float(normalizer)
    return 1.0 if d == 0 else d


def np_weighted(values, weights, normalizer=None):
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    return (weights * values).sum() / np_denominator(weights, normalizer)


def np_per_example(values, weights, normalizer=None):
    """Each row's share of np_weighted: its weighted sum over the same denominator."""
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    rows = (weights * values).reshape(len(values), -1).sum(axis=1)
    return rows / np_denominator(weights, normalizer)


def np_token_kl(logits, ref_logits):
    logp, logq = np_log_softmax(logits), np_log_softmax(ref_logits)
    return (np.exp(logp) * (logp - logq)).sum(axis=-1)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_cross_entropy_ignore_index(logits, targets, ignore_index=-100):
    """PyTorch/Hugging Face cross-entropy(reduction='mean', ignore_index): the mean
    of -log p over the positions whose target is not `ignore_index`, one at a time."""
    logp = np_log_softmax(logits)
    total, count = 0.0, 0
    for index in np.ndindex(*targets.shape):
        if targets[index] != ignore_index:
            total -= logp[index + (targets[index],)]
            count += 1
    return total / count


def np_ipo_trl(pc, pr, rc, rr, nc, nr, beta):
    """TRL's DPOTrainer(loss_type="ipo"): summed log-ratios divided by each
    response's completion-token count (clamped to >= 1), then the squared loss."""
    nc, nr = np.maximum(nc, 1.0), np.maximum(nr, 1.0)
    delta = (pc - rc) / nc - (pr - rr) / nr
    return (delta - 1 / (2 * beta)) ** 2


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


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------


def make_lm_batch():
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    weights = right_padded(LENGTHS, T)
    return logits, targets, weights


def make_ref_logits():
    return np.random.default_rng(6).standard_normal((B, T, V)).astype(np.float32)


def make_pairs():
    rng = np.random.default_rng(7)
    return tuple(rng.normal(-20.0, 5.0, size=6).astype(np.float32) for _ in range(4))


def make_rollout():
    rng = np.random.default_rng(8)
    old_logprobs = -rng.random((B, T)).astype(np.float32) * 3
    # Ratios between ~0.6 and ~1.6: some tokens clipped on each side.
    logprobs = old_logprobs + rng.uniform(-0.5, 0.5, (B, T)).astype(np.float32)
    advantages = rng.standard_normal((B, T)).astype(np.float32)
    weights = right_padded(LENGTHS, T)
    return logprobs, old_logprobs, advantages, weights


@pytest.fixture
def lm_batch():
    return make_lm_batch()


@pytest.fixture
def pairs():
    return make_pairs()


@pytest.fixture
def rollout():
    return make_rollout()


def loss_cases(dtype=np.float32):
    """{name: (arrays, options)} for every LOSSES entry, B = 4 examples each, with
    some padding (weight 0) and unequal row weights."""
    rng = np.random.default_rng(20)
    f = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    logits, ref_logits = 2 * f(B, T, V), f(B, T, V)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    weights = right_padded(LENGTHS, T).astype(dtype)
    pair_weights = np.array([1, 0, 1, 1], dtype)
    pc, pr, rc, rr = (f(B) - 20 for _ in range(4))
    old = -rng.random((B, T)).astype(dtype)
    return {
        "clm": ((logits, targets, weights), {}),
        "mlm": ((logits, targets, weights), {}),
        "sft": ((logits, targets, weights, ref_logits), {"kl_coef": 0.3}),
        "classification": ((logits[:, 0], targets[:, 0], weights[:, 1]), {}),
        "reward_model": ((pc / 10, pr / 10), {"margin": 0.2, "weights": pair_weights}),
        "dpo": ((pc, pr, rc, rr), {"beta": 0.3, "label_smoothing": 0.1, "weights": pair_weights}),
        "ipo": ((pc / 5, pr / 5, rc / 5, rr / 5), {"beta": 0.3, "weights": pair_weights}),
        "ppo_policy": ((old + 0.3 * f(B, T), old, f(B, T), weights), {"clip_eps": 0.2}),
        "ppo_value": ((old + 0.3 * f(B, T), old, f(B, T), weights), {"clip_eps": 0.2}),
        "grpo": ((old + 0.3 * f(B, T), old, f(B), weights),
                 {"clip_eps_high": 0.28, "ref_logprobs": old - 0.2 * f(B, T), "kl_coef": 0.1,
                  "aggregation": "sequence"}),
        "reinforce": ((old + 0.3 * f(B, T), f(B), weights), {}),
    }


def zero_weights(name, arrays, options):
    """The same case with every weight 0 (an all-padding shard)."""
    if "weights" in options:
        return arrays, dict(options, weights=np.zeros_like(options["weights"]))
    index = {"sft": 2, "classification": 2, "grpo": 3}.get(
        name, len(arrays) - 1 if name.startswith("ppo") else 2)
    arrays = list(arrays)
    arrays[index] = np.zeros_like(arrays[index])
    return tuple(arrays), options


def test_loss_cases_cover_every_loss():
    assert set(loss_cases()) == set(losses.LOSSES)


# ---------------------------------------------------------------------------
# Every function against its numpy / loop reference, with and without jit.
# ---------------------------------------------------------------------------


class NumpyReferenceTest(chex.TestCase):
    """`self.variant` is the function as is and under jax.jit (options static)."""

    def call(self, fn, *arrays, **options):
        return self.variant(functools.partial(fn, **options))(*arrays)

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_and_sequence_logprobs(self):
        logits, targets, weights = make_lm_batch()
        expected = np_token_logprobs(logits, targets)
        got = self.call(losses.token_logprobs, logits, targets)
        assert got.shape == (B, T) and got.dtype == jnp.float32
        assert_close(got, expected)
        seq = self.call(losses.sequence_logprobs, logits, targets, weights)
        assert seq.shape == (B,)
        assert_close(seq, (weights * expected).sum(axis=-1))
        assert float(seq[-1]) == 0.0  # all-padding row
        mean = self.call(losses.sequence_mean_logprobs, logits, targets, weights)
        lengths = np.array(LENGTHS, np.float64)
        assert_close(mean[:3], (weights * expected).sum(axis=-1)[:3] / lengths[:3])
        assert float(mean[-1]) == 0.0  # an empty row: 0, not 0 / 0

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 37.0)
    def test_clm_and_mlm_loss(self, normalizer):
        logits, targets, weights = make_lm_batch()
        mlm_weights = (np.random.default_rng(3).random((B, T)) < 0.3).astype(np.float32)
        per_token = -np_token_logprobs(logits, targets)
        for fn, w in ((losses.clm_loss, weights), (losses.mlm_loss, mlm_weights)):
            got = self.call(fn, logits, targets, w, normalizer=normalizer)
            assert got.shape == () and got.dtype == jnp.float32
            assert_close(got, np_weighted(per_token, w, normalizer))
            rows = self.call(fn, logits, targets, w, normalizer=normalizer, reduction="per_example")
            assert rows.shape == (B,)
            assert_close(rows, np_per_example(per_token, w, normalizer))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 9.0)
    def test_sft_loss_with_kl(self, normalizer):
        logits, targets, weights = make_lm_batch()
        ref_logits = make_ref_logits()
        per_token = -np_token_logprobs(logits, targets) + 0.3 * np_token_kl(logits, ref_logits)
        for reduction, reference in (("mean", np_weighted), ("per_example", np_per_example)):
            got = self.call(losses.sft_loss, logits, targets, weights, ref_logits, kl_coef=0.3,
                            normalizer=normalizer, reduction=reduction)
            assert_close(got, reference(per_token, weights, normalizer))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((None, None), (0.5, 16.0), ("per_pair", None))
    def test_reward_model_loss(self, margin, normalizer):
        pc, pr, _, _ = make_pairs()
        chosen, rejected = pc / 10, pr / 10
        if margin == "per_pair":
            margin = np.linspace(0.0, 1.0, 6).astype(np.float32)
        m = 0.0 if margin is None else margin
        per_pair = -np_log_sigmoid(chosen.astype(np.float64) - rejected - m)
        ones = np.ones(6)
        got = self.call(losses.reward_model_loss, chosen, rejected, margin=margin, normalizer=normalizer)
        assert got.shape == ()
        assert_close(got, np_weighted(per_pair, ones, normalizer))
        got = self.call(losses.reward_model_loss, chosen, rejected, margin=margin, normalizer=normalizer,
                        reduction="per_example")
        assert_close(got, np_per_example(per_pair, ones, normalizer))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0.0, None), (0.1, 16.0))
    def test_dpo_loss(self, label_smoothing, normalizer):
        pairs = make_pairs()
        pc, pr, rc, rr = (x.astype(np.float64) for x in pairs)
        beta, ls = 0.3, label_smoothing
        h = (pc - pr) - (rc - rr)
        per_pair = -(1 - ls) * np_log_sigmoid(beta * h) - ls * np_log_sigmoid(-beta * h)
        for reduction, reference in (("mean", np_weighted), ("per_example", np_per_example)):
            got = self.call(losses.dpo_loss, *pairs, beta=beta, label_smoothing=ls,
                            normalizer=normalizer, reduction=reduction)
            assert_close(got, reference(per_pair, np.ones(6), normalizer))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 16.0)
    def test_ipo_loss(self, normalizer):
        pairs = make_pairs()
        pc, pr, rc, rr = (x.astype(np.float64) for x in pairs)
        beta = 0.25
        per_pair = ((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2  # the formula, on what is passed
        for reduction, reference in (("mean", np_weighted), ("per_example", np_per_example)):
            got = self.call(losses.ipo_loss, *pairs, beta=beta, normalizer=normalizer, reduction=reduction)
            assert_close(got, reference(per_pair, np.ones(6), normalizer))

    @chex.variants(with_jit=True, without_jit=True)
    def test_ipo_on_sequence_mean_logprobs_is_trls_ipo(self):
        """ipo_loss on `sequence_mean_logprobs` is TRL's length-normalized IPO."""
        rng = np.random.default_rng(21)
        logits = {k: rng.standard_normal((B, T, V)).astype(np.float32) for k in ("pc", "pr", "rc", "rr")}
        chosen, rejected = (rng.integers(0, V, size=(B, T)) for _ in range(2))
        w_chosen, w_rejected = right_padded([7, 2, 5, 3], T), right_padded([1, 6, 5, 7], T)
        sides = {"pc": (chosen, w_chosen), "rc": (chosen, w_chosen),
                 "pr": (rejected, w_rejected), "rr": (rejected, w_rejected)}
        sums = {k: (w * np_token_logprobs(logits[k], y)).sum(-1) for k, (y, w) in sides.items()}
        beta = 0.1
        expected = np_ipo_trl(sums["pc"], sums["pr"], sums["rc"], sums["rr"],
                              w_chosen.sum(-1), w_rejected.sum(-1), beta).mean()

        def ipo(lc, lr, rlc, rlr):
            mean = losses.sequence_mean_logprobs
            return losses.ipo_loss(mean(lc, chosen, w_chosen), mean(lr, rejected, w_rejected),
                                   mean(rlc, chosen, w_chosen), mean(rlr, rejected, w_rejected), beta=beta)

        assert_close(self.variant(ipo)(logits["pc"], logits["pr"], logits["rc"], logits["rr"]), expected)
        # The summed convention would be a different number (the lengths differ).
        summed = np.mean(((sums["pc"] - sums["pr"]) - (sums["rc"] - sums["rr"]) - 1 / (2 * beta)) ** 2)
        assert abs(summed - expected) > 1.0

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 20.0)
    def test_ppo_policy_loss(self, normalizer):
        logprobs, old_logprobs, advantages, weights = make_rollout()
        eps = 0.2
        ratio = np.exp(logprobs.astype(np.float64) - old_logprobs)
        clipped = np.clip(ratio, 1 - eps, 1 + eps)
        per_token = -np.minimum(ratio * advantages, clipped * advantages)
        for reduction, reference in (("mean", np_weighted), ("per_example", np_per_example)):
            got = self.call(losses.ppo_policy_loss, logprobs, old_logprobs, advantages, weights,
                            clip_eps=eps, normalizer=normalizer, reduction=reduction)
            assert_close(got, reference(per_token, weights, normalizer))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 20.0)
    def test_ppo_value_loss(self, normalizer):
        rng = np.random.default_rng(9)
        old_values = rng.standard_normal((B, T)).astype(np.float32)
        values = old_values + rng.uniform(-0.5, 0.5, (B, T)).astype(np.float32)
        returns = rng.standard_normal((B, T)).astype(np.float32)
        weights = right_padded(LENGTHS, T)
        eps = 0.2
        v, old = values.astype(np.float64), old_values.astype(np.float64)
        clipped = old + np.clip(v - old, -eps, eps)
        per_token = 0.5 * np.maximum((v - returns) ** 2, (clipped - returns) ** 2)
        for reduction, reference in (("mean", np_weighted), ("per_example", np_per_example)):
            got = self.call(losses.ppo_value_loss, values, old_values, returns, weights,
                            clip_eps=eps, normalizer=normalizer, reduction=reduction)
            assert_close(got, reference(per_token, weights, normalizer))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 7.0)
    def test_classification_loss(self, normalizer):
        rng = np.random.default_rng(22)
        logits = (4.0 * rng.standard_normal((6, 5))).astype(np.float32)
        labels = rng.integers(0, 5, size=6)
        weights = np.array([1, 1, 0, 1, 0.5, 1], np.float32)
        per_row = -np_token_logprobs(logits, labels)
        for reduction, reference in (("mean", np_weighted), ("per_example", np_per_example)):
            got = self.call(losses.classification_loss, logits, labels, weights,
                            normalizer=normalizer, reduction=reduction)
            assert_close(got, reference(per_row, weights, normalizer))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1.0, 0.95), (0.9, 0.8), (0.99, 1.0))
    def test_gae(self, gamma, lam):
        rng = np.random.default_rng(10)
        rewards = rng.standard_normal((B, T)).astype(np.float32)
        values = rng.standard_normal((B, T)).astype(np.float32)
        weights = right_padded(LENGTHS, T)
        # Garbage at the pads must not leak into real steps.
        rewards[weights == 0] = 1e3
        values[weights == 0] = -1e3
        exp_adv, exp_ret = gae_loop(rewards, values, weights, gamma, lam)
        adv, ret = self.call(losses.gae, rewards, values, weights, gamma=gamma, lam=lam)
        assert adv.shape == ret.shape == (B, T)
        assert_close(adv, exp_adv)
        assert_close(ret, exp_ret)
        assert np.all(np.asarray(adv)[weights == 0] == 0)
        assert np.all(np.asarray(ret)[weights == 0] == 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_kl_penalized_rewards(self):
        rng = np.random.default_rng(11)
        scores = rng.standard_normal(B).astype(np.float32)
        logprobs = -rng.random((B, T)).astype(np.float32)
        ref_logprobs = -rng.random((B, T)).astype(np.float32)
        weights = right_padded(LENGTHS, T)
        expected = kl_rewards_loop(scores, logprobs, ref_logprobs, weights, 0.05)
        got = self.call(losses.kl_penalized_rewards, scores, logprobs, ref_logprobs, weights, kl_coef=0.05)
        assert got.shape == (B, T)
        assert_close(got, expected)
        assert np.all(np.asarray(got)[-1] == 0)  # the all-padding row


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
# Hugging Face -100 targets: ignored everywhere (weight 0).
# ---------------------------------------------------------------------------


@pytest.fixture
def hf_labels(lm_batch):
    """Targets with -100 at some positions (the prompt, padding), all weights 1."""
    logits, targets, _ = lm_batch
    targets = targets.copy()
    targets[0, :2] = -100
    targets[1, 4:] = -100
    targets[3, :] = -100  # a row with no labelled token at all
    return logits, targets, np.ones((B, T), np.float32)


def test_minus_100_targets_are_ignored_like_hugging_face(hf_labels):
    logits, targets, ones = hf_labels
    expected = np_cross_entropy_ignore_index(logits, targets)
    for fn in (losses.clm_loss, losses.mlm_loss, losses.sft_loss):
        assert_close(fn(logits, targets, ones), expected)
        assert_close(jax.jit(fn)(logits, targets, ones), expected)
    # optax's cross-entropy with the same mask gives the same mean.
    valid = targets != -100
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(valid, targets, 0))
    assert_close(jnp.sum(ce * valid) / valid.sum(), expected)
    # Per-sequence quantities: sums and means over the labelled tokens only.
    valid_lp = np.where(valid, np_token_logprobs(logits, np.where(valid, targets, 0)), 0.0)
    assert_close(losses.sequence_logprobs(logits, targets, ones), valid_lp.sum(-1))
    counts = valid.sum(-1)
    assert_close(losses.sequence_mean_logprobs(logits, targets, ones),
                 np.where(counts > 0, valid_lp.sum(-1) / np.maximum(counts, 1), 0.0))
    # And the KL term of SFT skips them too.
    ref_logits = make_ref_logits()
    per_token = -np_token_logprobs(logits, np.where(valid, targets, 0)) + 0.5 * np_token_kl(logits, ref_logits)
    assert_close(losses.sft_loss(logits, targets, ones, ref_logits, kl_coef=0.5),
                 (per_token * valid).sum() / valid.sum())


def test_minus_100_labels_in_classification():
    logits = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0], [0.0, 0.0, 0.0]], np.float32)
    labels = np.array([2, -100, 1])
    expected = -(np_token_logprobs(logits[[0, 2]], labels[[0, 2]])).mean()
    assert_close(losses.classification_loss(logits, labels), expected)


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


def test_token_kl_matches_numpy_and_is_zero_for_identical_logits(lm_batch):
    logits, targets, weights = lm_batch
    ref_logits = make_ref_logits()
    assert_close(losses.token_kl(logits, ref_logits), np_token_kl(logits, ref_logits))
    assert_close(losses.token_kl(logits, logits), np.zeros((B, T)))
    assert_close(
        losses.sft_loss(logits, targets, weights, logits, kl_coef=5.0),
        losses.clm_loss(logits, targets, weights),
    )
    # optax names the same quantity KL(p || q) with q the "predictions".
    kl = optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(ref_logits), jax.nn.log_softmax(logits))
    assert_close(losses.token_kl(logits, ref_logits), kl)


def test_sft_ref_logits_get_no_gradient(lm_batch):
    logits, targets, weights = lm_batch
    ref_logits = jnp.zeros((B, T, V))
    grad = jax.jit(jax.grad(functools.partial(losses.sft_loss, kl_coef=0.5), argnums=3))(
        logits, targets, weights, ref_logits
    )
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize(
    "kl_coef", [0.1, np.float32(0.1), np.float64(0.1), jnp.float32(0.1), np.array(0.1)],
    ids=["python", "np.float32", "np.float64", "jnp.float32", "np.array"])
def test_sft_kl_coef_without_ref_logits_raises(lm_batch, kl_coef):
    with pytest.raises(InputError, match="kl_coef=0.1.* needs ref_logits"):
        losses.sft_loss(*lm_batch, kl_coef=kl_coef)
    # Zero in any of these types is fine.
    losses.sft_loss(*lm_batch, kl_coef=kl_coef * 0)


def test_sft_traced_kl_coef_without_ref_logits_raises_at_trace_time(lm_batch):
    fn = jax.jit(lambda kl_coef: losses.sft_loss(*lm_batch, kl_coef=kl_coef))
    with pytest.raises(InputError, match="kl_coef is a traced value"):
        fn(0.1)
    # With ref_logits a traced kl_coef is what a schedule needs.
    fn = jax.jit(lambda kl_coef: losses.sft_loss(*lm_batch, make_ref_logits(), kl_coef=kl_coef))
    assert_close(fn(0.0), losses.clm_loss(*lm_batch))


# ---------------------------------------------------------------------------
# Preference losses.
# ---------------------------------------------------------------------------


def test_reward_model_loss_is_stable_for_large_gaps():
    got = losses.reward_model_loss(np.array([0.0, 200.0]), np.array([200.0, 0.0]))
    assert_close(got, (200.0 + 0.0) / 2)  # -log sigmoid(-200) ~= 200


def test_reward_model_loss_is_optax_sigmoid_cross_entropy(pairs):
    chosen, rejected = pairs[0] / 10, pairs[1] / 10
    bce = optax.sigmoid_binary_cross_entropy(jnp.asarray(chosen - rejected - 0.5), jnp.ones(6))
    assert_close(losses.reward_model_loss(chosen, rejected, margin=0.5), jnp.mean(bce))


@pytest.mark.parametrize("normalizer", [None, 8.0])
def test_pair_losses_weights_drop_padding_pairs(pairs, normalizer):
    """Weighted pair losses equal the loss over the kept pairs only (the empty slots
    of a packed preference batch must not count as pairs)."""
    keep = np.array([1, 0, 1, 1, 0, 1], np.float32)
    pc, pr, rc, rr = (x.astype(np.float64) for x in pairs)
    h = (pc - pr) - (rc - rr)
    denom = keep.sum() if normalizer is None else normalizer
    cases = [
        (losses.reward_model_loss(pairs[0] / 10, pairs[1] / 10, normalizer=normalizer, weights=keep),
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


@pytest.mark.parametrize("label_smoothing", [0.5, 0.7, -0.1, np.float32(0.5), float("nan")])
def test_dpo_label_smoothing_out_of_range_raises_at_trace_time(pairs, label_smoothing):
    with pytest.raises(InputError, match=r"label_smoothing=.* must lie in \[0.0, 0.5\)"):
        losses.dpo_loss(*pairs, label_smoothing=label_smoothing)
    with pytest.raises(InputError, match="label_smoothing"):
        jax.jit(functools.partial(losses.dpo_loss, label_smoothing=label_smoothing))(*pairs)


@pytest.mark.parametrize("fn", [losses.dpo_loss, losses.ipo_loss])
def test_preference_beta_must_be_positive(pairs, fn):
    for beta in (0.0, -0.1):
        with pytest.raises(InputError, match="beta=.* must be positive"):
            fn(*pairs, beta=beta)


# ---------------------------------------------------------------------------
# PPO.
# ---------------------------------------------------------------------------


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


def test_gae_hand_example():
    # One row, 3 real steps then a pad; gamma = lam = 1 gives
    # A_t = sum_{k >= t} r_k - V_t (Monte-Carlo return minus baseline).
    rewards = np.array([[0.0, 0.0, 1.0, 9.0]], np.float32)
    values = np.array([[0.5, 0.25, 0.75, 9.0]], np.float32)
    weights = np.array([[1, 1, 1, 0]], np.float32)
    adv, ret = losses.gae(rewards, values, weights, gamma=1.0, lam=1.0)
    assert_close(adv, [[0.5, 0.75, 0.25, 0.0]])
    assert_close(ret, [[1.0, 1.0, 1.0, 0.0]])


def test_sequence_level_ppo_is_trl_rloo_loss():
    """TRL's RLOOTrainer loss (a clipped ratio of summed sequence log-probs, the mean
    over sequences) is ppo_policy_loss on [B, 1] columns."""
    rng = np.random.default_rng(23)
    logps, old_logps, adv = rng.normal(-30, 1, 6), rng.normal(-30, 1, 6), rng.standard_normal(6)
    eps = 0.2
    ratio = np.exp(logps - old_logps)
    trl = np.mean(-np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv))
    col = lambda x: x[:, None].astype(np.float32)  # noqa: E731
    got = losses.ppo_policy_loss(col(logps), col(old_logps), col(adv), np.ones((6, 1)), clip_eps=eps)
    assert_close(got, trl)


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
        ("clm", lambda x: losses.clm_loss(x, targets, weights, normalizer=3.0), (logits,)),
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
        return losses.clm_loss(logits, targets, weights, normalizer=normalizer)

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


def test_vmap_over_an_extra_leading_axis(lm_batch):
    logits, targets, weights = lm_batch
    # An extra leading axis (e.g. several samples per prompt).
    stacked = np.stack([logits, logits[::-1], 2 * logits])
    seq = jax.jit(jax.vmap(losses.sequence_logprobs, in_axes=(0, None, None)))(
        stacked, targets, weights
    )
    loss = jax.jit(jax.vmap(losses.clm_loss, in_axes=(0, None, None)))(stacked, targets, weights)
    for i in range(3):
        token_lp = np_token_logprobs(stacked[i], targets)
        assert_close(seq[i], (weights * token_lp).sum(axis=-1))
        assert_close(loss[i], -np_weighted(token_lp, weights))
    # gae over an extra axis matches the batched call.
    rewards = np.random.default_rng(14).standard_normal((2, B, T)).astype(np.float32)
    adv = jax.jit(jax.vmap(lambda r: losses.gae(r, r, weights)[0]))(rewards)
    for i in range(2):
        assert_close(adv[i], losses.gae(rewards[i], rewards[i], weights)[0])


# ---------------------------------------------------------------------------
# The library contract, for every loss in LOSSES.
# ---------------------------------------------------------------------------

# Each entry's positional arrays, in order; everything else is a keyword-only option.
ARRAYS = {
    "clm": ["logits", "targets", "weights"],
    "mlm": ["logits", "targets", "weights"],
    "sft": ["logits", "targets", "weights", "ref_logits"],
    "classification": ["logits", "labels", "weights"],
    "reward_model": ["chosen_rewards", "rejected_rewards"],
    "dpo": ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"],
    "ipo": ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"],
    "ppo_policy": ["logprobs", "old_logprobs", "advantages", "weights"],
    "ppo_value": ["values", "old_values", "returns", "weights"],
    "grpo": ["logprobs", "old_logprobs", "advantages", "weights"],
    "reinforce": ["logprobs", "advantages", "weights"],
}


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_calling_convention_arrays_positional_options_keyword_only(name):
    params = inspect.signature(losses.LOSSES[name]).parameters
    positional = [p.name for p in params.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    options = {p.name: p for p in params.values() if p.kind == p.KEYWORD_ONLY}
    assert positional == ARRAYS[name]
    assert len(positional) + len(options) == len(params)  # no *args / **kwargs
    assert options["normalizer"].default is None and options["reduction"].default == "mean"
    # The LOSSES comment in losses.py lists each entry's arrays in this order.
    source = pathlib.Path(losses.__file__).read_text()
    block = source[source.index("# The losses by name."):source.index("LOSSES = {")]
    line = next(line for line in block.splitlines() if re.match(rf"#\s+[\w, ]*\b{name}\b", line))
    assert line, name


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("normalizer", [None, 13.0])
def test_per_example_sums_to_the_loss(name, normalizer):
    arrays, options = loss_cases()[name]
    fn = losses.LOSSES[name]
    total = fn(*arrays, **options, normalizer=normalizer)
    rows = fn(*arrays, **options, normalizer=normalizer, reduction="per_example")
    assert total.shape == () and rows.shape == (B,)
    assert_close(jnp.sum(rows), total)
    jitted = jax.jit(functools.partial(fn, **options, normalizer=normalizer, reduction="per_example"))
    assert_close(jitted(*arrays), rows)
    with pytest.raises(InputError, match="reduction='sum'"):
        fn(*arrays, **options, reduction="sum")


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_zero_normalizer_on_an_all_padding_shard_gives_zero_not_nan(name):
    """A user's own normalizer (the shard's weight sum) is 0 on an all-padding shard:
    the loss is 0 and the gradient 0, as with the default denominator."""
    arrays, options = zero_weights(name, *loss_cases()[name])
    fn = losses.LOSSES[name]
    for normalizer in (0.0, None, jnp.float32(0.0)):
        loss, grad = jax.jit(jax.value_and_grad(
            functools.partial(fn, **options, normalizer=normalizer)))(*arrays)
        assert float(loss) == 0.0, normalizer
        assert np.all(np.asarray(grad) == 0.0), normalizer
    rows = fn(*arrays, **options, normalizer=0.0, reduction="per_example")
    assert np.all(np.asarray(rows) == 0.0)


def test_zero_normalizer_in_masked_mean():
    assert float(losses.masked_mean(np.ones(3), np.zeros(3), 0.0)) == 0.0
    # Real weights summing to less than 1 are still divided exactly.
    assert_close(losses.masked_mean(np.ones(3), np.full(3, 0.1), 0.3), 1.0)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_result_dtype_follows_the_inputs_under_x64(name):
    """float32 inputs (and Python-number options) give float32 even with x64 on;
    float64 inputs give float64."""
    with jax.enable_x64(True):
        for dtype in (np.float32, np.float64):
            arrays, options = loss_cases(dtype)[name]
            fn = losses.LOSSES[name]
            for reduction in ("mean", "per_example"):
                got = fn(*arrays, **options, normalizer=13.0, reduction=reduction)
                assert got.dtype == dtype, (name, dtype, reduction, got.dtype)
                got = jax.jit(functools.partial(fn, **options, reduction=reduction))(*arrays)
                assert got.dtype == dtype, (name, dtype, reduction, got.dtype)


def test_other_functions_dtype_under_x64(lm_batch, rollout):
    logits, targets, weights = lm_batch
    logprobs, old_logprobs, _, _ = rollout
    with jax.enable_x64(True):
        for dtype in (np.float32, np.float64):
            x = logits.astype(dtype)
            assert losses.token_logprobs(x, targets).dtype == dtype
            assert losses.sequence_logprobs(x, targets, weights).dtype == dtype
            assert losses.sequence_mean_logprobs(x, targets, weights).dtype == dtype
            assert losses.token_kl(x, x).dtype == dtype
            lp = logprobs.astype(dtype)
            assert losses.masked_mean(lp, weights, 3.0).dtype == dtype
            assert all(a.dtype == dtype for a in losses.gae(lp, lp, weights))
            rewards = losses.kl_penalized_rewards(lp[:, 0], lp, old_logprobs.astype(dtype), weights,
                                                  kl_coef=0.1)
            assert rewards.dtype == dtype


def test_docstrings_state_equations_with_weights_and_true_return_types():
    for name, fn in losses.LOSSES.items():
        doc = inspect.getdoc(fn)
        equation = doc.split("\n\n")[1]  # the block under the summary line
        assert "w_" in equation and "/ D" in equation and "normalizer" in equation, name
        assert "reduction" in doc and "per_example" in doc, name
    for fn in vars(losses).values():
        if callable(fn) and fn.__doc__:
            assert "A float32 scalar" not in fn.__doc__, fn.__name__  # false under x64


SHAPE_ERRORS = [
    # (call, words the message must contain)
    (lambda l, t, w: losses.clm_loss(l[..., 0], t, w), "clm_loss: logits must be [B, T, V]"),
    (lambda l, t, w: losses.clm_loss(l, t[:, 1:], w), "clm_loss: targets must be [B, T]"),
    (lambda l, t, w: losses.mlm_loss(l, t, w[:, None]), "mlm_loss: weights must be [B, T]"),
    (lambda l, t, w: losses.sft_loss(l, t, w, l[:, 1:], kl_coef=0.1), "sft_loss: ref_logits"),
    (lambda l, t, w: losses.sequence_logprobs(l, t.reshape(-1), w), "sequence_logprobs: targets"),
    (lambda l, t, w: losses.token_logprobs(l, t[..., None]), "token_logprobs: targets"),
    (lambda l, t, w: losses.classification_loss(l[:, 0], t[:, :2]), "classification_loss: labels"),
    (lambda l, t, w: losses.reward_model_loss(w[:, 0], w[:3, 0]), "reward_model_loss: rejected_rewards"),
    (lambda l, t, w: losses.reward_model_loss(w[:, 0], w[:, 0], margin=w[:3, 0]), "reward_model_loss: margin"),
    (lambda l, t, w: losses.dpo_loss(w, w, w, w), "dpo_loss: policy_chosen_logps must be [B]"),
    (lambda l, t, w: losses.ipo_loss(w[0], w[0], w[0], w[1, :3]), "ipo_loss: ref_rejected_logps"),
    (lambda l, t, w: losses.dpo_loss(w[0], w[0], w[0], w[0], weights=w), "dpo_loss: weights"),
    (lambda l, t, w: losses.ppo_policy_loss(w, w, w[0], w), "ppo_policy_loss: advantages must be [B, T]"),
    (lambda l, t, w: losses.ppo_value_loss(w, w, w, w.T), "ppo_value_loss: weights"),
    (lambda l, t, w: losses.gae(w[0], w[0], w[0]), "gae: rewards must be [B, T]"),
    (lambda l, t, w: losses.kl_penalized_rewards(w, w, w, w, kl_coef=0.1), "kl_penalized_rewards: scores"),
    (lambda l, t, w: losses.mlm_mask(jax.random.key(0), t, mask_id=0, vocab_size=V, can_mask=w[0]),
     "mlm_mask: can_mask"),
]


@pytest.mark.parametrize("call,message", SHAPE_ERRORS, ids=[m.split(":")[0] + ":" + m.split(": ")[1].split()[0]
                                                            for _, m in SHAPE_ERRORS])
def test_shape_errors_name_the_argument_at_trace_time(lm_batch, call, message):
    logits, targets, weights = lm_batch
    for wrap in (lambda f: f, jax.jit):
        with pytest.raises(InputError, match=re.escape(message) + ".*; got shape"):
            wrap(call)(logits, targets, weights)


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
        "grpo": losses.grpo_loss,
        "reinforce": losses.reinforce_loss,
    }


def test_imports_only_jax_chex_and_the_error_module():
    # No flax (or any other framework): the module imports jax, chex for the
    # argument checks, llm_jax.errors for the error they raise, and nothing else.
    tree = ast.parse(pathlib.Path(losses.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert {name.split(".")[0] for name in imported} == {"jax", "chex", "llm_jax"}
    assert {name for name in imported if name.startswith("llm_jax")} == {"llm_jax.errors"}


# ---------------------------------------------------------------------------
# docs/losses.md: its code runs, and it covers every loss.
# ---------------------------------------------------------------------------


def test_docs_page_covers_every_loss():
    text = DOCS.read_text()
    for name, fn in losses.LOSSES.items():
        assert f"`{fn.__name__}`" in text, name
        assert f"`{name}`" in text, name  # its LOSSES key
    for trl_name in ('"sigmoid"', '"ipo"', '"robust"', '"hinge"', "RLOO", "PPO",
                     "softmax_cross_entropy_with_integer_labels"):
        assert trl_name in text, trl_name


def test_docs_example_runs():
    """Every ```python block of docs/losses.md, in order, in one namespace: the
    example train step (jitted, data-parallel over the test's 8 CPU devices, with
    gradient accumulation) and the smaller snippets, with their own asserts."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace = {"__name__": "docs_losses_example"}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)  # noqa: S102
    assert np.isfinite(namespace["loss"])
    assert len(namespace["batch"]["tokens"].sharding.device_set) == jax.device_count()
