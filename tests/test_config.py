"""llm_jax.config: every config section is checked before any work, and a bad
value names its dotted key (values that used to give ZeroDivisionError, an empty
'finished' stage, or a NaN caught only after training started); ModelConfig's
checks, presets and `--set` overrides."""

from __future__ import annotations

import dataclasses

import pytest

from experiments import pipeline, pretrain
from llm_jax import rundir
from llm_jax.config import PRESETS, ConfigError, ModelConfig, apply_overrides, preset, validate_all


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


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=30, num_heads=4), "d_model"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(positions="alibi"), "positions"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="relu"), "mlp"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_layers=0), "num_layers"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kwargs).validate()
    assert issubclass(ConfigError, ValueError)


def test_config_validation_accepts_valid_and_explicit_head_dim():
    assert ModelConfig(d_model=30, num_heads=4, head_dim=8).validate().head_size == 8
    assert ModelConfig(num_heads=4, num_kv_heads=None).kv_heads == 4
    with pytest.raises(ConfigError, match="preset"):
        preset("gpt5")


@dataclasses.dataclass(frozen=True)
class _RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    steps: int = 10
    lr: float = 1e-3
    shuffle: bool = True
    limit: int | None = 5
    name: str = "run"


def test_apply_overrides_parses_types():
    cfg = apply_overrides(_RunConfig(), [
        "model.num_layers=4", "model.dropout=0.25", "model.use_bias=true", "model.num_kv_heads=None",
        "steps=7", "lr=3e-4", "shuffle=0", "limit=none", "name=hello=world",
    ])
    assert cfg.model.num_layers == 4 and isinstance(cfg.model.num_layers, int)
    assert cfg.model.dropout == 0.25 and cfg.model.use_bias is True
    assert cfg.model.num_kv_heads is None
    assert cfg.steps == 7 and cfg.lr == 3e-4 and cfg.shuffle is False and cfg.limit is None
    assert cfg.name == "hello=world"
    assert apply_overrides(cfg, ["limit=12", "model.num_kv_heads=2"]).limit == 12
    assert apply_overrides(_RunConfig(), ["shuffle=no"]).shuffle is False
    assert apply_overrides(_RunConfig(), ["model.use_bias=yes"]).model.use_bias is True


def test_apply_overrides_errors_name_the_key():
    with pytest.raises(ConfigError, match="num_layerz"):
        apply_overrides(_RunConfig(), ["model.num_layerz=3"])
    with pytest.raises(ConfigError, match="stepz"):
        apply_overrides(_RunConfig(), ["stepz=3"])
    with pytest.raises(ConfigError, match="steps"):
        apply_overrides(_RunConfig(), ["steps=abc"])
    with pytest.raises(ConfigError, match="shuffle"):
        apply_overrides(_RunConfig(), ["shuffle=maybe"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(_RunConfig(), ["steps"])
    with pytest.raises(ConfigError, match="model"):
        apply_overrides(_RunConfig(), ["model=not_a_preset"])


def test_apply_overrides_model_preset():
    cfg = apply_overrides(_RunConfig(), ["model=gpt2", "model.num_layers=2"])
    assert cfg.model == dataclasses.replace(PRESETS["gpt2"], num_layers=2)
    assert cfg.model.positions == "learned" and cfg.model.d_model == 768


def test_odd_d_model_with_sinusoidal_positions_is_rejected():
    with pytest.raises(ConfigError, match="even model.d_model"):
        preset("tiny", d_model=33, num_heads=3, num_kv_heads=3, positions="sinusoidal")
