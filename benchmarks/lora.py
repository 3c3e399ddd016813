"""LoRA step cost on this machine's CPU: full fine-tuning vs LoRA merged vs LoRA unmerged.

    cd /work/main && PYTHONPATH=. python -m benchmarks.lora          # ~2 min; writes benchmarks/LORA_RESULTS.md
    PYTHONPATH=. python -m benchmarks.lora --quick --out /tmp/l.md   # does it run? numbers mean nothing

One SFT train step (`stages.sft.sft_loss_fn`, AdamW, one CPU device, float32)
on the same batch of random tokens for three ways of training one model
(d_model 512, 8 layers, 8 heads, d_ff 2048, vocab 8192; batch 8 x 256):
  full      every weight trained (params = the model);
  merged    LoRA whose loss forms W + (alpha/r) A @ B for each adapted weight
            and runs the model on those merged weights (`lora.merge`): the
            full-size merged weights and their full-size gradients exist in the step;
  unmerged  LoRA as the stages train it (`lora.attach`): the block computes
            x @ W + (x @ A) @ B', never a full-size merged weight or its gradient.
Reported: XLA's own memory analysis of each compiled step (temporary buffers;
arguments = params + optimizer state + batch + frozen base), and the median
wall time of the step over interleaved rounds (`core.time_round_robin`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os

import jax
import numpy as np

from benchmarks import core
from llm_jax import lora, model, sharding, train
from llm_jax.config import MeshConfig, ModelConfig, OptimizerConfig
from llm_jax.stages import sft

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = ModelConfig(vocab_size=8192, d_model=512, num_layers=8, num_heads=8, d_ff=2048, max_len=256)
TARGETS = (("q", "v"), ("q", "k", "v", "o", "up", "gate", "down"))


def merged_loss_fn(loss_fn, lora_cfg):
    """The LoRA loss through `lora.merge` (what `lora_loss_fn` did before `attach`)."""
    def wrapped(adapters, batch, rng, normalizer, base):
        return loss_fn(lora.merge(base, adapters, lora_cfg), batch, rng, normalizer)
    return wrapped


def batch_of(cfg: ModelConfig, rows: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (rows, seq + 1)).astype(np.int32)
    ones = np.ones((rows, seq), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": ones.astype(np.float32),
            "segment_ids": ones, "positions": np.broadcast_to(np.arange(seq), (rows, seq)).astype(np.int32)}


def contender(cfg, kind: str, targets, rank: int, batch, mesh):
    """(run() -> loss, memory dict) of one compiled step."""
    tx, schedule = train.make_optimizer(OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
    base = model.init(cfg, jax.random.PRNGKey(0))
    loss_fn = sft.sft_loss_fn(cfg)
    frozen = None
    if kind == "full":
        trainable = base
    else:
        lcfg = lora.LoRAConfig(rank=rank, targets=targets)
        trainable = lora.init_adapters(lcfg, cfg, jax.random.PRNGKey(1))
        loss_fn = lora.lora_loss_fn(loss_fn, lcfg) if kind == "unmerged" else merged_loss_fn(loss_fn, lcfg)
        frozen = base
    state, shardings = train.state_from_params(trainable, tx, mesh, seed=0)
    step = train.jit_train_step(train.make_train_step(loss_fn, sft.weight_sum, tx, schedule), mesh, shardings)
    batch = sharding.shard_batch(batch, mesh)
    mem = step.lower(state, batch, frozen).compile().memory_analysis()
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch, frozen)
        return float(m["loss"])
    return run, {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
                 "trainable": model.count_params(trainable)}


def measure(cfg: ModelConfig, rows: int, seq: int, rank: int, rounds: int) -> dict:
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    batch = batch_of(cfg, rows, seq)
    out = {}
    for targets in TARGETS:
        fns, mems = {}, {}
        for kind in ("full", "merged", "unmerged"):
            fns[kind], mems[kind] = contender(cfg, kind, targets, rank, batch, mesh)
        times = core.time_round_robin(fns, rounds=rounds, warmup=1)
        out["+".join(targets)] = {k: {**mems[k], "seconds": times[k]["wall"]["median"],
                                      "losses": times[k]["losses"]} for k in fns}
    return out


def report(res: dict, meta: dict) -> str:
    lines = ["# LoRA step cost", "",
             f"Written by `python -m benchmarks.lora` on {meta['date']}; machine: {meta['machine']}.", "",
             f"Model {meta['model']}; batch {meta['rows']} x {meta['seq']} tokens; rank {meta['rank']}; "
             f"median of {meta['rounds']} interleaved rounds. Temporary and argument bytes are XLA's memory "
             "analysis of the compiled step (arguments: trainable params + Adam state + batch + frozen base).", "",
             "| targets | training | trainable params | temp memory | argument memory | step s |",
             "|---|---|---:|---:|---:|---:|"]
    for targets, row in res.items():
        for kind, r in row.items():
            lines.append(f"| {targets} | {kind} | {r['trainable']:,} | {core.fmt_bytes(r['temp_bytes'])} | "
                         f"{core.fmt_bytes(r['argument_bytes'])} | {r['seconds']:.3f} |")
    lines += ["", "`merged` is the LoRA loss through `lora.merge`, `unmerged` through `lora.attach` "
              "(what the stages use); `full` trains every weight.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny model: checks that it runs")
    p.add_argument("--out", default=os.path.join(HERE, "LORA_RESULTS.md"))
    args = p.parse_args(argv)
    cfg, rows, seq, rank, rounds = MODEL, 8, 256, 8, 5
    if args.quick:
        cfg, rows, seq, rank, rounds = dataclasses.replace(MODEL, d_model=64, num_layers=2, num_heads=4,
                                                           d_ff=128, vocab_size=256), 2, 32, 2, 1
    res = measure(cfg, rows, seq, rank, rounds)
    info = core.machine_info()
    machine = (f"{info['cpu_model']}, {info['cores']} cores, {info['ram_bytes'] / 2**30:.0f} GiB, "
               f"load average {info['loadavg_start'][0]:.1f} at the start")
    meta = {"date": datetime.date.today().isoformat(), "machine": machine,
            "model": f"d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads, d_ff {cfg.d_ff}, "
                     f"vocab {cfg.vocab_size} ({model.count_params(jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))):,} params)",
            "rows": rows, "seq": seq, "rank": rank, "rounds": rounds}
    with open(args.out, "w") as f:
        f.write(report(res, meta))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "results": res}, f, indent=2)
    print(report(res, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
