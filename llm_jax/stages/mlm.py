"""Masked-LM pretraining for an encoder (BERT: Devlin et al., 2019, arXiv:1810.04805):

    L_MLM = - sum_{i in M} log p_theta(x_i | x_{\\M}) / |M|

M is a random 15% of the real, non-special positions; of those, the input shows
[MASK] 80% of the time, a random token 10% and the original token 10%
(`losses.mlm_mask`). Only a bidirectional model (`ModelConfig.causal=False`,
e.g. `preset("bert")`) can use the context on both sides.

The masking is drawn on the host, before the step, by `MaskingLoader`: the
normalizer |M| of the whole global batch must be known before the batch is cut
into microbatches (`train.make_train_step`), so that accumulated gradients are
exactly the full-batch gradient. Its input is any pretraining loader (packed
rows: inputs, targets, weights, positions, segment_ids); each row's `inputs`
already holds every token of its sequences once ([bos] text, chunked), so the
encoder reads those and the next-token targets are dropped.

Batch after masking (all [B, T]): inputs (corrupted tokens), targets (the
original tokens), weights (1 at the chosen positions M), positions, segment_ids.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import losses, model
from llm_jax.config import ConfigError, ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data.errors import DataError
from llm_jax.data.loader import DataConfig, LoaderWrapper, restore_per_process
from llm_jax.data.tokenizer import SPECIAL_TOKENS
from llm_jax.stages import pretrain, runner

STATE_KEY = "mlm"  # where a MaskingLoader keeps its position inside the data state


def check_encoder(model_cfg: ModelConfig) -> None:
    """MLM predicts a token from both sides: a causal model sees only the left one."""
    if model_cfg.causal:
        raise ConfigError("masked-LM training needs a bidirectional encoder, but model.causal=True; "
                          "use preset('bert') or set model.causal=false")


@functools.partial(jax.jit, static_argnames=("mask_id", "vocab_size", "mask_prob"))
def _mask_blocks(key, batch_index, block_ids, tokens, can_mask, *, mask_id, vocab_size, mask_prob):
    """`losses.mlm_mask` on each block of rows with its own key.

    tokens, can_mask: [K, R, T] (K blocks of R rows); block_ids: [K] int.
    Block k uses fold_in(fold_in(key, batch_index), block_ids[k])."""
    step_key = jax.random.fold_in(key, batch_index)

    def one(block_id, toks, ok):
        return losses.mlm_mask(jax.random.fold_in(step_key, block_id), toks, mask_id=mask_id,
                               vocab_size=vocab_size, mask_prob=mask_prob, can_mask=ok)

    return jax.vmap(one)(block_ids, tokens, can_mask)


def _host_device():
    """Masking runs on the host CPU (the accelerators are busy with the step); on a
    platform list without CPU it runs on the default device. Threefry bits are the
    same on every backend, so the masks do not depend on where this runs."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


class MaskingLoader(LoaderWrapper):
    """Wraps a pretraining loader and masks each of its batches for MLM.

    Batch n (counted from the start of the stage) is masked with key
    fold_in(fold_in(PRNGKey(seed), n), shard): each data shard of a
    `ShardedLoader` (or the shard of a plain `Loader`) gets its own key, so the
    global batch and its masks are the same on any number of processes. Positions
    that are padding (segment 0) or special tokens (ids < num_special: pad, bos,
    eos, mask, prompt, response) are never chosen.

    `get_state()` / `set_state()` carry the inner loader's state plus n, so a
    resumed stage (`loop.run_stage`) sees exactly the batches and masks of an
    uninterrupted one. For a ShardedLoader the count is stored in every shard's
    entry: `loop.restore_loader` merges the processes' states by shard and keeps
    only those entries.
    """

    def __init__(self, loader, *, mask_id: int, vocab_size: int, mask_prob: float = 0.15, seed: int = 0,
                 num_special: int = len(SPECIAL_TOKENS)):
        if not 0.0 < mask_prob < 1.0:
            raise ConfigError(f"MaskingLoader: mask_prob={mask_prob} must be in (0, 1)")
        if not 0 <= mask_id < vocab_size:
            raise ConfigError(f"MaskingLoader: mask_id={mask_id} is outside the vocabulary [0, {vocab_size})")
        if vocab_size <= num_special:
            raise ConfigError(f"MaskingLoader: vocab_size={vocab_size} leaves no ordinary token after "
                              f"{num_special} special ones")
        self.loader = loader
        self.mask_id, self.vocab_size, self.mask_prob = int(mask_id), int(vocab_size), float(mask_prob)
        self.seed, self.num_special = int(seed), int(num_special)
        self.batch_index = 0
        if hasattr(loader, "shard_ids"):  # ShardedLoader: rows are its shards' blocks, in order
            self.block_ids = list(loader.shard_ids)
        else:
            self.block_ids = [int(getattr(loader, "shard_index", 0))]
        self._device = _host_device()
        self._key = jax.device_put(jax.random.PRNGKey(self.seed), self._device)

    # -- batches ---------------------------------------------------------------

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.loader)
        out = self.mask(batch, self.batch_index)
        self.batch_index += 1
        return out

    def mask(self, batch: dict[str, np.ndarray], batch_index: int) -> dict[str, np.ndarray]:
        """The MLM batch made from one pretraining batch, masked as batch `batch_index`.

        batch: inputs, positions, segment_ids [R, T] (R = this process's rows, a
        multiple of its shard count). Returns inputs (corrupted), targets (the
        original inputs), weights (float32, 1 at chosen positions), positions and
        segment_ids, all [R, T] numpy arrays."""
        tokens = np.asarray(batch["inputs"])
        segments = np.asarray(batch["segment_ids"])
        rows, seq_len = tokens.shape
        blocks = len(self.block_ids)
        if rows % blocks:
            raise DataError(f"MaskingLoader: {rows} rows do not split into {blocks} data shards")
        can_mask = (segments > 0) & (tokens >= self.num_special)
        shape = (blocks, rows // blocks, seq_len)
        put = functools.partial(jax.device_put, device=self._device)
        inputs, targets, weights = _mask_blocks(
            self._key, put(np.uint32(batch_index)), put(np.asarray(self.block_ids, np.uint32)),
            put(tokens.reshape(shape)), put(can_mask.reshape(shape)),
            mask_id=self.mask_id, vocab_size=self.vocab_size, mask_prob=self.mask_prob)
        inputs, targets, weights = (np.asarray(x).reshape(rows, seq_len) for x in (inputs, targets, weights))
        return {"inputs": inputs.astype(tokens.dtype), "targets": targets.astype(tokens.dtype),
                "weights": weights.astype(np.float32), "positions": np.asarray(batch["positions"]),
                "segment_ids": segments}

    # -- state -----------------------------------------------------------------

    def _mine(self) -> dict:
        return {"batch_index": self.batch_index, "seed": self.seed, "mask_prob": self.mask_prob,
                "mask_id": self.mask_id, "vocab_size": self.vocab_size}

    def get_state(self) -> dict:
        inner = self.loader.get_state()
        if "shards" in inner:
            return {"shards": {k: {**v, STATE_KEY: self._mine()} for k, v in inner["shards"].items()}}
        return {"loader": inner, STATE_KEY: self._mine()}

    def set_state(self, state: dict) -> None:
        if "shards" in state:
            mine = [v.get(STATE_KEY) for v in state["shards"].values()]
            inner = {"shards": {k: {x: y for x, y in v.items() if x != STATE_KEY}
                                for k, v in state["shards"].items()}}
        else:
            mine, inner = [state.get(STATE_KEY)], state.get("loader")
        if any(m is None for m in mine) or inner is None:
            raise DataError("data state has no masking position: it was not saved by a MaskingLoader "
                            "(was the checkpoint made by another stage?)")
        expect = self._mine()
        for key in ("seed", "mask_prob", "mask_id", "vocab_size"):
            got = {m[key] for m in mine}
            if got != {expect[key]}:
                raise DataError(f"data state was masked with {key}={sorted(got)}, but this loader has "
                                f"{key}={expect[key]!r}: it would not continue the same stream")
        counts = {m["batch_index"] for m in mine}
        if len(counts) != 1:
            raise DataError(f"data state: the shards disagree on the batch count ({sorted(counts)})")
        self.loader.set_state(inner)
        self.batch_index = int(counts.pop())

    def restore(self, states: list[dict]) -> None:
        """Over a `ShardedLoader`, every process's shards merged (any process count)."""
        if all("shards" in s for s in states):
            self.set_state({"shards": {k: v for s in states for k, v in s["shards"].items()}})
        else:
            restore_per_process(self, states)

    @property
    def epoch_len(self) -> int:
        return self.loader.epoch_len


# ---------------------------------------------------------------------------
# Loss and evaluation


def normalizer(batch) -> jax.Array:
    """The global normalizer |M|: masked positions in the whole batch. At least 1,
    so that a batch where nothing was chosen (possible for tiny batches) gives a
    loss and gradient of 0 instead of 0/0; with 0/1 weights this changes nothing else."""
    return jnp.maximum(pretrain.weight_sum(batch), 1.0)


def _logits(model_cfg: ModelConfig, params, batch, dropout_rng=None) -> jax.Array:
    """[B, T, V] float32 logits of the encoder over the (corrupted) inputs."""
    return model.apply(model_cfg, params, batch["inputs"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng)


def _correct(logits, targets, weights) -> jax.Array:
    """sum_{b,t} w * [argmax_v logits = target]: masked tokens predicted exactly."""
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(hit * weights.astype(jnp.float32))


def mlm_loss_fn(model_cfg: ModelConfig):
    """loss_fn(params, batch, rng, normalizer) for `train.make_train_step`.

    Metrics (sums divided by the global normalizer, so they add up over
    microbatches): `accuracy`, the fraction of masked tokens predicted exactly."""
    check_encoder(model_cfg)

    def loss_fn(params, batch, rng, norm):
        logits = _logits(model_cfg, params, batch, rng if model_cfg.dropout > 0 else None)
        loss = losses.mlm_loss(logits, batch["targets"], batch["weights"], normalizer=norm)
        accuracy = _correct(logits, batch["targets"], batch["weights"]) / norm
        return loss, {"accuracy": jax.lax.stop_gradient(accuracy)}

    return loss_fn


def eval_batch(model_cfg: ModelConfig, params, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed NLL of the masked tokens, how many were predicted exactly, how many
    there are) on one masked batch: loss = sum / count, accuracy = correct / count."""
    check_encoder(model_cfg)
    logits = _logits(model_cfg, params, batch)
    nll = losses.mlm_loss(logits, batch["targets"], batch["weights"], normalizer=1.0)
    return nll, _correct(logits, batch["targets"], batch["weights"]), pretrain.weight_sum(batch)


# ---------------------------------------------------------------------------
# The stage


@dataclasses.dataclass(frozen=True)
class MLMConfig:
    """A masked-LM stage (BERT's recipe by default); data.seq_len/batch_size come from train.*."""

    # AdamW (0.9, 0.999, eps 1e-6), weight decay 0.01, lr 1e-4, 10k warmup steps (Devlin et al., 2019).
    optim: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=10_000, b2=0.999, eps=1e-6,
                                             weight_decay=0.01)
    train: TrainConfig = TrainConfig(steps=100_000, batch_size=256, seq_len=128, log_every=100,
                                     checkpoint_every=1000)
    data: DataConfig = DataConfig(source="tfds:lm1b")
    eval_split: str = "test"  # held-out split of the same dataset
    eval_batches: int = 16  # held-out masked batches, the same before and after
    mask_prob: float = 0.15  # chance that a real token is chosen for prediction
    mask_seed: int = 0  # training masks; held-out masks use mask_seed + 1

    def validate(self) -> "MLMConfig":
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob={self.mask_prob} must be in (0, 1)")
        return self


_eval_batch = jax.jit(eval_batch, static_argnums=0)  # one compile for before and after


def stage(model_cfg: ModelConfig, cfg: MLMConfig, tok, mesh, *, data_shards: int = 0,
          name: str = "mlm") -> runner.Stage:
    """Masked-LM pretraining of an encoder from fresh weights, judged by the held-out
    masked-token loss and accuracy before, during (train.eval_every) and after."""
    def masking(seed: int, **overrides) -> MaskingLoader:
        loader = runner.stage_loader(cfg.data, cfg.train, tok, data_shards, kind="pretrain", **overrides)
        return MaskingLoader(loader, mask_id=tok.mask_id, vocab_size=tok.vocab_size, mask_prob=cfg.mask_prob,
                             seed=seed, num_special=tok.num_special)

    @functools.cache
    def held_out():  # the same masks every time: seed mask_seed + 1, restarted at its start
        ld = masking(cfg.mask_seed + 1, split=cfg.eval_split, shuffle=False)
        return ld, ld.get_state()

    def heldout(params) -> dict:
        ld, start = held_out()
        loss, right, count = runner.heldout_sums(lambda p, b: _eval_batch(model_cfg, p, b), params, ld,
                                                 cfg.eval_batches, mesh, start)
        return {"heldout_mlm_loss": float(loss / max(count, 1.0)),
                "heldout_mlm_accuracy": float(right / max(count, 1.0))}

    def final(params) -> dict:
        h = heldout(params)
        return {"heldout_mlm_loss_after": h["heldout_mlm_loss"],
                "heldout_mlm_perplexity_after": float(np.exp(h["heldout_mlm_loss"])),
                "heldout_mlm_accuracy_after": h["heldout_mlm_accuracy"]}

    return runner.Stage(
        name, model_cfg, cfg, init=lambda: runner.fresh_params(model_cfg, mesh, cfg.train.seed),
        loader=lambda _: masking(cfg.mask_seed), loss=mlm_loss_fn(model_cfg), normalizer=normalizer,
        before=lambda p: {f"{k}_before": v for k, v in heldout(p).items()}, after=final, evaluate=heldout,
        extra={"data_shards": data_shards})
