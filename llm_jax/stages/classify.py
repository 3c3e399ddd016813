"""Sequence classification: the LM trunk, a pooling of its final hidden states, a linear head.

    params = {"model": <LM params, e.g. pretrained>, "head": {"kernel": [D, C], "bias": [C]}}
    h(x)   = pool(model.forward(x))                       # [D] per sequence
    L      = -sum over real sequences of log softmax(W^T h(x) + b)_y / (their count)   (the usual softmax classifier on a pooled representation, e.g. BERT, Devlin et al., 2019)

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

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import losses, model, sharding
from llm_jax.config import ConfigError, ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data.loader import DataConfig
from llm_jax.rundir import say
from llm_jax.stages import runner

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
        raise ConfigError(f"pooling={pooling!r}: expected one of {POOLINGS}")
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


# ---------------------------------------------------------------------------
# The stage


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    """A classification stage; data.seq_len and data.batch_size come from train.*,
    data.num_classes from num_classes."""

    model: ModelConfig = ModelConfig()
    pooling: str = "last"  # last | first | mean
    num_classes: int = 2
    optim: OptimizerConfig = OptimizerConfig(lr=1e-3, warmup_steps=30, weight_decay=0.01)
    train: TrainConfig = TrainConfig(steps=1200, batch_size=32, seq_len=32, log_every=100, spike_factor=0.0)
    data: DataConfig = DataConfig(source="builtin:classify", max_segments=1)
    eval_source: str = ""  # "": split "eval" of data.source; else every record of this source
    eval_batches: int = 0  # held-out batches at most; 0: the whole held-out set
    init_from: str = ""  # a stage directory of an earlier run with a matching LM

    def validate(self, where: str = "classify") -> "ClassifyConfig":
        check_pooling(self.pooling, self.model, f"{where}.pooling")
        if self.num_classes < 2:
            raise ConfigError(f"{where}.num_classes={self.num_classes}: a classifier needs at least 2 classes")
        if self.init_from and not os.path.isdir(os.path.join(self.init_from, "checkpoints")):
            raise ConfigError(f"{where}.init_from={self.init_from}: no checkpoints/ there; expected a stage "
                              "directory of an earlier llm_jax run")
        return self


def _loader(cfg: ClassifyConfig, tok, heldout: bool):
    # kind is asked for: a jsonl/tfds source of {"text", "label"} would otherwise read as pretraining.
    kw = {"num_classes": cfg.num_classes, "kind": "classification"}
    if heldout:
        source, split = (cfg.eval_source, "train") if cfg.eval_source else (cfg.data.source, "eval")
        kw.update(source=source, split=split, shuffle=False, num_epochs=1)
    return runner.stage_loader(cfg.data, cfg.train, tok, **kw)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _predict(model_cfg: ModelConfig, pooling: str, params, batch):
    """Predicted class of every (row, segment): [R, S] int. One compile serves before and after."""
    return jnp.argmax(class_logits(model_cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                  pooling, batch["label_mask"].shape[-1]), axis=-1)


def heldout_accuracy(cfg: ClassifyConfig, params, tok, mesh) -> dict:
    """Accuracy (and per-class accuracy) over the held-out set, one pass in order."""
    params = runner.host_params(params)  # host arrays: before and after hit the same compiled program
    right, count = np.zeros(cfg.num_classes), np.zeros(cfg.num_classes)
    for i, batch in enumerate(_loader(cfg, tok, heldout=True)):
        if cfg.eval_batches and i >= cfg.eval_batches:
            break
        pred = np.asarray(jax.device_get(_predict(cfg.model, cfg.pooling, params,
                                                  sharding.shard_batch(batch, mesh))))
        labels, mask = batch["labels"], batch["label_mask"] > 0
        # A multi-process run would need an all-gather of the batch here too: this
        # evaluation assumes one process, like the pipeline's probes.
        np.add.at(count, labels[mask], 1)
        np.add.at(right, labels[mask], (pred[mask] == labels[mask]).astype(float))
    return {"accuracy": float(right.sum() / max(count.sum(), 1)), "items": int(count.sum()),
            "by_class": {str(c): float(right[c] / count[c]) if count[c] else None for c in range(cfg.num_classes)}}


def stage(name: str, cfg: ClassifyConfig, tok, mesh) -> runner.Stage:
    """The LM trunk (fresh, or `init_from`'s) + a fresh head, judged by held-out accuracy."""
    def init():
        lm_rng, head_rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))
        if cfg.init_from:
            path = os.path.normpath(cfg.init_from)
            lm = runner.stage_params(os.path.dirname(path), os.path.basename(path),
                                     runner.model_like(cfg.model, mesh))
            say(f"{name}: LM weights from {cfg.init_from}")
        else:
            lm = jax.jit(lambda r: model.init(cfg.model, r))(lm_rng)
        return init_classifier_params(cfg.model, lm, cfg.num_classes, head_rng)

    def judged(when: str):
        def accuracy(params) -> dict:
            acc = heldout_accuracy(cfg, params, tok, mesh)
            out = {f"heldout_accuracy_{when}": acc["accuracy"], f"by_class_{when}": acc["by_class"]}
            if when == "after":
                out.update(pooling=cfg.pooling, causal=cfg.model.causal, init_from=cfg.init_from or None,
                           chance=1.0 / cfg.num_classes, heldout_items=acc["items"])
            return out
        return accuracy

    return runner.Stage(
        name, cfg.model, cfg, init=init, loader=lambda _: _loader(cfg, tok, heldout=False),
        loss=classify_loss_fn(cfg.model, cfg.pooling), normalizer=label_count,
        before=judged("before"), after=judged("after"))
