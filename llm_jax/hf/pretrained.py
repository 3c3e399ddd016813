"""A local Hugging Face directory in and out: `load_pretrained` reads config.json
and the safetensors weights into a ModelConfig and a numpy params tree,
`save_pretrained` writes a directory `transformers` loads as the same model.

Whatever the family, every tensor is checked against the shape its config
implies, and a tensor the family's mapping does not use (other than the buffers
it names, `Family.buffers`) is an error: it means the checkpoint computes
something this model would not.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import HFError
from llm_jax.hf.config import CONFIG_FILE, read_config
from llm_jax.hf.families import by_model_type, by_name, config_from_hf, config_to_hf, family_of
from llm_jax.hf.family import LoadOptions, Params, Reader
from llm_jax.hf.safetensors import WEIGHTS_FILE, read_weights, write_safetensors


def load_pretrained(directory: str, *, param_dtype: str = "float32",
                    init_missing_head: bool = False, rng_seed: int = 0) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params as numpy arrays) of a local HF directory.

    `param_dtype` is the storage dtype of the returned params (the config's
    `param_dtype` too); everything else about compute (dtype, remat, ...) is for
    the caller to set with `dataclasses.replace`. `init_missing_head`: a BERT
    checkpoint without its masked-LM head gets a fresh one drawn with `rng_seed`."""
    hf = read_config(directory)
    where = os.path.join(directory, CONFIG_FILE)
    cfg = dataclasses.replace(config_from_hf(hf, where), param_dtype=param_dtype)
    family = by_model_type(hf, where)
    tensors = read_weights(directory)
    if family.renames:
        tensors = {_rename(n, family.renames): a for n, a in tensors.items()}
    dt = np.dtype(param_dtype if param_dtype != "bfloat16" else ml_dtypes.bfloat16)
    r = Reader(tensors, directory, family.prefix, dt)
    params = family.params_from_hf(r, cfg, LoadOptions(init_missing_head, rng_seed))
    unused = sorted(n for n in tensors if n not in r.used and not family.ignores(n, cfg))
    if unused:
        raise HFError(f"{directory}: {len(unused)} tensors this llm_jax config does not use, e.g. "
                      f"{unused[:5]}: the checkpoint's architecture differs from {family.name}'s")
    return cfg, jax.tree.map(lambda a: np.asarray(a, dt), params)  # a fresh BERT head is float32


def _rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        name = name.replace(old, new)
    return name


def hf_weights(cfg: ModelConfig, params: Params) -> tuple[str, dict[str, np.ndarray]]:
    """(family, HF tensor name -> numpy array) of llm_jax params."""
    family = family_of(cfg)
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    tensors = {n: np.ascontiguousarray(a) for n, a in by_name(family).params_to_hf(host, cfg).items()}
    return family, tensors


def save_pretrained(directory: str, cfg: ModelConfig, params: Params, tokenizer=None) -> str:
    """Writes config.json + model.safetensors (+ the tokenizer's files, when it has
    a `save_hf`) so that `transformers.AutoModelFor...from_pretrained(directory)`
    loads the same model. Returns the family it was written as."""
    family, tensors = hf_weights(cfg, params)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(cfg, family, tokenizer), f, indent=2)
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors)
    if tokenizer is not None and hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(directory)
    return family


def resize_vocab(cfg: ModelConfig, params: Params, vocab_size: int) -> tuple[ModelConfig, Params]:
    """Grows the vocabulary to `vocab_size` (a tokenizer that added tokens, e.g. the
    SFT template's <prompt>/<response>): new embedding rows (and output columns,
    biases) are the mean of the existing ones, so a new token starts as an average
    token rather than noise."""
    old = cfg.vocab_size
    if vocab_size < old:
        raise HFError(f"resize_vocab: cannot shrink the vocabulary from {old} to {vocab_size}")
    if vocab_size == old:
        return cfg, params
    grow = vocab_size - old

    def extend(a, axis):
        a = np.asarray(a)
        mean = a.mean(axis=axis, keepdims=True).astype(a.dtype)
        return np.concatenate([a, np.repeat(mean, grow, axis=axis)], axis=axis)

    params = dict(params, embed=extend(params["embed"], 0))
    if "lm_head" in params:
        params["lm_head"] = extend(params["lm_head"], 1)
    if "lm_bias" in params:
        params["lm_bias"] = extend(params["lm_bias"], 0)
    return dataclasses.replace(cfg, vocab_size=vocab_size), params
