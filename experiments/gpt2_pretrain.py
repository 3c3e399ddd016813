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
import hashlib
import os
import sys
import tempfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from experiments import pretrain as pretrain_experiment
from llm_jax import cli, generate, launch, loop, model, sharding, train
from llm_jax.config import ConfigError, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, preset, to_dict
from llm_jax.data.errors import DataError
from llm_jax.data.loader import DataConfig, ShardedLoader
from llm_jax.data.records import check_record
from llm_jax.data.sources import open_source
from llm_jax.data.tokenizer import SPECIAL_TOKENS, TokenizerError, load_tokenizer, train_bpe
from llm_jax.rundir import is_primary, parse_args, say, write_run_json
from llm_jax.stages import pretrain, runner

STAGE = "pretrain"
BPE_FLOOR = len(SPECIAL_TOKENS) + 256  # the byte alphabet and the special tokens


@dataclasses.dataclass(frozen=True)
class Config:
    """data.batch_size and data.seq_len are taken from train.*; the BPE vocabulary
    size is model.vocab_size (one knob for both)."""

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
    data_shards: int = 0  # 0: one per process; fixed N: the same batches on any process count
    eval_batches: int = 16  # held-out batches for the loss before/after
    tokenizer_sample: int = 200_000  # training records the BPE is trained on
    samples: int = 4  # held-out sentence starts continued greedily after training
    sample_tokens: int = 32  # new tokens per continuation


# ---------------------------------------------------------------------------
# The corpus tokenizer (shared with experiments.bert_mlm)


def corpus_texts(data: DataConfig, split: str, count: int) -> list[str]:
    """Texts of `count` records spread evenly over `split` (all of them if fewer),
    the same on every process; unusable records are left out."""
    src = open_source(data.source, split=split, kind="pretrain", seed=data.seed, size=data.size,
                      data_dir=data.data_dir, cache_dir=data.cache_dir, download=data.download)
    n = len(src.records)
    picks = np.unique(np.linspace(0, n - 1, num=min(count, n)).astype(np.int64)).tolist()
    texts = []
    for i in picks:  # random access, as the training loader reads them
        rec = check_record(src.records[i], "pretrain")
        if isinstance(rec, dict):
            texts.append(rec["text"])
    if not texts:
        raise DataError(f"{data.source} ({split}): none of {len(picks)} sampled records has usable text")
    return texts


def corpus_tokenizer(workdir: str, data: DataConfig, vocab_size: int, sample: int):
    """The run's tokenizer: DIR/tokenizer/ if it exists (a resumed run), else a
    byte-level BPE of `vocab_size` tokens trained on `sample` training records.

    Every process trains its own copy from the same records (BPE training is
    deterministic), so no shared file system is needed; a checksum comparison
    across processes makes sure they agree. The caller saves it (process 0)."""
    directory = os.path.join(workdir, "tokenizer")
    if vocab_size < BPE_FLOOR:
        raise ConfigError(f"model.vocab_size={vocab_size}: a byte-level BPE needs at least {BPE_FLOOR} "
                          "tokens (256 bytes + special tokens)")
    if sample < 1:
        raise ConfigError(f"tokenizer_sample={sample} must be positive")
    try:
        if os.path.exists(os.path.join(directory, "meta.json")):
            tok = load_tokenizer(directory)
            say(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens, from {directory}")
        else:
            texts = corpus_texts(data, data.split, sample)
            tok = train_bpe(texts, vocab_size)
            say(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained on {len(texts)} records "
                f"of {data.source} ({data.split})")
    except TokenizerError as e:
        raise ConfigError(f"tokenizer ({directory}): {e}") from None
    if jax.process_count() > 1:
        multihost_utils.assert_equal(np.frombuffer(_fingerprint(tok), np.uint32),
                                     "the processes built different tokenizers")
    return tok


def _fingerprint(tok) -> bytes:
    """sha256 of the tokenizer's saved files (their serialization is deterministic)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.digest()


def save_tokenizer(workdir: str, tok) -> None:
    directory = os.path.join(workdir, "tokenizer")
    if is_primary() and not os.path.exists(os.path.join(directory, "meta.json")):
        tok.save(directory)


# ---------------------------------------------------------------------------
# The stage


def continuations(cfg: Config, params, tok) -> list[dict]:
    """Greedy continuations of the first half (at most 16 tokens) of `samples`
    held-out sentences: what the model makes of unseen text."""
    if cfg.samples < 1:
        return []
    prompts, texts = [], corpus_texts(cfg.data, cfg.eval_split, cfg.samples)
    for text in texts:
        ids = tok.encode(text)
        prompts.append([tok.bos_id, *ids[:max(1, min(len(ids) // 2, 16, cfg.model.max_len // 2 - 1))]])
    new = max(1, min(cfg.sample_tokens, cfg.model.max_len - max(len(p) for p in prompts)))
    outs = generate.generate(cfg.model, params, prompts, max_new_tokens=new, eos_id=tok.eos_id,
                             pad_id=tok.pad_id)
    return [{"prompt": tok.decode(p), "continuation": tok.decode(o), "original": t}
            for p, o, t in zip(prompts, outs, texts)]


def run(workdir: str, cfg: Config, mesh, tok) -> dict | None:
    """The pretraining stage in `workdir/pretrain`: its eval.json dict, or None when
    it stopped early (train.stop_after). Skipped if already finished."""
    stage_dir = os.path.join(workdir, STAGE)
    done = runner.begin(stage_dir, cfg.train.steps, to_dict(cfg))
    if done is not None:
        say(f"{STAGE}: already finished ({stage_dir}/eval.json); held-out loss "
            f"{done['heldout_loss_before']:.3f} -> {done['heldout_loss_after']:.3f}")
        return done

    data_cfg = dataclasses.replace(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                                   kind="pretrain")
    shards = cfg.data_shards or jax.process_count()
    loader = ShardedLoader(data_cfg, tok, shards)
    eval_cfg = dataclasses.replace(data_cfg, split=cfg.eval_split, shuffle=False)
    eval_loader = ShardedLoader(eval_cfg, tok, shards)
    eval_start = eval_loader.get_state()
    say(f"data: {cfg.data.source} ({loader.epoch_len} records on this process), rows of "
        f"{cfg.train.seq_len} tokens; held-out split {cfg.eval_split!r}; mesh {dict(mesh.shape)}")

    tx, schedule = train.make_optimizer(cfg.optim, cfg.train.steps)
    state, state_shardings = train.create_train_state(lambda r: model.init(cfg.model, r), tx, mesh,
                                                      cfg.train.seed)
    say(f"model: {model.count_params(state.params) / 1e6:.1f}M params")
    step_fn = train.jit_train_step(
        train.make_train_step(pretrain.clm_loss_fn(cfg.model), pretrain.weight_sum, tx, schedule,
                              cfg.train.microbatches), mesh, state_shardings)

    heldout = pretrain_experiment.heldout_loss
    loss_before = heldout(cfg, state.params, eval_loader, eval_start, mesh)
    state, summary = loop.run_stage(
        stage_dir, state, state_shardings, step_fn, loader, mesh, cfg.train, progress=say,
        evaluate=lambda p: {"heldout_loss": heldout(cfg, p, eval_loader, eval_start, mesh)})
    if not summary["finished"]:
        say(f"stopped at step {cfg.train.stop_after} of {cfg.train.steps} (train.stop_after); "
            "rerun the same command to continue")
        return None
    loss_after = heldout(cfg, state.params, eval_loader, eval_start, mesh)
    samples = continuations(cfg, runner.host_params(state.params), tok)
    result = {"steps": cfg.train.steps, "heldout_loss_before": loss_before, "heldout_loss_after": loss_after,
              "heldout_perplexity_after": float(np.exp(loss_after)), "train_seconds": summary["seconds"],
              "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len, "samples": samples,
              "data": loader.stats}
    runner.record(stage_dir, result)

    say(f"\nheld-out loss per token: {loss_before:.3f} before -> {loss_after:.3f} after "
        f"(perplexity {result['heldout_perplexity_after']:.1f}; {summary['seconds']:.0f}s of training)")
    for s in samples:
        say(f"  {s['prompt']!r} -> {s['continuation']!r}")
    return result


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    cfg.model.validate()  # before minutes of tokenizer training
    mesh = sharding.make_mesh(cfg.mesh)
    os.makedirs(workdir, exist_ok=True)
    tok = corpus_tokenizer(workdir, cfg.data, cfg.model.vocab_size, cfg.tokenizer_sample)
    pretrain_experiment.check_config(cfg, tok, mesh)
    write_run_json(workdir, cfg, "gpt2_pretrain")
    save_tokenizer(workdir, tok)
    if run(workdir, cfg, mesh, tok) is not None:
        say(f"wrote {workdir}/run.json, tokenizer/, {STAGE}/metrics.jsonl, {STAGE}/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
