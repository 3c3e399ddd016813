"""The generic training step: (state, batch) -> (state, metrics), jitted and sharded.

A stage supplies two pure functions:

    loss_fn(params, batch, rng, normalizer) -> (loss, metrics)
    normalizer_fn(batch) -> scalar   # e.g. the batch's total loss weight

and this module turns them into one compiled step with AdamW, warmup + cosine,
global-norm clipping and gradient accumulation. The normalizer is computed once
over the whole global batch before it is split into microbatches, and each
microbatch's loss is its weighted *sum* divided by that global number, so the
summed microbatch gradients are exactly the full-batch gradient (flax lm1b,
tunix WeightedMetric). For the same reason `metrics` must be additive over
microbatches (sums already divided by the global normalizer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding
from llm_jax.config import OptimizerConfig
from llm_jax.errors import InputError

Params = Any
LossFn = Callable[[Params, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["step", "params", "opt_state", "rng"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32[2] key: dropout etc. use fold_in(rng, step)


# ---------------------------------------------------------------------------
# Optimizer


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine decay to lr * end_lr_ratio."""
    decay = max(cfg.decay_steps or total_steps, 1)
    warmup = min(cfg.warmup_steps, decay - 1) if decay > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=decay,
        end_value=cfg.lr * cfg.end_lr_ratio)


def decay_mask(params: Params) -> Params:
    """Weight decay on weight matrices and embeddings; not on norms or biases."""
    def is_decayed(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name in ("scale", "bias") or name.endswith("_bias"))
    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(cfg, total_steps)
    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------
# State


def create_train_state(init_params: Callable[[jax.Array], Params], optimizer: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh, seed: int) -> tuple[TrainState, Any]:
    """Sharded from birth: params and Adam moments are created on their devices.

    Returns (state, state_shardings)."""
    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = init_params(params_rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=state_rng)
    return sharding.sharded_init(init, mesh, jax.random.PRNGKey(seed))


def state_from_params(params: Params, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                      seed: int) -> tuple[TrainState, Any]:
    """A fresh TrainState around given params (a stage starting from the previous
    stage's weights): params are placed by the partitioning table and passed to the
    compiled init as an argument (not baked in as constants); the optimizer state
    is born sharded like them. Returns (state, state_shardings)."""
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))

    def init(params, rng):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=jax.random.split(rng)[1])

    return sharding.sharded_init(init, mesh, params, jax.random.PRNGKey(seed))


# ---------------------------------------------------------------------------
# Step


def split_microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...], microbatch i taking rows i, i+n, i+2n, ...

    Interleaving (reshape to [B/n, n] then swap) keeps each device's rows on that
    device when the batch is sharded over its first axis: no data moves."""
    def split(x):
        if x.shape[0] % n:
            raise InputError(f"a batch of {x.shape[0]} rows does not split into {n} microbatches; "
                             "pass a number of microbatches that divides the rows (train.microbatches "
                             "must divide train.batch_size)")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, normalizer_fn: Callable[[dict], jax.Array],
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule | None = None,
                    microbatches: int = 1):
    """The pure (un-jitted) step `train_step(state, batch, frozen=None)`. See
    `jit_train_step` for the compiled, sharded one.

    `frozen` is an optional PyTree of arrays the loss reads but does not train
    (a reference model's params, a reward model): when given, the loss is called
    as `loss_fn(params, batch, rng, normalizer, frozen)`. It is an argument, not a
    closure, so jit does not bake gigabytes of weights into the program as constants."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict, frozen: Any = None):
        rng = jax.random.fold_in(state.rng, state.step)
        normalizer = normalizer_fn(batch)  # global: over all microbatches and devices
        extra = () if frozen is None else (frozen,)
        if microbatches == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, rng, normalizer, *extra)
        else:
            def body(acc, xs):
                i, mb = xs
                mb = jax.tree.map(sharding.constrain_activations, mb)
                (l, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), normalizer, *extra)
                return jax.tree.map(jnp.add, acc, (l, m, g)), None

            first = jax.tree.map(lambda x: x[0], split_microbatches(batch, microbatches))
            shapes = jax.eval_shape(grad_fn, state.params, first, rng, normalizer, *extra)
            (l0, m0), g0 = shapes
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, m0, g0))
            xs = (jnp.arange(microbatches), split_microbatches(batch, microbatches))
            (loss, metrics, grads), _ = jax.lax.scan(body, zeros, xs)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       normalizer=jnp.asarray(normalizer, jnp.float32))
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        return new_state, metrics

    return train_step


def jit_train_step(train_step, mesh: jax.sharding.Mesh, state_shardings: Any):
    """Compiles the step for `mesh`: the state keeps its shardings, its old buffers
    are donated (params + Adam moments are not held twice), the batch arrives
    already sharded (`sharding.shard_batch`), metrics come back replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(train_step, out_shardings=(state_shardings, replicated), donate_argnums=0)

    def step(state, batch, frozen=None):
        with jax.set_mesh(mesh):  # activation constraints read the mesh at trace time
            return jitted(state, batch, frozen)
    step.lower = lambda state, batch, frozen=None: _lower(jitted, mesh, state, batch, frozen)
    return step


def _lower(jitted, mesh, state, batch, frozen=None):
    with jax.set_mesh(mesh):
        return jitted.lower(state, batch, frozen)
