"""Data pipeline throughput: host batches/s of `llm_jax.data.loader.Loader`.

    cd /work/main && PYTHONPATH=. python -m benchmarks.data_pipeline [--batches 40]

Rows (all batch 32 x seq 256, one process, shuffled):
1. builtin:pretrain with the byte tokenizer (the headline number);
2. builtin:pretrain with a byte-level BPE (vocab 1024) trained on 2,000 of its documents;
3. builtin:sft and builtin:preferences (byte tokenizer);
4. jsonl: the same pretraining documents written to a file, built once into a
   TFDS ArrayRecord dataset and read back through TFDS data sources + Grain
   (the build time is reported separately);
5. jsonl of long documents (8 of 256 KB, like books), each split into ~1,000
   rows: the cost of reading and tokenizing a document once, not per chunk.

Each row times `--batches` batches after two warm-up batches, in one thread,
and reports batches/s, real (non-padding) tokens/s and packing efficiency.
Writes benchmarks/DATA_RESULTS.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import tempfile
import time

from llm_jax.data.loader import DataConfig, Loader
from llm_jax.data.packing import packing_efficiency
from llm_jax.data.sources import open_source
from llm_jax.data.tokenizer import ByteTokenizer, train_bpe

BATCH, SEQ = 32, 256
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "DATA_RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", open("/proc/cpuinfo").read(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.platform()}"


def time_loader(cfg: DataConfig, tok, batches: int) -> dict:
    t0 = time.perf_counter()
    ld = Loader(cfg, tok, shard_index=0, shard_count=1)
    start = time.perf_counter() - t0
    for _ in range(2):
        next(ld)
    t0 = time.perf_counter()
    real = slots = 0
    for _ in range(batches):
        b = next(ld)
        segs = [v for k, v in b.items() if k.endswith("segment_ids")]
        real += sum(int((s > 0).sum()) for s in segs)
        slots += sum(s.size for s in segs)
    dt = time.perf_counter() - t0
    return {"batches_per_s": batches / dt, "real_tokens_per_s": real / dt, "efficiency": real / slots,
            "startup_s": start, "last_batch_efficiency": packing_efficiency(b)}


def train_steps_per_s(model_cfg, batch: dict, steps: int = 5) -> float:
    """Steps/s of the jitted train step on one device, for the same batch shape."""
    import jax

    from llm_jax import model, sharding, train
    from llm_jax.config import MeshConfig, OptimizerConfig
    from llm_jax.stages import pretrain

    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx, sched = train.make_optimizer(OptimizerConfig(), 100)
    state, shardings = train.create_train_state(lambda r: model.init(model_cfg, r), tx, mesh, seed=0)
    step = train.jit_train_step(train.make_train_step(pretrain.clm_loss_fn(model_cfg), pretrain.weight_sum,
                                                      tx, sched), mesh, shardings)
    batch = {k: v for k, v in batch.items() if k in ("inputs", "targets", "weights", "positions", "segment_ids")}
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args(argv)
    byte = ByteTokenizer()
    base = DataConfig(source="builtin:pretrain", seq_len=SEQ, batch_size=BATCH, size=100_000)
    rows = []

    def row(name, cfg, tok, note=""):
        r = time_loader(cfg, tok, args.batches)
        rows.append((name, r, note))
        print(f"{name:45s} {r['batches_per_s']:7.2f} batches/s  {r['real_tokens_per_s']:9.0f} tok/s  "
              f"eff {r['efficiency']:.1%}", flush=True)

    row("builtin:pretrain, byte tokenizer", base, byte)
    docs = [open_source("builtin:pretrain", size=2000).records[i]["text"] for i in range(2000)]
    t0 = time.perf_counter()
    bpe = train_bpe(docs, vocab_size=1024)
    bpe_s = time.perf_counter() - t0
    row("builtin:pretrain, BPE 1024", base, bpe, f"BPE training on 2,000 docs: {bpe_s:.2f} s")
    row("builtin:sft, byte tokenizer", DataConfig(source="builtin:sft", seq_len=SEQ, batch_size=BATCH), byte)
    row("builtin:preferences, byte tokenizer",
        DataConfig(source="builtin:preferences", seq_len=SEQ, batch_size=BATCH), byte)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pretrain.jsonl")
        src = open_source("builtin:pretrain", size=20_000).records
        with open(path, "w") as f:
            for i in range(len(src)):
                f.write(json.dumps({"text": src[i]["text"]}) + "\n")
        cfg = DataConfig(source=f"jsonl:{path}", seq_len=SEQ, batch_size=BATCH, cache_dir=os.path.join(tmp, "c"))
        t0 = time.perf_counter()
        open_source(cfg.source, cache_dir=cfg.cache_dir)
        build_s = time.perf_counter() - t0
        row("jsonl (TFDS ArrayRecord + Grain), byte", cfg, byte,
            f"one-time build of 20,000 records: {build_s:.2f} s")
        long_path = os.path.join(tmp, "books.jsonl")
        with open(long_path, "w") as f:
            for i in range(8):
                text = " ".join(src[j]["text"] for j in range(i * 2000, (i + 1) * 2000))
                f.write(json.dumps({"text": text[:256 * 1024]}) + "\n")
        row("jsonl, 8 documents of 256 KB, byte",
            DataConfig(source=f"jsonl:{long_path}", seq_len=SEQ, batch_size=BATCH, cache_dir=os.path.join(tmp, "b")),
            byte, "each document spans about 1,000 rows")

    lines = [
        "# Data pipeline throughput",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {machine()}. "
        f"`python -m benchmarks.data_pipeline --batches {args.batches}`; one process, one thread, "
        f"batch {BATCH} x seq {SEQ}, shuffled, first-fit packing.",
        "",
        "| source, tokenizer | batches/s | real tokens/s | packing efficiency | loader start (s) | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r, note in rows:
        lines.append(f"| {name} | {r['batches_per_s']:.2f} | {r['real_tokens_per_s']:,.0f} | "
                     f"{r['efficiency']:.1%} | {r['startup_s']:.2f} | {note} |")
    lines += ["", "Packing efficiency = real (non-padding) token slots / all slots; for preferences "
              "both the chosen and the rejected tensors count."]

    # Is the pipeline the bottleneck? The train step on the same batch shape, beside it.
    import dataclasses

    from experiments.pretrain import Config
    from llm_jax.config import preset
    batch = next(Loader(base, byte, shard_index=0, shard_count=1))
    lines += ["", "## Beside the train step (same batch 32 x 256, one CPU device)", "",
              "| model | train steps/s | pipeline batches/s (byte) | pipeline / train |", "|---|---:|---:|---:|"]
    for name, mcfg in (("tiny preset", dataclasses.replace(preset("tiny"), vocab_size=byte.vocab_size,
                                                           max_len=SEQ)),
                       ("main job (experiments.pretrain)", dataclasses.replace(Config().model, max_len=SEQ))):
        sps = train_steps_per_s(mcfg, batch)
        lines.append(f"| {name} | {sps:.2f} | {rows[0][1]['batches_per_s']:.2f} | "
                     f"{rows[0][1]['batches_per_s'] / sps:.0f}x |")
        print(lines[-1], flush=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
