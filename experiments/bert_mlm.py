"""BERT-base-shape (110M) masked-LM pretraining on a TFDS text corpus (default lm1b).

    python -m experiments.bert_mlm --workdir runs/bert [--set train.steps=... ...]

The model is `preset("bert")` (bidirectional encoder, learned positions,
LayerNorm, GELU, biases; pre-norm and no token-type embeddings, unlike BERT
itself); the objective is BERT's masked LM (Devlin et al., 2019): 15% of the real tokens
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
import sys

from llm_jax import cli, launch, sharding
from llm_jax.config import MeshConfig, ModelConfig, preset
from llm_jax.data.corpus import corpus_tokenizer
from llm_jax.rundir import parse_args, say, write_run_json
from llm_jax.stages import mlm, runner


@dataclasses.dataclass(frozen=True)
class Config(mlm.MLMConfig):
    """The stage's settings (BERT's recipe) plus the run's; the BPE vocabulary size is
    model.vocab_size (one knob for both)."""

    model: ModelConfig = preset("bert")
    mesh: MeshConfig = MeshConfig()
    data_shards: int = 0  # 0: one per process; fixed N: the same batches and masks on any process count
    tokenizer_sample: int = 200_000  # training records the BPE is trained on


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    mlm.check_encoder(cfg.model)
    cfg.validate()
    mesh = sharding.make_mesh(cfg.mesh)
    runner.check("mlm", cfg, cfg.model, mesh, data_shards=cfg.data_shards)
    write_run_json(workdir, cfg, "bert_mlm")
    tok = corpus_tokenizer(workdir, cfg.data, cfg.model.vocab_size, cfg.tokenizer_sample)
    r = runner.run(workdir, mlm.stage(cfg.model, cfg, tok, mesh, data_shards=cfg.data_shards), mesh)
    if r is not None:  # None: stopped early (train.stop_after)
        say(f"\nheld-out masked tokens: loss {r['heldout_mlm_loss_before']:.3f} -> {r['heldout_mlm_loss_after']:.3f}, "
            f"accuracy {r['heldout_mlm_accuracy_before']:.3f} -> {r['heldout_mlm_accuracy_after']:.3f} "
            f"({r['train_seconds']:.0f}s of training); wrote {workdir}/run.json, tokenizer/, mlm/")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
