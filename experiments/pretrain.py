"""Causal-LM pretraining on the built-in world, on whatever devices JAX sees.

    python -m experiments.pretrain --workdir runs/demo [--set train.steps=600 ...]

Trains a small decoder on few-shot documents of the built-in tasks (copy, sort,
reverse, German->English and ->French, formatting, squares and doubles, sums),
logs the loss, reports held-out loss before and after and the in-context accuracy on held-out probes
at 0, 1 and k shots, with a few greedy continuations so you can see what it
learned. `experiments.pipeline` runs this stage first.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np

from llm_jax import cli, evals, launch, loop, model, sharding, train
from llm_jax.config import ConfigError, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, to_dict
from llm_jax.data.loader import DataConfig, ShardedLoader
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.rundir import is_primary, parse_args, say, write_run_json
from llm_jax.stages import pretrain, runner


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
    probe_shots: int = 3  # in-context accuracy at 0, 1 and this many shots
    probe_per_task: int = 16  # held-out probes per task and shot count


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


def check_config(cfg, tok, mesh) -> None:
    """Config mistakes found before anything compiles."""
    if cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size}")
    cfg.model.validate()
    sharding.check_model_fits_mesh(cfg.model, mesh)
    sharding.check_batch_fits_mesh(cfg.train.batch_size, cfg.train.microbatches, mesh)
    if cfg.train.seq_len > cfg.model.max_len:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_len={cfg.model.max_len}")


def run(workdir: str, cfg: Config, mesh, tok) -> dict | None:
    """The pretraining stage in `workdir/pretrain`: its eval.json dict, or None when
    it stopped early (train.stop_after). Skipped if already finished."""
    stage_dir = os.path.join(workdir, "pretrain")
    done = runner.begin(stage_dir, cfg.train.steps, to_dict(cfg))
    if done is not None:
        say(f"pretrain: already finished ({stage_dir}/eval.json); held-out loss "
            f"{done['heldout_loss_before']:.3f} -> {done['heldout_loss_after']:.3f}")
        return done

    data_cfg = dataclasses.replace(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                                   kind="pretrain")
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
    state, summary = loop.run_stage(
        stage_dir, state, state_shardings, step_fn, loader, mesh, cfg.train, progress=say,
        evaluate=lambda p: {"heldout_loss": heldout_loss(cfg, p, eval_loader, eval_start, mesh)})
    if not summary["finished"]:
        say(f"stopped at step {cfg.train.stop_after} of {cfg.train.steps} (train.stop_after); "
            "rerun the same command to continue")
        return None
    loss_after = heldout_loss(cfg, state.params, eval_loader, eval_start, mesh)

    params = runner.host_params(state.params)
    shots = sorted({0, 1, cfg.probe_shots})
    icl = evals.icl_accuracy(cfg.model, params, tok, shots=shots, per_task=cfg.probe_per_task,
                             seed=cfg.data.seed + 1)
    result = {"steps": cfg.train.steps, "heldout_loss_before": loss_before, "heldout_loss_after": loss_after,
              "heldout_perplexity_after": float(np.exp(loss_after)), "train_seconds": summary["seconds"],
              "icl_accuracy": icl, "data": loader.stats}
    runner.record(stage_dir, result)

    say(f"\nheld-out loss per token: {loss_before:.3f} before -> {loss_after:.3f} after "
        f"({summary['seconds']:.0f}s of training)")
    say("in-context accuracy on held-out probes: " + ", ".join(
        f"{k}-shot " + ("n/a (no probe fits max_len)" if v is None else f"{v:.2f}")
        for k, v in sorted(icl["by_shots"].items(), key=lambda kv: int(kv[0])))
        + f" (pooled over {', '.join(icl['pooled_tasks']) or 'no task'}: the tasks scored at every shot count)")
    for s in icl.get("samples", [])[:8]:
        last = s["prompt"].split("\n")[-1]
        say(f"  {'ok ' if s['correct'] else '   '}{last!r:34} -> {s['got']!r}  (expected {s['expected']!r})")
    return result


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    tok = ByteTokenizer()
    mesh = sharding.make_mesh(cfg.mesh)
    check_config(cfg, tok, mesh)
    os.makedirs(workdir, exist_ok=True)
    write_run_json(workdir, cfg, "pretrain")
    if is_primary():
        tok.save(os.path.join(workdir, "tokenizer"))
    if run(workdir, cfg, mesh, tok) is not None:
        say(f"wrote {workdir}/run.json, pretrain/metrics.jsonl, pretrain/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
