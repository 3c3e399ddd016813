"""What a model family is to llm_jax.hf: one `Family` value per file (gpt2.py,
llama.py, bert.py), listed once in `llm_jax.hf.families.FAMILIES`.

A family is the two directions of two mappings, between a HF config.json and a
`ModelConfig`, and between HF tensor names and the llm_jax params tree (see
model.py for its shapes; layers are stacked on a leading L axis), plus the
ModelConfig fields it needs to be exported as. Everything around them (reading
files, dispatching on `model_type`, refusing unused tensors, writing a directory)
is shared, so adding a family is one file and one line in the registry.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import HFError
from llm_jax.hf.config import Fields

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What a caller of `load_pretrained` may ask of a family's import beyond the
    tensors: a fresh masked-LM head for a checkpoint without one (BERT's BertModel),
    drawn with `rng_seed`."""
    init_missing_head: bool = False
    rng_seed: int = 0


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model family. `name` is the model_type it is exported as (and what
    `family_of` returns); `model_types` are those read as it (Mistral's config is
    read by Llama's mapping). `prefix` is the model's tensor-name prefix, which
    checkpoints may or may not carry ("transformer.h.0" or "h.0"); `renames` are
    (old, new) substrings of tensor names from older checkpoints."""
    name: str
    model_types: tuple[str, ...]
    prefix: str
    # (config.json dict, its path for errors, typed reads of it) -> ModelConfig (float32);
    # refuses by name any setting the model does not implement.
    config_from_hf: Callable[[dict, str, Fields], ModelConfig]
    # ModelConfig -> config.json dict, without torch_dtype and special token ids (added for all).
    config_to_hf: Callable[[ModelConfig], dict]
    # The ModelConfig fields (name -> value) a model needs to be exported as this family.
    shape: dict[str, Any]
    # Reader of the checkpoint's tensors -> params tree (numpy).
    params_from_hf: Callable[[Reader, ModelConfig, LoadOptions], Params]
    # params tree (numpy) -> HF tensor name -> array, names with the full prefix.
    params_to_hf: Callable[[Params, ModelConfig], dict[str, np.ndarray]]
    # False: q, k, v and o are all [d_model, d_model] in this family's checkpoints, so
    # exporting needs num_kv_heads == num_heads and head_dim == d_model / num_heads.
    grouped_query: bool = True
    renames: tuple[tuple[str, str], ...] = ()
    # Tensors a checkpoint may hold that carry no weights of ours (regular expressions
    # matched against the whole name): causal-mask buffers, rotary caches, heads this
    # model does not have. Any other tensor the mapping leaves unused is an error.
    buffers: tuple[str, ...] = ()
    # The output matrix's names, skipped when the head is tied to the embedding.
    tied_head: tuple[str, ...] = ()

    def ignores(self, name: str, cfg: ModelConfig) -> bool:
        """Whether a tensor the mapping did not use may be left out of the params."""
        if any(re.fullmatch(pattern, name) for pattern in self.buffers):
            return True
        return cfg.tie_embeddings and name in self.tied_head


class Reader:
    """Named access to a checkpoint's tensors that says which one is missing or
    misshapen, and remembers which were used (to report those that were not).

    Names are given without the model's prefix: checkpoints differ in it
    ("transformer.h.0" or "h.0", "bert.encoder" or "encoder")."""

    def __init__(self, tensors: dict[str, np.ndarray], where: str, prefix: str, dtype: np.dtype):
        # Each tensor is read straight into the params' storage dtype: through float32, a
        # bfloat16 checkpoint loaded as bfloat16 peaked at 3x its size in host memory.
        # The mappings only reshape, transpose and stack, so the result is the same.
        self.where, self.tensors, self.used, self.dtype = where, tensors, set(), dtype
        self.names = {n[len(prefix):] if n.startswith(prefix) else n: n for n in tensors}

    def has(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.names:
            raise HFError(f"{self.where}: tensor {name} is missing")
        a = self.tensors[self.names[name]]
        if tuple(a.shape) != tuple(shape):
            raise HFError(f"{self.where}: tensor {self.names[name]} has shape {tuple(a.shape)}, "
                          f"the config implies {shape}")
        self.used.add(self.names[name])
        return np.array(a, self.dtype)  # a copy: the params do not hold the memory-mapped files

    def stack(self, pattern: str, layers: int, shape: tuple[int, ...], fn: Callable = lambda a: a) -> np.ndarray:
        """[layers, ...] of fn(tensor) per layer, filled in place (one layer's copy at a time)."""
        first = fn(self(pattern.format(0), shape))
        out = np.empty((layers, *first.shape), first.dtype)
        out[0] = first
        for i in range(1, layers):
            out[i] = fn(self(pattern.format(i), shape))
        return out


def layer_norm(r: Reader, name: str, size: int, layers: int = 0) -> Params:
    """A LayerNorm's {"scale", "bias"} from tensors `name`.weight and `name`.bias;
    with `layers` > 0, `name` holds "{}" for the layer index and each is stacked [L, size]."""
    get = (lambda n: r.stack(n, layers, (size,))) if layers else (lambda n: r(n, (size,)))
    return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}

