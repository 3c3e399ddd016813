"""BERT-base-shape (110M) masked-LM pretraining on a TFDS text corpus (default lm1b).

    python -m experiments.bert_mlm --workdir runs/bert [--set train.steps=... ...]

The model is `preset("bert")` (bidirectional encoder, learned positions,
LayerNorm, GELU, biases; pre-norm and no token-type embeddings, unlike BERT
itself); the objective is BERT's masked LM (seed 003): 15% of the real tokens
are chosen, of those 80% become [MASK], 10% a random token, 10% stay, and the
loss is the cross-entropy of the original tokens at the chosen positions
(`llm_jax.stages.mlm`). The tokenizer is a byte-level BPE of `model.vocab_size`
tokens (30522, BERT's size) trained on `tokenizer_sample` training records and
saved in DIR/tokenizer/. Writes DIR/run.json and DIR/mlm/{config.json,
metrics.jsonl (loss, masked-token accuracy), eval.json (held-out masked-token
loss and accuracy before and after, on the same masks), checkpoints/}.
Rerunning the same command resumes, with the same masks.

Data: prepare the corpus once as ArrayRecord (`tfds build lm1b
--file_format=array_record --data_dir=...`). A real run on a TPU slice:

    tpu/run.sh --experiment bert_mlm --workdir gs://BUCKET/runs/bert -- \\
        --set data.data_dir=gs://BUCKET/tfds --set model.dtype=bfloat16 --set train.batch_size=1024

(BERT's own phase 1 was 900k steps of 256 x 128 tokens at lr 1e-4.)
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np

from experiments import gpt2_pretrain
from experiments import pretrain as pretrain_experiment
from llm_jax import cli, launch, loop, model, sharding, train
from llm_jax.config import ConfigError, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, preset, to_dict
from llm_jax.data.loader import DataConfig, ShardedLoader
from llm_jax.rundir import parse_args, say, write_run_json
from llm_jax.stages import mlm, runner

STAGE = "mlm"
_eval_batch = jax.jit(mlm.eval_batch, static_argnums=0)  # one compile for before and after


@dataclasses.dataclass(frozen=True)
class Config:
    """data.batch_size and data.seq_len are taken from train.*; the BPE vocabulary
    size is model.vocab_size (one knob for both)."""

    model: ModelConfig = preset("bert")
    # BERT's recipe: AdamW (0.9, 0.999, eps 1e-6), weight decay 0.01, lr 1e-4, 10k warmup steps.
    optim: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=10_000, b2=0.999, eps=1e-6,
                                             weight_decay=0.01)
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig(steps=100_000, batch_size=256, seq_len=128, log_every=100,
                                     checkpoint_every=1000)
    data: DataConfig = DataConfig(source="tfds:lm1b")
    eval_split: str = "test"  # held-out split of the same dataset
    data_shards: int = 0  # 0: one per process; fixed N: the same batches and masks on any process count
    eval_batches: int = 16  # held-out masked batches, the same before and after
    mask_prob: float = 0.15  # chance that a real token is chosen for prediction
    mask_seed: int = 0  # training masks; held-out masks use mask_seed + 1
    tokenizer_sample: int = 200_000  # training records the BPE is trained on


def heldout(cfg: Config, params, eval_loader: mlm.MaskingLoader, start: dict, mesh) -> tuple[float, float]:
    """(loss per masked token, masked-token accuracy) over the first `eval_batches`
    held-out batches, with the same masks every time (the loader restarts at `start`)."""
    sums = np.zeros(3)
    eval_loader.set_state(start)
    for _ in range(cfg.eval_batches):
        batch = sharding.shard_batch(next(eval_loader), mesh)
        sums += [float(x) for x in _eval_batch(cfg.model, params, batch)]
    count = max(sums[2], 1.0)
    return sums[0] / count, sums[1] / count


def masking_loader(cfg: Config, data_cfg: DataConfig, tok, seed: int) -> mlm.MaskingLoader:
    loader = ShardedLoader(data_cfg, tok, cfg.data_shards or jax.process_count())
    return mlm.MaskingLoader(loader, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                             mask_prob=cfg.mask_prob, seed=seed, num_special=tok.num_special)


def run(workdir: str, cfg: Config, mesh, tok) -> dict | None:
    """The MLM stage in `workdir/mlm`: its eval.json dict, or None when it stopped
    early (train.stop_after). Skipped if already finished."""
    stage_dir = os.path.join(workdir, STAGE)
    done = runner.begin(stage_dir, cfg.train.steps, to_dict(cfg))
    if done is not None:
        say(f"{STAGE}: already finished ({stage_dir}/eval.json); held-out masked-token loss "
            f"{done['heldout_mlm_loss_before']:.3f} -> {done['heldout_mlm_loss_after']:.3f}")
        return done

    data_cfg = dataclasses.replace(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                                   kind="pretrain")
    loader = masking_loader(cfg, data_cfg, tok, cfg.mask_seed)
    eval_loader = masking_loader(cfg, dataclasses.replace(data_cfg, split=cfg.eval_split, shuffle=False),
                                 tok, cfg.mask_seed + 1)
    eval_start = eval_loader.get_state()
    say(f"data: {cfg.data.source} ({loader.epoch_len} records on this process), rows of "
        f"{cfg.train.seq_len} tokens, {cfg.mask_prob:.0%} masked; held-out split {cfg.eval_split!r}; "
        f"mesh {dict(mesh.shape)}")

    tx, schedule = train.make_optimizer(cfg.optim, cfg.train.steps)
    state, state_shardings = train.create_train_state(lambda r: model.init(cfg.model, r), tx, mesh,
                                                      cfg.train.seed)
    say(f"model: {model.count_params(state.params) / 1e6:.1f}M params (encoder)")
    step_fn = train.jit_train_step(
        train.make_train_step(mlm.mlm_loss_fn(cfg.model), mlm.normalizer, tx, schedule,
                              cfg.train.microbatches), mesh, state_shardings)

    loss_before, acc_before = heldout(cfg, state.params, eval_loader, eval_start, mesh)
    state, summary = loop.run_stage(
        stage_dir, state, state_shardings, step_fn, loader, mesh, cfg.train, progress=say,
        evaluate=lambda p: dict(zip(("heldout_mlm_loss", "heldout_mlm_accuracy"),
                                    heldout(cfg, p, eval_loader, eval_start, mesh))))
    if not summary["finished"]:
        say(f"stopped at step {cfg.train.stop_after} of {cfg.train.steps} (train.stop_after); "
            "rerun the same command to continue")
        return None
    loss_after, acc_after = heldout(cfg, state.params, eval_loader, eval_start, mesh)
    result = {"steps": cfg.train.steps, "heldout_mlm_loss_before": loss_before,
              "heldout_mlm_loss_after": loss_after, "heldout_mlm_perplexity_after": float(np.exp(loss_after)),
              "heldout_mlm_accuracy_before": acc_before, "heldout_mlm_accuracy_after": acc_after,
              "train_seconds": summary["seconds"], "data": loader.stats}
    runner.record(stage_dir, result)
    say(f"\nheld-out masked tokens: loss {loss_before:.3f} -> {loss_after:.3f}, accuracy "
        f"{acc_before:.3f} -> {acc_after:.3f} ({summary['seconds']:.0f}s of training)")
    return result


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    cfg.model.validate()  # config mistakes before minutes of tokenizer training
    mlm.check_encoder(cfg.model)
    if not 0.0 < cfg.mask_prob < 1.0:
        raise ConfigError(f"mask_prob={cfg.mask_prob} must be in (0, 1)")
    mesh = sharding.make_mesh(cfg.mesh)
    os.makedirs(workdir, exist_ok=True)
    tok = gpt2_pretrain.corpus_tokenizer(workdir, cfg.data, cfg.model.vocab_size, cfg.tokenizer_sample)
    pretrain_experiment.check_config(cfg, tok, mesh)
    write_run_json(workdir, cfg, "bert_mlm")
    gpt2_pretrain.save_tokenizer(workdir, tok)
    if run(workdir, cfg, mesh, tok) is not None:
        say(f"wrote {workdir}/run.json, tokenizer/, {STAGE}/metrics.jsonl, {STAGE}/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
