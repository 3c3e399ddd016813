"""experiments.classify: both classifiers run end to end with tiny overrides, the
decoder starts from an earlier run's weights, and a rerun trains nothing."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import classify as classify_experiment
from llm_jax import model, train
from llm_jax.config import ModelConfig, OptimizerConfig
from llm_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


TINY_SETS = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_ff=64", "model.max_len=64",
             "train.steps=1", "train.batch_size=8", "train.seq_len=32", "train.log_every=1", "data.size=200"]


def _argv(workdir, sets):
    return ["--workdir", workdir] + [x for s in sets for x in ("--set", s)]


def test_experiment_smoke_resume_and_handoff(tmp_path, capsys):
    from llm_jax import checkpoint

    # An earlier run's stage with a trained LM: its checkpoints/ and the run's tokenizer/.
    cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=64)
    lm = model.init(cfg, jax.random.PRNGKey(7))
    tx, _ = train.make_optimizer(OptimizerConfig(), 10)
    ckpts = checkpoint.Checkpoints(str(tmp_path / "base" / "pretrain" / "checkpoints"), save_every=1,
                                   async_save=False)
    ckpts.save(3, train.TrainState(step=jnp.asarray(3, jnp.int32), params=lm, opt_state=tx.init(lm),
                                   rng=jax.random.PRNGKey(0)), force=True)
    ckpts.close()
    TOK.save(str(tmp_path / "base" / "tokenizer"))

    workdir = str(tmp_path / "run")
    sets = [f"{stage}.{s}" for stage in ("decoder", "encoder") for s in TINY_SETS]
    sets += [f"decoder.init_from={tmp_path}/base/pretrain", "encoder.pooling=mean"]
    assert classify_experiment.main(_argv(workdir, sets)) == 0
    for name, pooling, causal in (("classify_decoder", "last", True), ("classify_encoder", "mean", False)):
        ev = json.load(open(os.path.join(workdir, name, "eval.json")))
        assert (ev["steps"], ev["pooling"], ev["causal"], ev["heldout_items"]) == (1, pooling, causal, 100)
        assert 0.0 <= ev["heldout_accuracy_before"] <= 1.0 and 0.0 <= ev["heldout_accuracy_after"] <= 1.0
        rows = [json.loads(line) for line in open(os.path.join(workdir, name, "metrics.jsonl"))]
        assert [r["step"] for r in rows] == [1] and "accuracy" in rows[0]
        assert json.load(open(os.path.join(workdir, name, "config.json")))["model"]["causal"] is causal
    assert os.path.exists(os.path.join(workdir, "tokenizer", "meta.json"))
    # The decoder started from the earlier run's weights: its step-0 checkpoint holds them.
    like = jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))
    start = checkpoint.load_params(os.path.join(workdir, "classify_decoder", "checkpoints"), like, step=0,
                                   key="model")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), lm, start)
    capsys.readouterr()
    assert classify_experiment.main(_argv(workdir, sets)) == 0  # rerun: both finished, nothing trains
    assert "step " not in capsys.readouterr().out.replace("steps", "")
