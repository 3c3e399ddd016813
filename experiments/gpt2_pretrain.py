"""GPT-2-small (124M) causal-LM pretraining on a TFDS text corpus (default lm1b).

    python -m experiments.gpt2_pretrain --workdir runs/gpt2 [--set train.steps=... ...]

The model is `preset("gpt2")` (learned positions, LayerNorm, GELU, biases, tied
embeddings); the tokenizer is a byte-level BPE of `model.vocab_size` tokens
(50257, GPT-2's size) trained on `tokenizer_sample` records of the training
split and saved in DIR/tokenizer/. Writes DIR/run.json and DIR/pretrain/
{config.json, metrics.jsonl, eval.json, checkpoints/}: held-out (split
`eval_split`) loss and perplexity before and after, and greedy continuations of
a few held-out sentence starts. Rerunning the same command resumes.

Data: the corpus must be prepared once as ArrayRecord (no TensorFlow at run time):

    tfds build lm1b --file_format=array_record --data_dir=gs://BUCKET/tfds

A real run on a TPU slice (see docs/tpu.md; every worker runs the same command):

    tpu/run.sh --experiment gpt2_pretrain --workdir gs://BUCKET/runs/gpt2 -- \\
        --set data.data_dir=gs://BUCKET/tfds --set model.dtype=bfloat16 \\
        --set train.batch_size=512 --set train.steps=20000 --set mesh.fsdp=4

or on one GPU node (8 GPUs, data parallel; use microbatches if memory is short):

    python -m experiments.gpt2_pretrain --workdir runs/gpt2 --set data.data_dir=$HOME/tensorflow_datasets \\
        --set model.dtype=bfloat16 --set train.batch_size=256 --set train.microbatches=2

`--set model.vocab_size=50304` (a multiple of 128) trains a 50304-token BPE and
runs the embedding matmuls a little faster. The encoder counterpart is
`experiments.bert_mlm`.
"""

from __future__ import annotations

import dataclasses
import sys

from llm_jax import cli, generate, launch, sharding
from llm_jax.config import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, preset
from llm_jax.data.corpus import corpus_texts, corpus_tokenizer
from llm_jax.data.loader import DataConfig
from llm_jax.rundir import parse_args, say, write_run_json
from llm_jax.stages import pretrain, runner


@dataclasses.dataclass(frozen=True)
class Config(pretrain.PretrainConfig):
    """The stage's settings plus the run's; the BPE vocabulary size is model.vocab_size
    (one knob for both)."""

    model: ModelConfig = preset("gpt2")
    # nanoGPT's GPT-2 recipe: AdamW (0.9, 0.95), weight decay 0.1, lr 6e-4 with warmup, cosine.
    optim: OptimizerConfig = OptimizerConfig(lr=6e-4, warmup_steps=2000, weight_decay=0.1, b2=0.95)
    mesh: MeshConfig = MeshConfig()
    # 256 x 1024 = 262k tokens a step; lm1b (~1B tokens) is ~3800 steps an epoch.
    train: TrainConfig = TrainConfig(steps=20_000, batch_size=256, seq_len=1024, log_every=50,
                                     checkpoint_every=1000)
    # lm1b records are single sentences (~30 tokens): up to 64 of them share a row.
    data: DataConfig = DataConfig(source="tfds:lm1b", max_segments=64)
    eval_split: str = "test"  # held-out split of the same dataset
    eval_batches: int = 16  # held-out batches for the loss before/after
    data_shards: int = 0  # 0: one per process; fixed N: the same batches on any process count
    tokenizer_sample: int = 200_000  # training records the BPE is trained on
    samples: int = 4  # held-out sentence starts continued greedily after training
    sample_tokens: int = 32  # new tokens per continuation


def continuations(cfg: Config, params, tok) -> dict:
    """Greedy continuations of the first half (at most 16 tokens) of `samples`
    held-out sentences: what the model makes of unseen text."""
    out = {"tokens_per_step": cfg.train.batch_size * cfg.train.seq_len, "samples": []}
    if cfg.samples < 1:
        return out
    prompts, texts = [], corpus_texts(cfg.data, cfg.eval_split, cfg.samples)
    for text in texts:
        ids = tok.encode(text)
        prompts.append([tok.bos_id, *ids[:max(1, min(len(ids) // 2, 16, cfg.model.max_len // 2 - 1))]])
    new = max(1, min(cfg.sample_tokens, cfg.model.max_len - max(len(p) for p in prompts)))
    outs = generate.generate(cfg.model, runner.host_params(params), prompts, max_new_tokens=new,
                             eos_id=tok.eos_id, pad_id=tok.pad_id)
    out["samples"] = [{"prompt": tok.decode(p), "continuation": tok.decode(o), "original": t}
                      for p, o, t in zip(prompts, outs, texts)]
    return out


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    mesh = sharding.make_mesh(cfg.mesh)
    runner.check("pretrain", cfg, cfg.model, mesh, data_shards=cfg.data_shards)
    write_run_json(workdir, cfg, "gpt2_pretrain")
    tok = corpus_tokenizer(workdir, cfg.data, cfg.model.vocab_size, cfg.tokenizer_sample)
    stage = pretrain.stage(cfg.model, cfg, tok, mesh, data_shards=cfg.data_shards,
                           after=lambda p: continuations(cfg, p, tok))
    result = runner.run(workdir, stage, mesh)
    if result is None:
        return 0
    say(f"\nheld-out loss per token: {result['heldout_loss_before']:.3f} before -> "
        f"{result['heldout_loss_after']:.3f} after (perplexity {result['heldout_perplexity_after']:.1f}; "
        f"{result['train_seconds']:.0f}s of training)")
    for s in result["samples"]:
        say(f"  {s['prompt']!r} -> {s['continuation']!r}")
    say(f"wrote {workdir}/run.json, tokenizer/, pretrain/metrics.jsonl, pretrain/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
