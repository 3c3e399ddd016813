"""Hugging Face interop: import and export GPT-2, Llama-family and BERT checkpoints.

    cfg, params = hf.load_pretrained("path/to/hf_dir")          # config.json + *.safetensors
    hf.save_pretrained("out_dir", cfg, params, tokenizer=tok)   # a directory `transformers` loads
    cfg = hf.init_config(d, run_model, default_model, tok.vocab_size)  # an experiment's init_from=hf:DIR
    python -m llm_jax.hf export --workdir runs/x --stage sft --out hf_out

Only local directories, and only `config.json` + safetensors (single file or
sharded with `model.safetensors.index.json`): weights never pass through pickle,
and this package needs neither torch nor transformers. What is read from disk is
checked before it is used (the safetensors header against the format spec, the
index's shard paths, each config.json field's type): a malformed file is an
HFError naming the file and the tensor or field, never a wrong read.

Families (`model_type` in config.json), one module each:
    gpt2.py    gpt2             learned positions, LayerNorm, tanh GELU, biases, tied head
    llama.py   llama, mistral   RoPE (Llama 3 scaling), RMSNorm, SwiGLU, grouped-query attention
    bert.py    bert             post-norm encoder, token types, erf GELU, the masked-LM head
A checkpoint with a setting this model does not implement (GPT-2's attention
scaled by layer index, Mistral's sliding window shorter than the context, BERT's
relative positions, a RoPE scaling other than Llama 3's ...) is refused with the
setting's name, never loaded into a model that would compute something else.

The rest is shared: safetensors.py (the file format), config.py (config.json and
its typed field reads), family.py (what a family is), families.py (the registry:
adding a family is one module and one line there), pretrained.py (load and save
a directory), init_from.py (an experiment's init_from=hf:DIR: the checkpoint's
architecture with the run's compute settings, its weights, vocabulary grown),
export.py (the CLI).
"""

from llm_jax.errors import HFError
from llm_jax.hf.config import CONFIG_FILE, read_config
from llm_jax.hf.export import export_stage, main
from llm_jax.hf.families import FAMILIES, config_from_hf, config_to_hf, family_of
from llm_jax.hf.family import Family, Params
from llm_jax.hf.init_from import RUNTIME_FIELDS, init_config, init_dir, init_params
from llm_jax.hf.pretrained import hf_weights, load_pretrained, resize_vocab, save_pretrained
from llm_jax.hf.safetensors import INDEX_FILE, WEIGHTS_FILE, read_safetensors, read_weights, write_safetensors

__all__ = ["CONFIG_FILE", "FAMILIES", "INDEX_FILE", "RUNTIME_FIELDS", "WEIGHTS_FILE", "Family", "HFError",
           "Params", "config_from_hf", "config_to_hf", "export_stage", "family_of", "hf_weights", "init_config",
           "init_dir", "init_params", "load_pretrained", "main", "read_config", "read_safetensors",
           "read_weights", "resize_vocab", "save_pretrained", "write_safetensors"]
