"""Sequence classification fine-tuning: a decoder and an encoder on a labelled task.

    python -m experiments.classify --workdir runs/classify [--set decoder.train.steps=400 ...]
        [--set encoder.data.source=jsonl:labels.jsonl --set encoder.num_classes=5 ...]
        [--set decoder.init_from=runs/demo/pretrain --set decoder.model.d_model=128
         --set decoder.model.d_ff=512 --set decoder.model.max_len=256]

Two stages, each the LM trunk + pooling + a linear head trained with
-log softmax(W h(x) + b)_y (seed 003, `losses.classification_loss`):
  classify_decoder  causal model, h(x) = the hidden state at the last token;
  classify_encoder  bidirectional model (model.causal=False), h(x) = the hidden
                    state at the first token (bos, as a CLS token).
Both start from random weights unless `<stage>.init_from` names a stage
directory of an earlier llm_jax run with a matching LM (e.g. the pipeline's
`pretrain`; its run's tokenizer/ is used), handed off through
`runner.stage_params`.

Data: `builtin:classify` by default (which rule, same / reverse / sort, turns
a line's query into its answer: `llm_jax.data.classify` says why this task),
or `jsonl:PATH` of `{"text", "label"}` records (a bad line is skipped and
counted with its line number; a label >= num_classes stops with the line).
Held-out accuracy before and after training goes to each stage's eval.json:
on the built-in source's `eval` split (queries never trained on), or on
`<stage>.eval_source` (all of its records). Rerunning resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import numpy as np

from llm_jax import cli, launch, loop, model, sharding, train
from llm_jax.config import ConfigError, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, to_dict
from llm_jax.data import classify as classify_data
from llm_jax.data.loader import DataConfig, ShardedLoader
from llm_jax.data.tokenizer import ByteTokenizer, TokenizerError, check_vocab_fits, load_tokenizer
from llm_jax.rundir import is_primary, parse_args, say, write_run_json
from llm_jax.stages import classify, runner

# Narrower than the pipeline's model (d_model 128, d_ff 512): on 2 CPU cores this
# one takes several times fewer seconds per step. Tuning probes (encoder, 1500
# steps, held-out accuracy): 4 layers at lr 1e-3 0.94; 2 layers at lr 3e-3 0.65.
# To hand off the pipeline's `pretrain`, also set <stage>.model.d_model=128,
# .d_ff=512 and .max_len=256 (its shape).
MODEL = ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=64, num_layers=4, num_heads=4,
                    d_ff=256, max_len=64)


@dataclasses.dataclass(frozen=True)
class ClassifyStage:
    model: ModelConfig = MODEL
    pooling: str = "last"  # last | first | mean (see llm_jax.stages.classify)
    num_classes: int = len(classify_data.CLASSES)
    # lr 1e-3: in tuning probes, encoders at 2e-3 and 3e-3 sat near chance for hundreds of steps.
    optim: OptimizerConfig = OptimizerConfig(lr=1e-3, warmup_steps=30, weight_decay=0.01)
    # A built-in line is at most 28 bytes + bos: rows of 32 hold one line each.
    # No median spike rule (as for the reward model): once the loss is near 0.1, one
    # 32-row batch at 0.5 is 2.5x the median from noise alone (a default run rolled
    # back 247 steps for that); non-finite losses still roll back.
    train: TrainConfig = TrainConfig(steps=1200, batch_size=32, seq_len=32, log_every=100,
                                     checkpoint_every=400, spike_factor=0.0)
    # data.seq_len, .batch_size, .num_classes and .kind come from train.*, num_classes
    # and the stage (kind "classification").
    data: DataConfig = DataConfig(source="builtin:classify", size=20_000, max_segments=1)
    eval_source: str = ""  # "": split "eval" of data.source; else every record of this source
    eval_batches: int = 0  # held-out batches at most; 0: the whole held-out set
    init_from: str = ""  # a stage directory of an earlier run with a matching LM


@dataclasses.dataclass(frozen=True)
class Config:
    mesh: MeshConfig = MeshConfig()
    decoder: ClassifyStage = ClassifyStage()
    encoder: ClassifyStage = ClassifyStage(model=dataclasses.replace(MODEL, causal=False), pooling="first",
                                           train=dataclasses.replace(ClassifyStage.train, seed=1))


STAGES = {"classify_decoder": "decoder", "classify_encoder": "encoder"}


def check_stage(name: str, st: ClassifyStage, tok, mesh) -> None:
    """Config mistakes found before anything compiles, named by their field."""
    st.model.validate()
    classify.check_pooling(st.pooling, st.model, f"{name}.pooling")
    if st.num_classes < 2:
        raise ConfigError(f"{name}.num_classes={st.num_classes}: a classifier needs at least 2 classes")
    if st.data.source.startswith("builtin:classify") and st.num_classes != len(classify_data.CLASSES):
        raise ConfigError(f"{name}.num_classes={st.num_classes}, but builtin:classify has "
                          f"{len(classify_data.CLASSES)} classes {classify_data.CLASSES}")
    if st.train.seq_len > st.model.max_len:
        raise ConfigError(f"{name}.train.seq_len={st.train.seq_len} exceeds {name}.model.max_len="
                          f"{st.model.max_len}")
    if st.init_from and not os.path.isdir(os.path.join(st.init_from, "checkpoints")):
        raise ConfigError(f"{name}.init_from={st.init_from}: no checkpoints/ there; expected a stage "
                          f"directory of an earlier llm_jax run")
    sharding.check_model_fits_mesh(st.model, mesh)
    sharding.check_batch_fits_mesh(st.train.batch_size, st.train.microbatches, mesh)
    try:
        check_vocab_fits(tok, st.model.vocab_size)
    except TokenizerError as e:
        raise ConfigError(f"{name}.model.vocab_size: {e}") from None


def run_tokenizer(cfg: Config):
    """The init runs' tokenizer (they must agree), else the byte tokenizer."""
    found = {}
    for field in STAGES.values():
        init = getattr(cfg, field).init_from
        tok_dir = os.path.join(os.path.dirname(os.path.abspath(init)), "tokenizer") if init else ""
        if init and os.path.exists(os.path.join(tok_dir, "meta.json")):
            with open(os.path.join(tok_dir, "meta.json")) as f:
                found[tok_dir] = json.load(f)
    if len({json.dumps(m, sort_keys=True) for m in found.values()}) > 1:
        raise ConfigError(f"decoder.init_from and encoder.init_from come from runs with different "
                          f"tokenizers ({sorted(found)}); one run uses one tokenizer")
    return load_tokenizer(next(iter(found))) if found else ByteTokenizer()


def loader_for(st: ClassifyStage, tok, heldout: bool) -> ShardedLoader:
    # kind is asked for: a jsonl/tfds source of {"text", "label"} would otherwise read as pretraining.
    data = dataclasses.replace(st.data, seq_len=st.train.seq_len, batch_size=st.train.batch_size,
                               num_classes=st.num_classes, kind="classification")
    if heldout:
        source, split = (st.eval_source, "train") if st.eval_source else (data.source, "eval")
        data = dataclasses.replace(data, source=source, split=split, shuffle=False, num_epochs=1)
    return ShardedLoader(data, tok, jax.process_count())


@functools.partial(jax.jit, static_argnums=(0, 1))
def _predict(model_cfg: ModelConfig, pooling: str, params, batch):
    """Predicted class of every (row, segment): [R, S] int. One compile serves before and after."""
    return jax.numpy.argmax(classify.class_logits(model_cfg, params, batch["inputs"], batch["positions"],
                                                  batch["segment_ids"], pooling,
                                                  batch["label_mask"].shape[-1]), axis=-1)


def heldout_accuracy(st: ClassifyStage, params, tok, mesh) -> dict:
    """Accuracy (and per-class accuracy) over the held-out set, one pass in order.
    `params` are host (numpy) arrays, so both calls hit the same compiled program."""
    right = np.zeros(st.num_classes)
    count = np.zeros(st.num_classes)
    for i, batch in enumerate(loader_for(st, tok, heldout=True)):
        if st.eval_batches and i >= st.eval_batches:
            break
        pred = np.asarray(jax.device_get(_predict(st.model, st.pooling, params,
                                                  sharding.shard_batch(batch, mesh))))
        labels, mask = batch["labels"], batch["label_mask"] > 0
        # A multi-process run would need an all-gather of the batch here too: this
        # evaluation assumes one process (the built-in run), like the pipeline's probes.
        np.add.at(count, labels[mask], 1)
        np.add.at(right, labels[mask], (pred[mask] == labels[mask]).astype(float))
    return {"accuracy": float(right.sum() / max(count.sum(), 1)), "items": int(count.sum()),
            "by_class": {str(c): float(right[c] / count[c]) if count[c] else None
                         for c in range(st.num_classes)}}


def initial_params(name: str, st: ClassifyStage, mesh) -> dict:
    """{"model": pretrained (init_from) or fresh LM, "head": fresh}, placed on the mesh."""
    seed = jax.random.PRNGKey(st.train.seed)
    lm_rng, head_rng = jax.random.split(seed)
    if st.init_from:
        like = runner.abstract_params(lambda r: model.init(st.model, r), mesh, jax.random.PRNGKey(0))
        path = os.path.normpath(st.init_from)
        lm = runner.stage_params(os.path.dirname(path), os.path.basename(path), like)
        say(f"{name}: LM weights from {st.init_from}")
    else:
        lm = jax.jit(lambda r: model.init(st.model, r))(lm_rng)
    return classify.init_classifier_params(st.model, lm, st.num_classes, head_rng)


def run_stage(workdir: str, name: str, cfg: Config, mesh, tok) -> dict | None:
    """Trains and evaluates one stage; its eval.json if it finished, else None."""
    st = getattr(cfg, STAGES[name])
    stage_dir = os.path.join(workdir, name)
    done = runner.begin(stage_dir, st.train.steps, to_dict(st))  # has "model", as generate expects
    if done is not None:
        return done
    params = initial_params(name, st, mesh)
    before = heldout_accuracy(st, runner.host_params(params), tok, mesh)
    tx, schedule = train.make_optimizer(st.optim, st.train.steps)
    state, shardings = train.state_from_params(params, tx, mesh, st.train.seed)
    del params
    loader = loader_for(st, tok, heldout=False)
    step = train.jit_train_step(train.make_train_step(classify.classify_loss_fn(st.model, st.pooling),
                                                      classify.label_count, tx, schedule,
                                                      st.train.microbatches), mesh, shardings)
    state, summary = loop.run_stage(stage_dir, state, shardings, step, loader, mesh, st.train, progress=say)
    if not summary["finished"]:
        return None
    after = heldout_accuracy(st, runner.host_params(state.params), tok, mesh)
    result = {"steps": st.train.steps, "train_seconds": summary["seconds"], "pooling": st.pooling,
              "causal": st.model.causal, "init_from": st.init_from or None,
              "chance": 1.0 / st.num_classes, "heldout_items": after["items"],
              "heldout_accuracy_before": before["accuracy"], "heldout_accuracy_after": after["accuracy"],
              "by_class_before": before["by_class"], "by_class_after": after["by_class"],
              "data": loader.stats}
    runner.record(stage_dir, result)
    return result


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    mesh = sharding.make_mesh(cfg.mesh)
    tok = run_tokenizer(cfg)
    for name, field in STAGES.items():
        check_stage(field, getattr(cfg, field), tok, mesh)
    os.makedirs(workdir, exist_ok=True)
    write_run_json(workdir, cfg, "classify")
    if is_primary():
        tok.save(os.path.join(workdir, "tokenizer"))
    t0 = time.time()
    for name in STAGES:
        say(f"\n== {name} ==")
        result = run_stage(workdir, name, cfg, mesh, tok)
        if result is None:
            say(f"{name} stopped early (train.stop_after); rerun the same command to continue")
            return 0
        say(f"{name}: held-out accuracy {result['heldout_accuracy_before']:.3f} -> "
            f"{result['heldout_accuracy_after']:.3f} on {result['heldout_items']} items "
            f"(chance {result['chance']:.3f}; pooling {result['pooling']}, {result['train_seconds']:.0f}s)")
    say(f"\ndone in {time.time() - t0:.0f}s: {workdir}/classify_*/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
