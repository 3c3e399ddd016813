"""Every config section is checked before any work, and a bad value names its
dotted key (values that used to give ZeroDivisionError, an empty 'finished'
stage, or a NaN caught only after training started)."""

import pytest

from experiments import pipeline, pretrain
from llm_jax import rundir
from llm_jax.config import ConfigError, validate_all


@pytest.mark.parametrize("setting, message", [
    ("pretrain.train.steps=-5", r"pretrain\.train\.steps=-5: must be a finite number > 0"),
    ("sft.train.steps=0", r"sft\.train\.steps=0: must be a finite number > 0"),
    ("rm.train.checkpoint_every=0", r"rm\.train\.checkpoint_every=0: must be a finite number > 0"),
    ("dpo.train.log_every=0", r"dpo\.train\.log_every=0"),
    ("pretrain.train.microbatches=0", r"pretrain\.train\.microbatches=0"),
    ("pretrain.train.microbatches=3", r"pretrain\.train\.batch_size=\d+ is not divisible by "
                                      r"pretrain\.train\.microbatches=3"),
    ("sft.optim.lr=nan", r"sft\.optim\.lr=nan: must be a finite number > 0"),
    ("sft.optim.lr=-1e-3", r"sft\.optim\.lr=-0\.001"),
    ("dpo.optim.b2=1.5", r"dpo\.optim\.b2=1\.5: must be a finite number in \[0, 1\]"),
    ("ppo.optim.clip_norm=0", r"ppo\.optim\.clip_norm=0\.0"),
    ("mesh.data=0", r"mesh \{'data': 0, 'fsdp': 1, 'tensor': 1\}"),
    ("model.num_layers=0", r"model\.num_layers=0 must be positive"),
])
def test_bad_values_stop_at_parse_time_with_their_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        rundir.parse_args("t", pipeline.Config(), ["--workdir", "unused", "--set", setting])


def test_defaults_of_every_experiment_are_valid():
    for cfg in (pipeline.Config(), pretrain.Config()):
        assert validate_all(cfg) is cfg
    # None is a legal value for the optional fields (no clipping, decay over the run).
    rundir.parse_args("t", pipeline.Config(), ["--workdir", "unused", "--set", "sft.optim.clip_norm=none",
                                               "--set", "sft.optim.decay_steps=none"])
