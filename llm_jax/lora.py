"""LoRA: train small low-rank adapters on chosen projections, the base frozen (Hu et al., 2021, arXiv:2106.09685).

    adapters = init_adapters(lora_cfg, model_cfg, rng)       # only these are trained
    params = merge(base, adapters, lora_cfg)                  # W + (alpha / rank) * A @ B
    loss_fn = lora_loss_fn(sft.sft_loss_fn(model_cfg), lora_cfg)
    step(state, batch, frozen=base)                           # state.params = adapters

Each adapted weight is read as one matrix per layer, (input dims flattened) x
(output dims flattened), and gets A [L, in, r] and B [L, r, out]:

    target  weight            in       out
    q       [L, D, N, H]      D        N*H
    k, v    [L, D, G, H]      D        G*H
    o       [L, N, H, D]      N*H      D
    up/gate [L, D, F]         D        F        (gate: SwiGLU models only)
    down    [L, F, D]         F        D

adapters = {"layers": {"attn": {"q": {"a", "b"}, ...}, "mlp": {...}}}, mirroring
the params tree. A is Gaussian with std 1/sqrt(in) and B is zero, so the adapted
model starts exactly equal to the base. Adapters are float32 whatever the base's
storage dtype (they are small, and Adam wants them in full precision); the
merged weight comes back in the base weight's dtype.

Training with LoRA is the ordinary train step with `state.params` = the
adapters (so the optimizer state and the resume checkpoints hold only them) and
the frozen base passed as the step's `frozen` argument (not a jit constant).
The wrapped loss does not merge: `attach` puts each adapter beside its weight
and `model.block` computes x @ W + (x @ A) @ B, so the step holds no full-size
merged weight and no full-size weight gradient, only the base's own buffers,
the adapters and their gradients. `merge` (W + scale * A @ B) is for hand-off,
evaluation and export.

The frozen base doubles as the reference where a stage wants one: SFT's KL
term (`lora_loss_fn(..., base_as_reference=True)`) and DPO (build the reference
log-prob cache from the base; the policy is base + adapters), so no second copy
of the weights is held. A reward model trains the adapters and its scalar head:
`lora_reward_loss_fn`, trainable params {"adapters", "head"}.

Hand-off: `load_merged(checkpoint_dir, base, ...)` restores a LoRA stage's
adapters (params only) and returns the merged full params, which a later
stage, sampling code or an export takes like ordinary weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax import checkpoint, model, sharding
from llm_jax.config import ConfigError, ModelConfig

Params = Any

ATTN = ("q", "k", "v", "o")
MLP = ("up", "gate", "down")
# How many leading (after L) dims of each weight are its input side.
_INPUT_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "up": 1, "gate": 1, "down": 1}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters; rank 0 turns LoRA off (full fine-tuning)."""

    rank: int = 0  # r of A [in, r] and B [r, out]; 0: off
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("q", "v")  # among q, k, v, o (attention) and up, gate, down (MLP)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, model_cfg: ModelConfig | None = None) -> "LoRAConfig":
        """Raises ConfigError naming the field; with `model_cfg`, also checks the
        targets exist in that model and the rank fits every adapted matrix."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ConfigError(f"lora.rank={self.rank!r} must be an integer >= 0 (0 turns LoRA off)")
        if not self.enabled:
            return self
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha={self.alpha!r} must be a positive number")
        targets = tuple(self.targets)
        if not targets:
            raise ConfigError("lora.targets is empty: name at least one of " + ", ".join(ATTN + MLP))
        unknown = [t for t in targets if t not in ATTN + MLP]
        if unknown:
            raise ConfigError(f"lora.targets: unknown projection(s) {unknown}; choose among "
                              + ", ".join(ATTN + MLP))
        if len(set(targets)) != len(targets):
            raise ConfigError(f"lora.targets={list(targets)} names a projection twice")
        if model_cfg is not None:
            for t in targets:  # a target the model has not got (gate on a GELU model) fails here
                n_in, n_out = matrix_shape(model_cfg, t)
                if self.rank > min(n_in, n_out):
                    raise ConfigError(f"lora.rank={self.rank} exceeds the {t} projection's "
                                      f"{n_in} x {n_out} matrix (rank <= {min(n_in, n_out)})")
        return self


def _group(target: str) -> str:
    return "attn" if target in ATTN else "mlp"


@functools.lru_cache(maxsize=32)
def _layer_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{target: stacked weight shape [L, ...]} of the projections this model has,
    read off `model.init` itself (abstractly: no weights are made)."""
    layers = jax.eval_shape(lambda: model.init(model_cfg, jax.random.PRNGKey(0)))["layers"]
    return {t: tuple(layers[_group(t)][t].shape) for t in ATTN + MLP if t in layers[_group(t)]}


def weight_shape(model_cfg: ModelConfig, target: str) -> tuple[int, ...]:
    """The stacked weight's shape, e.g. q [L, D, N, H] (see llm_jax/model.py)."""
    shapes = _layer_shapes(model_cfg)
    if target not in shapes:
        raise ConfigError(f"lora.targets names {target!r}, which this model has not got "
                          f"(model.mlp={model_cfg.mlp!r}; it has {', '.join(shapes)})")
    return shapes[target]


def matrix_shape(model_cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of the per-layer matrix the adapter of `target` updates."""
    dims = weight_shape(model_cfg, target)[1:]
    k = _INPUT_DIMS[target]
    return math.prod(dims[:k]), math.prod(dims[k:])


def init_adapters(lora_cfg: LoRAConfig, model_cfg: ModelConfig, rng: jax.Array) -> Params:
    """Fresh adapters: per target {"a": [L, in, r] ~ N(0, 1/in), "b": [L, r, out] = 0}.

    B = 0 makes merge(base, adapters) == base exactly at the start; A's std
    1/sqrt(in) keeps x @ A at the scale of x, so alpha / rank sets the update's size."""
    lora_cfg.validate(model_cfg)
    if not lora_cfg.enabled:
        raise ConfigError("lora.rank=0: LoRA is off, there are no adapters to make")
    L = model_cfg.num_layers
    tree: dict = {}
    for target, key in zip(lora_cfg.targets, jax.random.split(rng, len(lora_cfg.targets))):
        n_in, n_out = matrix_shape(model_cfg, target)
        a = jax.random.normal(key, (L, n_in, lora_cfg.rank), jnp.float32) / math.sqrt(n_in)
        b = jnp.zeros((L, lora_cfg.rank, n_out), jnp.float32)
        tree.setdefault(_group(target), {})[target] = {"a": a, "b": b}
    return {"layers": tree}


@functools.partial(jax.jit, static_argnums=3)
def merge_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """w + scale * A @ B per layer, in w's layout and dtype: w [L, ...], a [L, in, r], b [L, r, out].

    The sum is formed in float32 and rounded once to w's dtype. Jitted on its
    own so an eager `merge` fuses it into one kernel per weight (and inlines
    into an enclosing jit)."""
    d = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)  # [L, in, out]
    return (w.astype(jnp.float32) + scale * d.reshape(w.shape)).astype(w.dtype)


def merge(params: Params, adapters: Params, lora_cfg: LoRAConfig) -> Params:
    """Full params with W + (alpha / rank) * A @ B on every adapted weight.

    Weights without an adapter are passed through as the same arrays, so an
    eager call (export, evaluation, hand-off) allocates only the adapted
    weights anew; inside a jitted loss it costs one fused update per adapted
    weight."""
    layers = dict(params["layers"])
    for group, targets in adapters["layers"].items():
        sub = dict(layers[group])
        for target, ab in targets.items():
            sub[target] = merge_weight(sub[target], ab["a"], ab["b"], lora_cfg.scale)
        layers[group] = sub
    return {**params, "layers": layers}


def attach(params: Params, adapters: Params, lora_cfg: LoRAConfig) -> Params:
    """params with each adapter beside its weight, for training: layers/attn/q_lora =
    {"a": A, "b": (alpha / rank) * B}, which `model.block` applies unmerged,
    x @ W + (x @ A) @ B'. Same outputs as `merge` (up to float rounding), but the
    step never forms a full-size W + A @ B or its gradient: the gradient reaches
    A and B from the activations directly. No array is copied here."""
    layers = dict(params["layers"])
    for group, targets in adapters["layers"].items():
        sub = dict(layers[group])
        for target, ab in targets.items():
            sub[target + "_lora"] = {"a": ab["a"], "b": lora_cfg.scale * ab["b"]}
        layers[group] = sub
    return {**params, "layers": layers}


def summary(lora_cfg: LoRAConfig, adapters: Params, params: Params) -> dict:
    """What eval.json records: the adapter size next to the model's."""
    n, m = model.count_params(adapters), model.count_params(params)
    return {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets),
            "adapter_params": n, "model_params": m, "adapter_fraction": n / m}


# ---------------------------------------------------------------------------
# Losses: the stage's own loss, on the merged params


def lora_loss_fn(loss_fn, lora_cfg: LoRAConfig, *, base_as_reference: bool = False):
    """Wraps an LM stage's loss (SFT, DPO) for `train.make_train_step` with LoRA:

        wrapped(adapters, batch, rng, normalizer, base)
            = loss_fn(attach(base, adapters), batch, rng, normalizer[, base])

    The step is called as `step(state, batch, frozen=base)` with state.params =
    the adapters. `base_as_reference=True` also hands the base to `loss_fn` as
    its frozen reference (SFT with kl_coef > 0: the KL is to the base model itself,
    no second copy)."""
    lora_cfg.validate()

    def wrapped(adapters, batch, rng, normalizer, base):
        extra = (base,) if base_as_reference else ()
        return loss_fn(attach(base, adapters, lora_cfg), batch, rng, normalizer, *extra)

    return wrapped


def init_reward_trainable(lora_cfg: LoRAConfig, model_cfg: ModelConfig, rng: jax.Array) -> Params:
    """The trainable part of a LoRA reward model: {"adapters", "head"} (fresh scalar head)."""
    a_rng, h_rng = jax.random.split(rng)
    return {"adapters": init_adapters(lora_cfg, model_cfg, a_rng),
            "head": model.init_scalar_head(model_cfg, h_rng)}


def merged_reward_params(base: Params, trainable: Params, lora_cfg: LoRAConfig) -> Params:
    """{"model": base + adapters (merged), "head": head}: the layout `stages.reward` reads."""
    return {"model": merge(base, trainable["adapters"], lora_cfg), "head": trainable["head"]}


def lora_reward_loss_fn(loss_fn, lora_cfg: LoRAConfig):
    """Wraps `reward.rm_loss_fn(...)` for LoRA: trainable {"adapters", "head"},
    the LM base frozen (`step(state, batch, frozen=base)`)."""
    lora_cfg.validate()

    def wrapped(trainable, batch, rng, normalizer, base):
        params = {"model": attach(base, trainable["adapters"], lora_cfg), "head": trainable["head"]}
        return loss_fn(params, batch, rng, normalizer)

    return wrapped


# ---------------------------------------------------------------------------
# Hand-off


def abstract_adapters(lora_cfg: LoRAConfig, model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Params:
    """Shapes/dtypes/shardings of the adapters: the target they are restored onto."""
    return sharding.abstract_params(lambda r: init_adapters(lora_cfg, model_cfg, r), mesh, jax.random.PRNGKey(0))


def load_merged(checkpoint_dir: str, base: Params, lora_cfg: LoRAConfig, model_cfg: ModelConfig,
                mesh: jax.sharding.Mesh, step: int | None = None) -> Params:
    """The full params of a LoRA stage: its adapters (params only, checked by name
    and shape against `lora_cfg`) restored from `checkpoint_dir` and merged into
    `base`, the weights that stage trained on. Returns a tree shaped like `base`."""
    adapters = checkpoint.load_params(checkpoint_dir, abstract_adapters(lora_cfg, model_cfg, mesh), step)
    merged = merge(base, adapters, lora_cfg)  # shares base's unadapted buffers
    # An adapted weight keeps its place in the partitioning table (device_put of
    # an array already placed so is a no-op).
    return jax.tree.map(lambda m, b: jax.device_put(m, b.sharding), merged, base)
