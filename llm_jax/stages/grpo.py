"""RL from verifiable rewards: GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE in one stage.

One step (`make_grpo_step`) on a batch of `prompts` prompts:

    sample   `group_size` (G) completions per prompt with the KV-cache sampler
             (temperature, top-p): rows [i*G, (i+1)*G) are prompt i's group
    verify   on the host: reward = verifier(prompt, completion, record) per row
             (`llm_jax.verifiers`); no reward model, no value model
    filter   optional dynamic sampling (DAPO): a group whose rewards are all equal
             has zero advantage and teaches nothing, so it is dropped and more
             prompts are sampled until the batch is full again (at most
             `max_refill_rounds` more rounds; then dropped groups fill the rest)
    update   advantages = `losses.group_advantages(rewards, G)`; `updates` passes
             over the batch in `minibatches` shuffled minibatches, each an
             optimizer step on the clipped objective `losses.grpo_loss` against
             the sampling policy's log-probs (or `losses.reinforce_loss`), with an
             optional k3 KL penalty to the frozen initial model

The variants differ only in how advantages are scaled, how the token losses are
averaged, and how the ratio is clipped (`ALGORITHMS`):

    grpo       std-scaled advantages, mean per sequence then over sequences
               (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, eq. 3)
    dr_grpo    no std scaling, sum over tokens / (rows x max_new_tokens): neither
               the length nor the group's spread biases the gradient (Liu et al.
               2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783)
    dapo       std-scaled, mean over every token of the batch, clip-higher
               (clip_eps_high 0.28) and dynamic sampling (Yu et al. 2025, "DAPO",
               arXiv:2503.14476)
    rloo       leave-one-out baseline, no ratio and no clipping (Ahmadian et al.
               2024, "Back to Basics", arXiv:2402.14740)
    reinforce  the group mean as baseline, no ratio and no clipping (Williams 1992)

Time steps and temperature are PPO's (`stages.ppo`): response token t sits at
sequence index P + t and is predicted from index P + t - 1; tokens after the
first eos are padding; the eos is an action. The policy trained is the tempered
one, softmax(logits / temperature), in the sampler and in every log-prob; top-p
truncation is not reflected in the log-probs (keep top_p = 1 for unbiased
updates). Dropout is off: the ratio is exactly 1 before the first update. With
one update per batch (updates = minibatches = 1, the default) the sampling
policy's log-probs are the update's own, stopped (no second forward).

State: `train.TrainState` whose `step` counts GRPO steps (the optimizer takes
updates x minibatches steps each; the lr schedule reads step x that). All
randomness comes from fold_in(state.rng, state.step), and every extra prompt
batch of dynamic sampling comes from the stage's prompt loader, whose position
is checkpointed: a resumed run continues bitwise.

LoRA (`stage(..., lora=LoRAConfig(rank=...))`, see `llm_jax.lora`): the
runner hands the step fresh adapters and the initial params, frozen
(`runner.Stage.build_lora`); state.params are then the adapters, so the
optimizer state and the checkpoints hold only them. Sampling and every
log-prob use base + adapters unmerged (`lora.attach`), the update trains the
adapters alone (`lora.lora_loss_fn`), and the KL reference is the frozen base
itself: one copy of the weights, argument of the jitted functions, never a
constant. `after` gets the merged model; a later stage or an export reads it
with `lora.load_merged(checkpoints, base, ...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from llm_jax import evals, generate, lora, losses, sharding, train, verifiers
from llm_jax.config import ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data import formats
from llm_jax.errors import ConfigError
from llm_jax.lora import LoRAConfig
from llm_jax.stages import ppo, runner

Params = Any


# ---------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What tells the variants apart (see the module docstring)."""

    scale: str  # group_advantages: "std" (divide by the group's std) or "none"
    leave_one_out: bool  # group_advantages: baseline = mean of the other G - 1 (RLOO)
    aggregation: str  # grpo_loss: "sequence" | "token" | "fixed"; "" for the unclipped ones
    clipped: bool  # grpo_loss (ratio, clipping, KL) or reinforce_loss
    clip_eps_high: float | None  # None: = clip_eps
    dynamic_sampling: bool


ALGORITHMS = {
    "grpo": Algorithm("std", False, "sequence", True, None, False),
    "dr_grpo": Algorithm("none", False, "fixed", True, None, False),
    "dapo": Algorithm("std", False, "token", True, 0.28, True),
    "rloo": Algorithm("none", True, "", False, None, False),
    "reinforce": Algorithm("none", False, "", False, None, False),
}
SCALES = ("std", "none")
AGGREGATIONS = ("sequence", "token", "fixed")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """A GRPO-family stage: the optimizer, the loop (train.steps = GRPO steps;
    train.batch_size and seq_len are unused: `prompts` x `group_size` and the prompt
    and response lengths rule) and the algorithm. Empty/None fields take the
    algorithm's value (`ALGORITHMS`)."""

    optim: OptimizerConfig = OptimizerConfig(lr=1e-5, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    # No median spike rule: the loss is near zero and changes sign (non-finite still rolls back).
    train: TrainConfig = TrainConfig(steps=100, log_every=5, spike_factor=0.0)
    algorithm: str = "grpo"  # grpo | dr_grpo | dapo | rloo | reinforce
    group_size: int = 8  # G completions per prompt
    prompts: int = 8  # prompts per step (global); rows = prompts x group_size
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    prompt_len: int = 0  # prompts are left-padded to this many tokens, longer ones skipped; 0: the longest
    updates: int = 1  # passes over each batch of groups (mu of GRPO)
    minibatches: int = 1  # optimizer steps per pass
    update_microbatches: int = 1  # gradient accumulation inside one minibatch
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: the algorithm's (DAPO 0.28), else clip_eps
    kl_coef: float = 0.0  # k3 KL to the frozen initial model; 0: no reference (as DAPO)
    aggregation: str = ""  # "": the algorithm's; else sequence | token | fixed
    scale: str = ""  # advantage scale; "": the algorithm's; else std | none
    dynamic_sampling: bool | None = None  # None: the algorithm's (DAPO: on)
    max_refill_rounds: int = 3  # dynamic sampling: extra sampling rounds per step at most

    def resolved(self) -> Algorithm:
        """The algorithm's settings with this config's overrides."""
        a = ALGORITHMS[self.algorithm]
        return dataclasses.replace(
            a, scale=self.scale or a.scale, aggregation=(self.aggregation or a.aggregation) if a.clipped else "",
            clip_eps_high=self.clip_eps_high if self.clip_eps_high is not None else
            (a.clip_eps_high if a.clip_eps_high is not None else self.clip_eps),
            dynamic_sampling=a.dynamic_sampling if self.dynamic_sampling is None else self.dynamic_sampling)

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.updates * self.minibatches

    def validate(self, where: str = "grpo") -> "GRPOConfig":
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"{where}.algorithm={self.algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
        for name in ("group_size", "prompts", "max_new_tokens", "temperature", "updates", "minibatches",
                     "update_microbatches", "clip_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be positive")
        for name in ("kl_coef", "max_refill_rounds", "prompt_len"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 0")
        if self.group_size < 2:
            raise ConfigError(f"{where}.group_size={self.group_size}: a group needs at least 2 completions "
                              "(the baseline is the group's other rewards)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}.top_p={self.top_p} must lie in (0, 1] (1 keeps every token)")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ConfigError(f"{where}.clip_eps_high={self.clip_eps_high} must be positive (or none)")
        if self.scale and self.scale not in SCALES:
            raise ConfigError(f"{where}.scale={self.scale!r}: expected one of {SCALES} (or empty)")
        if self.aggregation and self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"{where}.aggregation={self.aggregation!r}: expected one of {AGGREGATIONS} (or empty)")
        a = ALGORITHMS[self.algorithm]
        if not a.clipped:
            if self.updates * self.minibatches > 1:
                raise ConfigError(f"{where}.algorithm={self.algorithm} has no importance ratio, so it can only "
                                  f"take one update per batch: set {where}.updates=1 and {where}.minibatches=1 "
                                  "(or use grpo, dr_grpo or dapo for several clipped updates)")
            if self.kl_coef > 0:
                raise ConfigError(f"{where}.kl_coef={self.kl_coef}: the KL penalty belongs to the clipped "
                                  f"objectives (grpo, dr_grpo, dapo); {self.algorithm} has none")
            if self.aggregation:
                raise ConfigError(f"{where}.aggregation={self.aggregation!r}: {self.algorithm} sums each "
                                  "sequence's log-probs (losses.reinforce_loss); leave it empty")
        ppo.check_split(where, f"{where}: {self.rows} rows (prompts x group_size)", self.rows, self.minibatches,
                        self.update_microbatches)
        return self


def check(cfg: GRPOConfig, model_cfg: ModelConfig, mesh, where: str = "grpo") -> None:
    """The stage's config mistakes, before any stage of the run trains."""
    cfg.validate(where)
    cfg.train.validate(f"{where}.train")
    cfg.optim.validate(f"{where}.optim")
    if not model_cfg.causal:
        raise ConfigError(f"{where}: sampling needs a causal (decoder) model, but model.causal=False")
    if cfg.prompts % jax.process_count():
        raise ConfigError(f"{where}.prompts={cfg.prompts} must be a multiple of the {jax.process_count()} "
                          "processes (each samples its share)")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.prompts % shards:
        raise ConfigError(f"{where}.prompts={cfg.prompts}: a batch of prompts is split over data x fsdp = "
                          f"{shards} devices; make it a multiple of {shards}")
    if (cfg.rows // cfg.minibatches // cfg.update_microbatches) % shards:
        raise ConfigError(f"{where}: {cfg.rows} rows ({where}.prompts={cfg.prompts} x {where}.group_size="
                          f"{cfg.group_size}) in {cfg.minibatches} minibatches of {cfg.update_microbatches} "
                          f"microbatches do not split over data x fsdp = {shards} devices; make the rows of "
                          f"a microbatch a multiple of {shards}")


# ---------------------------------------------------------------------------
# The update


UPDATE_KEYS = ("tokens", "positions", "segment_ids", "response", "weights")


def grpo_loss_fn(model_cfg: ModelConfig, cfg: GRPOConfig):
    """loss_fn(params, minibatch, rng, normalizer) for `train.make_train_step`.

    The minibatch has `UPDATE_KEYS`, "advantages" [b], "metric_weights" [b, N]
    (weights / the minibatch's token count, so the token means below add up over
    microbatches), and "old_logprobs" / "ref_logprobs" [b, N] when there are
    several updates per batch / a KL penalty. Metrics (token means over the
    response): clip_fraction (tokens whose gradient the clip removes), kl (k3
    estimate of KL(pi || reference), else of KL(pi || sampling policy)),
    entropy, ratio."""
    a = cfg.resolved()

    def loss_fn(params, mb, rng, normalizer):
        del rng  # no dropout: the ratio must start at exactly 1
        w = mb["weights"]
        logits = ppo.action_logits(model_cfg, params, mb, cfg.temperature)
        logp = losses.token_logprobs(logits, mb["response"])
        now = jax.lax.stop_gradient(logp)
        old = mb["old_logprobs"] if "old_logprobs" in mb else now
        ref = mb.get("ref_logprobs")
        if a.clipped:
            loss = losses.grpo_loss(logp, old, mb["advantages"], w, clip_eps=cfg.clip_eps,
                                    clip_eps_high=a.clip_eps_high, ref_logprobs=ref, kl_coef=cfg.kl_coef,
                                    aggregation=a.aggregation, max_len=w.shape[1], normalizer=normalizer)
        else:
            loss = losses.reinforce_loss(logp, mb["advantages"], w, normalizer=normalizer)
        mw = mb["metric_weights"]
        ratio = jnp.exp(now - old)
        adv = mb["advantages"][:, None]
        clipped = (((ratio > 1.0 + a.clip_eps_high) & (adv > 0)) | ((ratio < 1.0 - cfg.clip_eps) & (adv < 0))
                   if a.clipped else jnp.zeros_like(ratio, bool))
        base = ref if ref is not None else old
        k3 = jnp.exp(base - now) - (base - now) - 1.0
        log_p = jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1)
        entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
        metrics = {"clip_fraction": jnp.sum(mw * clipped), "kl": jnp.sum(mw * k3),
                   "entropy": jnp.sum(mw * entropy), "ratio": jnp.sum(mw * ratio)}
        return loss, metrics

    return loss_fn


def normalizer_fn(cfg: GRPOConfig) -> Callable[[dict], jax.Array]:
    """The global normalizer of a minibatch, by aggregation: its response tokens
    (token), its rows (sequence; and REINFORCE/RLOO), rows x max_new_tokens (fixed)."""
    aggregation = cfg.resolved().aggregation

    def normalizer(batch: dict) -> jax.Array:
        w = batch["weights"].astype(jnp.float32)
        if aggregation == "token":
            return jnp.sum(w)
        if aggregation == "fixed":
            return jnp.asarray(w.shape[0] * w.shape[1], jnp.float32)
        return jnp.asarray(w.shape[0], jnp.float32)

    return normalizer


def advantages(cfg: GRPOConfig, rewards: jax.Array) -> jax.Array:
    """[rows] group-relative advantages of the algorithm."""
    a = cfg.resolved()
    return losses.group_advantages(rewards, cfg.group_size, scale=a.scale, leave_one_out=a.leave_one_out)


def make_grpo_update(model_cfg: ModelConfig, cfg: GRPOConfig, optimizer: optax.GradientTransformation,
                     schedule: optax.Schedule | None = None, lora_cfg: LoRAConfig = LoRAConfig()):
    """The pure update `update(state, batch, rewards, rng, base=None) -> (state, metrics, per_update)`.

    `batch` has `UPDATE_KEYS` (and old_logprobs / ref_logprobs when scored);
    `rewards` [rows]. Runs updates x minibatches optimizer steps under lax.scan;
    `per_update` holds each one's metrics, `metrics` their mean plus the
    advantages' mean absolute value. The state comes back with step + 1.
    With `lora_cfg.enabled`, state.params are the adapters and `base` the frozen
    model they are attached to (`lora.lora_loss_fn`)."""
    cfg.validate()
    loss_fn = grpo_loss_fn(model_cfg, cfg)
    if lora_cfg.enabled:
        loss_fn = lora.lora_loss_fn(loss_fn, lora_cfg)
    inner = train.make_train_step(loss_fn, normalizer_fn(cfg), optimizer, schedule, cfg.update_microbatches)
    per_step = cfg.optimizer_steps_per_step

    def update(state: train.TrainState, batch: dict, rewards, rng, base: Params | None = None):
        adv = advantages(cfg, rewards)
        data = {k: v for k, v in batch.items() if k in UPDATE_KEYS + ("old_logprobs", "ref_logprobs")}
        data["advantages"] = adv
        index = ppo.minibatch_indices(rng, adv.shape[0], cfg.updates, cfg.minibatches)

        def body(ts, idx):
            mb = jax.tree.map(lambda x: sharding.constrain_activations(x[idx]), data)
            mb["metric_weights"] = mb["weights"] / jnp.maximum(jnp.sum(mb["weights"]), 1.0)
            return inner(ts, mb, base)

        ts = train.TrainState(step=state.step * per_step, params=state.params, opt_state=state.opt_state,
                              rng=jax.random.fold_in(rng, 1))
        ts, per_update = jax.lax.scan(body, ts, index)
        metrics = dict(jax.tree.map(jnp.mean, per_update), advantage_abs=jnp.mean(jnp.abs(adv)))
        new = train.TrainState(step=state.step + 1, params=ts.params, opt_state=ts.opt_state, rng=state.rng)
        return new, metrics, per_update

    return update


# ---------------------------------------------------------------------------
# Sampling and verifying


def step_key(state_rng, step, purpose) -> jax.Array:
    """The key of one use in GRPO step `step`: purpose 0 shuffles the minibatches,
    r + 1 samples round r (dynamic sampling's refills are rounds 1, 2, ...)."""
    return jax.random.fold_in(jax.random.fold_in(state_rng, step), purpose)


def completions(tok, response: np.ndarray, weights: np.ndarray, eos_id: int) -> list[str]:
    """The text of each row's response: its real tokens before the eos."""
    return [tok.decode([int(t) for t, w in zip(row, ws) if w > 0 and t != eos_id])
            for row, ws in zip(response, weights)]


def _host(x) -> np.ndarray:
    """A global array as numpy on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _place(tree: dict, mesh) -> dict:
    """Global host rows -> arrays split over the mesh (this process's rows from it)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    n, p = jax.process_count(), jax.process_index()
    return sharding.shard_batch(jax.tree.map(lambda x: x[p * (len(x) // n):(p + 1) * (len(x) // n)], tree), mesh)


@dataclasses.dataclass
class Round:
    """One sampling round, on the host: the rollout's rows, their rewards and record indices."""

    rollout: dict  # build_rollout's arrays, numpy, [prompts * G, ...]
    rewards: np.ndarray  # [prompts * G] float32
    index: np.ndarray  # [prompts * G] record index of each row


def group_varies(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[groups] whether a group's rewards differ (a zero-variance group has zero advantage)."""
    g = rewards.reshape(-1, group_size)
    return g.max(axis=1) > g.min(axis=1)


def select_groups(rounds: Sequence[Round], prompts: int, group_size: int) -> tuple[list[tuple[int, int]], int]:
    """Dynamic sampling's choice: the first `prompts` groups (round, group) whose rewards
    vary, in order, then, if too few, the first zero-variance ones. -> (groups, filled)."""
    varied, flat = [], []
    for r, rnd in enumerate(rounds):
        v = group_varies(rnd.rewards, group_size)
        varied += [(r, g) for g in range(len(v)) if v[g]]
        flat += [(r, g) for g in range(len(v)) if not v[g]]
    chosen = varied[:prompts]
    filled = prompts - len(chosen)
    return chosen + flat[:filled], filled


def gather_groups(rounds: Sequence[Round], groups: Sequence[tuple[int, int]], group_size: int) -> Round:
    """The rows of `groups` (round, group), in order, as one round."""
    rows = [(r, g * group_size + j) for r, g in groups for j in range(group_size)]
    pick = lambda get: np.stack([get(rounds[r])[i] for r, i in rows])  # noqa: E731
    return Round({k: pick(lambda rnd, k=k: rnd.rollout[k]) for k in rounds[0].rollout},
                 pick(lambda rnd: rnd.rewards), pick(lambda rnd: rnd.index))


def rollout_metrics(rnd: Round, group_size: int, success: float, eos_id: int) -> dict:
    """Host-side numbers of one round (the policy's fresh samples)."""
    r, w, resp = rnd.rewards, rnd.rollout["weights"], rnd.rollout["response"]
    ended = np.any((resp == eos_id) & (w > 0), axis=1)
    return {"reward_mean": float(np.mean(r)), "reward_std": float(np.std(r)),
            "accuracy": float(np.mean(r >= success)),
            "zero_variance_groups": float(1.0 - np.mean(group_varies(r, group_size))),
            "response_length": float(np.mean(np.sum(w * (resp != eos_id), axis=1))),
            "no_eos_fraction": float(1.0 - np.mean(ended))}


# ---------------------------------------------------------------------------
# The step


def make_grpo_step(model_cfg: ModelConfig, cfg: GRPOConfig, optimizer: optax.GradientTransformation, tok, *,
                   records: Sequence[dict], verifier: verifiers.Verifier, verifier_name: str,
                   reference_params: Params | None = None, refill: Callable[[], dict] | None = None,
                   schedule: optax.Schedule | None = None, mesh=None, state_shardings: Any = None,
                   lora_cfg: LoRAConfig = LoRAConfig(), base: Params | None = None):
    """`step(state, prompt_batch) -> (state, metrics)`: sample -> verify -> update.

    A `step_fn` for `loop.run_stage`; `prompt_batch` is `GroupPromptLoader`'s
    {"tokens" [prompts, P], "mask" [prompts, P], "index" [prompts]} after
    `sharding.shard_batch`; "index" points into `records`, which the verifier
    reads. `reference_params` (needed when cfg.kl_coef > 0) is the frozen model of
    the KL penalty; `refill()` gives the next prompt batch for dynamic sampling.

    LoRA (`lora_cfg.enabled`): state.params are adapters over `base`, the frozen
    model; the policy that samples and is scored is base + adapters
    (`lora.attach`), and `base` is also the KL reference (reference_params stays
    None: no second copy).

    Metrics: reward_mean, reward_std, accuracy (share of rewards >= the
    verifier's success threshold), zero_variance_groups, response_length (eos
    excluded), no_eos_fraction - all over the step's first round of fresh samples;
    refill_rounds and filled_groups (zero-variance groups used to fill the batch)
    of dynamic sampling; the update's loss, clip_fraction, kl, entropy, ratio,
    grad_norm, lr, advantage_abs (means over its optimizer steps); and seconds
    in sample_seconds, verify_seconds, update_seconds. Jitted once: every call has
    the same shapes.
    """
    cfg.validate()
    algo = cfg.resolved()
    if lora_cfg.enabled:
        if base is None:
            raise ConfigError("grpo with lora.rank > 0 needs the frozen base model the adapters sit on (base)")
        if reference_params is not None:
            raise ConfigError("grpo with lora.rank > 0: the frozen base is the KL reference; pass "
                              "reference_params=None rather than a second copy of the weights")
        reference_params = base if cfg.kl_coef > 0 else None
    elif base is not None:
        raise ConfigError("grpo: base is the frozen model of LoRA adapters, but lora.rank=0")
    if cfg.kl_coef > 0 and reference_params is None:
        raise ConfigError("grpo.kl_coef > 0 needs a frozen reference model (reference_params)")
    if algo.dynamic_sampling and refill is None:
        raise ConfigError("grpo.dynamic_sampling needs the prompt loader to refill from (refill)")
    if mesh is not None:
        sharding.check_batch_fits_mesh(cfg.rows, 1, mesh)
    success = verifiers.success_threshold(verifier)
    eos_id, pad_id = tok.eos_id, tok.pad_id
    G = cfg.group_size
    rows = rep = None
    if mesh is not None:
        rows = sharding.batch_sharding(mesh, 1)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @functools.partial(jax.jit, out_shardings=rows)
    def sample(params, tokens, mask, state_rng, step, round_):
        tokens, mask = jnp.repeat(tokens, G, axis=0), jnp.repeat(mask, G, axis=0)
        response = generate._sample(model_cfg, params, tokens, mask, step_key(state_rng, step, round_ + 1),
                                    max_new_tokens=cfg.max_new_tokens, temperature=float(cfg.temperature),
                                    top_k=0, top_p=float(cfg.top_p), eos_id=eos_id)
        return ppo.build_rollout(tokens, mask, response, eos_id=eos_id, pad_id=pad_id)

    needs_old, needs_ref = cfg.optimizer_steps_per_step > 1, cfg.kl_coef > 0

    @functools.partial(jax.jit, out_shardings=rows)
    def score(params, ref_params, batch):
        out = {}
        if needs_old:
            logits = ppo.action_logits(model_cfg, params, batch, cfg.temperature)
            out["old_logprobs"] = losses.token_logprobs(logits, batch["response"])
        if needs_ref:
            logits = ppo.action_logits(model_cfg, ref_params, batch, cfg.temperature)
            out["ref_logprobs"] = losses.token_logprobs(logits, batch["response"])
        return out

    update = jax.jit(make_grpo_update(model_cfg, cfg, optimizer, schedule, lora_cfg),
                     out_shardings=None if mesh is None else (state_shardings, rep, rep), donate_argnums=0)

    def policy(params: Params) -> Params:
        """The model that samples and is scored: the params, or base + the adapters."""
        return lora.attach(base, params, lora_cfg) if lora_cfg.enabled else params

    def run(fn, *args):
        if mesh is None:
            return jax.block_until_ready(fn(*args))
        with jax.set_mesh(mesh):  # activation constraints read the mesh at trace time
            return jax.block_until_ready(fn(*args))

    def sample_round(state, prompt_batch, round_: int) -> tuple[Round, float, float]:
        t0 = time.perf_counter()
        rollout = run(sample, policy(state.params), prompt_batch["tokens"], prompt_batch["mask"], state.rng,
                      state.step, jnp.int32(round_))
        host = {k: _host(v) for k, v in rollout.items()}
        t1 = time.perf_counter()
        index = np.repeat(_host(prompt_batch["index"]), G)
        texts = completions(tok, host["response"], host["weights"], eos_id)
        rewards = verifiers.rewards(verifier, verifier_name, records, index, texts)
        return Round(host, rewards, index), t1 - t0, time.perf_counter() - t1

    def collect(state: train.TrainState, prompt_batch: dict) -> tuple[Round, dict]:
        """The step's batch of groups on the host (dynamic sampling's choice when on)
        and the rollout metrics."""
        if prompt_batch["tokens"].shape[0] != cfg.prompts:
            raise ConfigError(f"a prompt batch of {prompt_batch['tokens'].shape[0]} rows, but grpo.prompts="
                              f"{cfg.prompts}")
        first, sample_s, verify_s = sample_round(state, prompt_batch, 0)
        metrics = rollout_metrics(first, G, success, eos_id)
        if not algo.dynamic_sampling:
            return first, dict(metrics, sample_seconds=sample_s, verify_seconds=verify_s)
        rounds = [first]
        while (sum(int(np.sum(group_varies(r.rewards, G))) for r in rounds) < cfg.prompts
               and len(rounds) <= cfg.max_refill_rounds):
            more = refill()
            more = sharding.shard_batch(more, mesh) if mesh is not None else jax.tree.map(jnp.asarray, more)
            rnd, s, v = sample_round(state, more, len(rounds))
            rounds.append(rnd)
            sample_s, verify_s = sample_s + s, verify_s + v
        groups, filled = select_groups(rounds, cfg.prompts, G)
        chosen = gather_groups(rounds, groups, G)
        return chosen, dict(metrics, refill_rounds=float(len(rounds) - 1), filled_groups=float(filled),
                            batch_reward_mean=float(np.mean(chosen.rewards)),
                            sample_seconds=sample_s, verify_seconds=verify_s)

    def step(state: train.TrainState, prompt_batch: dict) -> tuple[train.TrainState, dict]:
        chosen, metrics = collect(state, prompt_batch)
        t0 = time.perf_counter()
        batch, rewards = _place(chosen.rollout, mesh), _place({"r": chosen.rewards}, mesh)["r"]
        if needs_old or needs_ref:
            batch = dict(batch, **run(score, policy(state.params), reference_params, batch))
        state, update_metrics, _ = run(update, state, batch, rewards, step_key(state.rng, state.step, 0), base)
        return state, dict(update_metrics, **metrics, update_seconds=time.perf_counter() - t0)

    # The parts, for tests and for callers that want one phase alone:
    # collect(state, prompt_batch) -> (Round of the batch of groups, rollout metrics);
    # sample(params, tokens, mask, state_rng, step, round) -> rollout [prompts * G rows];
    # score(params, ref_params, rollout) -> {old_logprobs?, ref_logprobs?};
    # update(state, batch, rewards, shuffle_key, base=None) -> (state, metrics, per_update);
    # policy(state.params) -> the params sample and score take (LoRA: base + adapters, attached).
    step.collect, step.sample, step.score, step.update = collect, sample, score, update
    step.policy = policy
    return step


# ---------------------------------------------------------------------------
# Prompts


class GroupPromptLoader(ppo.PromptLoader):
    """`ppo.PromptLoader` over records' prompts that also yields each prompt's
    record index ("index" [rows] int32), so the verifier reads the right record."""

    def __init__(self, records: Sequence[dict], tok, batch_size: int, seed: int, *, prompt_len: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None):
        prompts = [r["prompt"] for r in records]
        lengths = [len(formats.prompt_tokens(tok, p)) for p in prompts]
        super().__init__(prompts, tok, batch_size, seed, prompt_len=prompt_len or None,
                         shard_index=shard_index, shard_count=shard_count)
        # The records PromptLoader kept (not longer than its width), in its order.
        self.kept = np.asarray([i for i, n in enumerate(lengths) if n <= self.prompt_len], np.int32)

    def __next__(self) -> dict:
        start = self.position + self.shard_index * self.rows
        n = len(self.prompts)
        picked = [int(self._permutation((start + i) // n)[(start + i) % n]) for i in range(self.rows)]
        return dict(super().__next__(), index=self.kept[picked])


def check_prompts_fit(records: Sequence[dict], tok, cfg: GRPOConfig, model_cfg: ModelConfig, source: str) -> None:
    """A ConfigError when the longest prompt kept plus max_new_tokens exceeds model.max_len."""
    lengths = [len(formats.prompt_tokens(tok, r["prompt"])) for r in records]
    width = cfg.prompt_len or max(lengths)
    if model_cfg.positions == "learned" and width + cfg.max_new_tokens > model_cfg.max_len:
        longest = int(np.argmax(lengths))
        raise ConfigError(
            f"{source}: prompts of up to {width} tokens (record {longest} has {lengths[longest]}) + "
            f"grpo.max_new_tokens={cfg.max_new_tokens} exceed model.max_len={model_cfg.max_len}; lower "
            "grpo.max_new_tokens, or set grpo.prompt_len to skip longer prompts")


# ---------------------------------------------------------------------------
# Held-out evaluation


def heldout_reward(model_cfg: ModelConfig, params, tok, records: Sequence[dict], verifier: verifiers.Verifier,
                   verifier_name: str, *, max_new_tokens: int, batch_size: int = 64) -> dict:
    """Greedy completions of held-out records, scored by the verifier:
    {"reward": mean, "accuracy": share >= success threshold, "records": count}."""
    prompts = [formats.prompt_tokens(tok, r["prompt"]) for r in records]
    outs = evals.decode_batched(model_cfg, params, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                                pad_id=tok.pad_id, batch_size=batch_size)
    r = verifiers.rewards(verifier, verifier_name, records, range(len(records)), [tok.decode(o) for o in outs])
    return {"reward": float(np.mean(r)), "accuracy": float(np.mean(r >= verifiers.success_threshold(verifier))),
            "records": len(records)}


# ---------------------------------------------------------------------------
# The stage


PREFLIGHT_RECORDS = 1000  # records the verifier is tried on (with an empty completion) before training


def preflight(verifier: verifiers.Verifier, name: str, records: Sequence[dict]) -> dict:
    """The verifier on the first PREFLIGHT_RECORDS records with an empty completion
    (any completion can be sampled, the empty one too): a verifier that fails on a
    record's fields fails here, naming it, before the first step."""
    n = min(len(records), PREFLIGHT_RECORDS)
    verifiers.rewards(verifier, name, records, range(n), [""] * n)
    return {"verifier": name, "records": len(records)}


def stage(model_cfg: ModelConfig, cfg: GRPOConfig, tok, mesh, *, init: Callable[[], Params],
          records: Callable[[], list[dict]], verifier: str = verifiers.BUILTIN,
          before: Callable | None = None, after: Callable | None = None, evaluate: Callable | None = None,
          lora: LoRAConfig = LoRAConfig(), name: str = "grpo") -> runner.Stage:
    """GRPO (or a relative, `cfg.algorithm`) from the params `init()` gives (also the
    frozen KL reference when cfg.kl_coef > 0) on the prompts of `records()`
    ({"prompt", "answer", ...}), rewarded by the verifier named `verifier` (loaded
    now: a bad name is a ConfigError before any stage trains). With
    `lora.rank > 0` only adapters train over the frozen `init()` params, which
    are also the reference (see the module docstring)."""
    check(cfg, model_cfg, mesh, name)
    lora.validate(model_cfg)
    fn = verifiers.load_verifier(verifier)
    verifiers.success_threshold(fn)
    held: dict = {}

    def data() -> list[dict]:
        if "records" not in held:
            held["records"] = records()
            check_prompts_fit(held["records"], tok, cfg, model_cfg, f"{name} prompts")
        return held["records"]

    def loader(_stage_dir: str) -> GroupPromptLoader:
        held["loader"] = GroupPromptLoader(data(), tok, cfg.prompts, cfg.train.seed, prompt_len=cfg.prompt_len)
        return held["loader"]

    def build(params, tx, schedule):
        state, shardings = train.state_from_params(params, tx, mesh, cfg.train.seed)
        step = make_grpo_step(model_cfg, cfg, tx, tok, records=data(), verifier=fn, verifier_name=verifier,
                              reference_params=params if cfg.kl_coef > 0 else None,
                              refill=lambda: next(held["loader"]), schedule=schedule, mesh=mesh,
                              state_shardings=shardings)
        return state, shardings, step

    def build_lora(base, adapters, tx, schedule):
        state, shardings = train.state_from_params(adapters, tx, mesh, cfg.train.seed)
        step = make_grpo_step(model_cfg, cfg, tx, tok, records=data(), verifier=fn, verifier_name=verifier,
                              refill=lambda: next(held["loader"]), schedule=schedule, mesh=mesh,
                              state_shardings=shardings, lora_cfg=lora, base=base)
        return state, shardings, step

    return runner.Stage(
        name, model_cfg, cfg, init=init, loader=loader, build=build, build_lora=build_lora, lora=lora,
        prepare=lambda _dir, _params: {"preflight": preflight(fn, verifier, data())},
        before=before, after=after, evaluate=evaluate,
        optimizer_steps=cfg.train.steps * cfg.optimizer_steps_per_step, extra={"verifier": verifier})
