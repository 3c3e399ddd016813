"""Sequence classification fine-tuning: a decoder and an encoder on a labelled task.

    python -m experiments.classify --workdir runs/classify [--set decoder.train.steps=400 ...]
        [--set encoder.data.source=jsonl:labels.jsonl --set encoder.num_classes=5 ...]
        [--set decoder.init_from=runs/demo/pretrain --set decoder.model.d_model=128
         --set decoder.model.d_ff=512 --set decoder.model.max_len=256]

Two stages, each the LM trunk + pooling + a linear head trained with
-log softmax(W h(x) + b)_y (`losses.classification_loss`):
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
import json
import os
import sys
import time

from llm_jax import cli, launch, sharding
from llm_jax.config import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data import classify as classify_data
from llm_jax.data.loader import DataConfig
from llm_jax.data.tokenizer import ByteTokenizer, check_vocab_fits, load_tokenizer
from llm_jax.errors import ConfigError, TokenizerError
from llm_jax.rundir import is_primary, parse_args, say, write_run_json
from llm_jax.stages import classify, runner

# Narrower than the pipeline's model (d_model 128, d_ff 512): on 2 CPU cores this
# one takes several times fewer seconds per step. Tuning probes (encoder, 1500
# steps, held-out accuracy): 4 layers at lr 1e-3 0.94; 2 layers at lr 3e-3 0.65.
# To hand off the pipeline's `pretrain`, also set <stage>.model.d_model=128,
# .d_ff=512 and .max_len=256 (its shape).
MODEL = ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=64, num_layers=4, num_heads=4,
                    d_ff=256, max_len=64)

DECODER = classify.ClassifyConfig(
    model=MODEL, pooling="last", num_classes=len(classify_data.CLASSES),
    # lr 1e-3: in tuning probes, encoders at 2e-3 and 3e-3 sat near chance for hundreds of steps.
    optim=OptimizerConfig(lr=1e-3, warmup_steps=30, weight_decay=0.01),
    # A built-in line is at most 28 bytes + bos: rows of 32 hold one line each.
    # No median spike rule (as for the reward model): once the loss is near 0.1, one
    # 32-row batch at 0.5 is 2.5x the median from noise alone (a default run rolled
    # back 247 steps for that); non-finite losses still roll back.
    train=TrainConfig(steps=1200, batch_size=32, seq_len=32, log_every=100, checkpoint_every=400,
                      spike_factor=0.0),
    data=DataConfig(source="builtin:classify", size=20_000, max_segments=1))


@dataclasses.dataclass(frozen=True)
class Config:
    mesh: MeshConfig = MeshConfig()
    decoder: classify.ClassifyConfig = DECODER
    encoder: classify.ClassifyConfig = dataclasses.replace(
        DECODER, model=dataclasses.replace(MODEL, causal=False), pooling="first",
        train=dataclasses.replace(DECODER.train, seed=1))


STAGES = {"classify_decoder": "decoder", "classify_encoder": "encoder"}


def check_stage(field: str, st: classify.ClassifyConfig, tok, mesh) -> None:
    """Config mistakes found before anything compiles, named by their field."""
    st.validate(field)
    if st.data.source.startswith("builtin:classify") and st.num_classes != len(classify_data.CLASSES):
        raise ConfigError(f"{field}.num_classes={st.num_classes}, but builtin:classify has "
                          f"{len(classify_data.CLASSES)} classes {classify_data.CLASSES}")
    runner.check(field, st, st.model, mesh)
    try:
        check_vocab_fits(tok, st.model.vocab_size)
    except TokenizerError as e:
        raise ConfigError(f"{field}.model.vocab_size: {e}") from None


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


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    mesh = sharding.make_mesh(cfg.mesh)
    tok = run_tokenizer(cfg)
    for field in STAGES.values():
        check_stage(field, getattr(cfg, field), tok, mesh)
    write_run_json(workdir, cfg, "classify")
    if is_primary():
        tok.save(os.path.join(workdir, "tokenizer"))
    t0 = time.time()
    for name, field in STAGES.items():
        say(f"\n== {name} ==")
        result = runner.run(workdir, classify.stage(name, getattr(cfg, field), tok, mesh), mesh)
        if result is None:
            return 0
        say(f"{name}: held-out accuracy {result['heldout_accuracy_before']:.3f} -> "
            f"{result['heldout_accuracy_after']:.3f} on {result['heldout_items']} items "
            f"(chance {result['chance']:.3f}; pooling {result['pooling']}, {result['train_seconds']:.0f}s)")
    say(f"\ndone in {time.time() - t0:.0f}s: {workdir}/classify_*/eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
