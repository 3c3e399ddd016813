"""GPT-2 (`model_type` gpt2, GPT2LMHeadModel): learned positions, LayerNorm, tanh
GELU, biases, the head tied to the embedding. Its Conv1D weights are stored
[in, out], as ours, and c_attn holds q | k | v side by side.

Settings of transformers' GPT-2 that this model does not implement are refused
by name: attention scaled by the inverse layer index, reordered and upcast
attention, cross-attention, an untied head.
"""

from __future__ import annotations

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import HFError
from llm_jax.hf.config import Fields, require
from llm_jax.hf.family import Family, LoadOptions, Params, Reader, layer_norm


def config_from_hf(hf: dict, where: str, f: Fields) -> ModelConfig:
    require(hf, where, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                    ("tie_word_embeddings", True)):  # GPT2LMHeadModel's head is the embedding
        require(hf, where, key, (ok,), ok)
    d, n = f.int("n_embd"), f.int("n_head")
    if d % n:
        raise HFError(f"{where}: n_embd={d} is not divisible by n_head={n}")
    return ModelConfig(vocab_size=f.int("vocab_size"), d_model=d, num_layers=f.int("n_layer"),
                       num_heads=n, d_ff=f.int("n_inner", 4 * d), max_len=f.int("n_positions"),
                       positions="learned", norm="layernorm", mlp="gelu", use_bias=True,
                       norm_eps=f.number("layer_norm_epsilon", 1e-5, positive=False), tie_embeddings=True)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": True,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}


def params_from_hf(r: Reader, c: ModelConfig, _: LoadOptions) -> Params:
    L, D, N, H, F = c.num_layers, c.d_model, c.num_heads, c.head_size, c.d_ff
    h = "h.{}."
    qkv = r.stack(h + "attn.c_attn.weight", L, (D, 3 * D))  # [L, D, 3D]: q | k | v
    qkv_b = r.stack(h + "attn.c_attn.bias", L, (3 * D,))
    q, k, v = (qkv[:, :, i * D:(i + 1) * D].reshape(L, D, N, H) for i in range(3))
    qb, kb, vb = (qkv_b[:, i * D:(i + 1) * D].reshape(L, N, H) for i in range(3))

    return {
        "embed": r("wte.weight", (c.vocab_size, D)), "pos_embed": r("wpe.weight", (c.max_len, D)),
        "layers": {
            "attn_norm": layer_norm(r, h + "ln_1", D, L), "mlp_norm": layer_norm(r, h + "ln_2", D, L),
            "attn": {"q": q, "k": k, "v": v, "q_bias": qb, "k_bias": kb, "v_bias": vb,
                     "o": r.stack(h + "attn.c_proj.weight", L, (D, D)).reshape(L, N, H, D),
                     "o_bias": r.stack(h + "attn.c_proj.bias", L, (D,))},
            "mlp": {"up": r.stack(h + "mlp.c_fc.weight", L, (D, F)), "up_bias": r.stack(h + "mlp.c_fc.bias", L, (F,)),
                    "down": r.stack(h + "mlp.c_proj.weight", L, (F, D)),
                    "down_bias": r.stack(h + "mlp.c_proj.bias", L, (D,))},
        },
        "final_norm": layer_norm(r, "ln_f", D),
    }


def params_to_hf(p: Params, c: ModelConfig) -> dict[str, np.ndarray]:
    L, D = c.num_layers, c.d_model
    a, m = p["layers"]["attn"], p["layers"]["mlp"]
    out = {"transformer.wte.weight": p["embed"], "transformer.wpe.weight": p["pos_embed"],
           "transformer.ln_f.weight": p["final_norm"]["scale"], "transformer.ln_f.bias": p["final_norm"]["bias"]}
    for i in range(L):
        h = f"transformer.h.{i}."
        out[h + "attn.c_attn.weight"] = np.concatenate([a[x][i].reshape(D, D) for x in "qkv"], axis=1)
        out[h + "attn.c_attn.bias"] = np.concatenate([a[x + "_bias"][i].reshape(D) for x in "qkv"])
        out[h + "attn.c_proj.weight"] = a["o"][i].reshape(D, D)
        out[h + "attn.c_proj.bias"] = a["o_bias"][i]
        out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = m["up"][i], m["up_bias"][i]
        out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = m["down"][i], m["down_bias"][i]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[h + theirs + ".weight"] = p["layers"][ours]["scale"][i]
            out[h + theirs + ".bias"] = p["layers"][ours]["bias"][i]
    return out


FAMILY = Family(
    name="gpt2", model_types=("gpt2",), prefix="transformer.",
    config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    shape=dict(causal=True, positions="learned", norm="layernorm", norm_position="pre", mlp="gelu",
               use_bias=True, type_vocab_size=0, lm_head_transform=False, lm_head_bias=False,
               tie_embeddings=True),
    params_from_hf=params_from_hf, params_to_hf=params_to_hf, grouped_query=False,
    buffers=(r".*\.attn\.bias", r".*\.attn\.masked_bias"),  # the causal mask, in older files
    tied_head=("lm_head.weight",))
