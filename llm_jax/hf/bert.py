"""BERT (`model_type` bert, BertForMaskedLM): a post-norm encoder with token types,
erf GELU and the masked-LM head (a dense transform, LayerNorm, the tied decoder
and its bias), after Devlin et al. 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding".

A BertModel checkpoint has no masked-LM head: it is refused unless the caller
passes `init_missing_head=True`, which gives the head `model.init` would (e.g.
to fine-tune a classifier on the encoder). Relative position embeddings, a
decoder configuration and an untied decoder are refused by name.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from llm_jax import model
from llm_jax.config import ModelConfig
from llm_jax.errors import HFError
from llm_jax.hf.config import Fields, require
from llm_jax.hf.family import Family, LoadOptions, Params, Reader, layer_norm


def config_from_hf(hf: dict, where: str, f: Fields) -> ModelConfig:
    require(hf, where, "hidden_act", ("gelu",), "gelu")
    require(hf, where, "position_embedding_type", ("absolute",), "absolute")
    require(hf, where, "is_decoder", (False,), False)
    require(hf, where, "tie_word_embeddings", (True,), True)  # the masked-LM decoder is the embedding
    d, n = f.int("hidden_size"), f.int("num_attention_heads")
    if d % n:
        raise HFError(f"{where}: hidden_size={d} is not divisible by num_attention_heads={n}")
    return ModelConfig(vocab_size=f.int("vocab_size"), d_model=d, num_layers=f.int("num_hidden_layers"),
                       num_heads=n, d_ff=f.int("intermediate_size"), max_len=f.int("max_position_embeddings"),
                       causal=False, positions="learned", norm="layernorm",
                       norm_eps=f.number("layer_norm_eps", 1e-12, positive=False), norm_position="post",
                       mlp="gelu_exact", use_bias=True, type_vocab_size=f.int("type_vocab_size", 2),
                       lm_head_transform=True, lm_head_bias=True, tie_embeddings=True)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
            "max_position_embeddings": cfg.max_len, "type_vocab_size": max(cfg.type_vocab_size, 1),
            "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute",
            "tie_word_embeddings": True}


def params_from_hf(r: Reader, c: ModelConfig, load: LoadOptions) -> Params:
    L, D, N, H, F, V = c.num_layers, c.d_model, c.num_heads, c.head_size, c.d_ff, c.vocab_size
    h = "encoder.layer.{}."

    def dense(name, shape_out_in, fn):
        return (r.stack(h + name + ".weight", L, shape_out_in, fn),
                r.stack(h + name + ".bias", L, (shape_out_in[0],)))

    qkv = {x: dense(f"attention.self.{name}", (D, D), lambda w: w.T.reshape(D, N, H))
           for x, name in (("q", "query"), ("k", "key"), ("v", "value"))}
    o, o_bias = dense("attention.output.dense", (D, D), lambda w: w.T.reshape(N, H, D))
    up, up_bias = dense("intermediate.dense", (F, D), np.transpose)
    down, down_bias = dense("output.dense", (D, F), np.transpose)
    attn = {"o": o, "o_bias": o_bias}
    for x, (w, b) in qkv.items():
        attn[x], attn[x + "_bias"] = w, b.reshape(L, N, H)
    params = {
        "embed": r("embeddings.word_embeddings.weight", (V, D)),
        "pos_embed": r("embeddings.position_embeddings.weight", (c.max_len, D)),
        "type_embed": r("embeddings.token_type_embeddings.weight", (c.type_vocab_size, D)),
        "embed_norm": layer_norm(r, "embeddings.LayerNorm", D),
        "layers": {"attn_norm": layer_norm(r, h + "attention.output.LayerNorm", D, L),
                   "mlp_norm": layer_norm(r, h + "output.LayerNorm", D, L),
                   "attn": attn, "mlp": {"up": up, "up_bias": up_bias, "down": down, "down_bias": down_bias}},
    }
    t = "cls.predictions."
    if r.has(t + "transform.dense.weight"):
        params["lm_transform"] = {"kernel": r(t + "transform.dense.weight", (D, D)).T,
                                  "bias": r(t + "transform.dense.bias", (D,)),
                                  "norm": layer_norm(r, t + "transform.LayerNorm", D)}
        bias = t + "bias" if r.has(t + "bias") else t + "decoder.bias"
        params["lm_bias"] = r(bias, (V,))
    elif load.init_missing_head:
        params = _fresh_head(c, params, load.rng_seed)
    else:
        raise HFError(f"{r.where}: no masked-LM head (cls.predictions.*): a BertModel checkpoint; "
                      "pass init_missing_head=True for a freshly initialised head (e.g. to fine-tune a classifier)")
    return params


def params_to_hf(p: Params, c: ModelConfig) -> dict[str, np.ndarray]:
    L, D = c.num_layers, c.d_model
    a, m, b = p["layers"]["attn"], p["layers"]["mlp"], "bert."
    type_embed = p.get("type_embed", np.zeros((1, D), np.float32))  # HF's BERT always adds one
    out = {b + "embeddings.word_embeddings.weight": p["embed"],
           b + "embeddings.position_embeddings.weight": p["pos_embed"],
           b + "embeddings.token_type_embeddings.weight": type_embed,
           b + "embeddings.LayerNorm.weight": p["embed_norm"]["scale"],
           b + "embeddings.LayerNorm.bias": p["embed_norm"]["bias"],
           "cls.predictions.transform.dense.weight": p["lm_transform"]["kernel"].T,
           "cls.predictions.transform.dense.bias": p["lm_transform"]["bias"],
           "cls.predictions.transform.LayerNorm.weight": p["lm_transform"]["norm"]["scale"],
           "cls.predictions.transform.LayerNorm.bias": p["lm_transform"]["norm"]["bias"],
           "cls.predictions.bias": p["lm_bias"]}
    for i in range(L):
        h = f"{b}encoder.layer.{i}."
        for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
            out[h + f"attention.self.{name}.weight"] = a[x][i].reshape(D, D).T
            out[h + f"attention.self.{name}.bias"] = a[x + "_bias"][i].reshape(D)
        out[h + "attention.output.dense.weight"] = a["o"][i].reshape(D, D).T
        out[h + "attention.output.dense.bias"] = a["o_bias"][i]
        out[h + "intermediate.dense.weight"], out[h + "intermediate.dense.bias"] = m["up"][i].T, m["up_bias"][i]
        out[h + "output.dense.weight"], out[h + "output.dense.bias"] = m["down"][i].T, m["down_bias"][i]
        for ours, theirs in (("attn_norm", "attention.output.LayerNorm"), ("mlp_norm", "output.LayerNorm")):
            out[h + theirs + ".weight"] = p["layers"][ours]["scale"][i]
            out[h + theirs + ".bias"] = p["layers"][ours]["bias"][i]
    return out


def _fresh_head(cfg: ModelConfig, params: Params, seed: int) -> Params:
    """`params` with the masked-LM head `model.init` gives (one layer is enough to
    draw it: the head's shapes do not depend on depth)."""
    fresh = model.init(dataclasses.replace(cfg, num_layers=1), jax.random.PRNGKey(seed))
    return {**params, "lm_transform": jax.tree.map(np.asarray, fresh["lm_transform"]),
            "lm_bias": np.asarray(fresh["lm_bias"])}


FAMILY = Family(
    name="bert", model_types=("bert",), prefix="bert.",
    config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    shape=dict(causal=False, positions="learned", norm="layernorm", norm_position="post",
               mlp="gelu_exact", use_bias=True, lm_head_transform=True, lm_head_bias=True,
               tie_embeddings=True),
    params_from_hf=params_from_hf, params_to_hf=params_to_hf, grouped_query=False,
    # Checkpoints from before PyTorch named LayerNorm's weight and bias gamma and beta.
    renames=(("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")),
    # position ids; the pooler and next-sentence head (heads this model does not have)
    buffers=(r".*position_ids", r"(bert\.)?pooler\..*", r"cls\.seq_relationship\..*"),
    tied_head=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"))
