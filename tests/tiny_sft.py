"""A tiny model's finished SFT stage, laid out as the main job leaves one (the stage
directory and the run's tokenizer beside it): what the benchmarks that read
`--sft runs/demo/sft` are tested on."""

from __future__ import annotations

import os

import jax

from llm_jax import sharding
from llm_jax.config import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data.loader import DataConfig
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.stages import runner, sft

TINY = ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=32, num_layers=1, num_heads=2, d_ff=64,
                   max_len=256)


def one_device_mesh():
    return sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def sft_stage(work: str, steps: int, records: int) -> str:
    """`work`/sft after `steps` SFT steps (lr 1e-2, 8 rows of 64 tokens) of TINY from a
    seed-0 start on `records` built-in instructions, on one device; `work`/tokenizer beside it."""
    tok = ByteTokenizer()
    os.makedirs(os.path.join(work, "tokenizer"), exist_ok=True)
    tok.save(os.path.join(work, "tokenizer"))
    mesh = one_device_mesh()
    cfg = sft.SFTConfig(optim=OptimizerConfig(lr=1e-2, warmup_steps=0),
                        train=TrainConfig(steps=steps, batch_size=8, seq_len=64, log_every=steps),
                        data=DataConfig(source="builtin:sft", size=records))
    runner.run(work, sft.stage(TINY, cfg, tok, init=lambda: runner.fresh_params(TINY, mesh, 0)), mesh,
               progress=lambda _: None)
    return os.path.join(work, "sft")
