"""RLHF with PPO: sample responses, score them, take clipped policy/value steps.

One PPO iteration (`make_ppo_step`) on a batch of left-padded prompts:

    rollout  sample N tokens per prompt with the KV-cache sampler (policy)
             -> sequence [B, P + N] = prompt (left-padded) + response (right-padded)
    score    one forward each of the policy, the frozen reference (SFT) model,
             the value model and the frozen reward model:
               old_logprobs, ref_logprobs, old_values  [B, N]   per action token
               scores                                  [B]      per sequence
             rewards    = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, beta)
             advantages, returns = gae(rewards, old_values)
    update   `epochs` passes over `minibatches` shuffled minibatches:
               loss = ppo_policy_loss + vf_coef * ppo_value_loss (both clipped)

Time steps and alignment. Response token t (the action a_t) sits at sequence
index P + t; it is predicted from the hidden state at index P + t - 1, so that
hidden is the state s_t: log pi(a_t | s_t) and V(s_t) both read index P - 1 + t
(`response_states`). Tokens after the first eos are padding (weight 0); the
eos itself is an action and gets the last reward slot. The reward model reads
the sequence as it did in training (`[bos,<prompt>] prompt [<response>] response`,
eos not an input) and its score is its head value at the last real non-eos
token (the last prompt token for an empty response).

Sampling temperature T: the policy being optimized is the tempered one,
softmax(logits / T); old, new and reference log-probs all use logits / T, so
the importance ratio and the KL are those of the distribution actually sampled.
(`top_k` truncation is not reflected in the log-probs; keep top_k = 0 for
unbiased PPO.) Dropout is off in every forward pass: the ratio must be exactly 1
before the first update.

State. `PPOState` is `train.TrainState` plus `kl_coef` (the adaptive beta), so a
checkpoint holds beta and a resumed run continues exactly. `step` counts PPO
iterations; the optimizer takes `epochs * minibatches` updates per iteration
(build the lr schedule with `optimizer_steps(train_steps, ppo_cfg)`). All
randomness comes from `fold_in(state.rng, state.step)`.

Params: `{"policy": lm params, "value": {"model": lm params, "head": scalar head}}`
train under one optimizer; the reference (lm params) and reward model
(`{"model", "head"}`) are frozen and passed to the jitted functions as
arguments, never baked in as constants.

Loss-spike guard: PPO losses are not positive and fall towards 0 as the value
model fits, so `train.spike_factor`'s median rule misfires; run PPO with
`spike_factor=0` (non-finite losses still roll back).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax import generate, losses, model, sharding, train
from llm_jax.config import ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data import builtin, formats
from llm_jax.data.tokenizer import EOS_ID, PAD_ID
from llm_jax.errors import ConfigError, DataError, InputError
from llm_jax.stages import reward, runner

Params = Any
ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """One PPO iteration: rollout of `rollout_batch` prompts, then updates."""

    rollout_batch: int = 32  # prompts per iteration (global)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0: full distribution (see the module docstring)
    epochs: int = 4  # PPO passes over each rollout
    minibatches: int = 4  # optimizer updates per pass
    update_microbatches: int = 1  # gradient accumulation inside one minibatch
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # initial beta of the KL penalty to the reference
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller
    kl_target: float = 6.0  # nats per sequence
    kl_horizon: int = 10_000  # in sequences
    whiten_advantages: bool = True
    # Subtracted from the score of a response that ran out of tokens without an eos (as
    # TRL's missing_eos_penalty): a reward model scores a cut-off response as if it ended
    # there, so without a penalty rambling to the budget costs nothing.
    missing_eos_penalty: float = 0.0

    def validate(self) -> "PPOConfig":
        positive = ("rollout_batch", "max_new_tokens", "temperature", "epochs", "minibatches",
                    "update_microbatches", "clip_eps", "value_clip_eps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"ppo.{name}={getattr(self, name)} must be positive")
        for name in ("top_k", "vf_coef", "kl_coef", "missing_eos_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ppo.{name}={getattr(self, name)} must be >= 0")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"ppo.{name}={getattr(self, name)} must be in [0, 1]")
        check_split("ppo", f"ppo.rollout_batch={self.rollout_batch}", self.rollout_batch, self.minibatches,
                    self.update_microbatches)
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon <= 0):
            raise ConfigError(f"ppo.adaptive_kl needs ppo.kl_target > 0 and ppo.kl_horizon > 0, got "
                              f"{self.kl_target} and {self.kl_horizon}")
        return self


def check_split(where: str, rows_field: str, rows: int, minibatches: int, microbatches: int) -> None:
    """A batch of `rows` rollouts must split into `minibatches` updates, and each update's
    rows into `microbatches` (shared by PPO and GRPO, whose updates are alike)."""
    if rows % minibatches:
        raise ConfigError(f"{rows_field} is not divisible by {where}.minibatches={minibatches}")
    if (rows // minibatches) % microbatches:
        raise ConfigError(f"a minibatch of {rows // minibatches} sequences is not divisible by "
                          f"{where}.update_microbatches={microbatches}")


def optimizer_steps(train_steps: int, cfg: PPOConfig) -> int:
    """Optimizer updates in a run of `train_steps` PPO iterations (for the lr schedule)."""
    return train_steps * cfg.epochs * cfg.minibatches


# ---------------------------------------------------------------------------
# State


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["step", "params", "opt_state", "rng", "kl_coef"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PPOState:
    step: jax.Array  # int32 scalar: PPO iterations done
    params: Params  # {"policy": lm params, "value": {"model": lm params, "head": ...}}
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32[2] key; iteration i uses fold_in(rng, i)
    kl_coef: jax.Array  # float32 scalar: the current beta (adapted between iterations)


def create_ppo_state(params: Params, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                     seed: int, kl_coef: float) -> tuple[PPOState, Any]:
    """(state, state_shardings) for `params = {"policy": ..., "value": ...}`, e.g. SFT weights
    and a reward-model copy. The params are an argument of the jitted init (not
    constants) and are placed by the partitioning table along with Adam's moments."""
    if set(params) != {"policy", "value"} or set(params["value"]) != {"model", "head"}:
        raise InputError("PPO params must be {'policy': lm params, 'value': {'model': lm params, "
                         f"'head': scalar head}}; got keys {sorted(params)}")

    def init(params, rng):
        return PPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                        rng=rng, kl_coef=jnp.asarray(kl_coef, jnp.float32))

    rng = jax.random.split(jax.random.PRNGKey(seed))[1]  # as train.create_train_state
    shardings = sharding.tree_shardings(jax.eval_shape(init, params, rng), mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(params, rng)
    return state, shardings


def adaptive_kl_coef(kl_coef, kl, *, target: float, horizon: int, n: int):
    """Ziegler et al. 2019 proportional controller for beta.

        e = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n / horizon)

    kl: the mean per-sequence KL(pi || pi_ref) of the last rollout; n: its
    number of sequences."""
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * n / horizon)


# ---------------------------------------------------------------------------
# Rollout


def build_rollout(prompt_tokens, prompt_mask, response, *, eos_id: int = EOS_ID,
                  pad_id: int = PAD_ID) -> dict:
    """Prompts + sampled responses -> the sequences every model reads.

    Args:
        prompt_tokens: [B, P] left-padded prompts.
        prompt_mask: [B, P] 1 on real prompt tokens.
        response: [B, N] sampled tokens (anything after the first eos is ignored).

    Returns a dict of
        tokens [B, P + N]: prompt then response, pad_id after the first eos;
        positions [B, P + N]: counted from each row's first real token;
        segment_ids [B, P + N] int32: 1 on real tokens, 0 on padding;
        response [B, N]: the response with pad_id after the first eos;
        weights [B, N] float32: 1 up to and including the first eos (the actions).
    """
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    is_eos = jnp.asarray(response) == eos_id
    eos_before = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0  # an eos strictly earlier
    weights = (~eos_before).astype(jnp.float32)
    response = jnp.where(eos_before, pad_id, response).astype(jnp.int32)
    prompt_len = jnp.sum(prompt_mask, axis=1, keepdims=True)  # [B, 1]
    prompt_pos = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    # Response positions continue the prompt's (as in the sampler), padding included.
    response_pos = prompt_len + jnp.arange(response.shape[1])
    return {
        "tokens": jnp.concatenate([jnp.asarray(prompt_tokens, jnp.int32), response], axis=1),
        "positions": jnp.concatenate([prompt_pos, response_pos], axis=1).astype(jnp.int32),
        "segment_ids": jnp.concatenate([prompt_mask, weights.astype(jnp.int32)], axis=1),
        "response": response,
        "weights": weights,
    }


@functools.partial(jax.jit, static_argnames=("model_cfg", "ppo_cfg", "eos_id", "pad_id"))
def rollout(model_cfg: ModelConfig, ppo_cfg: PPOConfig, policy_params, prompt_tokens, prompt_mask,
            rng, *, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> dict:
    """Samples `ppo_cfg.max_new_tokens` per prompt (KV cache) -> `build_rollout`'s dict."""
    response = generate._sample(model_cfg, policy_params, prompt_tokens, prompt_mask, rng,
                                max_new_tokens=ppo_cfg.max_new_tokens,
                                temperature=float(ppo_cfg.temperature), top_k=int(ppo_cfg.top_k),
                                top_p=1.0, eos_id=eos_id)
    return build_rollout(prompt_tokens, prompt_mask, response, eos_id=eos_id, pad_id=pad_id)


# ---------------------------------------------------------------------------
# Scoring


def response_states(cfg: ModelConfig, params, batch: dict, num_actions: int) -> jax.Array:
    """Hidden states s_t before each action token: [B, N, D] (index P - 1 + t)."""
    hidden = model.forward(cfg, params, batch["tokens"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])  # [B, P + N, D]
    width = hidden.shape[1]
    return hidden[:, width - num_actions - 1: width - 1]


def action_logits(cfg: ModelConfig, params, batch: dict, temperature: float) -> jax.Array:
    """Tempered logits of the policy at each action: [B, N, V] float32."""
    states = response_states(cfg, params, batch, batch["response"].shape[1])
    return model.lm_logits(cfg, params, states) / temperature


def state_values(cfg: ModelConfig, value_params, batch: dict) -> jax.Array:
    """V(s_t) of the value model ({"model", "head"}) at each action: [B, N] float32."""
    states = response_states(cfg, value_params["model"], batch, batch["response"].shape[1])
    return model.scalar_head(value_params["head"], states)


def score_index(batch: dict, eos_id: int = EOS_ID) -> jax.Array:
    """[B] index of the last real non-eos token of prompt + response."""
    width, n = batch["tokens"].shape[1], batch["response"].shape[1]
    kept = jnp.sum(batch["weights"] * (batch["response"] != eos_id), axis=1).astype(jnp.int32)
    return width - n - 1 + kept


def reward_model_scores(reward_cfg: ModelConfig, reward_params, batch: dict, *,
                        eos_id: int = EOS_ID) -> jax.Array:
    """The reward model's head value at the last real non-eos token: [B] float32.
    A likelihood reward model (`reward.is_likelihood_model`) adds lm_scale x the
    mean log-prob of the response's real tokens (its eos included when it has one)."""
    hidden = model.forward(reward_cfg, reward_params["model"], batch["tokens"],
                           positions=batch["positions"], segment_ids=batch["segment_ids"])
    index = score_index(batch, eos_id)
    last = jnp.take_along_axis(hidden, index[:, None, None], axis=1)  # [B, 1, D]
    out = model.scalar_head(reward_params["head"], last)[:, 0]
    if not reward.is_likelihood_model(reward_params):
        return out
    width, n = batch["tokens"].shape[1], batch["response"].shape[1]
    # The states that predict the response tokens, one segment per row.
    states = hidden[:, width - n - 1:width - 1]
    term = reward.likelihood_term(reward_cfg, reward_params, states, batch["response"], batch["weights"],
                                  jnp.ones(batch["weights"].shape, jnp.int32), 1)
    return out + term[:, 0]


def whiten(x, weights, eps: float = 1e-8):
    """(x - mean) / std over the weighted entries (0 elsewhere)."""
    mean = losses.masked_mean(x, weights)
    var = losses.masked_mean((x - mean) ** 2, weights)
    return jnp.where(weights > 0, (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


def score_rollout(model_cfg: ModelConfig, ppo_cfg: PPOConfig, policy_params, value_params, ref_params,
                  batch: dict, scores, kl_coef, *, value_cfg: ModelConfig | None = None,
                  eos_id: int = EOS_ID) -> tuple[dict, dict]:
    """Log-probs, values, rewards and advantages of a rollout (three forwards).

    Args:
        batch: `build_rollout`'s dict.
        scores: [B] sequence scores (reward model or a custom `score_fn`).
        kl_coef: beta for this rollout's KL penalty.

    Returns `(batch + {old_logprobs, ref_logprobs, old_values, rewards,
    advantages, returns, scores} (all [B, N] but scores [B]), metrics)`. The
    rewards carry `ppo_cfg.missing_eos_penalty` on responses without an eos;
    `scores` and the "score" metric are the scores as given."""
    value_cfg = value_cfg or model_cfg
    weights = batch["weights"]
    logits = action_logits(model_cfg, policy_params, batch, ppo_cfg.temperature)
    logprobs = losses.token_logprobs(logits, batch["response"])
    ref_logits = action_logits(model_cfg, ref_params, batch, ppo_cfg.temperature)
    ref_logprobs = losses.token_logprobs(ref_logits, batch["response"])
    values = state_values(value_cfg, value_params, batch)
    scores = jnp.asarray(scores, jnp.float32)
    ended = jnp.any((batch["response"] == eos_id) & (weights > 0), axis=1)  # [B]: stopped at an eos
    penalized = scores - jnp.where(ended, 0.0, ppo_cfg.missing_eos_penalty)

    rewards = losses.kl_penalized_rewards(penalized, logprobs, ref_logprobs, weights, kl_coef=kl_coef)
    advantages, returns = losses.gae(rewards, values, weights, gamma=ppo_cfg.gamma, lam=ppo_cfg.lam)
    if ppo_cfg.whiten_advantages:
        advantages = whiten(advantages, weights)

    log_p = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)  # [B, N]
    kl = jnp.sum(weights * (logprobs - ref_logprobs), axis=1)  # [B] sampled-token estimate
    length = jnp.sum(weights * (batch["response"] != eos_id), axis=1)
    scored = dict(batch, old_logprobs=logprobs, ref_logprobs=ref_logprobs, old_values=values,
                  rewards=rewards, advantages=advantages, returns=returns, scores=scores)
    metrics = {"score": jnp.mean(scores), "kl": jnp.mean(kl), "entropy": losses.masked_mean(entropy, weights),
               "response_length": jnp.mean(length), "no_eos_fraction": 1.0 - jnp.mean(ended),
               "value_mean": losses.masked_mean(values, weights),
               "return_mean": losses.masked_mean(returns, weights)}
    return scored, metrics


# ---------------------------------------------------------------------------
# Update


def ppo_loss_fn(model_cfg: ModelConfig, ppo_cfg: PPOConfig, value_cfg: ModelConfig | None = None):
    """loss_fn(params, minibatch, rng, normalizer) for `train.make_train_step`.

    loss = ppo_policy_loss + vf_coef * ppo_value_loss, each a sum over the
    minibatch's response tokens divided by `normalizer` (their count)."""
    value_cfg = value_cfg or model_cfg

    def loss_fn(params, mb, rng, normalizer):
        del rng  # no dropout: the ratio must start at exactly 1
        w = mb["weights"]
        logprobs = losses.token_logprobs(
            action_logits(model_cfg, params["policy"], mb, ppo_cfg.temperature), mb["response"])
        values = state_values(value_cfg, params["value"], mb)
        policy_loss = losses.ppo_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], w,
                                             clip_eps=ppo_cfg.clip_eps, normalizer=normalizer)
        value_loss = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], w,
                                           clip_eps=ppo_cfg.value_clip_eps, normalizer=normalizer)
        # Logging sums over the same normalizer, so they add up over microbatches.
        ratio = jnp.exp(jax.lax.stop_gradient(logprobs) - mb["old_logprobs"])
        metrics = {"policy_loss": policy_loss, "value_loss": value_loss,
                   "clip_fraction": losses.ppo_clip_fraction(logprobs, mb["old_logprobs"], w,
                                                             clip_eps=ppo_cfg.clip_eps,
                                                             normalizer=normalizer),
                   "ratio": losses.masked_mean(ratio, w, normalizer)}
        return policy_loss + ppo_cfg.vf_coef * value_loss, metrics

    return loss_fn


def token_count(batch: dict) -> jax.Array:
    """The normalizer: response tokens (actions) in the minibatch."""
    return jnp.sum(batch["weights"].astype(jnp.float32))


def minibatch_indices(rng, rows: int, epochs: int, minibatches: int) -> jax.Array:
    """[epochs * minibatches, rows / minibatches] row indices: each epoch a fresh permutation."""
    perms = jax.vmap(lambda k: jax.random.permutation(k, rows))(jax.random.split(rng, epochs))
    return perms.reshape(epochs * minibatches, rows // minibatches)


UPDATE_KEYS = ("tokens", "positions", "segment_ids", "response", "weights", "old_logprobs",
               "old_values", "advantages", "returns")


def make_ppo_update(model_cfg: ModelConfig, ppo_cfg: PPOConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, value_cfg: ModelConfig | None = None):
    """The pure update `update(state, scored, rng, new_kl_coef) -> (state, metrics, per_update)`.

    Runs `epochs * minibatches` optimizer steps (one `train.make_train_step`
    step each) under `lax.scan`; `per_update` holds each step's metrics
    ([epochs * minibatches]), `metrics` their mean. The state comes back with
    step + 1 and kl_coef = new_kl_coef."""
    ppo_cfg.validate()
    inner = train.make_train_step(ppo_loss_fn(model_cfg, ppo_cfg, value_cfg), token_count, optimizer,
                                  schedule, ppo_cfg.update_microbatches)
    updates = ppo_cfg.epochs * ppo_cfg.minibatches

    def update(state: PPOState, scored: dict, rng, new_kl_coef):
        data = {k: scored[k] for k in UPDATE_KEYS}
        rows = data["tokens"].shape[0]
        index = minibatch_indices(rng, rows, ppo_cfg.epochs, ppo_cfg.minibatches)

        def body(ts, idx):
            mb = jax.tree.map(lambda x: sharding.constrain_activations(x[idx]), data)
            return inner(ts, mb)

        # The inner TrainState's step counts optimizer updates (what the schedule reads).
        ts = train.TrainState(step=state.step * updates, params=state.params,
                              opt_state=state.opt_state, rng=jax.random.fold_in(rng, 1))
        ts, per_update = jax.lax.scan(body, ts, index)
        metrics = jax.tree.map(jnp.mean, per_update)
        new_state = PPOState(step=state.step + 1, params=ts.params, opt_state=ts.opt_state,
                             rng=state.rng, kl_coef=jnp.asarray(new_kl_coef, jnp.float32))
        return new_state, metrics, per_update

    return update


# ---------------------------------------------------------------------------
# The stage step


def iteration_keys(state_rng, step) -> tuple[jax.Array, jax.Array]:
    """(sampling key, minibatch-shuffle key) of iteration `step`."""
    keys = jax.random.split(jax.random.fold_in(state_rng, step))
    return keys[0], keys[1]


def make_ppo_step(model_cfg: ModelConfig, ppo_cfg: PPOConfig, optimizer: optax.GradientTransformation, *,
                  reference_params: Params, reward_params: Params | None = None,
                  reward_cfg: ModelConfig | None = None, value_cfg: ModelConfig | None = None,
                  score_fn: ScoreFn | None = None, schedule: optax.Schedule | None = None,
                  mesh: jax.sharding.Mesh | None = None, state_shardings: Any = None,
                  eos_id: int = EOS_ID, pad_id: int = PAD_ID):
    """`step(state, prompt_batch) -> (state, metrics)`: rollout -> scoring -> update.

    A `step_fn` for `loop.run_stage`; `prompt_batch` is {"tokens": [B, P] int32
    left-padded, "mask": [B, P]} (e.g. `PromptLoader` after `sharding.shard_batch`).

    Args:
        model_cfg: config of the policy and the reference model.
        ppo_cfg: PPO settings (validated here).
        optimizer: over `state.params` (policy + value model).
        reference_params: frozen lm params (the SFT model) for the KL penalty.
        reward_params: frozen reward model {"model", "head"} (config `reward_cfg`,
            default `model_cfg`); exactly one of it and `score_fn` is given.
        value_cfg: config of the value model (default `model_cfg`).
        score_fn: custom reward `score_fn(tokens, mask) -> [B]` replacing the
            reward model (tests, program rewards): tokens is the [B, P + N]
            sequence (left-padded prompt, then the response with padding after
            the first eos), mask [B, P + N] float32 is 1 on the response's real
            tokens (eos included) and 0 on prompt and padding. It is called
            outside jit with global arrays, so a jnp function runs on the
            devices and a numpy one works on a single process.
        schedule: the lr schedule, for the "lr" metric.
        mesh, state_shardings: when given, the jitted functions run under the
            mesh and the state keeps its shardings (its buffers are donated).

    Metrics: loss, policy_loss, value_loss, clip_fraction, ratio, grad_norm, lr
    (means over the iteration's updates), score (mean), kl (mean per-sequence
    sum over response tokens of log pi - log pi_ref), beta (used for this
    rollout's rewards), entropy (mean per response token), response_length
    (mean real tokens, eos excluded), no_eos_fraction (responses cut off at
    max_new_tokens), value_mean, return_mean, and seconds
    spent in rollout_seconds, score_seconds, update_seconds.
    """
    ppo_cfg.validate()
    if (reward_params is None) == (score_fn is None):
        raise InputError("make_ppo_step: give exactly one of reward_params (a reward model) and score_fn")
    reward_cfg = reward_cfg or model_cfg
    if mesh is not None:
        sharding.check_batch_fits_mesh(ppo_cfg.rollout_batch, 1, mesh)
        sharding.check_batch_fits_mesh(ppo_cfg.rollout_batch // ppo_cfg.minibatches,
                                       ppo_cfg.update_microbatches, mesh)

    rows = rep = None
    if mesh is not None:
        rows = sharding.batch_sharding(mesh, 1)  # a prefix: leading dim split, the rest replicated
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @functools.partial(jax.jit, out_shardings=None if mesh is None else (rows, rep))
    def sample(policy_params, tokens, mask, state_rng, step):
        sample_key, shuffle_key = iteration_keys(state_rng, step)
        return rollout(model_cfg, ppo_cfg, policy_params, tokens, mask, sample_key,
                       eos_id=eos_id, pad_id=pad_id), shuffle_key

    @functools.partial(jax.jit, out_shardings=None if mesh is None else rows)
    def reward(reward_params, batch):
        return reward_model_scores(reward_cfg, reward_params, batch, eos_id=eos_id)

    @functools.partial(jax.jit, out_shardings=None if mesh is None else (rows, rep, rep))
    def score(params, ref_params, batch, scores, kl_coef):
        scored, metrics = score_rollout(model_cfg, ppo_cfg, params["policy"], params["value"], ref_params,
                                        batch, scores, kl_coef, value_cfg=value_cfg, eos_id=eos_id)
        new_kl_coef = kl_coef
        if ppo_cfg.adaptive_kl:
            new_kl_coef = adaptive_kl_coef(kl_coef, metrics["kl"], target=ppo_cfg.kl_target,
                                           horizon=ppo_cfg.kl_horizon, n=scores.shape[0])
        return scored, dict(metrics, beta=kl_coef), new_kl_coef

    update = jax.jit(make_ppo_update(model_cfg, ppo_cfg, optimizer, schedule, value_cfg),
                     out_shardings=None if mesh is None else (state_shardings, rep, rep),
                     donate_argnums=0)

    def run(fn, *args):
        if mesh is None:
            return jax.block_until_ready(fn(*args))
        with jax.set_mesh(mesh):  # activation constraints read the mesh at trace time
            return jax.block_until_ready(fn(*args))

    def step(state: PPOState, prompt_batch: dict) -> tuple[PPOState, dict]:
        tokens, mask = prompt_batch["tokens"], prompt_batch["mask"]
        if tokens.shape[0] != ppo_cfg.rollout_batch:
            raise ConfigError(f"prompt batch of {tokens.shape[0]} rows, but ppo.rollout_batch="
                              f"{ppo_cfg.rollout_batch}")
        longest = tokens.shape[1] + ppo_cfg.max_new_tokens
        if model_cfg.positions == "learned" and longest > model_cfg.max_len:
            raise ConfigError(f"prompt width {tokens.shape[1]} + ppo.max_new_tokens="
                              f"{ppo_cfg.max_new_tokens} exceeds model.max_len={model_cfg.max_len} (learned "
                              "positions end there): lower ppo.max_new_tokens or use shorter prompts")
        t0 = time.perf_counter()
        batch, shuffle_key = run(sample, state.params["policy"], tokens, mask, state.rng, state.step)
        t1 = time.perf_counter()
        if score_fn is None:
            scores = run(reward, reward_params, batch)
        else:
            mask_full = jnp.concatenate([jnp.zeros(tokens.shape, jnp.float32), batch["weights"]], axis=1)
            scores = jnp.asarray(score_fn(batch["tokens"], mask_full), jnp.float32)
        scored, score_metrics, new_kl_coef = run(score, state.params, reference_params, batch, scores,
                                                 state.kl_coef)
        t2 = time.perf_counter()
        state, metrics, _ = run(update, state, scored, shuffle_key, new_kl_coef)
        t3 = time.perf_counter()
        metrics = dict(metrics, **score_metrics, rollout_seconds=t1 - t0, score_seconds=t2 - t1,
                       update_seconds=t3 - t2)
        return state, metrics

    # The compiled parts, for tests and for callers that want one phase alone:
    # sample(policy_params, tokens, mask, state_rng, step) -> (rollout, shuffle_key);
    # reward(reward_params, rollout) -> scores; score(params, ref_params, rollout, scores,
    # kl_coef) -> (scored, metrics, new_kl_coef); update(state, scored, shuffle_key,
    # new_kl_coef) -> (state, metrics, per_update).
    step.sample, step.reward, step.score, step.update = sample, reward, score, update
    return step


# ---------------------------------------------------------------------------
# Prompts


class PromptLoader:
    """Endless shuffled epochs of prompts as left-padded token batches.

    Yields {"tokens": [rows, P] int32 left-padded with pad_id, "mask": [rows, P]
    int32} where P = `prompt_len` (default: the longest prompt) is fixed, so the
    jitted step compiles once. The global batch is the stream slice
    [position, position + batch_size) of the concatenated per-epoch
    permutations (epoch e shuffled by (seed, e)); process `shard_index` gets
    rows [shard_index * rows, (shard_index + 1) * rows) of it, rows =
    batch_size / shard_count. Prompts longer than `prompt_len` are skipped and
    counted in `stats["skipped"]`. `get_state()` is {"seed", "size",
    "position"}: a fresh loader given it yields exactly the batches that follow.
    """

    TOO_LONG = "prompt longer than prompt_len"

    def __init__(self, prompts: list[str], tok, batch_size: int, seed: int, *,
                 prompt_len: int | None = None, shard_index: int | None = None,
                 shard_count: int | None = None):
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
        if batch_size <= 0 or batch_size % shard_count:
            raise ConfigError(f"PromptLoader: batch_size={batch_size} must be a positive multiple of "
                              f"the shard count {shard_count}")
        if not 0 <= shard_index < shard_count:
            raise InputError(f"PromptLoader: shard_index={shard_index} not in [0, {shard_count})")
        if prompt_len is not None and prompt_len <= 0:
            raise ConfigError(f"PromptLoader: prompt_len={prompt_len} must be positive")
        encoded = [formats.prompt_tokens(tok, p) for p in prompts]
        if not encoded:
            raise DataError("PromptLoader: no prompts")
        width = prompt_len if prompt_len is not None else max(len(e) for e in encoded)
        self.prompts = [e for e in encoded if len(e) <= width]
        skipped = len(encoded) - len(self.prompts)
        if not self.prompts:
            raise DataError(f"PromptLoader: all {len(encoded)} prompts are longer than prompt_len={width}")
        self.prompt_len, self.batch_size, self.seed = width, batch_size, seed
        self.rows, self.shard_index = batch_size // shard_count, shard_index
        self.pad_id = tok.pad_id
        self.stats = {"skipped": {self.TOO_LONG: skipped} if skipped else {}, "truncated": 0}
        self.position = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts)))
        return self._perm[1]

    def _prompt_at(self, position: int) -> list[int]:
        n = len(self.prompts)
        return self.prompts[int(self._permutation(position // n)[position % n])]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.position + self.shard_index * self.rows
        chosen = [self._prompt_at(start + i) for i in range(self.rows)]
        self.position += self.batch_size
        tokens = np.full((self.rows, self.prompt_len), self.pad_id, np.int32)
        mask = np.zeros((self.rows, self.prompt_len), np.int32)
        for i, p in enumerate(chosen):
            tokens[i, self.prompt_len - len(p):] = p
            mask[i, self.prompt_len - len(p):] = 1
        return {"tokens": tokens, "mask": mask}

    def get_state(self) -> dict:
        return {"seed": self.seed, "size": len(self.prompts), "position": self.position}

    def set_state(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("size", len(self.prompts))):
            if state.get(key) != mine:
                raise DataError(f"PromptLoader state was saved with {key}={state.get(key)!r}, this loader "
                                f"has {key}={mine!r}: it would not continue the same stream")
        self.position = int(state["position"])

    def restore(self, states: list[dict]) -> None:
        """The global stream position is the same on every process: any process count resumes."""
        self.set_state(states[0])


def builtin_prompts(count: int, seed: int = 0, split: str = "train",
                    tasks: tuple[str, ...] | None = None) -> list[str]:
    """`count` instruction prompts from the built-in SFT task generator."""
    rng = random.Random(seed)
    return [builtin.sft_record(rng, split, tasks)["prompt"] for _ in range(count)]


# ---------------------------------------------------------------------------
# The stage


@dataclasses.dataclass(frozen=True)
class PPOStageConfig:
    """A PPO stage: the optimizer, the loop (train.steps = PPO iterations; batch_size and
    seq_len are unused: ppo.rollout_batch and the prompt/response lengths rule), PPO itself."""

    # lr 1e-4, clip_norm 1.0: see the pipeline's sweep in docs/main_job.md.
    optim: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    # No spike guard: PPO's loss is near zero and changes sign (non-finite still rolls back).
    train: TrainConfig = TrainConfig(steps=30, log_every=5, spike_factor=0.0)
    ppo: PPOConfig = PPOConfig()
    prompts: int = 4000  # training prompts


def stage(model_cfg: ModelConfig, cfg: PPOStageConfig, tok, mesh, *, policy: Callable, reward_model: Callable,
          prompts: Callable[[], list[str]], after: Callable | None = None, name: str = "ppo") -> runner.Stage:
    """PPO from the policy `policy()` gives (also the frozen reference), scored by the
    frozen reward model `reward_model()`, whose trunk and head start the value model."""
    cfg.ppo.validate()
    frozen: dict = {}  # the reference and the reward model, loaded when the stage trains

    def init() -> dict:
        frozen["reference"], frozen["reward"] = policy(), reward_model()
        value = {"model": frozen["reward"]["model"], "head": frozen["reward"]["head"]}  # not its lm_scale
        return {"policy": frozen["reference"], "value": value}

    def build(params, tx, schedule):
        state, shardings = create_ppo_state(params, tx, mesh, cfg.train.seed, cfg.ppo.kl_coef)
        step = make_ppo_step(model_cfg, cfg.ppo, tx, reference_params=frozen["reference"],
                             reward_params=frozen["reward"], schedule=schedule, mesh=mesh,
                             state_shardings=shardings, eos_id=tok.eos_id, pad_id=tok.pad_id)
        return state, shardings, step

    return runner.Stage(
        name, model_cfg, cfg, init=init,
        loader=lambda _: PromptLoader(prompts(), tok, cfg.ppo.rollout_batch, cfg.train.seed), build=build,
        optimizer_steps=optimizer_steps(cfg.train.steps, cfg.ppo),  # epochs x minibatches updates a step
        after=(lambda p: after(p["policy"])) if after else None)
