"""Sequence classification: the LM trunk, a pooling of its final hidden states, a linear head.

    params = {"model": <LM params, e.g. pretrained>, "head": {"kernel": [D, C], "bias": [C]}}
    h(x)   = pool(model.forward(x))                       # [D] per sequence
    L      = -sum over real sequences of log softmax(W^T h(x) + b)_y / (their count)   (seed 003)

The trunk is the same params tree as every other stage's LM, so a pretrained
(or SFT) model hands off into `params["model"]` (`runner.stage_params`).

Pooling (`POOLINGS`), per sequence, over its real tokens (segment id > 0):
  last   the hidden state at its last input token: the only one that has read
         the whole sequence in a causal decoder;
  first  the hidden state at its first token (bos, used as a CLS token): for
         encoders, where every token sees every other;
  mean   the mean over its tokens.
`first` on a causal model is refused: a decoder's first token sees only itself.

Classification batches (`data.loader`, kind classification) are packed like
pretraining batches and add `labels` [R, S] (int) and `label_mask` [R, S]:
sequence k sits at (row r, segment s + 1) and its label at labels[r, s].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_jax import losses, model
from llm_jax.config import ConfigError, ModelConfig

POOLINGS = ("last", "first", "mean")


def check_pooling(pooling: str, model_cfg: ModelConfig, field: str = "pooling") -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"{field}={pooling!r}: expected one of {POOLINGS}")
    if pooling == "first" and model_cfg.causal:
        raise ConfigError(f"{field}='first' with model.causal=True: a decoder's first token sees only "
                          f"itself; use 'last' (or 'mean'), or an encoder (model.causal=False)")


def init_head(model_cfg: ModelConfig, num_classes: int, rng: jax.Array) -> dict:
    """A linear map D -> C: {"kernel": [D, C], "bias": [C]}."""
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    kernel = model_cfg.init_std * jax.random.normal(rng, (model_cfg.d_model, num_classes), jnp.float32)
    return {"kernel": kernel.astype(model_cfg.param_dtype),
            "bias": jnp.zeros((num_classes,), model_cfg.param_dtype)}


def init_classifier_params(model_cfg: ModelConfig, lm_params, num_classes: int, rng: jax.Array) -> dict:
    """Wraps LM params (fresh or pretrained) with a fresh head: {"model", "head"}."""
    return {"model": lm_params, "head": init_head(model_cfg, num_classes, rng)}


def pool(hidden: jax.Array, segment_ids: jax.Array, pooling: str, max_segments: int = 1) -> jax.Array:
    """hidden [R, T, D] -> one vector per (row, segment): [R, S, D] float32.

    out[r, s] pools the tokens of row r with segment id s + 1 (see the module
    docstring); a segment absent from its row gives zeros. For unpacked rows pass
    the 0/1 real-token mask as segment_ids and max_segments=1. First and last are
    gathers and the mean a select-and-sum, so they are exact in float32 on any
    accelerator (no one-hot matmul at reduced precision)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    hidden = hidden.astype(jnp.float32)
    T = hidden.shape[1]
    t = jnp.arange(T)
    in_seg = segment_ids[:, None, :] == jnp.arange(1, max_segments + 1)[None, :, None]  # [R, S, T]
    present = jnp.any(in_seg, axis=-1)  # [R, S]
    if pooling == "mean":
        total = jnp.sum(jnp.where(in_seg[..., None], hidden[:, None], 0.0), axis=2)  # [R, S, D]
        count = jnp.sum(in_seg, axis=-1, keepdims=True).astype(jnp.float32)  # [R, S, 1]
        return total / jnp.maximum(count, 1.0)
    if pooling == "last":
        index = jnp.max(jnp.where(in_seg, t, -1), axis=-1)  # [R, S]
    else:
        index = jnp.min(jnp.where(in_seg, t, T), axis=-1)
    index = jnp.clip(index, 0, T - 1)
    picked = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [R, S, D]
    return jnp.where(present[..., None], picked, 0.0)


def class_logits(model_cfg: ModelConfig, params, inputs, positions, segment_ids, pooling: str,
                 max_segments: int = 1, dropout_rng=None) -> jax.Array:
    """Class scores of every packed sequence: [R, T] tokens -> [R, S, C] float32."""
    hidden = model.forward(model_cfg, params["model"], inputs, positions=positions,
                           segment_ids=segment_ids, dropout_rng=dropout_rng)  # [R, T, D]
    pooled = pool(hidden, segment_ids, pooling, max_segments)  # [R, S, D]
    head = params["head"]
    return (jnp.einsum("rsd,dc->rsc", pooled, head["kernel"].astype(jnp.float32))
            + head["bias"].astype(jnp.float32))


def _batch_logits(model_cfg, params, batch, pooling, dropout_rng=None):
    S = batch["label_mask"].shape[-1]
    return class_logits(model_cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                        pooling, S, dropout_rng)


def label_count(batch) -> jax.Array:
    """The global normalizer: how many labelled sequences the whole batch holds."""
    return jnp.sum(batch["label_mask"].astype(jnp.float32))


def classify_loss_fn(model_cfg: ModelConfig, pooling: str):
    """loss_fn(params, batch, rng, normalizer) for `train.make_train_step`.

    `losses.classification_loss` over the labelled sequences (`label_mask`),
    normalized by the global count (`label_count`). Metric `accuracy`: a sum over
    the same normalizer, so it adds up exactly over microbatches."""
    def loss_fn(params, batch, rng, normalizer):
        dropout_rng = rng if model_cfg.dropout > 0 else None
        logits = _batch_logits(model_cfg, params, batch, pooling, dropout_rng)  # [R, S, C]
        C = logits.shape[-1]
        labels, mask = batch["labels"].reshape(-1), batch["label_mask"].reshape(-1)
        loss = losses.classification_loss(logits.reshape(-1, C), labels, mask, normalizer=normalizer)
        right = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1).reshape(-1) == labels
        return loss, {"accuracy": losses.masked_mean(right, mask, normalizer)}
    return loss_fn


def accuracy_counts(model_cfg: ModelConfig, params, batch, pooling: str) -> tuple[jax.Array, jax.Array]:
    """(sequences classified right, labelled sequences) on one held-out batch."""
    logits = _batch_logits(model_cfg, params, batch, pooling)
    right = jnp.argmax(logits, axis=-1) == batch["labels"]
    return jnp.sum(jnp.where(right, batch["label_mask"], 0.0)), label_count(batch)
