"""Losses for language-model training: pretraining, fine-tuning, preferences, RL.

Conventions shared by every function here (docs/losses.md has the long form):

* Pure functions on arrays (jax.numpy / jax.nn / jax.lax, argument checks with
    chex), safe under `jax.jit`, `jax.grad` and `jax.vmap` (over an extra
    leading axis). No Flax, no config objects. Shapes: B batch, T time,
    V vocab, C classes.
* Arguments are checked at trace time (shapes with chex): a wrong rank, a
    mismatch or an option out of range raises `llm_jax.errors.InputError` (a
    ValueError) naming the function, the argument, the shape it must have and
    the one it has, e.g. "clm_loss: targets must be [B, T] (logits.shape[:2]);
    got shape (2, 7), expected (2, 8)".
* Token-level inputs are already aligned: `targets[b, t]` is the token that
    `logits[b, t]` predicts (see `shift_for_clm`). A target < 0 (Hugging
    Face's -100 "ignore" label, or -1 padding) is ignored everywhere: it counts
    as weight 0, in the loss and in the default denominator.
* `weights` are 0/1 (or real, >= 0) loss weights: 0 marks padding, tokens that
    carry no loss (e.g. the prompt in SFT) or empty pair slots.
* Every loss returns the weighted sum of its per-element losses l (per token,
    pair or sequence) divided by a denominator D:

        L = sum_i w_i l_i / D,   D = normalizer          if given (0 -> 1)
                                 = sum_i w_i             otherwise (0 -> 1)

    (pair losses without `weights`: w_i = 1, so D = B.) A trainer passes the
    *global* normalizer (e.g. the weight sum of the whole batch) so that summing
    the losses, and gradients, of micro-batches or data-parallel shards gives
    exactly the full-batch value. A zero denominator (an all-padding shard, with
    or without an explicit normalizer) is replaced by 1, so the loss is 0 with a
    zero gradient, never NaN.
* `reduction` (keyword-only, every loss): "mean" (default) returns the scalar L
    above; "per_example" returns [B], each example's (row's or pair's) share
    sum_{i in b} w_i l_i / D over the same D, so that
    `loss(..., reduction="per_example").sum() == loss(...)`. Multiply by D and
    divide by the row's own weight sum for that row's own mean.
* Options (normalizer, reduction, beta, kl_coef, margin, clip_eps, ...) are
    keyword-only; arrays are positional. See `LOSSES` for each entry's arrays.
* Reductions and softmaxes run in (at least) float32, even for bf16 inputs: the
    result is float32 for bf16/f16/f32 inputs, float64 when float64 arrays are
    given with `jax_enable_x64` on (Python-number options never widen it).
"""

import chex
import jax
import jax.numpy as jnp

from llm_jax.errors import InputError

REDUCTIONS = ("mean", "per_example")


def _float(x):
    """`x` as an array of at least float32 precision (bf16, ints, bools -> f32)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _static_value(x):
    """float(x) if `x` is known at trace time (a Python or numpy number, a concrete
    JAX scalar), else None (a value traced by jit/grad/vmap, or not a scalar)."""
    try:
        return float(x)
    except TypeError:  # includes jax.errors.ConcretizationTypeError
        return None


def _rank(x, rank, message):
    """chex's rank check; a failure is an InputError: `message` (the function, the
    argument, the shape it must have) and the shape it has."""
    try:
        chex.assert_rank(x, rank)
    except AssertionError:
        raise InputError(f"{message}; got shape {jnp.shape(x)}") from None


def _shape(x, shape, message):
    """chex's shape check, failing as `_rank` does."""
    try:
        chex.assert_shape(x, shape)
    except AssertionError:
        raise InputError(f"{message}; got shape {jnp.shape(x)}, expected {tuple(shape)}") from None


def _check_reduction(fn, reduction):
    if reduction not in REDUCTIONS:
        raise InputError(f"{fn}: reduction={reduction!r}; pass reduction='mean' (a scalar) or "
                         "'per_example' ([B])")


def _check_range(fn, name, value, low, high, high_open=True):
    """An InputError at trace time when a known scalar option lies outside its range."""
    v = _static_value(value)
    if v is None:
        return
    above = v >= high if high_open else v > high
    if not (v >= low) or above:  # `not >=` also catches NaN
        bracket = ")" if high_open else "]"
        raise InputError(f"{fn}: {name}={value} must lie in [{low}, {high}{bracket}")


def _check_positive(fn, name, value):
    v = _static_value(value)
    if v is not None and not v > 0:
        raise InputError(f"{fn}: {name}={value} must be positive")


def _check_token_inputs(fn, logits, targets, weights=None):
    """logits [B, T, V], targets [B, T], weights [B, T]."""
    _rank(logits, 3, message=f"{fn}: logits must be [B, T, V]")
    _shape(targets, logits.shape[:2],
           message=f"{fn}: targets must be [B, T] (logits.shape[:2])")
    if weights is not None:
        _shape(weights, logits.shape[:2],
               message=f"{fn}: weights must be [B, T], the shape of targets")


def _check_same(fn, rank, shape_doc, **arrays):
    """Every array has rank `rank` and the shape of the first one."""
    (first_name, first), *rest = [(k, v) for k, v in arrays.items() if v is not None]
    _rank(first, rank, message=f"{fn}: {first_name} must be {shape_doc}")
    for name, x in rest:
        _shape(x, first.shape,
               message=f"{fn}: {name} must be {shape_doc}, the shape of {first_name}")


def _valid_weights(weights, targets):
    """`weights` with every position whose target is < 0 (ignore label) set to 0."""
    return jnp.where(jnp.asarray(targets) >= 0, _float(weights), 0.0)


def masked_mean(values, weights=None, normalizer=None, *, reduction="mean"):
    """Weighted sum divided by `normalizer`, or by the weights' sum.

        masked_mean = sum(w * values) / normalizer    if normalizer is given
                    = sum(w * values) / sum(w)        otherwise

    A zero denominator would give 0 / 0 (NaN) on a micro-batch or shard that is
    all padding: an all-zero `weights` with the default denominator, or an
    explicit `normalizer` of 0 (e.g. a caller's own weight sum). Either is
    replaced by 1 (with `jnp.where`, so real weights summing to less than 1 are
    still divided exactly), which gives 0 and a zero gradient instead of NaN.
    A zero normalizer with non-zero weights is a caller's error; it gives the
    plain weighted sum.

    Args:
        values: [B, ...] per-element values.
        weights: [B, ...] weights of the same shape, or None for all ones (then the
            default denominator is the number of elements).
        normalizer: optional scalar denominator, e.g. the global weight sum.
        reduction: "mean" (a scalar) or "per_example" ([B]: the sum over each
            example's elements, divided by the same denominator).

    Returns:
        A scalar, or [B] for reduction="per_example"; float32 (float64 for
        float64 inputs under jax_enable_x64).
    """
    _check_reduction("masked_mean", reduction)
    values = _float(values)
    weights = jnp.ones_like(values) if weights is None else _float(weights)
    weighted = weights * values
    if normalizer is None:
        denominator = jnp.sum(weights)
        denominator = jnp.where(denominator > 0, denominator, 1.0)
    else:
        denominator = _float(normalizer)
        _rank(denominator, 0, message="masked_mean: normalizer must be a scalar")
        denominator = jnp.where(denominator != 0, denominator, 1.0)
    denominator = denominator.astype(weighted.dtype)  # a Python normalizer never widens
    if reduction == "per_example":
        if weighted.ndim == 0:
            raise InputError("masked_mean: reduction='per_example' needs values [B, ...], got a scalar; "
                             "pass reduction='mean' for a scalar")
        return jnp.sum(weighted, axis=tuple(range(1, weighted.ndim))) / denominator
    return jnp.sum(weighted) / denominator


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
    A side effect: a target outside [0, V) (e.g. -100 or -1 padding) gives
    log-prob 0, not a wrapped index or NaN. The losses go further and give a
    target < 0 weight 0 (see the module docstring).

    Args:
        logits: [B, T, V] unnormalized log-probabilities (any float dtype); any
            leading shape [..., V] works, e.g. class logits [B, C].
        targets: [B, T] int token ids in [0, V): `logits.shape[:-1]`.

    Returns:
        [B, T] log-probabilities, float32 (float64 for float64 logits under
        jax_enable_x64).
    """
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _shape(targets, logits.shape[:-1],
           message="token_logprobs: targets must be logits.shape[:-1], e.g. [B, T] for logits [B, T, V]")
    log_probs = jax.nn.log_softmax(_float(logits), axis=-1)
    # A select, not a multiply by the one-hot: -inf log-probs (masked vocab
    # entries) would give -inf * 0 = NaN.
    hit = targets[..., None] == jnp.arange(log_probs.shape[-1])
    return jnp.sum(jnp.where(hit, log_probs, 0.0), axis=-1)


def sequence_logprobs(logits, targets, weights):
    """Log-probability of each sequence: sum_t w_t * log p(y_t).

    Used for preference losses, e.g. the inputs of `dpo_loss`. Positions whose
    target is < 0 count as weight 0.

    Args:
        logits: [B, T, V] logits.
        targets: [B, T] token ids.
        weights: [B, T] weights (1 on the tokens that belong to the sequence).

    Returns:
        [B] sequence log-probabilities, float32 (float64 under x64 for float64
        inputs).
    """
    return _sequence_sums("sequence_logprobs", logits, targets, weights)[0]


def _sequence_sums(name, logits, targets, weights):
    """(sum_t w log p [B], the valid weights [B, T]) after the shared input checks."""
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _check_token_inputs(name, logits, targets, jnp.asarray(weights))
    weights = _valid_weights(weights, targets)
    return jnp.sum(weights * token_logprobs(logits, targets), axis=-1), weights


def sequence_mean_logprobs(logits, targets, weights):
    """Per-token mean log-probability of each sequence (length-normalized).

        mean_b = sum_t w_{b,t} log p(y_{b,t}) / sum_t w_{b,t}     (0 for an empty row)

    The inputs `ipo_loss` expects (TRL's IPO convention). Arguments, target < 0
    and dtypes as `sequence_logprobs`; returns [B] mean log-probabilities.
    """
    total, weights = _sequence_sums("sequence_mean_logprobs", logits, targets, weights)
    count = jnp.sum(weights, axis=-1)
    return total / jnp.where(count > 0, count, 1.0).astype(total.dtype)


def clm_loss(logits, targets, weights, *, normalizer=None, reduction="mean"):
    """Causal language-modelling (next-token) cross-entropy.

        L = -sum_{b,t} w_{b,t} log p(y_{b,t}) / D,   D = normalizer or sum_{b,t} w_{b,t}

    with w = 0 wherever the target is < 0. The same as the weighted mean of
    `optax.softmax_cross_entropy_with_integer_labels(logits, targets)`, and as
    PyTorch/Hugging Face cross-entropy with `ignore_index=-100` when the weights
    are all 1.

    Args:
        logits: [B, T, V] logits.
        targets: [B, T] next tokens, aligned with `logits` (see `shift_for_clm`).
        weights: [B, T] token weights (0 at padding).
        normalizer: optional scalar denominator D (e.g. the global weight sum).
        reduction: "mean" (the scalar L) or "per_example" ([B], each row's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Radford et al., `Improving Language Understanding by Generative
        Pre-Training <https://openai.com/research/language-unsupervised>`_, 2018
    """
    _check_reduction("clm_loss", reduction)
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _check_token_inputs("clm_loss", logits, targets, jnp.asarray(weights))
    weights = _valid_weights(weights, targets)
    return -masked_mean(token_logprobs(logits, targets), weights, normalizer, reduction=reduction)


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
    _rank(tokens, 2, message="mlm_mask: tokens must be [B, T]")
    if can_mask is not None:
        _shape(can_mask, tokens.shape,
               message="mlm_mask: can_mask must be [B, T], the shape of tokens")
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


def mlm_loss(logits, targets, weights, *, normalizer=None, reduction="mean"):
    """Masked language-modelling cross-entropy over the chosen positions.

        L = -sum_{b,t} w_{b,t} log p(y_{b,t}) / D,   D = normalizer or sum_{b,t} w_{b,t}

    with w = 0 wherever the target is < 0 (Hugging Face's MLM collator labels
    the unchosen positions -100; with it, weights may be all ones).

    Args:
        logits: [B, T, V] logits at every position.
        targets: [B, T] original tokens (from `mlm_mask`).
        weights: [B, T] 1 at the masked (chosen) positions, else 0.
        normalizer: optional scalar denominator D (e.g. the global weight sum).
        reduction: "mean" (the scalar L) or "per_example" ([B], each row's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Devlin et al., `BERT: Pre-training of Deep Bidirectional Transformers for
        Language Understanding <https://arxiv.org/abs/1810.04805>`_, 2019
    """
    _check_reduction("mlm_loss", reduction)
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _check_token_inputs("mlm_loss", logits, targets, jnp.asarray(weights))
    weights = _valid_weights(weights, targets)
    return -masked_mean(token_logprobs(logits, targets), weights, normalizer, reduction=reduction)


def token_kl(logits, ref_logits):
    """Exact per-token KL(pi || pi_ref) over the full vocabulary.

        KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v)),
        p = softmax(logits), q = softmax(ref_logits)

    Args:
        logits: [B, T, V] logits of pi (any leading shape [..., V]).
        ref_logits: [B, T, V] logits of pi_ref, the shape of `logits`.

    Returns:
        [B, T] KL divergences (>= 0), float32 (float64 under x64 for float64
        inputs).
    """
    logits, ref_logits = jnp.asarray(logits), jnp.asarray(ref_logits)
    _shape(ref_logits, logits.shape,
           message="token_kl: ref_logits must have the shape of logits")
    log_p = jax.nn.log_softmax(_float(logits), axis=-1)
    log_q = jax.nn.log_softmax(_float(ref_logits), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def sft_loss(logits, targets, weights, ref_logits=None, *, kl_coef=0.0, normalizer=None,
             reduction="mean"):
    """Supervised fine-tuning loss: completion-only cross-entropy (+ KL).

        L = sum_{b,t} w_{b,t} [-log p(y_{b,t}) + kl_coef KL(pi_{b,t} || pi_ref_{b,t})] / D,
        D = normalizer or sum_{b,t} w_{b,t}

    with w = 0 wherever the target is < 0. `weights` select the completion
    tokens (0 on prompt and padding). The KL term (see `token_kl`) keeps the
    model close to a frozen reference; it is only added when `ref_logits` is
    given, and gradients never flow into `ref_logits`.

    Args:
        logits: [B, T, V] policy logits.
        targets: [B, T] next tokens.
        weights: [B, T] 1 on completion tokens, else 0.
        ref_logits: optional [B, T, V] logits of the reference model.
        kl_coef: KL coefficient. Without `ref_logits` it must be 0: a known
            non-zero value (Python, numpy or concrete JAX scalar) raises
            InputError, and so does a traced one, which cannot be checked.
        normalizer: optional scalar denominator D (e.g. the global weight sum).
        reduction: "mean" (the scalar L) or "per_example" ([B], each row's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Ouyang et al., `Training language models to follow instructions with human
        feedback <https://arxiv.org/abs/2203.02155>`_, 2022
    """
    _check_reduction("sft_loss", reduction)
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _check_token_inputs("sft_loss", logits, targets, jnp.asarray(weights))
    weights = _valid_weights(weights, targets)
    per_token = -token_logprobs(logits, targets)
    if ref_logits is not None:
        _shape(ref_logits, logits.shape,
               message="sft_loss: ref_logits must be [B, T, V], the shape of logits")
        kl = token_kl(logits, jax.lax.stop_gradient(ref_logits))
        per_token = per_token + kl_coef * kl
    else:
        _check_no_kl("sft_loss", kl_coef, "ref_logits")
    return masked_mean(per_token, weights, normalizer, reduction=reduction)


# ---------------------------------------------------------------------------
# Pairwise preference losses (one value per (chosen, rejected) pair).
# ---------------------------------------------------------------------------


def reward_model_loss(chosen_rewards, rejected_rewards, *, margin=None, weights=None,
                      normalizer=None, reduction="mean"):
    """Bradley-Terry reward-model loss on preference pairs.

        L = -sum_i w_i log sigmoid(r+_i - r-_i - m_i) / D,
        D = normalizer or sum_i w_i (B without weights)

    `jax.nn.log_sigmoid` avoids the overflow of log(sigmoid(x)) for large |x|.
    TRL's RewardTrainer loss (with its optional "margin" column; its
    `center_rewards_coefficient` term is not included).

    Args:
        chosen_rewards: [B] rewards of the preferred responses.
        rejected_rewards: [B] rewards of the rejected responses.
        margin: optional scalar or [B] margin m the preferred reward must exceed
            the rejected one by (e.g. from preference strength, as in Llama 2).
        weights: optional [B] pair weights w, e.g. 0 for the empty slots of a
            packed batch; default all ones.
        normalizer: optional scalar denominator D.
        reduction: "mean" (the scalar L) or "per_example" ([B], each pair's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Ouyang et al., `Training language models to follow instructions with human
        feedback <https://arxiv.org/abs/2203.02155>`_, 2022;
        Touvron et al., `Llama 2: Open Foundation and Fine-Tuned Chat Models
        <https://arxiv.org/abs/2307.09288>`_, 2023 (margin)
    """
    _check_reduction("reward_model_loss", reduction)
    chosen, rejected = _float(chosen_rewards), _float(rejected_rewards)
    _check_same("reward_model_loss", 1, "[B]", chosen_rewards=chosen, rejected_rewards=rejected,
                weights=None if weights is None else jnp.asarray(weights))
    diff = chosen - rejected
    if margin is not None:
        margin = _float(margin)
        if margin.ndim:
            _shape(margin, diff.shape,
                   message="reward_model_loss: margin must be a scalar or [B]")
        diff = diff - margin.astype(diff.dtype)
    return masked_mean(-jax.nn.log_sigmoid(diff), weights, normalizer, reduction=reduction)


def _preference_logit(fn, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, weights):
    """h = (pc - pr) - (rc - rr): the policy's log-ratio gain over the reference.

    The reference model is frozen, so no gradient flows into its log-probs.
    """
    pc, pr, rc, rr = (_float(x) for x in (policy_chosen_logps, policy_rejected_logps,
                                          ref_chosen_logps, ref_rejected_logps))
    _check_same(fn, 1, "[B]", policy_chosen_logps=pc, policy_rejected_logps=pr,
                ref_chosen_logps=rc, ref_rejected_logps=rr,
                weights=None if weights is None else jnp.asarray(weights))
    return (pc - pr) - jax.lax.stop_gradient(rc - rr)


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    label_smoothing=0.0,
    weights=None,
    normalizer=None,
    reduction="mean",
):
    """Direct Preference Optimization (sigmoid) loss, with cDPO label smoothing.

        h_i = (log pi(y+_i) - log pi(y-_i)) - (log pi_ref(y+_i) - log pi_ref(y-_i))
        L = sum_i w_i [-(1 - ls) log sigmoid(beta h_i) - ls log sigmoid(-beta h_i)] / D,
        D = normalizer or sum_i w_i (B without weights)

    The log-probs are summed over each response's tokens (`sequence_logprobs`),
    as in the paper and TRL.

    `ls` (label_smoothing) is conservative DPO (cDPO, Mitchell 2023): the
    assumed probability that a preference label is flipped; ls = 0 is plain DPO.
    In TRL this is `DPOTrainer(loss_type="sigmoid", label_smoothing=ls)` up to
    TRL 0.28 only: from TRL 0.29 on, "sigmoid" ignores label_smoothing, and
    TRL's `loss_type="robust"` is a different loss (rDPO, Chowdhury et al. 2024:
    ((1 - ls) l(h) - ls l(-h)) / (1 - 2 ls), an unbiased estimate of the clean
    loss), which this function does not compute.

    Args:
        policy_chosen_logps: [B] sequence log-probs of y+ under the policy (see
            `sequence_logprobs`).
        policy_rejected_logps: [B] same for y-.
        ref_chosen_logps: [B] sequence log-probs of y+ under the frozen reference.
        ref_rejected_logps: [B] same for y-.
        beta: inverse temperature (> 0): strength of the implicit KL constraint.
        label_smoothing: cDPO label-noise rate in [0, 0.5). A value known at
            trace time (Python or numpy number) outside the range raises
            InputError; a traced value is not checked.
        weights: optional [B] pair weights w (0 for padding pairs).
        normalizer: optional scalar denominator D.
        reduction: "mean" (the scalar L) or "per_example" ([B], each pair's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Rafailov et al., `Direct Preference Optimization: Your Language Model is
        Secretly a Reward Model <https://arxiv.org/abs/2305.18290>`_, 2023;
        Mitchell, `A note on DPO with noisy preferences & relationship to IPO
        <https://ericmitchell.ai/cdpo.pdf>`_, 2023
    """
    _check_reduction("dpo_loss", reduction)
    _check_positive("dpo_loss", "beta", beta)
    _check_range("dpo_loss", "label_smoothing", label_smoothing, 0.0, 0.5)
    h = _preference_logit("dpo_loss", policy_chosen_logps, policy_rejected_logps,
                          ref_chosen_logps, ref_rejected_logps, weights)
    per_pair = (
        -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
        - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    )
    return masked_mean(per_pair, weights, normalizer, reduction=reduction)


def ipo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    weights=None,
    normalizer=None,
    reduction="mean",
):
    """Identity Preference Optimization loss, on length-normalized log-probs.

        h_i = (lp(y+_i) - lp(y-_i)) - (lp_ref(y+_i) - lp_ref(y-_i))
        L = sum_i w_i (h_i - 1 / (2 beta))^2 / D,   D = normalizer or sum_i w_i (B without weights)

    Regresses h to a finite target instead of pushing it to infinity, which
    keeps the policy regularized even for deterministic preferences.

    Convention: lp(y) is the *per-token mean* log-prob of response y (its summed
    log-prob divided by its own token count, `sequence_mean_logprobs`), not the
    sum that `dpo_loss` takes. Azar et al. define h with the probabilities of
    whole responses, pi(y|x), and regress it to 1/(2 tau) (their eq. 17; tau is
    beta here). Taken literally with summed log-probs, h grows with the
    responses' length while the target 1/(2 beta) does not, so the same beta
    regularizes long and short responses differently. The authors advised
    averaging over tokens, and TRL's `DPOTrainer(loss_type="ipo")` does so since
    v0.7.11 (PR #1265): the same h as here, in nats per token. The formula is
    applied to whatever is passed; summed log-probs give the paper's literal,
    length-dependent form.

    Args:
        policy_chosen_logps: [B] per-token mean log-probs of y+ under the policy.
        policy_rejected_logps: [B] same for y-.
        ref_chosen_logps: [B] per-token mean log-probs of y+ under the frozen
            reference.
        ref_rejected_logps: [B] same for y-.
        beta: regularization strength tau (> 0); the target of h is 1 / (2 beta).
        weights: optional [B] pair weights w (0 for padding pairs).
        normalizer: optional scalar denominator D.
        reduction: "mean" (the scalar L) or "per_example" ([B], each pair's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Azar et al., `A General Theoretical Paradigm to Understand Learning from
        Human Preferences <https://arxiv.org/abs/2310.12036>`_, 2023
    """
    _check_reduction("ipo_loss", reduction)
    _check_positive("ipo_loss", "beta", beta)
    h = _preference_logit("ipo_loss", policy_chosen_logps, policy_rejected_logps,
                          ref_chosen_logps, ref_rejected_logps, weights)
    return masked_mean((h - 1.0 / (2.0 * beta)) ** 2, weights, normalizer, reduction=reduction)


# ---------------------------------------------------------------------------
# PPO (RLHF): per-token policy and value losses, advantages, rewards.
# ---------------------------------------------------------------------------


def _check_rollout(fn, **arrays):
    _check_same(fn, 2, "[B, T]", **{k: jnp.asarray(v) for k, v in arrays.items()})


def ppo_policy_loss(
    logprobs, old_logprobs, advantages, weights, *, clip_eps=0.2, normalizer=None, reduction="mean"
):
    """PPO clipped-surrogate policy loss.

        r_{b,t} = exp(log pi(a_{b,t}) - log pi_old(a_{b,t}))
        L = -sum_{b,t} w_{b,t} min(r A, clip(r, 1 - eps, 1 + eps) A)_{b,t} / D,
        D = normalizer or sum_{b,t} w_{b,t}

    `old_logprobs` and `advantages` come from the rollout and are constants:
    no gradient flows into them.

    Args:
        logprobs: [B, T] log-probs of the taken tokens under the current policy.
        old_logprobs: [B, T] same under the rollout policy.
        advantages: [B, T] advantage estimates (e.g. from `gae`).
        weights: [B, T] token weights (0 at prompt and padding).
        clip_eps: clipping range eps of the probability ratio.
        normalizer: optional scalar denominator D (e.g. the global weight sum).
        reduction: "mean" (the scalar L) or "per_example" ([B], each row's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Schulman et al., `Proximal Policy Optimization Algorithms
        <https://arxiv.org/abs/1707.06347>`_, 2017
    """
    _check_reduction("ppo_policy_loss", reduction)
    _check_rollout("ppo_policy_loss", logprobs=logprobs, old_logprobs=old_logprobs,
                   advantages=advantages, weights=weights)
    per_token = _clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps, clip_eps)
    return masked_mean(per_token, weights, normalizer, reduction=reduction)


def _clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high):
    """Per token -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp - old),
    with the rollout's old log-probs and advantages constants (PPO's and GRPO's)."""
    old_logprobs = jax.lax.stop_gradient(_float(old_logprobs))
    advantages = jax.lax.stop_gradient(_float(advantages))
    ratio = jnp.exp(_float(logprobs) - old_logprobs)
    clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    # The pessimistic (smaller) objective removes any gain from moving the
    # ratio outside [1 - eps_low, 1 + eps_high] in the direction the advantage favors.
    return -jnp.minimum(ratio * advantages, clipped_ratio * advantages)


def _check_no_kl(fn: str, kl_coef, reference: str) -> None:
    """Without the reference's `reference` argument, kl_coef must be a known 0: a
    non-zero or traced value would be a KL term silently dropped."""
    value = _static_value(kl_coef)
    if value is None:
        raise InputError(f"{fn}: kl_coef is a traced value, so it cannot be checked to be 0 "
                         f"without {reference}; pass {reference}, or leave kl_coef at 0")
    if value != 0:
        raise InputError(f"{fn}: kl_coef={kl_coef} needs {reference} (without them the KL "
                         "term would be dropped)")


def ppo_clip_fraction(logprobs, old_logprobs, weights, *, clip_eps, normalizer=None):
    """Weighted fraction of tokens whose ratio lies outside [1 - eps, 1 + eps].

        sum_{b,t} w_{b,t} [|r_{b,t} - 1| > eps] / D,   D = normalizer or sum_{b,t} w_{b,t}

    For logging only (no gradient).

    Args:
        logprobs: [B, T] log-probs under the current policy.
        old_logprobs: [B, T] log-probs under the rollout policy.
        weights: [B, T] token weights.
        clip_eps: clipping range eps, as in `ppo_policy_loss`.
        normalizer: optional scalar denominator D (e.g. the global weight sum).

    Returns:
        A scalar in [0, 1] (with the default normalizer), float32 (float64 under
        x64 for float64 inputs).
    """
    _check_rollout("ppo_clip_fraction", logprobs=logprobs, old_logprobs=old_logprobs, weights=weights)
    ratio = jnp.exp(_float(logprobs) - _float(old_logprobs))
    clipped = jnp.abs(ratio - 1.0) > clip_eps
    return jax.lax.stop_gradient(masked_mean(clipped, weights, normalizer))


def ppo_value_loss(
    values, old_values, returns, weights, *, clip_eps=0.2, normalizer=None, reduction="mean"
):
    """PPO clipped value loss.

        v_clip = v_old + clip(v - v_old, -eps, eps)
        L = sum_{b,t} w_{b,t} 0.5 max((v - R)^2, (v_clip - R)^2)_{b,t} / D,
        D = normalizer or sum_{b,t} w_{b,t}

    `old_values` and `returns` come from the rollout and are constants.

    Args:
        values: [B, T] current value predictions.
        old_values: [B, T] value predictions at rollout time.
        returns: [B, T] value targets (e.g. from `gae`).
        weights: [B, T] token weights.
        clip_eps: clipping range of the value update.
        normalizer: optional scalar denominator D (e.g. the global weight sum).
        reduction: "mean" (the scalar L) or "per_example" ([B], each row's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Schulman et al., `Proximal Policy Optimization Algorithms
        <https://arxiv.org/abs/1707.06347>`_, 2017 (value clipping as in the
        OpenAI baselines implementation)
    """
    _check_reduction("ppo_value_loss", reduction)
    _check_rollout("ppo_value_loss", values=values, old_values=old_values, returns=returns,
                   weights=weights)
    values = _float(values)
    old_values = jax.lax.stop_gradient(_float(old_values))
    returns = jax.lax.stop_gradient(_float(returns))
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    per_token = 0.5 * jnp.maximum(
        (values - returns) ** 2, (clipped_values - returns) ** 2
    )
    return masked_mean(per_token, weights, normalizer, reduction=reduction)


def gae(rewards, values, weights, *, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation over right-padded episodes.

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1}
        R_t     = A_t + V_t

    with V_{t+1} = A_{t+1} = 0 after the last real step (the episode ends
    there), and A = R = 0 where w = 0. Computed by a reverse `jax.lax.scan`
    over time. A zero weight in the middle of a row would likewise end the
    episode at that step, so padding must be at the end of each row.

    Args:
        rewards: [B, T] per-step rewards (e.g. from `kl_penalized_rewards`).
        values: [B, T] value estimates V_t.
        weights: [B, T] > 0 at real steps, 0 at padding.
        gamma: discount factor.
        lam: GAE lambda (bias-variance trade-off).

    Returns:
        `(advantages [B, T], returns [B, T])`, both 0 at padding; float32
        (float64 under x64 for float64 inputs).

    References:
        Schulman et al., `High-Dimensional Continuous Control Using Generalized
        Advantage Estimation <https://arxiv.org/abs/1506.02438>`_, 2016
    """
    _check_rollout("gae", rewards=rewards, values=values, weights=weights)
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

        reward_{b,t} = -kl_coef (log pi(a_{b,t}) - log pi_ref(a_{b,t}))
                       + [t == last real step of row b] * score_b

    where w_{b,t} > 0, and 0 at padding. log pi - log pi_ref is the
    sampled-token estimate of KL(pi || pi_ref).

    Args:
        scores: [B] reward-model score of each whole response.
        logprobs: [B, T] log-probs of the sampled tokens under the policy.
        ref_logprobs: [B, T] same under the reference model.
        weights: [B, T] > 0 at real (response) tokens, 0 at padding.
        kl_coef: KL penalty coefficient.

    Returns:
        [B, T] rewards, float32 (float64 under x64 for float64 inputs). A row
        without real tokens gets all zeros.

    References:
        Ziegler et al., `Fine-Tuning Language Models from Human Preferences
        <https://arxiv.org/abs/1909.08593>`_, 2019
    """
    _check_rollout("kl_penalized_rewards", logprobs=logprobs, ref_logprobs=ref_logprobs,
                   weights=weights)
    _shape(scores, jnp.shape(logprobs)[:1],
           message="kl_penalized_rewards: scores must be [B] (logprobs.shape[:1])")
    real = jnp.asarray(weights) > 0
    log_ratio = _float(logprobs) - _float(ref_logprobs)
    rewards = jnp.where(real, -kl_coef * log_ratio, 0.0)
    positions = jnp.arange(real.shape[-1])
    # Index of each row's last real step; -1 (matches nothing) for empty rows.
    last = jnp.max(jnp.where(real, positions, -1), axis=-1)
    is_last = positions == last[..., None]
    return rewards + jnp.where(is_last, _float(scores)[..., None], 0.0).astype(rewards.dtype)


# ---------------------------------------------------------------------------
# Sequence classification (one label per sequence).
# ---------------------------------------------------------------------------


def classification_loss(logits, labels, weights=None, *, normalizer=None, reduction="mean"):
    """Cross-entropy of class logits against integer labels (BERT's fine-tuning loss,
    Devlin et al. 2019, arXiv:1810.04805).

        L = -sum_b w_b log softmax(logits_b)_{y_b} / D,   D = normalizer or sum_b w_b

    with w_b = 0 where the label is < 0. `logits` are a head's outputs
    `W h(x) + b` on a pooled or last-token representation h(x); the log-softmax
    runs in float32 (log-sum-exp, stable for large logits). The label is picked
    with `token_logprobs`, so a label >= C gives log-prob 0 rather than NaN or a
    wrapped class, and a row at weight 0 contributes nothing.

    Args:
        logits: [B, C] class scores (any float dtype).
        labels: [B] int class indices y_b in [0, C); < 0 means no label.
        weights: optional [B] weights, e.g. 0 for the empty slots of a packed
            batch; default all ones.
        normalizer: optional scalar denominator D, e.g. the global count of real
            sequences.
        reduction: "mean" (the scalar L) or "per_example" ([B], each row's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).
    """
    _check_reduction("classification_loss", reduction)
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _rank(logits, 2, message="classification_loss: logits must be [B, C]")
    _shape(labels, logits.shape[:1],
           message="classification_loss: labels must be [B] (logits.shape[:1])")
    if weights is None:
        weights = jnp.ones(labels.shape, jnp.float32)
    _shape(weights, labels.shape,
           message="classification_loss: weights must be [B], the shape of labels")
    weights = _valid_weights(weights, labels)
    return masked_mean(-token_logprobs(logits, labels), weights, normalizer, reduction=reduction)


# ---------------------------------------------------------------------------
# RL from verifiable rewards: group-relative advantages, GRPO and its variants
# (DAPO, Dr. GRPO), RLOO and REINFORCE. No value model: each prompt's G sampled
# responses are scored by a program and compared with one another.
# ---------------------------------------------------------------------------

ADVANTAGE_SCALES = ("std", "none")
AGGREGATIONS = ("token", "sequence", "fixed")


def group_advantages(rewards, group_size, *, scale="std", leave_one_out=False, eps=1e-4):
    """Group-relative advantages: each sampled response's reward against its group's.

        rows [i G, (i + 1) G) are the G = group_size responses to prompt i; for row b
        in group g:
        mean_g = sum_{j in g} r_j / G
        std_g  = sqrt(sum_{j in g} (r_j - mean_g)^2 / (G - 1))      (sample std, ddof=1)
        base_b = mean_g                                 (default)
               = (sum_{j in g} r_j - r_b) / (G - 1)     (leave_one_out: the other G - 1)
        A_b    = (r_b - base_b) / (std_g + eps)         (scale="std")
               = r_b - base_b                           (scale="none")

    With leave_one_out, r_b - base_b = G / (G - 1) (r_b - mean_g): the same
    direction as the plain mean baseline, scaled, but the baseline no longer
    depends on r_b, so the estimate of the policy gradient is unbiased.

    The settings of the literature: scale="std" is GRPO (Shao et al. 2024) and
    DAPO (Yu et al. 2025); scale="none" is Dr. GRPO (Liu et al. 2025), which
    drops the std because it weights too-easy and too-hard prompts (small std)
    up; scale="none", leave_one_out=True is RLOO (Ahmadian et al. 2024, after
    Kool et al. 2019). A group whose rewards are all equal (every response
    right, or every one wrong) gets A = 0 exactly, for any eps (never 0 / 0):
    it carries no learning signal.

    Args:
        rewards: [B] one scalar reward per sampled response, B a multiple of G.
        group_size: G, a Python int known at trace time; >= 2 for scale="std"
            or leave_one_out (a std or a mean of the others needs two samples).
        scale: "std" (divide by std_g + eps) or "none".
        leave_one_out: the baseline is the mean of the group's other G - 1
            rewards instead of the group's mean.
        eps: added to std_g (>= 0), so a group of nearly equal rewards does not
            blow up.

    Returns:
        [B] advantages, float32 (float64 under x64 for float64 inputs).

    References:
        Shao et al., `DeepSeekMath: Pushing the Limits of Mathematical Reasoning
        in Open Language Models <https://arxiv.org/abs/2402.03300>`_, 2024 (GRPO);
        Liu et al., `Understanding R1-Zero-Like Training: A Critical Perspective
        <https://arxiv.org/abs/2503.20783>`_, 2025 (Dr. GRPO);
        Ahmadian et al., `Back to Basics: Revisiting REINFORCE Style Optimization
        for Learning from Human Feedback in LLMs
        <https://arxiv.org/abs/2402.14740>`_, 2024 (RLOO);
        Kool et al., `Buy 4 REINFORCE Samples, Get a Baseline for Free!
        <https://openreview.net/forum?id=r1lgTGL5DE>`_, 2019
    """
    fn = "group_advantages"
    if scale not in ADVANTAGE_SCALES:
        raise InputError(f"{fn}: scale={scale!r}; pass scale='std' (GRPO, DAPO) or 'none' "
                         "(Dr. GRPO, RLOO)")
    size = _static_value(group_size)
    if size is None or not 1 <= size < float("inf") or size != int(size):
        raise InputError(f"{fn}: group_size={group_size!r} must be a positive Python int known at "
                         "trace time (the number of responses sampled per prompt)")
    size = int(size)
    if size < 2 and (scale == "std" or leave_one_out):
        need = "scale='std'" if scale == "std" else "leave_one_out=True"
        raise InputError(f"{fn}: group_size=1 with {need}: a sample std or a mean of the other "
                         "responses needs group_size >= 2")
    _check_range(fn, "eps", eps, 0.0, float("inf"))
    rewards = _float(rewards)
    _rank(rewards, 1, message=f"{fn}: rewards must be [B], one reward per response")
    if rewards.shape[0] % size:
        raise InputError(f"{fn}: rewards must be [B] with B a multiple of group_size={size} (rows "
                         f"[i*G, (i+1)*G) are prompt i's responses); got shape {rewards.shape}")
    groups = rewards.reshape(-1, size)  # [B / G, G]
    total = jnp.sum(groups, axis=-1, keepdims=True)
    mean = total / size
    if leave_one_out:
        deviation = groups - (total - groups) / (size - 1)
    else:
        deviation = groups - mean
    # All equal -> exactly 0. The sum of G equal floats / G need not give the
    # float back, so `r - mean` alone could leave a rounding residue.
    constant = jnp.max(groups, axis=-1, keepdims=True) == jnp.min(groups, axis=-1, keepdims=True)
    if scale == "std":
        variance = jnp.sum((groups - mean) ** 2, axis=-1, keepdims=True) / (size - 1)
        # sqrt's derivative at 0 is infinite; keep 0 out of it so gradients stay finite.
        std = jnp.where(variance > 0, jnp.sqrt(jnp.where(variance > 0, variance, 1.0)), 0.0)
        deviation = deviation / jnp.where(constant, 1.0, std + eps)
    return jnp.where(constant, 0.0, deviation).reshape(rewards.shape)


def grpo_loss(
    logprobs,
    old_logprobs,
    advantages,
    weights,
    *,
    clip_eps=0.2,
    clip_eps_high=None,
    ref_logprobs=None,
    kl_coef=0.0,
    aggregation="token",
    max_len=None,
    normalizer=None,
    reduction="mean",
):
    """GRPO's clipped policy loss with one advantage per sequence, and its variants.

        r_{b,t} = exp(log pi(a_{b,t}) - log pi_old(a_{b,t}))
        k3_{b,t} = exp(q_{b,t}) - q_{b,t} - 1,   q = log pi_ref(a_{b,t}) - log pi(a_{b,t})
        l_{b,t} = -min(r A_b, clip(r, 1 - eps_low, 1 + eps_high) A_b)_{b,t} + kl_coef k3_{b,t}
        L = sum_{b,t} v_{b,t} l_{b,t} / D, by `aggregation`:
          "token"     v_{b,t} = w_{b,t},                   D = normalizer or sum_{b,t} w_{b,t}
          "sequence"  v_{b,t} = w_{b,t} / sum_t' w_{b,t'},  D = normalizer or B
          "fixed"     v_{b,t} = w_{b,t},                   D = normalizer or B max_len

    The aggregation is what tells the published variants apart (with
    `group_advantages` for A):

    * "sequence": GRPO (Shao et al. 2024, eq. 3): each response's mean over its
      own tokens, then the mean over responses. A token of a long response
      weighs less than one of a short response, so long wrong answers are
      penalized less per token.
    * "token": DAPO (Yu et al. 2025, eq. 8, "token-level policy gradient
      loss"): every token of the batch weighs the same. DAPO also raises the
      upper clip (eps_high = 0.28 > eps_low = 0.2, "clip-higher") so that
      unlikely tokens can gain probability, and drops the KL term.
    * "fixed": Dr. GRPO (Liu et al. 2025): a constant denominator, B times the
      generation budget max_len, so no response's length changes the weight of
      its tokens (no length bias).

    r's denominator pi_old and the advantages come from sampling: no gradient
    flows into `old_logprobs`, `advantages` or `ref_logprobs`. The optional
    penalty k3 is Schulman's (2020) "k3" estimator of KL(pi || pi_ref) from
    tokens sampled from pi: non-negative, unbiased, and low-variance; GRPO adds
    it to the loss rather than to the reward.

    The global normalizer: across micro-batches and data-parallel shards pass the
    whole batch's D, e.g. its weight sum ("token"), its number of rows
    ("sequence") or B max_len ("fixed"); the shards' losses and gradients then
    add up to the full batch's exactly. With "sequence", an all-padding row
    counts in the default D = B and contributes 0 (never 0 / 0).

    Args:
        logprobs: [B, T] log-probs of the sampled tokens under the current policy.
        old_logprobs: [B, T] same under the sampling policy (constants).
        advantages: [B] one advantage per response (e.g. `group_advantages`).
        weights: [B, T] token weights w: 1 on response tokens, 0 on the prompt
            and padding.
        clip_eps: eps_low in [0, 1]: the ratio is clipped below at 1 - eps_low.
        clip_eps_high: eps_high >= 0, the ratio is clipped above at 1 + eps_high;
            None means eps_high = clip_eps (PPO's symmetric clip).
        ref_logprobs: optional [B, T] log-probs under a frozen reference, for the
            KL penalty.
        kl_coef: coefficient of k3. Without `ref_logprobs` it must be 0: a known
            non-zero value raises InputError, and so does a traced one.
        aggregation: "token" (DAPO), "sequence" (GRPO) or "fixed" (Dr. GRPO).
        max_len: the generation budget in tokens: "fixed"'s default D is
            B max_len, so it is required with "fixed" when no normalizer is
            given; unused otherwise.
        normalizer: optional scalar denominator D (the global one, see above).
        reduction: "mean" (the scalar L) or "per_example" ([B], each row's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Shao et al., `DeepSeekMath: Pushing the Limits of Mathematical Reasoning
        in Open Language Models <https://arxiv.org/abs/2402.03300>`_, 2024 (GRPO);
        Yu et al., `DAPO: An Open-Source LLM Reinforcement Learning System at
        Scale <https://arxiv.org/abs/2503.14476>`_, 2025;
        Liu et al., `Understanding R1-Zero-Like Training: A Critical Perspective
        <https://arxiv.org/abs/2503.20783>`_, 2025 (Dr. GRPO);
        Schulman, `Approximating KL Divergence
        <http://joschu.net/blog/kl-approx.html>`_, 2020 (k3)
    """
    fn = "grpo_loss"
    _check_reduction(fn, reduction)
    if aggregation not in AGGREGATIONS:
        raise InputError(f"{fn}: aggregation={aggregation!r}; pass 'token' (DAPO), 'sequence' "
                         "(GRPO) or 'fixed' (Dr. GRPO)")
    _check_range(fn, "clip_eps", clip_eps, 0.0, 1.0, high_open=False)
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    _check_range(fn, "clip_eps_high", clip_eps_high, 0.0, float("inf"))
    rollout = dict(logprobs=logprobs, old_logprobs=old_logprobs, weights=weights)
    if ref_logprobs is not None:
        rollout["ref_logprobs"] = ref_logprobs
    _check_rollout(fn, **rollout)
    _shape(advantages, jnp.shape(logprobs)[:1],
           message=f"{fn}: advantages must be [B] (logprobs.shape[:1]), one per response")
    if aggregation == "fixed" and normalizer is None:
        if max_len is None:
            raise InputError(f"{fn}: aggregation='fixed' divides by B * max_len (Dr. GRPO); pass "
                             "max_len (the generation budget in tokens) or a normalizer")
        _check_positive(fn, "max_len", max_len)
    per_token = _clipped_surrogate(logprobs, old_logprobs, jnp.asarray(advantages)[:, None], clip_eps,
                                   clip_eps_high)
    if ref_logprobs is not None:
        log_ratio = jax.lax.stop_gradient(_float(ref_logprobs)) - _float(logprobs)
        per_token = per_token + kl_coef * (jnp.exp(log_ratio) - log_ratio - 1.0)
    else:
        _check_no_kl(fn, kl_coef, "ref_logprobs")
    weights = _float(weights)
    rows = weights.shape[0]
    if aggregation == "sequence":
        lengths = jnp.sum(weights, axis=-1, keepdims=True)
        # An all-padding row keeps weights 0 (a where, so no 0 / 0 in the gradient).
        weights = weights / jnp.where(lengths > 0, lengths, 1.0)
        normalizer = rows if normalizer is None else normalizer
    elif aggregation == "fixed" and normalizer is None:
        normalizer = rows * max_len
    return masked_mean(per_token, weights, normalizer, reduction=reduction)


def reinforce_loss(logprobs, advantages, weights, *, normalizer=None, reduction="mean"):
    """REINFORCE: the score-function policy gradient with one advantage per sequence.

        L = -sum_{b,t} w_{b,t} A_b log pi(a_{b,t}) / D,   D = normalizer or B

    so grad L = -sum_b A_b grad log pi(y_b) / D, with log pi(y_b) the response's
    summed log-prob: Williams' (1992) estimator. A is the reward minus a
    baseline, e.g. `group_advantages(..., scale="none", leave_one_out=True)`
    (RLOO, the loss of Ahmadian et al. 2024 without a ratio). The default D is
    the number of rows B (a mean over responses, padding rows included), not the
    weight sum as in the token losses; pass the whole batch's B as the global
    normalizer across micro-batches and shards. No gradient flows into
    `advantages`.

    Args:
        logprobs: [B, T] log-probs of the sampled tokens under the current policy.
        advantages: [B] one advantage per response.
        weights: [B, T] token weights (1 on response tokens, 0 on prompt and
            padding).
        normalizer: optional scalar denominator D (e.g. the global number of rows).
        reduction: "mean" (the scalar L) or "per_example" ([B], each row's share
            of L; they sum to L).

    Returns:
        A scalar ([B] for reduction="per_example"), float32 (float64 under x64
        for float64 inputs).

    References:
        Williams, `Simple Statistical Gradient-Following Algorithms for
        Connectionist Reinforcement Learning
        <https://doi.org/10.1007/BF00992696>`_, 1992;
        Ahmadian et al., `Back to Basics: Revisiting REINFORCE Style Optimization
        for Learning from Human Feedback in LLMs
        <https://arxiv.org/abs/2402.14740>`_, 2024
    """
    fn = "reinforce_loss"
    _check_reduction(fn, reduction)
    _check_rollout(fn, logprobs=logprobs, weights=weights)
    _shape(advantages, jnp.shape(logprobs)[:1],
           message=f"{fn}: advantages must be [B] (logprobs.shape[:1]), one per response")
    advantages = jax.lax.stop_gradient(_float(advantages))[:, None]
    per_token = -advantages * _float(logprobs)
    normalizer = jnp.shape(logprobs)[0] if normalizer is None else normalizer
    return masked_mean(per_token, weights, normalizer, reduction=reduction)


# The losses by name. Every entry is called the same way:
#
#     LOSSES[name](*arrays, **options) -> scalar    ([B] with reduction="per_example")
#
# `arrays` positional, in this order; `options` keyword-only, and every entry
# takes normalizer=None and reduction="mean":
#
#     clm, mlm        logits [B,T,V], targets [B,T], weights [B,T]
#     sft             logits, targets, weights, ref_logits=None [B,T,V];  kl_coef=0
#     classification  logits [B,C], labels [B], weights=None [B]
#     reward_model    chosen_rewards [B], rejected_rewards [B];  margin=None, weights=None
#     dpo             policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
#                     ref_rejected_logps [B] (summed);  beta=0.1, label_smoothing=0, weights=None
#     ipo             the same four [B] (per-token means);  beta=0.1, weights=None
#     ppo_policy      logprobs, old_logprobs, advantages, weights [B,T];  clip_eps=0.2
#     ppo_value       values, old_values, returns, weights [B,T];  clip_eps=0.2
#     grpo            logprobs, old_logprobs, advantages [B], weights [B,T];  clip_eps=0.2,
#                     clip_eps_high=None, ref_logprobs=None [B,T], kl_coef=0,
#                     aggregation="token", max_len=None
#     reinforce       logprobs [B,T], advantages [B], weights [B,T]
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
    "grpo": grpo_loss,
    "reinforce": reinforce_loss,
}
