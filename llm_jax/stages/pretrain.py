"""Causal-LM pretraining: next-token cross-entropy on every real token.

Batch (all [B, T]): inputs, targets (aligned: targets[:, t] follows inputs[:, t]),
weights (1 on real tokens, 0 on padding), optional positions and segment_ids
for packed rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import losses, model
from llm_jax.config import ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data.loader import DataConfig
from llm_jax.stages import runner


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """A causal-LM stage; data.seq_len and data.batch_size come from train.*."""

    optim: OptimizerConfig = OptimizerConfig(lr=3e-3, warmup_steps=30, weight_decay=0.01)
    train: TrainConfig = TrainConfig(steps=300, batch_size=32, seq_len=128, log_every=25)
    data: DataConfig = DataConfig(source="builtin:pretrain", size=20_000)
    eval_split: str = "eval"  # held-out split of data.source for the loss before/after
    eval_batches: int = 8  # held-out batches (the same ones every time)


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


def heldout_loss(model_cfg: ModelConfig, cfg: PretrainConfig, tok, mesh, data_shards: int = 0
                 ) -> Callable[..., float]:
    """params -> mean token loss over the first `cfg.eval_batches` held-out batches:
    the same batches every call (an unshuffled loader, restarted each time)."""
    fn = jax.jit(lambda p, b: eval_loss(model_cfg, p, b))

    @functools.cache
    def loader():  # opened on first use: a finished stage never opens it
        ld = runner.stage_loader(cfg.data, cfg.train, tok, data_shards, kind="pretrain", split=cfg.eval_split,
                                 shuffle=False)
        return ld, ld.get_state()

    def loss(params) -> float:
        ld, start = loader()
        total, count = runner.heldout_sums(fn, params, ld, cfg.eval_batches, mesh, start)
        return float(total / max(count, 1.0))
    return loss


def stage(model_cfg: ModelConfig, cfg: PretrainConfig, tok, mesh, *, data_shards: int = 0,
          after: Callable | None = None, name: str = "pretrain") -> runner.Stage:
    """Pretraining from fresh weights (seed train.seed), judged by held-out loss
    before, during (train.eval_every) and after; `after(params)` adds entries."""
    heldout = heldout_loss(model_cfg, cfg, tok, mesh, data_shards)

    def final(params) -> dict:
        loss = heldout(params)
        return {"heldout_loss_after": loss, "heldout_perplexity_after": float(np.exp(loss)),
                **(after(params) if after else {})}

    return runner.Stage(
        name, model_cfg, cfg, init=lambda: runner.fresh_params(model_cfg, mesh, cfg.train.seed),
        loader=lambda _: runner.stage_loader(cfg.data, cfg.train, tok, data_shards, kind="pretrain"),
        loss=clm_loss_fn(model_cfg), normalizer=weight_sum,
        before=lambda p: {"heldout_loss_before": heldout(p)}, after=final,
        evaluate=lambda p: {"heldout_loss": heldout(p)}, extra={"data_shards": data_shards})
