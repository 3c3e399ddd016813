"""Causal-LM pretraining: next-token cross-entropy on every real token.

Batch (all [B, T]): inputs, targets (aligned: targets[:, t] follows inputs[:, t]),
weights (1 on real tokens, 0 on padding), optional positions and segment_ids
for packed rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_jax import losses, model
from llm_jax.config import ModelConfig


def clm_loss_fn(model_cfg: ModelConfig):
    """loss_fn(params, batch, rng, normalizer) for `train.make_train_step`."""
    def loss_fn(params, batch, rng, normalizer):
        logits = model.apply(model_cfg, params, batch["inputs"], positions=batch.get("positions"),
                             segment_ids=batch.get("segment_ids"),
                             dropout_rng=rng if model_cfg.dropout > 0 else None)
        loss = losses.clm_loss(logits, batch["targets"], batch["weights"], normalizer=normalizer)
        return loss, {}
    return loss_fn


def weight_sum(batch) -> jax.Array:
    """The global normalizer: how many target tokens the whole batch scores."""
    return jnp.sum(batch["weights"].astype(jnp.float32))


def eval_loss(model_cfg: ModelConfig, params, batch) -> tuple[jax.Array, jax.Array]:
    """(summed token NLL, token count) on one batch; perplexity = exp(sum / count)."""
    logits = model.apply(model_cfg, params, batch["inputs"], positions=batch.get("positions"),
                         segment_ids=batch.get("segment_ids"))
    count = weight_sum(batch)
    return losses.clm_loss(logits, batch["targets"], batch["weights"], normalizer=1.0), count
