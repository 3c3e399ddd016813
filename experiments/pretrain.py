"""Causal-LM pretraining on the built-in world, on whatever devices JAX sees.

    python -m experiments.pretrain --workdir runs/demo [--set train.steps=600 ...]

Trains a small decoder on few-shot documents of the built-in tasks (copy, sort,
reverse, German->English, formatting, squares, sums), logs the loss, reports
held-out loss before and after, and prints greedy continuations of held-out
few-shot prompts so you can see what it learned.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from llm_jax import generate, launch, loop, model, sharding, train
from llm_jax.config import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, to_dict
from llm_jax.data import builtin
from llm_jax.data.loader import DataConfig, ShardedLoader
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.rundir import is_primary, parse_args, run_main, say, write_json, write_run_json
from llm_jax.stages import pretrain


@dataclasses.dataclass(frozen=True)
class Config:
    """data.batch_size and data.seq_len are taken from train.* (one source of truth)."""

    model: ModelConfig = ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=128, num_layers=4,
                                     num_heads=4, d_ff=512, max_len=256)
    optim: OptimizerConfig = OptimizerConfig(lr=3e-3, warmup_steps=30, weight_decay=0.01)
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig(steps=300, batch_size=32, seq_len=128, log_every=25)
    data: DataConfig = DataConfig(source="builtin:pretrain", size=20_000)
    data_shards: int = 0  # 0: one per process; fixed N: the same batches on any process count
    eval_batches: int = 8  # held-out batches (split "eval") for the loss before/after
    probe_shots: int = 3


def heldout_loss(cfg: Config, params, eval_loader: ShardedLoader, start: dict, mesh) -> float:
    """Mean token loss over the first `eval_batches` held-out batches (the same
    batches every time: a fresh unshuffled loader, the same count on every host)."""
    fn = jax.jit(lambda p, b: pretrain.eval_loss(cfg.model, p, b))
    total, count = 0.0, 0.0
    eval_loader.set_state(start)
    for _ in range(cfg.eval_batches):
        s, c = fn(params, sharding.shard_batch(next(eval_loader), mesh))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def probes(cfg: Config) -> list[dict]:
    """Held-out few-shot prompts of each task ("split eval": never a training document)."""
    rng = random.Random(cfg.data.seed + 1)
    return [builtin.icl_probe(rng, task, cfg.probe_shots) for task in sorted(builtin.TASKS)]


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    tok = ByteTokenizer()
    if cfg.model.vocab_size < tok.vocab_size:
        raise SystemExit(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size}")
    cfg.model.validate()
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_model_fits_mesh(cfg.model, mesh)
    sharding.check_batch_fits_mesh(cfg.train.batch_size, cfg.train.microbatches, mesh)
    if cfg.train.seq_len > cfg.model.max_len:
        raise SystemExit(f"train.seq_len={cfg.train.seq_len} exceeds model.max_len={cfg.model.max_len}")

    stage_dir = os.path.join(workdir, "pretrain")
    eval_path = os.path.join(stage_dir, "eval.json")
    if os.path.exists(eval_path):
        done = json.load(open(eval_path))
        if done.get("steps") == cfg.train.steps:
            say(f"pretrain: already finished ({eval_path}); held-out loss "
                  f"{done['heldout_loss_before']:.3f} -> {done['heldout_loss_after']:.3f}")
            return 0
    os.makedirs(workdir, exist_ok=True)
    write_run_json(workdir, cfg, "pretrain")
    if is_primary():
        tok.save(os.path.join(workdir, "tokenizer"))
    write_json(os.path.join(stage_dir, "config.json"), to_dict(cfg))

    data_cfg = dataclasses.replace(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size)
    shards = cfg.data_shards or jax.process_count()
    loader = ShardedLoader(data_cfg, tok, shards)
    eval_loader = ShardedLoader(dataclasses.replace(data_cfg, split="eval", shuffle=False), tok, shards)
    eval_start = eval_loader.get_state()
    say(f"data: {cfg.data.source} ({loader.epoch_len} records on this process), rows of "
        f"{cfg.train.seq_len} tokens; mesh {dict(mesh.shape)}")

    tx, schedule = train.make_optimizer(cfg.optim, cfg.train.steps)
    state, state_shardings = train.create_train_state(lambda r: model.init(cfg.model, r), tx, mesh,
                                                      cfg.train.seed)
    say(f"model: {model.count_params(state.params) / 1e6:.2f}M params")
    step_fn = train.jit_train_step(
        train.make_train_step(pretrain.clm_loss_fn(cfg.model), pretrain.weight_sum, tx, schedule,
                              cfg.train.microbatches), mesh, state_shardings)

    loss_before = heldout_loss(cfg, state.params, eval_loader, eval_start, mesh)
    state, summary = loop.run_stage(stage_dir, state, state_shardings, step_fn, loader, mesh, cfg.train,
                                    progress=say)
    train_time = summary["seconds"]
    if not summary["finished"]:
        say(f"stopped at step {cfg.train.stop_after} of {cfg.train.steps} (train.stop_after); "
            "rerun the same command to continue")
        return 0
    loss_after = heldout_loss(cfg, state.params, eval_loader, eval_start, mesh)

    params = jax.device_get(multihost_utils.process_allgather(state.params, tiled=True)
                            if jax.process_count() > 1 else state.params)
    samples, correct = [], 0
    for probe in probes(cfg):
        out = tok.decode(generate.generate(cfg.model, params, [[tok.bos_id, *tok.encode(probe["prompt"])]],
                                           max_new_tokens=len(tok.encode(probe["answer"])) + 3)[0])
        got = out.split("\n")[0].strip()
        ok = builtin.score(probe["task"], probe["query"], got)
        correct += ok
        samples.append({"task": probe["task"], "prompt": probe["prompt"], "expected": probe["answer"],
                        "got": got, "correct": ok})
    result = {"steps": cfg.train.steps, "heldout_loss_before": loss_before, "heldout_loss_after": loss_after,
              "heldout_perplexity_after": float(np.exp(loss_after)), "train_seconds": train_time,
              "probe_accuracy": correct / len(samples), "data": loader.stats, "samples": samples}
    write_json(eval_path, result)

    say(f"\nheld-out loss per token: {loss_before:.3f} before -> {loss_after:.3f} after "
          f"({train_time:.0f}s of training)")
    for s in samples:
        last = s["prompt"].split("\n")[-1]
        say(f"  {'ok ' if s['correct'] else '   '}{last!r:34} -> {s['got']!r}  (expected {s['expected']!r})")
    say(f"wrote {workdir}/run.json, pretrain/metrics.jsonl, pretrain/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
