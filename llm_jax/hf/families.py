"""The registry of model families, and the config mapping that dispatches on it.

To add a family: write `llm_jax/hf/<name>.py` with its `FAMILY` (see
`llm_jax.hf.family.Family`; gpt2.py is the shortest example) and add it to
`FAMILIES` below. Loading, saving, the export CLI, `family_of` and the list of
supported model types all follow from this tuple.
"""

from __future__ import annotations

from llm_jax.config import ConfigError, ModelConfig
from llm_jax.errors import HFError
from llm_jax.hf.bert import FAMILY as BERT
from llm_jax.hf.gpt2 import FAMILY as GPT2
from llm_jax.hf.llama import FAMILY as LLAMA
from llm_jax.hf.config import CONFIG_FILE, Fields, special_ids
from llm_jax.hf.family import Family

# In the order `family_of` tries them when exporting.
FAMILIES: tuple[Family, ...] = (GPT2, LLAMA, BERT)


def by_model_type(hf: dict, where: str) -> Family:
    """The family that reads a config.json of this `model_type`."""
    kind = hf.get("model_type")
    for family in FAMILIES:
        if kind in family.model_types:
            return family
    supported = ", ".join(t for family in FAMILIES for t in family.model_types)
    raise HFError(f"{where}: model_type={kind!r} is not supported (supported: {supported})")


def by_name(name: str) -> Family:
    """The family exported as `name` (a `family_of` result)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise HFError(f"unknown family {name!r} (known: {', '.join(f.name for f in FAMILIES)})")


def config_from_hf(hf: dict, where: str = CONFIG_FILE) -> ModelConfig:
    """The llm_jax ModelConfig of a HF config.json dict (float32; see `load_pretrained`).
    Every field is read with its type checked (`Fields`); a combination ModelConfig
    refuses is an HFError naming `where` too."""
    if not isinstance(hf, dict):
        raise HFError(f"{where}: a JSON {type(hf).__name__}, not the JSON object of a model config")
    family = by_model_type(hf, where)
    try:
        return family.config_from_hf(hf, where, Fields(hf, where)).validate()
    except ConfigError as e:
        raise HFError(f"{where}: {e}") from None


def family_of(cfg: ModelConfig) -> str:
    """The HF family a config can be exported as, or an HFError that says why none fits."""
    reasons = []
    for family in FAMILIES:
        wrong = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in family.shape.items() if getattr(cfg, k) != v]
        if not family.grouped_query:  # its q, k, v and o weights are all [d_model, d_model]
            if cfg.kv_heads != cfg.num_heads:
                wrong.append(f"num_kv_heads={cfg.num_kv_heads!r} (needs None or num_heads={cfg.num_heads}: "
                             f"{family.name} has no grouped-query attention)")
            if cfg.head_size * cfg.num_heads != cfg.d_model:
                wrong.append(f"head_dim={cfg.head_dim!r} (needs None or d_model/num_heads="
                             f"{cfg.d_model // cfg.num_heads})")
        if not wrong:
            return family.name
        reasons.append(f"{family.name}: model.{', model.'.join(wrong)}")
    raise HFError("this model matches no Hugging Face family llm_jax exports; " + "; ".join(reasons))


def config_to_hf(cfg: ModelConfig, family: str, tokenizer=None) -> dict:
    """The config.json dict of `cfg` as `family` (see `family_of`), with the
    tokenizer's special token ids when one is given."""
    # param_dtype is "float32" | "bfloat16" (ModelConfig validates it), as HF spells them.
    return {**by_name(family).config_to_hf(cfg), "torch_dtype": cfg.param_dtype, **special_ids(tokenizer)}
