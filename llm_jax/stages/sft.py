"""Supervised fine-tuning (SFT): completion-only cross-entropy, optionally KL-tied
to the pretrained model (the KL-regularized fine-tuning of Ziegler et al., 2019, arXiv:1909.08593):

    L(theta) = L_SFT(theta) + lambda * KL(pi_theta || pi_pretrained)

Batch (all [B, T], from `builtin:sft` or a jsonl SFT source): inputs, targets,
weights, positions, segment_ids. The loader already puts weight 1 only on the
response tokens and the eos (`data.formats`), so the prompt carries no loss and
the same weights select the tokens the KL term is averaged over.

With `kl_coef > 0` the frozen reference (pretrained) params arrive as the loss's
5th argument (`train_step(state, batch, frozen=ref_params)`): an argument, not a
closure, so jit does not bake them into the program as constants.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from llm_jax import losses, model
from llm_jax.config import ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data.loader import DataConfig
from llm_jax.errors import ConfigError, InputError
from llm_jax.lora import LoRAConfig
from llm_jax.stages import pretrain, runner

# The global normalizer: the number of scored (response + eos) tokens.
weight_sum = pretrain.weight_sum


def _logits(model_cfg: ModelConfig, params, batch, dropout_rng=None) -> jax.Array:
    """[B, T, V] float32 logits of one packed batch."""
    return model.apply(model_cfg, params, batch["inputs"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng)


def sft_loss_fn(model_cfg: ModelConfig, kl_coef: float = 0.0):
    """loss_fn(params, batch, rng, normalizer[, frozen]) for `train.make_train_step`.

    kl_coef = 0: plain completion-only CE; no `frozen` argument.
    kl_coef > 0: `frozen` is the reference (pretrained) params; the loss adds
    kl_coef * KL(pi_theta || pi_ref) per scored token, over the full vocabulary,
    with the reference logits under stop_gradient (the reference is not trained).

    Metrics (sums divided by the global normalizer, so they add up exactly over
    microbatches): `ce` the cross-entropy part and, with a reference, `kl` the
    mean KL per scored token (before kl_coef). The returned loss is ce + kl_coef * kl.
    """
    if kl_coef < 0:
        raise ConfigError(f"sft_loss_fn: kl_coef={kl_coef} must be >= 0")

    def loss_fn(params, batch, rng, normalizer, frozen=None):
        if kl_coef > 0 and frozen is None:
            raise InputError(f"sft_loss_fn(kl_coef={kl_coef}) needs the reference params: "
                             "call the train step as step(state, batch, frozen=ref_params)")
        if kl_coef == 0 and frozen is not None:
            raise InputError("sft_loss_fn(kl_coef=0) got reference params it would not use; "
                             "drop `frozen` (it costs a forward pass and memory) or set kl_coef > 0")
        dropout_rng = rng if model_cfg.dropout > 0 else None
        logits = _logits(model_cfg, params, batch, dropout_rng)
        targets, weights = batch["targets"], batch["weights"]
        ce = losses.sft_loss(logits, targets, weights, normalizer=normalizer)
        if frozen is None:
            return ce, {"ce": ce}
        ref_logits = jax.lax.stop_gradient(_logits(model_cfg, frozen, batch))  # deterministic
        loss = losses.sft_loss(logits, targets, weights, ref_logits=ref_logits, kl_coef=kl_coef,
                               normalizer=normalizer)
        kl = losses.masked_mean(losses.token_kl(logits, ref_logits), weights, normalizer)
        return loss, {"ce": jax.lax.stop_gradient(ce), "kl": jax.lax.stop_gradient(kl)}

    return loss_fn


def eval_loss(model_cfg: ModelConfig, params, batch) -> tuple[jax.Array, jax.Array]:
    """(summed NLL of the response tokens, their count) on one SFT batch.

    The batch's weights already select response + eos, so this is the
    pretraining evaluation read on those tokens only; exp(sum / count) is the
    response perplexity."""
    return pretrain.eval_loss(model_cfg, params, batch)


# ---------------------------------------------------------------------------
# The stage


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """An SFT stage; data.seq_len and data.batch_size come from train.*."""

    optim: OptimizerConfig = OptimizerConfig(lr=2e-5, warmup_steps=100, weight_decay=0.0)
    train: TrainConfig = TrainConfig(steps=2000, batch_size=64, seq_len=1024, log_every=20)
    data: DataConfig = DataConfig(source="builtin:sft")
    kl_coef: float = 0.0  # > 0: + kl_coef * KL(pi || initial model) per scored token


def stage(model_cfg: ModelConfig, cfg: SFTConfig, tok, *, init: Callable, data_shards: int = 0,
          before: Callable | None = None, after: Callable | None = None, lora: LoRAConfig = LoRAConfig(),
          name: str = "sft") -> runner.Stage:
    """SFT from the params `init()` gives (an earlier stage's), with those params as the
    frozen KL reference when cfg.kl_coef > 0; `before`/`after` judge the model."""
    return runner.Stage(
        name, model_cfg, cfg, init=init,
        loader=lambda _: runner.stage_loader(cfg.data, cfg.train, tok, data_shards, kind="sft"),
        loss=sft_loss_fn(model_cfg, cfg.kl_coef), normalizer=weight_sum, reference=cfg.kl_coef > 0,
        before=before, after=after, lora=lora, extra={"data_shards": data_shards})
