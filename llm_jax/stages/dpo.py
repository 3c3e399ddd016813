"""DPO / IPO on preference pairs, with the reference log-probs computed once.

    h = (log pi(y+) - log pi(y-)) - (log pi_ref(y+) - log pi_ref(y-))
    DPO: L = -log sigmoid(beta h)        IPO: L = (h - 1 / (2 beta))^2

DPO takes each response's summed log-prob; IPO its per-token mean (the sum
divided by the response's token count, TRL's convention; see `losses.ipo_loss`).

The reference model (usually the SFT model) is frozen, so its sequence
log-probs depend only on the data. A pre-pass (`build_reference_cache`) runs it
over exactly the batches training will see and stores them on disk; training
then reads them next to each batch (`CachedReferenceLoader`) and the reference
params need not be in device memory while the policy trains.

    cache = build_reference_cache(cfg, sft_params, make_loader(), steps, dir, mesh)
    del sft_params                                 # free the reference
    loader = CachedReferenceLoader(make_loader(), dir)   # same data config and seed
    run_stage(..., loader=loader, step_fn=<dpo_loss_fn step>, ...)

Cache layout (a local or shared POSIX directory; numpy .npz, never pickle):
    manifest.json                            steps + a fingerprint of data, model, reference
    step_00000012.process_0000.npz           ref_chosen_logps, ref_rejected_logps [rows, S]
                                             and batch_digest (sha256 of the batch they belong to)
Each process stores and reads back only its own rows (the process-local batch
its loader yields): they are the rows of its addressable shards of the global
result (`local_rows`), so the pre-pass needs no collective beyond jit's own,
and a cache works with the same process count it was built with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llm_jax import losses, model, sharding
from llm_jax.config import ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data import packing
from llm_jax.data.loader import DataConfig, LoaderWrapper, restore_per_process
from llm_jax.errors import ConfigError, InputError, ReferenceCacheError
from llm_jax.lora import LoRAConfig
from llm_jax.rundir import say
from llm_jax.stages import runner
from llm_jax.stages.reward import pair_count  # the normalizer: real pairs in the global batch

PREFIXES = ("chosen_", "rejected_")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
MANIFEST = "manifest.json"
CACHE_VERSION = 1


# ---------------------------------------------------------------------------
# Log-probs and the loss


def pair_logps(model_cfg: ModelConfig, params, batch, prefix: str, max_segments: int,
               dropout_rng=None) -> jax.Array:
    """Sequence log-probs of one side of a packed preference batch: [R, S].

    out[r, s] = sum of weight * log p(target) over the tokens of segment s + 1
    in row r (the response and its eos; the prompt has weight 0)."""
    logits = model.apply(model_cfg, params, batch[prefix + "inputs"], positions=batch[prefix + "positions"],
                         segment_ids=batch[prefix + "segment_ids"], dropout_rng=dropout_rng)  # [R, T, V]
    token = losses.token_logprobs(logits, batch[prefix + "targets"]) * batch[prefix + "weights"]  # [R, T]
    return packing.sequence_scores(token, batch[prefix + "segment_ids"], max_segments)


def pair_token_counts(batch, prefix: str, max_segments: int) -> jax.Array:
    """Token count of each sequence of one side of a packed preference batch: [R, S].

    out[r, s] = sum of the weights of segment s + 1 in row r (its response and
    eos; targets < 0 count 0, as in `losses`): the divisor that turns a summed
    log-prob from `pair_logps` into IPO's per-token mean."""
    weights = batch[prefix + "weights"] * (batch[prefix + "targets"] >= 0)
    return packing.sequence_scores(weights, batch[prefix + "segment_ids"], max_segments)


def _per_token(logps: jax.Array, counts: jax.Array) -> jax.Array:
    """Summed log-probs -> per-token means; an empty slot (count 0) is divided by 1."""
    return logps / jnp.where(counts > 0, counts, 1.0)


def _check_width(batch, max_segments: int) -> None:
    if batch["pair_mask"].shape[-1] != max_segments:
        raise InputError(f"max_segments={max_segments}, but the batch's pair_mask has "
                         f"{batch['pair_mask'].shape[-1]} segments per row (data.max_segments)")


def dpo_loss_fn(model_cfg: ModelConfig, max_segments: int, beta: float = 0.1,
                label_smoothing: float = 0.0, loss: str = "dpo"):
    """loss_fn(params, batch, rng, normalizer) for `train.make_train_step`.

    `loss` picks `losses.dpo_loss` (with cDPO `label_smoothing`) on summed
    sequence log-probs, or `losses.ipo_loss` on per-token mean log-probs: for
    IPO the policy's and the (cached, summed) reference's log-probs of each
    response are divided by that response's token count (`pair_token_counts`),
    so h and its target 1 / (2 beta) are in nats per token, as in TRL. Both
    weight pairs by `pair_mask` and divide by the global pair count
    (`pair_count`). The batch must carry `ref_chosen_logps` and
    `ref_rejected_logps` [R, S] (from `CachedReferenceLoader`).

    Metrics (sums over the same normalizer, exact over microbatches), with the
    implicit rewards r(y) = beta * (log pi(y) - log pi_ref(y)) on the log-probs
    the loss uses (per-token means for IPO): `chosen_reward`,
    `rejected_reward`, `reward_margin` (= beta * h) and `accuracy` (fraction of
    pairs with h > 0)."""
    if loss not in ("dpo", "ipo"):
        raise ConfigError(f"dpo_loss_fn: loss={loss!r}; expected 'dpo' or 'ipo'")
    if beta <= 0:
        raise ConfigError(f"dpo_loss_fn: beta={beta} must be positive")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"dpo_loss_fn: label_smoothing={label_smoothing} must be in [0, 0.5)")
    if loss == "ipo" and label_smoothing:
        raise ConfigError("dpo_loss_fn: label_smoothing is a DPO (cDPO) option; IPO has none")

    def loss_fn(params, batch, rng, normalizer):
        missing = [k for k in REF_KEYS if k not in batch]
        if missing:
            raise InputError(f"DPO batch lacks {missing}: wrap the loader in CachedReferenceLoader")
        _check_width(batch, max_segments)
        rngs = (None, None) if model_cfg.dropout == 0 else jax.random.split(rng)
        pc, pr = (pair_logps(model_cfg, params, batch, p, max_segments, r).reshape(-1)
                  for p, r in zip(PREFIXES, rngs))
        rc, rr = (batch[k].reshape(-1) for k in REF_KEYS)
        mask = batch["pair_mask"].reshape(-1)
        if loss == "ipo":  # per-token means: the IPO convention (see losses.ipo_loss)
            chosen_n, rejected_n = (pair_token_counts(batch, p, max_segments).reshape(-1) for p in PREFIXES)
            pc, rc = _per_token(pc, chosen_n), _per_token(rc, chosen_n)
            pr, rr = _per_token(pr, rejected_n), _per_token(rr, rejected_n)
        if loss == "dpo":
            value = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing,
                                    normalizer=normalizer, weights=mask)
        else:
            value = losses.ipo_loss(pc, pr, rc, rr, beta=beta, normalizer=normalizer, weights=mask)
        chosen_reward = beta * jax.lax.stop_gradient(pc - rc)
        rejected_reward = beta * jax.lax.stop_gradient(pr - rr)
        margin = chosen_reward - rejected_reward  # beta * h
        mean = lambda x: losses.masked_mean(x, mask, normalizer)  # noqa: E731
        return value, {"reward_margin": mean(margin), "chosen_reward": mean(chosen_reward),
                       "rejected_reward": mean(rejected_reward), "accuracy": mean(margin > 0)}

    return loss_fn


# ---------------------------------------------------------------------------
# The reference cache


def batch_digest(batch: dict) -> str:
    """sha256 of a host batch (keys, dtypes, shapes, bytes): ties a cached step
    to the exact batch it was computed from."""
    h = hashlib.sha256()
    for key in sorted(batch):
        x = np.ascontiguousarray(batch[key])
        h.update(f"{key}:{x.dtype.str}:{x.shape};".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, [R_global, ...] -> [R_local, ...].

    `sharding.shard_batch` (jax.make_array_from_process_local_data) maps a
    process's local rows, in order, onto the row blocks its devices address,
    taken in increasing global order; so its rows are the distinct row blocks of
    its addressable shards (devices along the tensor axis hold copies), sorted
    by where they start."""
    blocks = {}
    for shard in x.addressable_shards:
        blocks.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def _data_config(loader):
    """The DataConfig of a data.loader.Loader or ShardedLoader."""
    inner = getattr(loader, "loaders", [loader])[0]
    if not hasattr(inner, "config"):
        raise TypeError(f"the reference cache needs a data.loader.Loader or ShardedLoader, "
                        f"got {type(loader).__name__}")
    return inner.config


def data_fingerprint(loader) -> dict:
    """What decides the batches: data config, shard layout, process count (flat, JSON-able)."""
    inner = getattr(loader, "loaders", [loader])[0]
    where = ("data_dir", "cache_dir", "download")  # where the data lives, not what it is
    out = {f"data.{k}": v for k, v in dataclasses.asdict(_data_config(loader)).items() if k not in where}
    out.update(data_shards=inner.shard_count, processes=jax.process_count())
    return json.loads(json.dumps(out))  # tuples -> lists, as they come back from the manifest


def _fingerprint(model_cfg: ModelConfig, loader, reference: str) -> dict:
    out = data_fingerprint(loader)
    out.update({f"model.{k}": v for k, v in dataclasses.asdict(model_cfg).items()})
    out.update(version=CACHE_VERSION, reference=reference)
    return json.loads(json.dumps(out))


def _check_same(saved: dict, want: dict, cache_dir: str, keys=None) -> None:
    keys = sorted(set(saved) | set(want)) if keys is None else keys
    diff = [f"{k}: cached {saved.get(k)!r}, now {want.get(k)!r}" for k in keys if saved.get(k) != want.get(k)]
    if diff:
        raise ReferenceCacheError(f"the reference cache in {cache_dir} was built for other data or another "
                                  f"reference ({'; '.join(diff)}); use a new cache directory or delete it")


def _read_manifest(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _step_path(cache_dir: str, step: int) -> str:
    return os.path.join(cache_dir, f"step_{step:08d}.process_{jax.process_index():04d}.npz")


def _write_atomic(path: str, write: Callable) -> None:
    """Writes through a temporary file and renames it: a file either exists whole or not at all."""
    tmp = f"{path}.tmp-{jax.process_index()}-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_partial_files(cache_dir: str) -> None:
    """Deletes this process's temporary files left by a killed build."""
    mine = f".tmp-{jax.process_index()}-"
    for name in os.listdir(cache_dir):
        if mine in name:
            os.remove(os.path.join(cache_dir, name))


def _built_steps(cache_dir: str, steps: int) -> int:
    """How many steps 0, 1, ... this process has on disk, without a gap."""
    n = 0
    while n < steps and os.path.exists(_step_path(cache_dir, n)):
        n += 1
    return n


def _next(loader, i: int, steps: int) -> dict:
    try:
        return next(loader)
    except StopIteration:
        raise ReferenceCacheError(f"the data loader ended after {i} batches, but the reference cache "
                                  f"needs {steps}; use an endless loader (data.num_epochs=None)") from None


def build_reference_cache(model_cfg: ModelConfig, ref_params, loader, steps: int, cache_dir: str,
                          mesh: jax.sharding.Mesh, *, reference: str = "",
                          progress: Callable[[str], None] = print) -> str:
    """Writes the reference log-probs of the first `steps` batches of `loader`.

    `loader` must be FRESH and configured exactly like the training loader (same
    data config, seed and shards): cached step i belongs to its batch i.
    `reference` names the reference model (e.g. its checkpoint path); a cache
    built for another reference, model config or data is refused.

    Resumable: files are written atomically, so after a crash a rerun keeps the
    complete steps, fast-forwards the loader past them and computes the rest.
    Runs on all processes (jit over `mesh`); each writes its own rows.
    Returns cache_dir."""
    if steps < 1:
        raise ConfigError(f"build_reference_cache: steps={steps} must be positive")
    fingerprint = _fingerprint(model_cfg, loader, reference)
    os.makedirs(cache_dir, exist_ok=True)
    _remove_partial_files(cache_dir)
    saved = _read_manifest(cache_dir)
    if saved is not None:
        _check_same(saved["fingerprint"], fingerprint, cache_dir)
    manifest = json.dumps({"steps": steps, "fingerprint": fingerprint}, indent=1, sort_keys=True)
    _write_atomic(os.path.join(cache_dir, MANIFEST), lambda f: f.write(manifest.encode()))

    done = _built_steps(cache_dir, steps)
    if jax.process_count() > 1:  # every process must run the same number of jitted steps
        done = int(np.min(multihost_utils.process_allgather(np.int32(done))))
    if done:
        progress(f"reference cache {cache_dir}: {done}/{steps} steps already built, skipping them")
    for i in range(done):
        _next(loader, i, steps)

    max_segments = _data_config(loader).max_segments
    rows = sharding.batch_sharding(mesh, 2)
    compute = jax.jit(lambda p, b: tuple(pair_logps(model_cfg, p, b, x, max_segments) for x in PREFIXES),
                      out_shardings=(rows, rows))
    every = max(1, steps // 10)
    for i in range(done, steps):
        batch = _next(loader, i, steps)
        with jax.set_mesh(mesh):
            chosen, rejected = compute(ref_params, sharding.shard_batch(batch, mesh))
        arrays = {"ref_chosen_logps": local_rows(chosen), "ref_rejected_logps": local_rows(rejected),
                  "batch_digest": np.array(batch_digest(batch))}
        _write_atomic(_step_path(cache_dir, i), lambda f: np.savez(f, **arrays))
        if (i + 1) % every == 0 or i + 1 == steps:
            progress(f"reference cache: {i + 1}/{steps} steps")
    return cache_dir


class CachedReferenceLoader(LoaderWrapper):
    """Wraps the training loader: each batch comes with its cached reference
    log-probs (`ref_chosen_logps`, `ref_rejected_logps` [rows, S]).

    The state holds the inner loader's state and the batch index, so
    `loop.run_stage` resumes (and skips batches after a rollback) exactly. A
    batch that differs from the one the cache was built from (other data,
    tokenizer or order) is an error, not a silent mismatch."""

    def __init__(self, loader, cache_dir: str):
        manifest = _read_manifest(cache_dir)
        if manifest is None:
            raise ReferenceCacheError(f"no reference cache in {cache_dir}: run build_reference_cache first")
        want = data_fingerprint(loader)
        _check_same(manifest["fingerprint"], want, cache_dir, keys=sorted(want))
        self.steps = int(manifest["steps"])
        built = _built_steps(cache_dir, self.steps)
        if built < self.steps:
            raise ReferenceCacheError(f"the reference cache in {cache_dir} is incomplete for process "
                                      f"{jax.process_index()} ({built}/{self.steps} steps); rerun "
                                      "build_reference_cache to finish it")
        self.loader, self.cache_dir, self.step = loader, cache_dir, 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step >= self.steps:
            raise ReferenceCacheError(f"training asked for batch {self.step + 1}, but the reference cache in "
                                      f"{self.cache_dir} holds {self.steps} steps; build it with steps >= "
                                      "train.steps")
        batch = next(self.loader)
        with np.load(_step_path(self.cache_dir, self.step), allow_pickle=False) as cached:
            if str(cached["batch_digest"]) != batch_digest(batch):
                raise ReferenceCacheError(f"batch {self.step} is not the one the reference cache in "
                                          f"{self.cache_dir} was built from (different data, tokenizer "
                                          "or loader position?)")
            refs = {k: cached[k] for k in REF_KEYS}
        self.step += 1
        return {**batch, **refs}

    def get_state(self) -> dict:
        return {"reference_step": self.step, "loader": self.loader.get_state()}

    def set_state(self, state: dict) -> None:
        self.loader.set_state(state["loader"])
        self.step = int(state["reference_step"])

    def restore(self, states: list[dict]) -> None:
        """Each process reads its own part of the cache: the same process count resumes."""
        restore_per_process(self, states)


# ---------------------------------------------------------------------------
# The stage


LOSSES = ("dpo", "ipo")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """A DPO stage; data.seq_len and data.batch_size come from train.*."""

    optim: OptimizerConfig = OptimizerConfig(lr=5e-7, warmup_steps=50, weight_decay=0.0)
    train: TrainConfig = TrainConfig(steps=1000, batch_size=64, seq_len=1024, log_every=20, spike_factor=0.0)
    data: DataConfig = DataConfig(source="builtin:preferences")
    beta: float = 0.1
    label_smoothing: float = 0.0  # > 0: cDPO
    loss: str = "dpo"  # dpo | ipo

    def validate(self, where: str = "dpo") -> "DPOConfig":
        if self.loss not in LOSSES:
            raise ConfigError(f"{where}.loss={self.loss!r}: expected one of {', '.join(LOSSES)}")
        return self


def stage(model_cfg: ModelConfig, cfg: DPOConfig, tok, mesh, *, init: Callable, data_shards: int = 0,
          before: Callable | None = None, after: Callable | None = None, lora: LoRAConfig = LoRAConfig(),
          reference_name: str = "", name: str = "dpo") -> runner.Stage:
    """DPO from the params `init()` gives, which are also the reference: its
    log-probs of every training batch are computed first and stored under
    DIR/<name>/reference/ (`build_reference_cache`), so the reference leaves memory
    before the policy trains (with LoRA it stays, as the frozen base: one copy)."""
    cfg.validate(name)

    def loader():
        return runner.stage_loader(cfg.data, cfg.train, tok, data_shards, kind="preferences")

    def prepare(stage_dir: str, reference) -> dict:
        t0 = time.time()
        build_reference_cache(model_cfg, reference, loader(), cfg.train.steps, os.path.join(stage_dir, "reference"),
                              mesh, reference=reference_name, progress=say)
        return {"reference_seconds": time.time() - t0}

    def cached(stage_dir: str):
        return CachedReferenceLoader(loader(), os.path.join(stage_dir, "reference"))

    return runner.Stage(
        name, model_cfg, cfg, init=init, loader=cached, prepare=prepare,
        loss=dpo_loss_fn(model_cfg, cfg.data.max_segments, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                         loss=cfg.loss),
        normalizer=pair_count, before=before, after=after, lora=lora, extra={"data_shards": data_shards})
