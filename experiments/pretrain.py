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

from llm_jax import cli, evals, launch, sharding
from llm_jax.config import MeshConfig, ModelConfig
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.errors import ConfigError
from llm_jax.rundir import is_primary, parse_args, say, write_run_json
from llm_jax.stages import pretrain, runner


@dataclasses.dataclass(frozen=True)
class Config(pretrain.PretrainConfig):
    """The stage's settings (optim, train, data, eval_split, eval_batches) plus the run's."""

    model: ModelConfig = ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=128, num_layers=4,
                                     num_heads=4, d_ff=512, max_len=256)
    mesh: MeshConfig = MeshConfig()
    data_shards: int = 0  # 0: one per process; fixed N: the same batches on any process count
    probe_shots: int = 3  # in-context accuracy at 0, 1 and this many shots
    probe_per_task: int = 16  # held-out probes per task and shot count


def icl(cfg: Config, tok, params) -> dict:
    """In-context accuracy on held-out probes at 0, 1 and k shots."""
    return {"icl_accuracy": evals.icl_accuracy(cfg.model, runner.host_params(params), tok,
                                               shots=sorted({0, 1, cfg.probe_shots}),
                                               per_task=cfg.probe_per_task, seed=cfg.data.seed + 1)}


def report(result: dict) -> None:
    say(f"\nheld-out loss per token: {result['heldout_loss_before']:.3f} before -> "
        f"{result['heldout_loss_after']:.3f} after ({result['train_seconds']:.0f}s of training)")
    icl = result["icl_accuracy"]
    say("in-context accuracy on held-out probes: " + ", ".join(
        f"{k}-shot " + ("n/a (no probe fits max_len)" if v is None else f"{v:.2f}")
        for k, v in sorted(icl["by_shots"].items(), key=lambda kv: int(kv[0])))
        + f" (pooled over {', '.join(icl['pooled_tasks']) or 'no task'}: the tasks scored at every shot count)")
    for s in icl.get("samples", [])[:8]:
        last = s["prompt"].split("\n")[-1]
        say(f"  {'ok ' if s['correct'] else '   '}{last!r:34} -> {s['got']!r}  (expected {s['expected']!r})")


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    tok = ByteTokenizer()
    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size}")
    runner.check("pretrain", cfg, cfg.model, mesh, kind="pretrain", data_shards=cfg.data_shards)
    write_run_json(workdir, cfg, "pretrain")
    if is_primary():
        tok.save(os.path.join(workdir, "tokenizer"))
    stage = pretrain.stage(cfg.model, cfg, tok, mesh, data_shards=cfg.data_shards, after=lambda p: icl(cfg, tok, p))
    result = runner.run(workdir, stage, mesh)
    if result is not None:
        report(result)
        say(f"wrote {workdir}/run.json, pretrain/metrics.jsonl, pretrain/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
