"""Llama and Mistral (`model_type` llama or mistral, LlamaForCausalLM): RoPE
(half-split, as HF stores it; Llama 3's frequency scaling), RMSNorm, SwiGLU,
grouped-query attention, no biases. torch Linear weights are stored [out, in].

Mistral is Llama's mapping, literally: its config.json has the same fields and
its checkpoint the same tensor names. What sets it apart, sliding-window
attention, is refused unless the window covers the whole context (then it is
plain causal attention), so a Mistral checkpoint loads here and is exported as
llama. A RoPE scaling other than Llama 3's, a partial rotary factor, biases or
an activation other than SiLU are refused by name.
"""

from __future__ import annotations

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import HFError
from llm_jax.hf.config import Fields, require
from llm_jax.hf.family import Family, LoadOptions, Params, Reader


def _rope_settings(hf: dict, where: str) -> dict:
    """RoPE theta and scaling from either format: `rope_theta` + `rope_scaling`
    (files written before transformers 5) or `rope_parameters` (transformers 5)."""
    top = Fields(hf, where)
    params, scaling = top.object("rope_parameters"), top.object("rope_scaling")
    in_params, in_scaling = Fields(params, where, "rope_parameters."), Fields(scaling, where, "rope_scaling.")

    def fields(key: str) -> Fields:  # rope_parameters wins, as in `merged` below
        return in_params if key in params else in_scaling

    theta = (in_params if "rope_theta" in params else top).number("rope_theta", 10_000.0)
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    out = {"rope_theta": theta}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=fields("factor").number("factor"),
                   rope_low_freq_factor=fields("low_freq_factor").number("low_freq_factor"),
                   rope_high_freq_factor=fields("high_freq_factor").number("high_freq_factor"),
                   rope_original_max_len=fields("original_max_position_embeddings").int(
                       "original_max_position_embeddings"))
    elif kind != "default":
        raise HFError(f"{where}: RoPE scaling {kind!r} is not supported by llm_jax "
                      "(supported: none, 'llama3')")
    # Also at the top level: transformers moves a partial_rotary_factor found there into the
    # RoPE parameters.
    for fields_ in (in_params, in_scaling, top):
        partial = fields_.number("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise HFError(f"{where}: {fields_.prefix}partial_rotary_factor={partial} is not supported "
                          "(llm_jax rotates the whole head)")
    return out


def config_from_hf(hf: dict, where: str, f: Fields) -> ModelConfig:
    require(hf, where, "hidden_act", ("silu",), "silu")
    require(hf, where, "attention_bias", (False,), False)
    require(hf, where, "mlp_bias", (False,), False)
    max_len = f.int("max_position_embeddings")
    window = f.int("sliding_window", None, minimum=0)
    if window is not None and window < max_len:
        raise HFError(f"{where}: sliding_window={window} < max_position_embeddings="
                      f"{max_len}: sliding-window attention is not supported")
    d, n = f.int("hidden_size"), f.int("num_attention_heads")
    kv, head_dim = f.int("num_key_value_heads", n), f.int("head_dim", d // n)
    if n % kv:
        raise HFError(f"{where}: num_attention_heads={n} is not a multiple of num_key_value_heads={kv}")
    if head_dim % 2 or head_dim == 0:
        source = f"head_dim={head_dim}" if "head_dim" in hf else f"hidden_size/num_attention_heads={head_dim}"
        raise HFError(f"{where}: {source}: rotary positions need an even head size")
    return ModelConfig(vocab_size=f.int("vocab_size"), d_model=d, num_layers=f.int("num_hidden_layers"),
                       num_heads=n, num_kv_heads=kv, head_dim=head_dim, d_ff=f.int("intermediate_size"),
                       max_len=max_len, positions="rotary", norm="rmsnorm",
                       norm_eps=f.number("rms_norm_eps", 1e-6, positive=False), mlp="swiglu", use_bias=False,
                       tie_embeddings=f.bool("tie_word_embeddings", False), **_rope_settings(hf, where))


def config_to_hf(cfg: ModelConfig) -> dict:
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
           "head_dim": cfg.head_size, "hidden_act": "silu", "max_position_embeddings": cfg.max_len,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
           "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False}
    if cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                               "low_freq_factor": cfg.rope_low_freq_factor,
                               "high_freq_factor": cfg.rope_high_freq_factor,
                               "original_max_position_embeddings": cfg.rope_original_max_len}
    return out


def params_from_hf(r: Reader, c: ModelConfig, _: LoadOptions) -> Params:
    L, D, N, G, H, F = c.num_layers, c.d_model, c.num_heads, c.kv_heads, c.head_size, c.d_ff
    h = "layers.{}."
    # torch Linear weights are [out, in]; ours are [in, out...].
    params = {
        "embed": r("embed_tokens.weight", (c.vocab_size, D)),
        "layers": {
            "attn_norm": {"scale": r.stack(h + "input_layernorm.weight", L, (D,))},
            "mlp_norm": {"scale": r.stack(h + "post_attention_layernorm.weight", L, (D,))},
            "attn": {"q": r.stack(h + "self_attn.q_proj.weight", L, (N * H, D), lambda w: w.T.reshape(D, N, H)),
                     "k": r.stack(h + "self_attn.k_proj.weight", L, (G * H, D), lambda w: w.T.reshape(D, G, H)),
                     "v": r.stack(h + "self_attn.v_proj.weight", L, (G * H, D), lambda w: w.T.reshape(D, G, H)),
                     "o": r.stack(h + "self_attn.o_proj.weight", L, (D, N * H), lambda w: w.T.reshape(N, H, D))},
            "mlp": {"up": r.stack(h + "mlp.up_proj.weight", L, (F, D), np.transpose),
                    "gate": r.stack(h + "mlp.gate_proj.weight", L, (F, D), np.transpose),
                    "down": r.stack(h + "mlp.down_proj.weight", L, (D, F), np.transpose)},
        },
        "final_norm": {"scale": r("norm.weight", (D,))},
    }
    if not c.tie_embeddings:
        params["lm_head"] = r("lm_head.weight", (c.vocab_size, D)).T
    return params


def params_to_hf(p: Params, c: ModelConfig) -> dict[str, np.ndarray]:
    L, D, N, G, H = c.num_layers, c.d_model, c.num_heads, c.kv_heads, c.head_size
    a, m = p["layers"]["attn"], p["layers"]["mlp"]
    out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    for i in range(L):
        h = f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = p["layers"]["attn_norm"]["scale"][i]
        out[h + "post_attention_layernorm.weight"] = p["layers"]["mlp_norm"]["scale"][i]
        out[h + "self_attn.q_proj.weight"] = a["q"][i].reshape(D, N * H).T
        out[h + "self_attn.k_proj.weight"] = a["k"][i].reshape(D, G * H).T
        out[h + "self_attn.v_proj.weight"] = a["v"][i].reshape(D, G * H).T
        out[h + "self_attn.o_proj.weight"] = a["o"][i].reshape(N * H, D).T
        for x in ("up", "gate", "down"):
            out[h + f"mlp.{x}_proj.weight"] = m[x][i].T
    return out


FAMILY = Family(
    name="llama", model_types=("llama", "mistral"), prefix="model.",
    config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    shape=dict(causal=True, positions="rotary", norm="rmsnorm", norm_position="pre", mlp="swiglu",
               use_bias=False, type_vocab_size=0, lm_head_transform=False, lm_head_bias=False),
    params_from_hf=params_from_hf, params_to_hf=params_to_hf,
    buffers=(r".*rotary_emb\.inv_freq",),  # RoPE's frequencies, in older files
    tied_head=("lm_head.weight",))
