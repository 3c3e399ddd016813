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
from llm_jax.data.packing import pack_clm, packing_efficiency
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.rundir import is_primary, parse_args, run_main, say, write_json, write_run_json
from llm_jax.stages import pretrain


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=128, num_layers=4,
                                     num_heads=4, d_ff=512, max_len=256)
    optim: OptimizerConfig = OptimizerConfig(lr=3e-3, warmup_steps=30, weight_decay=0.01)
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig(steps=300, batch_size=32, seq_len=128, log_every=25)
    train_docs: int = 20_000
    eval_docs: int = 500
    data_seed: int = 0  # eval documents use data_seed + 1: never the training stream


def encode_docs(tok: ByteTokenizer, docs: list[str]) -> list[list[int]]:
    return [[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs]


class RowLoader:
    """Endless shuffled batches of packed rows, epoch after epoch; resumable.

    The state is (epoch, next batch index): the permutation of an epoch is a pure
    function of (seed, epoch), so restoring the state replays the same batches.
    Each JAX process yields only its own slice of every global batch."""

    def __init__(self, packed: dict[str, np.ndarray], batch_size: int, seed: int):
        self.packed, self.batch_size, self.seed = packed, batch_size, seed
        self.batches_per_epoch = len(packed["inputs"]) // batch_size
        if self.batches_per_epoch == 0:
            raise SystemExit(f"only {len(packed['inputs'])} packed rows: fewer than one batch of {batch_size}")
        self.epoch, self.index = 0, 0

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.packed["inputs"]))
        idx = np.sort(order[self.index * self.batch_size:(self.index + 1) * self.batch_size])
        self.index += 1
        return {k: v[process_slice(idx)] for k, v in self.packed.items()}


def process_slice(rows: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch's rows (the mesh is
    process-major, so process p's devices hold the p-th share)."""
    n, p = jax.process_count(), jax.process_index()
    share = len(rows) // n
    return rows[p * share:(p + 1) * share]


def heldout_loss(cfg: Config, params, packed, mesh) -> float:
    fn = jax.jit(lambda p, b: pretrain.eval_loss(cfg.model, p, b))
    total, count = 0.0, 0.0
    bs = cfg.train.batch_size
    for i in range(0, len(packed["inputs"]) - bs + 1, bs):
        rows = process_slice(np.arange(i, i + bs))
        b = sharding.shard_batch({k: v[rows] for k, v in packed.items()}, mesh)
        s, c = fn(params, b)
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def probes(seed: int) -> list[tuple[str, str]]:
    """Held-out few-shot prompts (3 shots + a query) and their answers."""
    rng = random.Random(seed)
    out = []
    for task in ("copy", "reverse", "sort", "translate", "square", "format"):
        shots = builtin.few_shot_document(rng, task, 3)
        q, a = builtin.TASKS[task](rng)
        out.append((f"{shots}{q} ->", f" {a}"))
    return out


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

    train_packed = pack_clm(encode_docs(tok, builtin.pretrain_documents(cfg.data_seed, cfg.train_docs)),
                            cfg.train.seq_len)
    eval_packed = pack_clm(encode_docs(tok, builtin.pretrain_documents(cfg.data_seed + 1, cfg.eval_docs)),
                           cfg.train.seq_len)
    say(f"data: {len(train_packed['inputs'])} packed rows of {cfg.train.seq_len} tokens, "
          f"packing efficiency {packing_efficiency(train_packed):.1%}; mesh {dict(mesh.shape)}")

    tx, schedule = train.make_optimizer(cfg.optim, cfg.train.steps)
    state, state_shardings = train.create_train_state(lambda r: model.init(cfg.model, r), tx, mesh,
                                                      cfg.train.seed)
    say(f"model: {model.count_params(state.params) / 1e6:.2f}M params")
    step_fn = train.jit_train_step(
        train.make_train_step(pretrain.clm_loss_fn(cfg.model), pretrain.weight_sum, tx, schedule,
                              cfg.train.microbatches), mesh, state_shardings)

    loss_before = heldout_loss(cfg, state.params, eval_packed, mesh)
    loader = RowLoader(train_packed, cfg.train.batch_size, cfg.train.seed)
    state, summary = loop.run_stage(stage_dir, state, state_shardings, step_fn, loader, mesh, cfg.train,
                                    progress=say)
    train_time = summary["seconds"]
    if not summary["finished"]:
        say(f"stopped at step {cfg.train.stop_after} of {cfg.train.steps} (train.stop_after); "
            "rerun the same command to continue")
        return 0
    loss_after = heldout_loss(cfg, state.params, eval_packed, mesh)

    params = jax.device_get(multihost_utils.process_allgather(state.params, tiled=True)
                            if jax.process_count() > 1 else state.params)
    samples, correct = [], 0
    for prompt, answer in probes(cfg.data_seed + 2):
        out = tok.decode(generate.generate(cfg.model, params, [[tok.bos_id, *tok.encode(prompt)]],
                                           max_new_tokens=len(tok.encode(answer)) + 2)[0])
        got = out.split("\n")[0]
        correct += got.strip() == answer.strip()
        samples.append({"prompt": prompt, "expected": answer.strip(), "got": got.strip()})
    result = {"steps": cfg.train.steps, "heldout_loss_before": loss_before, "heldout_loss_after": loss_after,
              "heldout_perplexity_after": float(np.exp(loss_after)), "train_seconds": train_time,
              "probe_exact_match": correct / len(samples), "samples": samples}
    write_json(eval_path, result)

    say(f"\nheld-out loss per token: {loss_before:.3f} before -> {loss_after:.3f} after "
          f"({train_time:.0f}s of training)")
    for s in samples:
        last = s["prompt"].split("\n")[-1]
        mark = "ok " if s["got"] == s["expected"] else "   "
        say(f"  {mark}{last!r:32} -> {s['got']!r}  (expected {s['expected']!r})")
    say(f"wrote {workdir}/run.json, pretrain/metrics.jsonl, pretrain/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
