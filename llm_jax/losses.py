"""Losses for language-model training: pretraining, fine-tuning, preferences, RL.

Conventions shared by every function here:

* Pure functions on arrays (jax.numpy / jax.nn / jax.lax only), safe under
    `jax.jit`, `jax.grad` and `jax.vmap`. Shapes: B batch, T time, V vocab.
* Token-level inputs are already aligned: `targets[b, t]` is the token that
    `logits[b, t]` predicts (see `shift_for_clm`).
* `weights` are 0/1 (or real) per-token loss weights; 0 marks padding or
    tokens that carry no loss (e.g. the prompt in SFT).
* Every loss returns a float32 scalar: the weighted sum of per-token (or
    per-pair) losses divided by `normalizer` when it is given, else by the
    weights' sum (the number of pairs for pair losses), see `masked_mean`. The
    trainer passes the *global* normalizer so that summing the losses (and
    gradients) of micro-batches or data-parallel shards gives exactly the
    full-batch value.
* Reductions and softmaxes run in (at least) float32, even for bf16 inputs.
"""

import jax
import jax.numpy as jnp


def _float(x):
    """`x` as an array of at least float32 precision (bf16, ints, bools -> f32)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_mean(values, weights=None, normalizer=None):
    """Weighted sum divided by `normalizer`, or by the weights' sum.

        masked_mean = sum(w * values) / normalizer    if normalizer is given
                    = sum(w * values) / sum(w)        otherwise

    An all-zero `weights` (e.g. a micro-batch that is all padding) would give
    0 / 0; the default denominator is then replaced by 1 (with `jnp.where`, so
    real weights summing to less than 1 are still divided exactly), which gives
    a loss of 0 and a zero gradient instead of NaN.

    Args:
        values: [...] per-element values.
        weights: [...] weights of the same shape, or None for all ones (then the
            default denominator is the number of elements).
        normalizer: optional scalar denominator, e.g. the global weight sum.

    Returns:
        A float32 scalar.
    """
    values = _float(values)
    weights = jnp.ones_like(values) if weights is None else _float(weights)
    total = jnp.sum(weights * values)
    if normalizer is None:
        denominator = jnp.sum(weights)
        denominator = jnp.where(denominator > 0, denominator, 1.0)
    else:
        denominator = _float(normalizer)
    return total / denominator


# ---------------------------------------------------------------------------
# Token log-probabilities and language-modelling losses.
# ---------------------------------------------------------------------------


def shift_for_clm(tokens, weights=None):
    """Splits a token sequence into next-token-prediction inputs and targets.

        inputs = tokens[:, :-1],  targets = tokens[:, 1:],  weights[:, 1:]

    A weight belongs to the token it scores, so the weight of the target
    `tokens[:, t + 1]` is `weights[:, t + 1]`.

    Args:
        tokens: [B, T] token ids.
        weights: optional [B, T] per-token weights.

    Returns:
        `(inputs [B, T-1], targets [B, T-1])`, or `(inputs, targets,
        weights [B, T-1])` when `weights` is given.
    """
    tokens = jnp.asarray(tokens)
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    if weights is None:
        return inputs, targets
    return inputs, targets, jnp.asarray(weights)[..., 1:]


def token_logprobs(logits, targets):
    """Log-probability of each target token.

        log p(y_t) = log_softmax(logits_t)[y_t]
                   = (logits_t[y_t] - max_v logits_t)
                     - log sum_v exp(logits_t[v] - max_v logits_t)

    The softmax is computed in float32 even for bf16 logits: bf16 keeps ~3
    significant digits, too few for a logsumexp over a large vocabulary.
    `log_softmax` subtracts the max before anything else, so large logits
    lose no precision (unlike logits[y] - logsumexp(logits), which subtracts
    two large numbers).

    The target's entry is picked with a one-hot multiply-and-sum rather than a
    gather: the gather's gradient is a scatter into a zero-filled [B, T, V]
    buffer, while the one-hot form fuses into the log-softmax's elementwise
    pass forwards and backwards (on CPU this saved a 64 MiB memset + scatter per
    step of the benchmark model; TPU/GPU code uses one-hot for the same reason).
    A side effect: a target outside [0, V) (e.g. -1 padding) gives log-prob 0,
    not a wrapped index or NaN, so padding at weight 0 is harmless.

    Args:
        logits: [B, T, V] unnormalized log-probabilities (any float dtype).
        targets: [B, T] int token ids in [0, V).

    Returns:
        [B, T] float32 log-probabilities.
    """
    log_probs = jax.nn.log_softmax(_float(logits), axis=-1)
    # A select, not a multiply by the one-hot: -inf log-probs (masked vocab
    # entries) would give -inf * 0 = NaN.
    hit = jnp.asarray(targets)[..., None] == jnp.arange(log_probs.shape[-1])
    return jnp.sum(jnp.where(hit, log_probs, 0.0), axis=-1)


def sequence_logprobs(logits, targets, weights):
    """Log-probability of each sequence: sum_t w_t * log p(y_t).

    Used for preference losses, e.g. the inputs of `dpo_loss`.

    Args:
        logits: [B, T, V] logits.
        targets: [B, T] token ids.
        weights: [B, T] weights (1 on the tokens that belong to the sequence).

    Returns:
        [B] float32 sequence log-probabilities.
    """
    return jnp.sum(_float(weights) * token_logprobs(logits, targets), axis=-1)


def clm_loss(logits, targets, weights, normalizer=None):
    """Causal language-modelling (next-token) cross-entropy.

        L = -sum_{b,t} w_{b,t} log p(y_{b,t}) / normalizer   (default sum(w))

    Args:
        logits: [B, T, V] logits.
        targets: [B, T] next tokens, aligned with `logits` (see `shift_for_clm`).
        weights: [B, T] token weights (0 at padding).
        normalizer: optional scalar denominator (e.g. the global weight sum).

    Returns:
        A float32 scalar.

    References:
        Radford et al., `Improving Language Understanding by Generative
        Pre-Training <https://openai.com/research/language-unsupervised>`_, 2018
    """
    return -masked_mean(token_logprobs(logits, targets), weights, normalizer)


def mlm_mask(rng, tokens, *, mask_id, vocab_size, mask_prob=0.15, can_mask=None):
    """BERT masking: picks positions to predict and corrupts the inputs there.

    Each position where `can_mask` is True is chosen independently with
    probability `mask_prob`. A chosen position's input becomes `mask_id` with
    probability 0.8, a token drawn uniformly from [0, vocab_size) with
    probability 0.1 (it may equal the original by chance), and stays unchanged
    with probability 0.1.

    Args:
        rng: a `jax.random` key.
        tokens: [B, T] int token ids.
        mask_id: id of the mask token.
        vocab_size: random replacements are drawn from [0, vocab_size).
        mask_prob: probability of choosing a position.
        can_mask: optional [B, T] bool; False (padding, special tokens) is never
            chosen. Default: all True.

    Returns:
        `(inputs [B, T], targets [B, T], weights [B, T])`: the corrupted inputs
        (dtype of `tokens`), the original tokens as targets, and float32 weights
        that are 1 at chosen positions and 0 elsewhere.

    References:
        Devlin et al., `BERT: Pre-training of Deep Bidirectional Transformers for
        Language Understanding <https://arxiv.org/abs/1810.04805>`_, 2019
    """
    tokens = jnp.asarray(tokens)
    choose_key, action_key, random_key = jax.random.split(rng, 3)
    chosen = jax.random.bernoulli(choose_key, mask_prob, tokens.shape)
    if can_mask is not None:
        chosen = chosen & jnp.asarray(can_mask, dtype=bool)
    # One uniform draw per position picks the corruption:
    # [0, 0.8) -> mask_id, [0.8, 0.9) -> random token, [0.9, 1) -> unchanged.
    action = jax.random.uniform(action_key, tokens.shape)
    use_mask = chosen & (action < 0.8)
    use_random = chosen & (action >= 0.8) & (action < 0.9)
    random_tokens = jax.random.randint(
        random_key, tokens.shape, 0, vocab_size, dtype=tokens.dtype
    )
    inputs = jnp.where(use_random, random_tokens, tokens)
    inputs = jnp.where(use_mask, jnp.asarray(mask_id, tokens.dtype), inputs)
    return inputs, tokens, chosen.astype(jnp.float32)


def mlm_loss(logits, targets, weights, normalizer=None):
    """Masked language-modelling cross-entropy over the chosen positions.

        L = -sum_{b,t} w_{b,t} log p(y_{b,t}) / normalizer   (default sum(w))

    Args:
        logits: [B, T, V] logits at every position.
        targets: [B, T] original tokens (from `mlm_mask`).
        weights: [B, T] 1 at the masked (chosen) positions, else 0.
        normalizer: optional scalar denominator (e.g. the global weight sum).

    Returns:
        A float32 scalar.

    References:
        Devlin et al., `BERT: Pre-training of Deep Bidirectional Transformers for
        Language Understanding <https://arxiv.org/abs/1810.04805>`_, 2019
    """
    return -masked_mean(token_logprobs(logits, targets), weights, normalizer)


def token_kl(logits, ref_logits):
    """Exact per-token KL(pi || pi_ref) over the full vocabulary.

        KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v)),
        p = softmax(logits), q = softmax(ref_logits)

    Args:
        logits: [B, T, V] logits of pi.
        ref_logits: [B, T, V] logits of pi_ref.

    Returns:
        [B, T] float32 KL divergences (>= 0).
    """
    log_p = jax.nn.log_softmax(_float(logits), axis=-1)
    log_q = jax.nn.log_softmax(_float(ref_logits), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def sft_loss(logits, targets, weights, ref_logits=None, kl_coef=0.0, normalizer=None):
    """Supervised fine-tuning loss: completion-only cross-entropy (+ KL).

        L = sum_{b,t} w_{b,t} [-log p(y_{b,t}) + kl_coef * KL(pi_t || pi_ref_t)]
            / normalizer                                         (default sum(w))

    `weights` select the completion tokens (0 on prompt and padding). The KL
    term (see `token_kl`) keeps the model close to a frozen reference; it is
    only added when `ref_logits` is given, and gradients never flow into
    `ref_logits`.

    Args:
        logits: [B, T, V] policy logits.
        targets: [B, T] next tokens.
        weights: [B, T] 1 on completion tokens, else 0.
        ref_logits: optional [B, T, V] logits of the reference model.
        kl_coef: KL coefficient; must be 0 when `ref_logits` is None.
        normalizer: optional scalar denominator (e.g. the global weight sum).

    Returns:
        A float32 scalar.

    References:
        Ouyang et al., `Training language models to follow instructions with human
        feedback <https://arxiv.org/abs/2203.02155>`_, 2022
    """
    per_token = -token_logprobs(logits, targets)
    if ref_logits is not None:
        kl = token_kl(logits, jax.lax.stop_gradient(ref_logits))
        per_token = per_token + kl_coef * kl
    elif isinstance(kl_coef, (int, float)) and kl_coef != 0:
        raise ValueError("sft_loss: kl_coef != 0 needs ref_logits.")
    return masked_mean(per_token, weights, normalizer)


# ---------------------------------------------------------------------------
# Pairwise preference losses (one value per (chosen, rejected) pair).
# ---------------------------------------------------------------------------


def reward_model_loss(chosen_rewards, rejected_rewards, margin=None, normalizer=None, weights=None):
    """Bradley-Terry reward-model loss on preference pairs.

        L = -sum_i log sigmoid(r+_i - r-_i - m_i) / normalizer   (default B)

    `jax.nn.log_sigmoid` avoids the overflow of log(sigmoid(x)) for large |x|.

    Args:
        chosen_rewards: [B] rewards of the preferred responses.
        rejected_rewards: [B] rewards of the rejected responses.
        margin: optional scalar or [B] margin m the preferred reward must exceed
            the rejected one by (e.g. from preference strength, as in Llama 2).
        normalizer: optional scalar denominator; default the number of pairs
            (the weights' sum when `weights` is given).
        weights: optional [B] pair weights, e.g. 0 for the empty slots of a
            packed batch.

    Returns:
        A float32 scalar.

    References:
        Ouyang et al., `Training language models to follow instructions with human
        feedback <https://arxiv.org/abs/2203.02155>`_, 2022;
        Touvron et al., `Llama 2: Open Foundation and Fine-Tuned Chat Models
        <https://arxiv.org/abs/2307.09288>`_, 2023 (margin)
    """
    margin = 0.0 if margin is None else _float(margin)
    per_pair = -jax.nn.log_sigmoid(
        _float(chosen_rewards) - _float(rejected_rewards) - margin
    )
    return masked_mean(per_pair, weights, normalizer)


def _preference_logit(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
):
    """h = (pc - pr) - (rc - rr): the policy's log-ratio gain over the reference.

    The reference model is frozen, so no gradient flows into its log-probs.
    """
    policy_margin = _float(policy_chosen_logps) - _float(policy_rejected_logps)
    ref_margin = _float(ref_chosen_logps) - _float(ref_rejected_logps)
    return policy_margin - jax.lax.stop_gradient(ref_margin)


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    label_smoothing=0.0,
    normalizer=None,
    weights=None,
):
    """Direct Preference Optimization (sigmoid) loss, with cDPO smoothing.

        h = (log pi(y+) - log pi(y-)) - (log pi_ref(y+) - log pi_ref(y-))
        L = sum_i [-(1 - ls) log sigmoid(beta h_i) - ls log sigmoid(-beta h_i)]
            / normalizer                                         (default B)

    `ls` (label_smoothing) is the assumed probability that a preference label
    is flipped (conservative DPO); ls = 0 is plain DPO.

    Args:
        policy_chosen_logps: [B] sequence log-probs of y+ under the policy (see
            `sequence_logprobs`).
        policy_rejected_logps: [B] same for y-.
        ref_chosen_logps: [B] sequence log-probs of y+ under the frozen reference.
        ref_rejected_logps: [B] same for y-.
        beta: inverse temperature: strength of the implicit KL constraint.
        label_smoothing: cDPO label-noise rate in [0, 0.5).
        normalizer: optional scalar denominator; default the number of pairs
            (the weights' sum when `weights` is given).
        weights: optional [B] pair weights (0 for padding pairs).

    Returns:
        A float32 scalar.

    References:
        Rafailov et al., `Direct Preference Optimization: Your Language Model is
        Secretly a Reward Model <https://arxiv.org/abs/2305.18290>`_, 2023;
        Mitchell, `A note on DPO with noisy preferences & relationship to IPO
        <https://ericmitchell.ai/cdpo.pdf>`_, 2023
    """
    h = _preference_logit(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    per_pair = (
        -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
        - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    )
    return masked_mean(per_pair, weights, normalizer)


def ipo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    normalizer=None,
    weights=None,
):
    """Identity Preference Optimization loss.

        h = (log pi(y+) - log pi(y-)) - (log pi_ref(y+) - log pi_ref(y-))
        L = sum_i (h_i - 1 / (2 beta))^2 / normalizer        (default B)

    Regresses h to a finite target instead of pushing it to infinity, which
    keeps the policy regularized even for deterministic preferences.

    Args:
        policy_chosen_logps: [B] sequence log-probs of y+ under the policy.
        policy_rejected_logps: [B] same for y-.
        ref_chosen_logps: [B] sequence log-probs of y+ under the frozen reference.
        ref_rejected_logps: [B] same for y-.
        beta: regularization strength (the target of h is 1 / (2 beta)).
        normalizer: optional scalar denominator; default the number of pairs
            (the weights' sum when `weights` is given).
        weights: optional [B] pair weights (0 for padding pairs).

    Returns:
        A float32 scalar.

    References:
        Azar et al., `A General Theoretical Paradigm to Understand Learning from
        Human Preferences <https://arxiv.org/abs/2310.12036>`_, 2023
    """
    h = _preference_logit(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return masked_mean((h - 1.0 / (2.0 * beta)) ** 2, weights, normalizer)


# ---------------------------------------------------------------------------
# PPO (RLHF): per-token policy and value losses, advantages, rewards.
# ---------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs, old_logprobs, advantages, weights, *, clip_eps=0.2, normalizer=None
):
    """PPO clipped-surrogate policy loss.

        r = exp(log pi(a) - log pi_old(a))
        L = -sum_{b,t} w min(r A, clip(r, 1 - eps, 1 + eps) A) / normalizer
                                                             (default sum(w))

    `old_logprobs` and `advantages` come from the rollout and are constants:
    no gradient flows into them.

    Args:
        logprobs: [B, T] log-probs of the taken tokens under the current policy.
        old_logprobs: [B, T] same under the rollout policy.
        advantages: [B, T] advantage estimates (e.g. from `gae`).
        weights: [B, T] token weights (0 at prompt and padding).
        clip_eps: clipping range eps of the probability ratio.
        normalizer: optional scalar denominator (e.g. the global weight sum).

    Returns:
        A float32 scalar.

    References:
        Schulman et al., `Proximal Policy Optimization Algorithms
        <https://arxiv.org/abs/1707.06347>`_, 2017
    """
    old_logprobs = jax.lax.stop_gradient(_float(old_logprobs))
    advantages = jax.lax.stop_gradient(_float(advantages))
    ratio = jnp.exp(_float(logprobs) - old_logprobs)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # The pessimistic (smaller) objective removes any gain from moving the
    # ratio outside [1 - eps, 1 + eps] in the direction the advantage favors.
    per_token = -jnp.minimum(ratio * advantages, clipped_ratio * advantages)
    return masked_mean(per_token, weights, normalizer)


def ppo_clip_fraction(logprobs, old_logprobs, weights, *, clip_eps, normalizer=None):
    """Weighted fraction of tokens whose ratio lies outside [1 - eps, 1 + eps].

        sum_{b,t} w [|r - 1| > eps] / normalizer    (default sum(w))

    For logging only (no gradient).

    Args:
        logprobs: [B, T] log-probs under the current policy.
        old_logprobs: [B, T] log-probs under the rollout policy.
        weights: [B, T] token weights.
        clip_eps: clipping range eps, as in `ppo_policy_loss`.
        normalizer: optional scalar denominator (e.g. the global weight sum).

    Returns:
        A float32 scalar in [0, 1] (with the default normalizer).
    """
    ratio = jnp.exp(_float(logprobs) - _float(old_logprobs))
    clipped = jnp.abs(ratio - 1.0) > clip_eps
    return jax.lax.stop_gradient(masked_mean(clipped, weights, normalizer))


def ppo_value_loss(
    values, old_values, returns, weights, *, clip_eps=0.2, normalizer=None
):
    """PPO clipped value loss.

        v_clip = v_old + clip(v - v_old, -eps, eps)
        L = sum_{b,t} w 0.5 max((v - R)^2, (v_clip - R)^2) / normalizer
                                                             (default sum(w))

    `old_values` and `returns` come from the rollout and are constants.

    Args:
        values: [B, T] current value predictions.
        old_values: [B, T] value predictions at rollout time.
        returns: [B, T] value targets (e.g. from `gae`).
        weights: [B, T] token weights.
        clip_eps: clipping range of the value update.
        normalizer: optional scalar denominator (e.g. the global weight sum).

    Returns:
        A float32 scalar.

    References:
        Schulman et al., `Proximal Policy Optimization Algorithms
        <https://arxiv.org/abs/1707.06347>`_, 2017 (value clipping as in the
        OpenAI baselines implementation)
    """
    values = _float(values)
    old_values = jax.lax.stop_gradient(_float(old_values))
    returns = jax.lax.stop_gradient(_float(returns))
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    per_token = 0.5 * jnp.maximum(
        (values - returns) ** 2, (clipped_values - returns) ** 2
    )
    return masked_mean(per_token, weights, normalizer)


def gae(rewards, values, weights, *, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation over right-padded episodes.

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1}
        R_t     = A_t + V_t

    with V_{t+1} = A_{t+1} = 0 after the last real step (the episode ends
    there). Computed by a reverse `jax.lax.scan` over time. A zero weight in
    the middle of a row would likewise end the episode at that step, so
    padding must be at the end of each row.

    Args:
        rewards: [B, T] per-step rewards (e.g. from `kl_penalized_rewards`).
        values: [B, T] value estimates V_t.
        weights: [B, T] > 0 at real steps, 0 at padding.
        gamma: discount factor.
        lam: GAE lambda (bias-variance trade-off).

    Returns:
        `(advantages [B, T], returns [B, T])`, float32, both 0 at padding.

    References:
        Schulman et al., `High-Dimensional Continuous Control Using Generalized
        Advantage Estimation <https://arxiv.org/abs/1506.02438>`_, 2016
    """
    real = jnp.asarray(weights) > 0
    # Zeroing the pads makes V = 0 past the last real step; `where` (not a
    # product) also keeps garbage (inf/nan) pad values out of the result.
    rewards = jnp.where(real, _float(rewards), 0.0)
    values = jnp.where(real, _float(values), 0.0)

    def step(carry, x):
        next_value, next_advantage = carry
        reward, value, is_real = x
        delta = reward + gamma * next_value - value
        advantage = jnp.where(is_real, delta + gamma * lam * next_advantage, 0.0)
        return (value, advantage), advantage

    # scan runs over the leading axis, so put time (the last axis) first.
    time_major = tuple(jnp.moveaxis(x, -1, 0) for x in (rewards, values, real))
    zeros = jnp.zeros(values.shape[:-1], values.dtype)
    _, advantages = jax.lax.scan(step, (zeros, zeros), time_major, reverse=True)
    advantages = jnp.moveaxis(advantages, 0, -1)
    return advantages, advantages + values


def kl_penalized_rewards(scores, logprobs, ref_logprobs, weights, *, kl_coef):
    """Per-token RLHF rewards: KL penalty on every token, score on the last.

        reward_{b,t} = -kl_coef (log pi(a_t) - log pi_ref(a_t))
                       + [t == last real step of row b] * score_b

    and 0 at padding. log pi - log pi_ref is the sampled-token estimate of
    KL(pi || pi_ref).

    Args:
        scores: [B] reward-model score of each whole response.
        logprobs: [B, T] log-probs of the sampled tokens under the policy.
        ref_logprobs: [B, T] same under the reference model.
        weights: [B, T] > 0 at real (response) tokens, 0 at padding.
        kl_coef: KL penalty coefficient.

    Returns:
        [B, T] float32 rewards. A row without real tokens gets all zeros.

    References:
        Ziegler et al., `Fine-Tuning Language Models from Human Preferences
        <https://arxiv.org/abs/1909.08593>`_, 2019
    """
    real = jnp.asarray(weights) > 0
    log_ratio = _float(logprobs) - _float(ref_logprobs)
    rewards = jnp.where(real, -kl_coef * log_ratio, 0.0)
    positions = jnp.arange(real.shape[-1])
    # Index of each row's last real step; -1 (matches nothing) for empty rows.
    last = jnp.max(jnp.where(real, positions, -1), axis=-1)
    is_last = positions == last[..., None]
    return rewards + jnp.where(is_last, _float(scores)[..., None], 0.0)


# ---------------------------------------------------------------------------
# Sequence classification (one label per sequence).
# ---------------------------------------------------------------------------


def classification_loss(logits, labels, weights=None, normalizer=None):
    """Cross-entropy of class logits against integer labels (seed 003).

        L = -sum_b w_b * log softmax(logits_b)_{y_b} / normalizer   (default sum_b w_b)

    `logits` are a head's outputs `W h(x) + b` on a pooled or last-token
    representation h(x); the log-softmax runs in float32 (log-sum-exp, stable
    for large logits). The label is picked with `token_logprobs`, so a label
    outside [0, C) (e.g. -1 padding) gives log-prob 0 rather than NaN or a
    wrapped class, and a row at weight 0 contributes nothing.

    Args:
        logits: [B, C] class scores (any float dtype).
        labels: [B] int class indices y_b in [0, C).
        weights: optional [B] weights, e.g. 0 for the empty slots of a packed
            batch; default all ones.
        normalizer: optional scalar denominator, e.g. the global count of real
            sequences; default the weights' sum (B when `weights` is None).

    Returns:
        A float32 scalar.
    """
    return masked_mean(-token_logprobs(logits, labels), weights, normalizer)


LOSSES = {
    "clm": clm_loss,
    "mlm": mlm_loss,
    "sft": sft_loss,
    "reward_model": reward_model_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "ppo_policy": ppo_policy_loss,
    "ppo_value": ppo_value_loss,
    "classification": classification_loss,
}
