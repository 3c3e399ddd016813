"""A run that starts from a local Hugging Face directory (`init_from=hf:DIR`):
what the model is comes from the checkpoint, how to compute it from the run.

    directory = hf.init_dir(cfg.init_from)         # DIR of "hf:DIR", else None
    tok = load_hf_tokenizer(directory)             # tokenizer.json (+ the template markers)
    model_cfg = hf.init_config(directory, cfg.model, Config().model, tok.vocab_size)
    params = hf.init_params(directory, model_cfg)  # in the stage's init(): a finished stage
                                                   # loads no weights, a LoRA hand-off reloads them

The architecture is DIR/config.json's; only `RUNTIME_FIELDS` (how to compute:
dtype, param_dtype, remat, scan_layers, attention_impl, dropout) come from the
run's model config. Any other model field the run sets to a value the
checkpoint does not have is a ConfigError naming it, never silently dropped.
The vocabulary grows to the tokenizer's when it added tokens (the SFT
template's <prompt>/<response>), new rows the mean of the old (`resize_vocab`).
"""

from __future__ import annotations

import dataclasses
import os

from llm_jax.config import ConfigError, ModelConfig
from llm_jax.hf.config import CONFIG_FILE, read_config
from llm_jax.hf.families import config_from_hf
from llm_jax.hf.family import Params
from llm_jax.hf.pretrained import load_pretrained, resize_vocab

PREFIX = "hf:"

# The model.* fields kept from the run's config; every other one is the checkpoint's.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl", "dropout")


def init_dir(init_from: str) -> str | None:
    """DIR of init_from="hf:DIR", else None (a stage directory, or nothing). A DIR
    that is not a directory is a ConfigError naming it (not a missing file inside it)."""
    if not init_from.startswith(PREFIX):
        return None
    directory = init_from[len(PREFIX):]
    if not os.path.isdir(directory):
        raise ConfigError(f"init_from={init_from}: {directory!r} is not a directory; give a local Hugging Face "
                          "model directory (config.json, *.safetensors, tokenizer.json)")
    return directory


def init_config(directory: str, model: ModelConfig, default: ModelConfig, vocab_size: int) -> ModelConfig:
    """The checkpoint's architecture with `model`'s RUNTIME_FIELDS and a vocabulary
    of at least `vocab_size` (the tokenizer's).

    `default` is the experiment's own default model config: a field of `model`
    outside RUNTIME_FIELDS that differs from it was set by the user, and if it
    also differs from the checkpoint's value it is a ConfigError."""
    arch = config_from_hf(read_config(directory), os.path.join(directory, CONFIG_FILE))
    clashes = [f"model.{f.name}={getattr(model, f.name)!r} (the checkpoint has {getattr(arch, f.name)!r})"
               for f in dataclasses.fields(ModelConfig) if f.name not in RUNTIME_FIELDS
               and getattr(model, f.name) != getattr(default, f.name)
               and getattr(model, f.name) != getattr(arch, f.name)]
    if clashes:
        raise ConfigError(f"init_from={PREFIX}{directory}: the architecture is the checkpoint's config.json, "
                          f"so these settings cannot apply: {', '.join(clashes)}; only model."
                          f"{', model.'.join(RUNTIME_FIELDS)} may be set")
    runtime = {f: getattr(model, f) for f in RUNTIME_FIELDS}
    return dataclasses.replace(arch, vocab_size=max(arch.vocab_size, vocab_size), **runtime).validate()


def init_params(directory: str, model_cfg: ModelConfig) -> Params:
    """The checkpoint's weights (numpy, stored as model_cfg.param_dtype) with the
    vocabulary grown to model_cfg.vocab_size (`init_config`'s)."""
    arch, params = load_pretrained(directory, param_dtype=model_cfg.param_dtype)
    return resize_vocab(arch, params, model_cfg.vocab_size)[1]

