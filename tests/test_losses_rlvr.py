"""Tests for the RL-from-verifiable-rewards losses of llm_jax.losses:
`group_advantages`, `grpo_loss` (GRPO, DAPO, Dr. GRPO) and `reinforce_loss`.

As in tests/test_losses.py, every expected number comes from an independent
reference (float64 Python loops, `statistics`, hand arithmetic with `math`),
never from the code under test, and the references run with and without jit
(`chex.variants`). The calling convention, per-example reduction, dtype and
zero-normalizer checks that every `LOSSES` entry gets are in tests/test_losses.py.
"""

import functools
import math
import re
import statistics

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from llm_jax import losses
from llm_jax.errors import InputError

RTOL, ATOL = 1e-5, 1e-6
G = 4  # responses per prompt
B, T = 8, 6  # two groups of four
AGGREGATIONS = ("token", "sequence", "fixed")


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# Independent references (float64, one element at a time).
# ---------------------------------------------------------------------------


def advantages_loop(rewards, group_size, scale="std", leave_one_out=False, eps=1e-4):
    out = []
    for start in range(0, len(rewards), group_size):
        group = [float(x) for x in rewards[start:start + group_size]]
        for j, reward in enumerate(group):
            others = group[:j] + group[j + 1:]
            baseline = statistics.fmean(others) if leave_one_out else statistics.fmean(group)
            advantage = reward - baseline
            if scale == "std":
                advantage /= statistics.stdev(group) + eps  # the sample std (ddof=1)
            out.append(advantage)
    return np.array(out)


def k3(ref_logprob, logprob):
    q = ref_logprob - logprob
    return math.exp(q) - q - 1.0


def grpo_loop(logprobs, old_logprobs, advantages, weights, *, clip_eps=0.2, clip_eps_high=None,
              ref_logprobs=None, kl_coef=0.0, aggregation="token", max_len=None, normalizer=None):
    """(loss, per-row shares) of the GRPO family, one token at a time."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    rows, weight_sums = [], []
    for b in range(logprobs.shape[0]):
        row, row_weight = 0.0, 0.0
        for t in range(logprobs.shape[1]):
            ratio = math.exp(float(logprobs[b, t]) - float(old_logprobs[b, t]))
            clipped = min(max(ratio, 1.0 - clip_eps), 1.0 + high)
            a = float(advantages[b])
            per_token = -min(ratio * a, clipped * a)
            if ref_logprobs is not None:
                per_token += kl_coef * k3(float(ref_logprobs[b, t]), float(logprobs[b, t]))
            row += float(weights[b, t]) * per_token
            row_weight += float(weights[b, t])
        rows.append(row)
        weight_sums.append(row_weight)
    if aggregation == "token":
        denominator = sum(weight_sums) if normalizer is None else normalizer
    elif aggregation == "sequence":
        rows = [r / n if n > 0 else 0.0 for r, n in zip(rows, weight_sums)]
        denominator = len(rows) if normalizer is None else normalizer
    else:
        denominator = len(rows) * max_len if normalizer is None else normalizer
    denominator = denominator or 1.0
    shares = np.array(rows) / denominator
    return shares.sum(), shares


def reinforce_loop(logprobs, advantages, weights, normalizer=None):
    rows = []
    for b in range(logprobs.shape[0]):
        summed = sum(float(weights[b, t]) * float(logprobs[b, t]) for t in range(logprobs.shape[1]))
        rows.append(-float(advantages[b]) * summed)
    denominator = (len(rows) if normalizer is None else normalizer) or 1.0
    shares = np.array(rows) / denominator
    return shares.sum(), shares


# ---------------------------------------------------------------------------
# Inputs: ragged masks (right padding, a hole, an empty row, a half weight).
# ---------------------------------------------------------------------------


def ragged_weights(lengths=(6, 3, 1, 0, 5, 2, 4, 6), t=T):
    weights = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    weights[0, 2] = 0.0  # a hole inside a row
    weights[4, 1] = 0.5  # a real-valued weight
    return weights


def make_rollout(seed=0):
    """(logprobs, old_logprobs, advantages, weights, ref_logprobs) for B rows."""
    rng = np.random.default_rng(seed)
    old = -3.0 * rng.random((B, T)).astype(np.float32)
    # Ratios from ~0.6 to ~1.65: tokens clipped on both sides, by both eps_high values.
    logprobs = old + rng.uniform(-0.5, 0.5, (B, T)).astype(np.float32)
    ref = old + rng.uniform(-0.7, 0.7, (B, T)).astype(np.float32)
    advantages = rng.standard_normal(B).astype(np.float32)
    return logprobs, old, advantages, ragged_weights(), ref


def make_rewards():
    rng = np.random.default_rng(1)
    return np.concatenate([
        [1.0, 0.0, 0.0, 1.0],      # pass/fail rewards
        [1.0, 1.0, 1.0, 1.0],      # every response right: no signal
        rng.standard_normal(4),    # real-valued rewards
        [0.1, 0.1, 0.1, 0.1],      # equal real-valued rewards
        rng.random(4),
    ]).astype(np.float32)


# ---------------------------------------------------------------------------
# Each function against its reference, with and without jit.
# ---------------------------------------------------------------------------


class ReferenceTest(chex.TestCase, parameterized.TestCase):
    """`self.variant` is the function as is and under jax.jit (options static)."""

    def call(self, fn, *arrays, **options):
        return self.variant(functools.partial(fn, **options))(*arrays)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(scale=("std", "none"), leave_one_out=(False, True), eps=(1e-4, 0.1))
    def test_group_advantages(self, scale, leave_one_out, eps):
        rewards = make_rewards()
        got = self.call(losses.group_advantages, rewards, group_size=G, scale=scale,
                        leave_one_out=leave_one_out, eps=eps)
        assert got.shape == rewards.shape and got.dtype == jnp.float32
        expected = advantages_loop(rewards, G, scale, leave_one_out, eps)
        assert_close(got, expected)
        # Groups whose rewards are all equal: exactly 0.
        assert np.all(np.asarray(got)[4:8] == 0.0) and np.all(np.asarray(got)[12:16] == 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(aggregation=AGGREGATIONS, normalizer=(None, 11.0), clip_eps_high=(None, 0.28),
                           kl=(False, True))
    def test_grpo_loss(self, aggregation, normalizer, clip_eps_high, kl):
        logprobs, old, advantages, weights, ref = make_rollout()
        options = dict(clip_eps=0.2, clip_eps_high=clip_eps_high, aggregation=aggregation,
                       max_len=9, normalizer=normalizer)
        if kl:
            options.update(ref_logprobs=ref, kl_coef=0.3)
        loss, shares = grpo_loop(logprobs, old, advantages, weights, **options)
        got = self.call(losses.grpo_loss, logprobs, old, advantages, weights, **options)
        assert got.shape == () and got.dtype == jnp.float32
        assert_close(got, loss)
        rows = self.call(losses.grpo_loss, logprobs, old, advantages, weights, **options,
                         reduction="per_example")
        assert rows.shape == (B,)
        assert_close(rows, shares)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 5.0)
    def test_reinforce_loss(self, normalizer):
        logprobs, _, advantages, weights, _ = make_rollout()
        loss, shares = reinforce_loop(logprobs, advantages, weights, normalizer)
        got = self.call(losses.reinforce_loss, logprobs, advantages, weights, normalizer=normalizer)
        assert got.shape == () and got.dtype == jnp.float32
        assert_close(got, loss)
        rows = self.call(losses.reinforce_loss, logprobs, advantages, weights, normalizer=normalizer,
                         reduction="per_example")
        assert_close(rows, shares)


# ---------------------------------------------------------------------------
# Group advantages.
# ---------------------------------------------------------------------------


def test_std_is_the_sample_std_by_hand():
    # [1, 0, 0, 0]: mean 1/4, squared deviations 9/16 + 3/16 = 3/4; ddof=1: var 1/4, std 1/2.
    got = losses.group_advantages(np.array([1.0, 0.0, 0.0, 0.0]), 4, eps=0.0)
    assert_close(got, [1.5, -0.5, -0.5, -0.5])
    # Two samples [0, 1]: std = sqrt(1/2), so A = +-0.5 / (sqrt(1/2) + eps).
    eps = 1e-4
    got = losses.group_advantages(np.array([0.0, 1.0]), 2)
    assert_close(got, [-0.5 / (math.sqrt(0.5) + eps), 0.5 / (math.sqrt(0.5) + eps)])


@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_rloo_leave_one_out_identity(group_size):
    """r_b - mean of the other G-1 = G / (G-1) * (r_b - mean of all G), with or without std."""
    rewards = np.random.default_rng(group_size).standard_normal(4 * group_size).astype(np.float32)
    factor = group_size / (group_size - 1)
    for scale in ("none", "std"):
        loo = losses.group_advantages(rewards, group_size, scale=scale, leave_one_out=True)
        plain = losses.group_advantages(rewards, group_size, scale=scale)
        assert_close(loo, factor * np.asarray(plain, np.float64))
    centred = rewards.reshape(-1, group_size) - rewards.reshape(-1, group_size).mean(-1, keepdims=True)
    rloo = losses.group_advantages(rewards, group_size, scale="none", leave_one_out=True)
    assert_close(rloo, factor * centred.reshape(-1))


@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_zero_variance_group_gives_zero_and_finite_gradients(eps):
    rewards = np.array([0.3, 0.3, 0.3, 0.3, 1.0, 0.0, 1.0, 1.0], np.float32)
    for scale in ("std", "none"):
        for leave_one_out in (False, True):
            fn = functools.partial(losses.group_advantages, group_size=4, scale=scale,
                                   leave_one_out=leave_one_out, eps=eps)
            got = np.asarray(jax.jit(fn)(rewards))
            assert np.all(got[:4] == 0.0) and np.all(np.isfinite(got))
            assert np.all(got[4:] != 0.0)
            grad = jax.grad(lambda r: jnp.sum(fn(r) * jnp.arange(8.0)))(rewards)  # noqa: B023
            assert np.all(np.isfinite(np.asarray(grad)))
    # Three equal rewards of 0.1: in float32 the mean of the other two is not 0.1
    # exactly, so `r - baseline` alone would leave a residue.
    tie = np.full(3, 0.1, np.float32)
    assert tie[0] - (tie.sum(dtype=np.float32) - tie[0]) / np.float32(2) != 0.0
    got = losses.group_advantages(tie, 3, scale="none", leave_one_out=True, eps=eps)
    assert np.all(np.asarray(got) == 0.0)


def test_group_size_one_without_std_or_baseline_is_zero():
    got = losses.group_advantages(np.array([1.0, 0.0, 2.0]), 1, scale="none")
    assert np.all(np.asarray(got) == 0.0)


def test_group_advantages_gradient_by_finite_differences():
    rewards = np.random.default_rng(5).standard_normal(8)
    with jax.enable_x64(True):
        for scale in ("std", "none"):
            for leave_one_out in (False, True):
                fn = functools.partial(losses.group_advantages, group_size=4, scale=scale,
                                       leave_one_out=leave_one_out)
                check_grads(jax.jit(fn), (jnp.asarray(rewards, jnp.float64),), order=1, modes=["rev"])


# ---------------------------------------------------------------------------
# The clipped objective, its gradient and the KL penalty.
# ---------------------------------------------------------------------------


def test_clip_asymmetry_on_hand_picked_ratios():
    """DAPO's clip-higher: eps_low = 0.2, eps_high = 0.28."""
    ratios = np.array([[1.25, 1.3, 0.75, 0.85, 1.3]])
    logprobs = np.log(ratios).astype(np.float32)
    old = np.zeros((1, 5), np.float32)
    weights = np.ones((1, 5), np.float32)
    grad_fn = jax.value_and_grad(losses.grpo_loss)

    # A > 0: 1.25 is inside [0.8, 1.28], 1.3 above it.
    loss, grad = grad_fn(logprobs[:, :2], old[:, :2], np.array([2.0], np.float32), weights[:, :2],
                         clip_eps_high=0.28)
    assert_close(loss, -(1.25 * 2.0 + 1.28 * 2.0) / 2)
    assert_close(grad[0, 0], -1.25 * 2.0 / 2)  # d(-r A / n)/d log r = -r A / n
    assert grad[0, 1] == 0.0  # clipped: the constant 1.28 * A
    # Symmetric clipping (eps_high = eps_low = 0.2) would clip 1.25 too.
    loss, grad = grad_fn(logprobs[:, :2], old[:, :2], np.array([2.0], np.float32), weights[:, :2],
                         clip_eps_high=None)
    assert_close(loss, -(1.2 * 2.0 + 1.2 * 2.0) / 2)
    assert np.all(np.asarray(grad) == 0.0)

    # A < 0: the lower clip 1 - eps_low = 0.8 acts (0.75), 0.85 is inside; the
    # upper clip never binds for A < 0 (at 1.3 the pessimistic term is r A).
    loss, grad = grad_fn(logprobs[:, 2:], old[:, 2:], np.array([-1.0], np.float32), weights[:, 2:],
                         clip_eps_high=0.28)
    assert_close(loss, -(0.8 * -1.0 + 0.85 * -1.0 + 1.3 * -1.0) / 3)
    assert grad[0, 0] == 0.0
    assert_close(grad[0, 1:], [0.85 / 3, 1.3 / 3])


def analytic_grad(logprobs, old, advantages, weights, ref, kl_coef, clip_eps, clip_eps_high,
                  aggregation, max_len):
    """d grpo_loss / d logprobs from the derivative of each token's term, float64."""
    lp, old, ref = (np.asarray(x, np.float64) for x in (logprobs, old, ref))
    a = np.asarray(advantages, np.float64)[:, None]
    ratio = np.exp(lp - old)
    # The objective is the constant clip * A where the clip binds in A's direction.
    flat = ((a > 0) & (ratio > 1 + clip_eps_high)) | ((a < 0) & (ratio < 1 - clip_eps))
    per_token = np.where(flat, 0.0, -ratio * a) + kl_coef * (1.0 - np.exp(ref - lp))
    w = np.asarray(weights, np.float64)
    if aggregation == "token":
        return w * per_token / w.sum(), flat
    if aggregation == "sequence":
        n = w.sum(-1, keepdims=True)
        return np.where(n > 0, w / np.where(n > 0, n, 1), 0.0) * per_token / len(w), flat
    return w * per_token / (len(w) * max_len), flat


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.4])
def test_gradient_matches_the_analytic_formula(aggregation, kl_coef):
    logprobs, old, advantages, weights, ref = make_rollout(seed=3)
    fn = functools.partial(losses.grpo_loss, clip_eps=0.2, clip_eps_high=0.28, ref_logprobs=ref,
                           kl_coef=kl_coef, aggregation=aggregation, max_len=9)
    grad = np.asarray(jax.jit(jax.grad(fn))(logprobs, old, advantages, weights))
    expected, flat = analytic_grad(logprobs, old, advantages, weights, ref, kl_coef, 0.2, 0.28,
                                   aggregation, 9)
    assert_close(grad, expected)
    real = weights > 0
    assert (flat & real).sum() >= 3 and (~flat & real).sum() >= 3  # both kinds of token occur
    if kl_coef == 0.0:
        assert np.all(grad[flat] == 0.0)  # exactly zero where the clip binds in A's direction
        assert np.all(grad[~flat & real] != 0.0)


def test_gradients_by_finite_differences():
    rng = np.random.default_rng(12)
    old = -rng.random((4, 3))
    logprobs = old + rng.uniform(-0.1, 0.1, (4, 3))  # |log r| < 0.1: no clipping kink
    ref = old + rng.uniform(-0.5, 0.5, (4, 3))
    advantages = rng.standard_normal(4)
    weights = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.5, 1.0]])
    cases = [functools.partial(losses.grpo_loss, old_logprobs=old, advantages=advantages, weights=weights,
                               ref_logprobs=ref, kl_coef=0.3, aggregation=aggregation, max_len=5)
             for aggregation in AGGREGATIONS]
    cases.append(functools.partial(losses.reinforce_loss, advantages=advantages, weights=weights))
    with jax.enable_x64(True):
        for fn in cases:
            check_grads(jax.jit(fn), (jnp.asarray(logprobs, jnp.float64),), order=1, modes=["rev"])


def test_k3_penalty_is_its_formula_nonnegative_and_an_unbiased_kl():
    rng = np.random.default_rng(4)
    logprobs = -3.0 * rng.random((6, 1)).astype(np.float32)
    ref = logprobs + rng.uniform(-2.0, 2.0, (6, 1)).astype(np.float32)
    ref[0] = logprobs[0]  # equal log-probs: no penalty
    zeros, ones = np.zeros(6, np.float32), np.ones((6, 1), np.float32)
    # A = 0 leaves only the penalty; one token per row, normalizer 1: each row's share is its k3.
    per_row = losses.grpo_loss(logprobs, logprobs, zeros, ones, ref_logprobs=ref, kl_coef=1.0,
                               normalizer=1.0, reduction="per_example")
    expected = [k3(float(r), float(lp)) for r, lp in zip(ref[:, 0], logprobs[:, 0])]
    assert_close(per_row, expected)
    assert np.all(np.asarray(per_row) >= 0.0) and float(per_row[0]) == 0.0
    doubled = losses.grpo_loss(logprobs, logprobs, zeros, ones, ref_logprobs=ref, kl_coef=2.0,
                               normalizer=1.0, reduction="per_example")
    assert_close(doubled, 2 * np.asarray(expected))

    # Its expectation over tokens a ~ pi is KL(pi || pi_ref): weight each of V
    # actions by pi(a) and the "token" aggregation is that expectation, exactly.
    pi = rng.dirichlet(np.ones(7))
    pi_ref = rng.dirichlet(np.ones(7))
    kl = float(np.sum(pi * (np.log(pi) - np.log(pi_ref))))
    lp = np.log(pi)[None].astype(np.float32)
    got = losses.grpo_loss(lp, lp, np.zeros(1, np.float32), pi[None].astype(np.float32),
                           ref_logprobs=np.log(pi_ref)[None].astype(np.float32), kl_coef=1.0)
    assert_close(got, kl)


def test_sampling_inputs_get_no_gradient():
    logprobs, old, advantages, weights, ref = make_rollout()
    for aggregation in AGGREGATIONS:
        fn = functools.partial(losses.grpo_loss, kl_coef=0.2, aggregation=aggregation, max_len=9)
        grads = jax.grad(lambda lp, o, a, r: fn(lp, o, a, weights, ref_logprobs=r),  # noqa: B023
                         argnums=(0, 1, 2, 3))(logprobs, old, advantages, ref)
        assert np.any(np.asarray(grads[0]) != 0)
        assert all(np.all(np.asarray(g) == 0) for g in grads[1:]), aggregation
    grads = jax.grad(losses.reinforce_loss, argnums=(0, 1))(logprobs, advantages, weights)
    assert np.any(np.asarray(grads[0]) != 0) and np.all(np.asarray(grads[1]) == 0)


def test_on_policy_grpo_gradient_is_reinforces():
    """At r = 1 the clipped objective's gradient is REINFORCE's: -A grad log pi, over the same D."""
    logprobs, _, advantages, weights, _ = make_rollout()
    reinforce = jax.grad(losses.reinforce_loss)(logprobs, advantages, weights)
    for aggregation in ("token", "fixed"):
        grpo = jax.grad(functools.partial(losses.grpo_loss, aggregation=aggregation, normalizer=float(B)))(
            logprobs, logprobs, advantages, weights)
        assert_close(grpo, reinforce)
    # On policy the value is -mean(A) over the weighted tokens ("token" aggregation).
    got = losses.grpo_loss(logprobs, logprobs, advantages, weights)
    assert_close(got, -(weights * advantages[:, None]).sum() / weights.sum())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_rows_and_zero_normalizer(aggregation):
    """An all-padding row adds 0 to the loss and gets a zero gradient (no 0 / 0);
    an all-padding batch with normalizer 0 gives 0, not NaN."""
    logprobs, old, advantages, weights, ref = make_rollout()
    assert weights[3].sum() == 0
    fn = functools.partial(losses.grpo_loss, ref_logprobs=ref, kl_coef=0.1, aggregation=aggregation,
                           max_len=9)
    loss, grad = jax.jit(jax.value_and_grad(fn))(logprobs, old, advantages, weights)
    grad = np.asarray(grad)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    assert np.all(grad[3] == 0.0)
    rows = fn(logprobs, old, advantages, weights, reduction="per_example")
    assert float(rows[3]) == 0.0
    zero = np.zeros_like(weights)
    for normalizer in (0.0, None):
        loss, grad = jax.jit(jax.value_and_grad(functools.partial(fn, normalizer=normalizer)))(
            logprobs, old, advantages, zero)
        assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
    loss, grad = jax.value_and_grad(functools.partial(losses.reinforce_loss, normalizer=0.0))(
        logprobs, advantages, zero)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


# ---------------------------------------------------------------------------
# The global normalizer: micro-batches and devices give the full-batch gradient.
# ---------------------------------------------------------------------------

DIM, VOCAB, MAX_LEN = 5, 7, 9


def make_policy_batch(rows, seed=13):
    """(batch, params) of a tiny linear policy; old and reference log-probs from
    nearby parameters, so the ratios straddle the clip range."""
    rng = np.random.default_rng(seed)
    params = 0.5 * rng.standard_normal((DIM, VOCAB)).astype(np.float32)
    x = rng.standard_normal((rows, T, DIM)).astype(np.float32)
    actions = rng.integers(0, VOCAB, size=(rows, T)).astype(np.int32)

    def sampled_logprobs(p):
        logits = (x @ p).astype(np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return np.take_along_axis(logp, actions[..., None], -1)[..., 0].astype(np.float32)

    lengths = rng.integers(1, T + 1, size=rows)
    lengths[1] = 0  # an empty response
    return {
        "x": x,
        "actions": actions,
        "weights": (np.arange(T) < lengths[:, None]).astype(np.float32),
        "old": sampled_logprobs(params + 0.2 * rng.standard_normal(params.shape)),
        "ref": sampled_logprobs(params + 0.3 * rng.standard_normal(params.shape)),
        "rewards": rng.integers(0, 2, size=rows).astype(np.float32),
    }, params


def policy_loss(name, params, batch, advantages, normalizer):
    """A tiny linear policy's loss: logits = x @ params, log-probs of the sampled actions."""
    logprobs = losses.token_logprobs(batch["x"] @ params, batch["actions"])
    if name == "reinforce":
        return losses.reinforce_loss(logprobs, advantages, batch["weights"], normalizer=normalizer)
    return losses.grpo_loss(logprobs, batch["old"], advantages, batch["weights"], clip_eps_high=0.28,
                            ref_logprobs=batch["ref"], kl_coef=0.1, aggregation=name, max_len=MAX_LEN,
                            normalizer=normalizer)


def global_normalizer(name, weights):
    """The whole batch's denominator for each aggregation."""
    if name == "token":
        return jnp.sum(weights)
    return weights.shape[0] * (MAX_LEN if name == "fixed" else 1)


NAMES = AGGREGATIONS + ("reinforce",)


@pytest.mark.parametrize("name", NAMES)
def test_global_normalizer_makes_microbatches_exact(name):
    batch, params = make_policy_batch(12)
    advantages = losses.group_advantages(batch["rewards"], G)
    assert np.any(np.asarray(advantages) != 0)
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(policy_loss, name)))
    full_loss, full_grad = grad_fn(params, batch, advantages, None)  # the default denominator
    normalizer = global_normalizer(name, batch["weights"])
    total_loss, total_grad, own_loss = 0.0, 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 7), slice(7, 12)):  # unequal micro-batches
        part = {k: v[rows] for k, v in batch.items()}
        loss, grad = grad_fn(params, part, advantages[rows], normalizer)
        total_loss += float(loss)
        total_grad += np.asarray(grad)
        own_loss += float(grad_fn(params, part, advantages[rows], None)[0])
    assert_close(total_loss, float(full_loss))
    assert_close(total_grad, np.asarray(full_grad))
    # Each micro-batch on its own denominator would not add up to the full batch.
    assert not np.isclose(own_loss, float(full_loss), rtol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_global_normalizer_on_an_8_device_mesh_with_accumulation(name):
    """Rows split over 8 devices along `data`, two accumulated micro-batches per
    step, advantages computed in the step from the sharded rewards: the same loss
    and gradient as one device on the full batch."""
    assert jax.device_count() == 8  # tests/conftest.py forces 8 host devices
    batch, params = make_policy_batch(16, seed=14)  # 2 rows per device: groups span devices
    microbatches = 2

    def accumulated(params, batch):
        advantages = losses.group_advantages(batch["rewards"], G)
        normalizer = global_normalizer(name, batch["weights"])
        chunks = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]),
                              dict(batch, advantages=advantages))

        def add(total, chunk):
            loss, grad = jax.value_and_grad(functools.partial(policy_loss, name))(
                params, chunk, chunk["advantages"], normalizer)
            return (total[0] + loss, total[1] + grad), None

        zeros = (jnp.zeros(()), jnp.zeros_like(params))
        return jax.lax.scan(add, zeros, chunks)[0]

    def full(params, batch):
        advantages = losses.group_advantages(batch["rewards"], G)
        return jax.value_and_grad(functools.partial(policy_loss, name))(params, batch, advantages, None)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    loss, grad = jax.jit(accumulated)(replicated, sharded)
    assert len(sharded["x"].sharding.device_set) == 8
    one = jax.devices()[0]
    want_loss, want_grad = jax.jit(full)(jax.device_put(params, one), jax.device_put(batch, one))
    assert_close(loss, float(want_loss))
    assert_close(grad, np.asarray(want_grad))


# ---------------------------------------------------------------------------
# Transformations, dtypes, the registry.
# ---------------------------------------------------------------------------


def test_vmap_over_an_extra_leading_axis():
    logprobs, old, advantages, weights, ref = make_rollout()
    stacked = np.stack([logprobs, logprobs - 0.1, old])
    fn = functools.partial(losses.grpo_loss, clip_eps_high=0.28, aggregation="sequence")
    got = jax.jit(jax.vmap(fn, in_axes=(0, None, None, None)))(stacked, old, advantages, weights)
    for i in range(3):
        assert_close(got[i], grpo_loop(stacked[i], old, advantages, weights, clip_eps_high=0.28,
                                       aggregation="sequence")[0])
    rewards = np.stack([make_rewards(), make_rewards()[::-1]])
    got = jax.jit(jax.vmap(functools.partial(losses.group_advantages, group_size=G)))(rewards)
    for i in range(2):
        assert_close(got[i], advantages_loop(rewards[i], G))


def test_group_advantages_dtype_follows_the_rewards_under_x64():
    with jax.enable_x64(True):
        for dtype in (np.float32, np.float64):
            for scale in ("std", "none"):
                got = losses.group_advantages(make_rewards().astype(dtype), G, scale=scale)
                assert got.dtype == dtype, (dtype, scale)
        assert losses.group_advantages(np.array([1, 0, 0, 1]), 4).dtype == np.float32  # ints -> f32


def test_registry_entries():
    assert losses.LOSSES["grpo"] is losses.grpo_loss
    assert losses.LOSSES["reinforce"] is losses.reinforce_loss
    # Advantages are an input to a loss, not a loss (as `gae`).
    assert losses.group_advantages not in losses.LOSSES.values()


# ---------------------------------------------------------------------------
# Argument errors: InputError naming the function, the argument and the shapes.
# ---------------------------------------------------------------------------

ERRORS = [
    # (call on (logprobs [B,T], weights [B,T], advantages [B]), message pattern)
    (lambda lp, w, a: losses.group_advantages(a[:6], 4),
     r"group_advantages: rewards must be [B] with B a multiple of group_size=4 .*; got shape (6,)"),
    (lambda lp, w, a: losses.group_advantages(lp, 4), r"group_advantages: rewards must be [B]"
                                                       r", one reward per response; got shape (8, 6)"),
    (lambda lp, w, a: losses.group_advantages(a, 1), "group_advantages: group_size=1 with scale='std'"),
    (lambda lp, w, a: losses.group_advantages(a, 1, scale="none", leave_one_out=True),
     "group_advantages: group_size=1 with leave_one_out=True"),
    (lambda lp, w, a: losses.group_advantages(a, 2.5), "group_advantages: group_size=2.5 must be a positive"),
    (lambda lp, w, a: losses.group_advantages(a, 0), "group_advantages: group_size=0 must be a positive"),
    (lambda lp, w, a: losses.group_advantages(a, 4, scale="mean"),
     "group_advantages: scale='mean'; pass scale='std'"),
    (lambda lp, w, a: losses.group_advantages(a, 4, eps=-1.0), "group_advantages: eps=-1.0 must lie in"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, lp, w),
     r"grpo_loss: advantages must be [B] (logprobs.shape[:1]), one per response; got shape (8, 6), "
     r"expected (8,)"),
    (lambda lp, w, a: losses.grpo_loss(lp[0], lp[0], a[:1], w[0]),
     r"grpo_loss: logprobs must be [B, T]; got"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp[:, 1:], a, w),
     r"grpo_loss: old_logprobs must be [B, T], the shape of logprobs; got shape (8, 5)"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w[:4]), r"grpo_loss: weights must be [B, T]"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w, ref_logprobs=lp[:, :2], kl_coef=0.1),
     r"grpo_loss: ref_logprobs must be [B, T], the shape of logprobs; got shape (8, 2)"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w, aggregation="mean"),
     "grpo_loss: aggregation='mean'; pass 'token' (DAPO), 'sequence' (GRPO) or 'fixed' (Dr. GRPO)"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w, aggregation="fixed"),
     "grpo_loss: aggregation='fixed' divides by B * max_len (Dr. GRPO); pass max_len"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w, aggregation="fixed", max_len=0),
     "grpo_loss: max_len=0 must be positive"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w, kl_coef=0.1),
     "grpo_loss: kl_coef=0.1 needs ref_logprobs"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w, clip_eps=-0.1),
     r"grpo_loss: clip_eps=-0.1 must lie in [0.0, 1.0]"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w, clip_eps=1.5), r"grpo_loss: clip_eps=1.5 must lie in"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w, clip_eps_high=-0.2), "grpo_loss: clip_eps_high=-0.2"),
    (lambda lp, w, a: losses.reinforce_loss(lp, lp, w),
     r"reinforce_loss: advantages must be [B] (logprobs.shape[:1]), one per response; got shape (8, 6)"),
    (lambda lp, w, a: losses.reinforce_loss(lp, a, w.T),
     r"reinforce_loss: weights must be [B, T], the shape of logprobs; got shape (6, 8)"),
]


# Values known only under jit: a traced group_size or kl_coef cannot be checked.
TRACED_ERRORS = [
    (lambda lp, w, a: losses.group_advantages(a, jnp.sum(a).astype(int)),
     "group_advantages: group_size=.* must be a positive Python int known at trace time"),
    (lambda lp, w, a: losses.grpo_loss(lp, lp, a, w, kl_coef=jnp.sum(a)),
     "grpo_loss: kl_coef is a traced value, so it cannot be checked to be 0 without ref_logprobs"),
]


def error_id(case):
    return case[1].split(":")[0] + ":" + case[1].split(": ")[1].split()[0]


@pytest.mark.parametrize("call,message", ERRORS, ids=[error_id(c) for c in ERRORS])
def test_argument_errors_name_the_argument_at_trace_time(call, message):
    logprobs, _, advantages, weights, _ = make_rollout()
    pattern = re.escape(message).replace(re.escape(".*"), ".*")
    for wrap in (lambda f: f, jax.jit):
        with pytest.raises(InputError, match=pattern):
            wrap(call)(logprobs, weights, advantages)


@pytest.mark.parametrize("call,message", TRACED_ERRORS, ids=[error_id(c) for c in TRACED_ERRORS])
def test_traced_options_that_cannot_be_checked_raise(call, message):
    logprobs, _, advantages, weights, _ = make_rollout()
    with pytest.raises(InputError, match=re.escape(message).replace(re.escape(".*"), ".*")):
        jax.jit(call)(logprobs, weights, advantages)
    assert issubclass(InputError, ValueError)


def test_the_options_that_make_the_errors_above_valid():
    logprobs, old, advantages, weights, ref = make_rollout()
    # "fixed" with a normalizer needs no max_len; kl_coef with ref_logprobs may be traced.
    losses.grpo_loss(logprobs, old, advantages, weights, aggregation="fixed", normalizer=54.0)
    fn = jax.jit(lambda c: losses.grpo_loss(logprobs, old, advantages, weights, ref_logprobs=ref, kl_coef=c))
    assert_close(fn(0.0), losses.grpo_loss(logprobs, old, advantages, weights))
    losses.grpo_loss(logprobs, old, advantages, weights, clip_eps=0.0, clip_eps_high=0.0)
    losses.grpo_loss(logprobs, old, advantages, weights, kl_coef=0)
