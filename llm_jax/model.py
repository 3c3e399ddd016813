"""The transformer: one frozen config, pure functions over a params PyTree.

    params = init(config, rng)
    logits = apply(config, params, tokens)                     # [B, T, V]
    hidden = forward(config, params, tokens)                   # [B, T, D]
    logits, cache = apply_with_cache(config, params, tokens, cache)   # decoding

The model returns activations; losses live in `llm_jax.losses` and heads are
small functions here (`lm_logits`, `scalar_head`), so six objectives share one
forward pass without branches in it.

Letters used in shapes and einsums:
    B batch, T query time, S key time (T, or the cache length), D d_model,
    N query heads, G key/value heads (N % G == 0, grouped-query attention),
    H head size, F MLP hidden size, V vocab, L layers.

Params (layers stacked on a leading L axis so they run under `lax.scan`):
    embed [V, D]; pos_embed [max_len, D] (learned positions only);
    type_embed [type_vocab_size, D] (token types only); embed_norm (post-norm only)
    layers/attn_norm/{scale[, bias]} [L, D]
    layers/attn/{q [L, D, N, H], k [L, D, G, H], v [L, D, G, H], o [L, N, H, D]}
    layers/mlp_norm/{scale[, bias]} [L, D]
    layers/mlp/{up [L, D, F], gate [L, D, F] (SwiGLU only), down [L, F, D]}
    (with use_bias: q_bias [L, N, H], k_bias/v_bias [L, G, H], o_bias [L, D],
     up_bias/gate_bias [L, F], down_bias [L, D])
    final_norm/{scale[, bias]} [D] (pre-norm only); lm_head [D, V] (untied embeddings only)
    lm_transform/{kernel [D, D], bias [D], norm/{scale, bias}}; lm_bias [V] (BERT's MLM head)

Pre-norm (GPT-2, Llama) blocks are x + f(norm(x)) with one norm at the end;
post-norm (BERT) blocks are norm(x + f(x)), with a norm on the embeddings instead.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax import splash
from llm_jax.config import ModelConfig
from llm_jax.errors import ConfigError, InputError
from llm_jax.sharding import constrain_activations, gather_embedding_table, target_platform

Params = dict[str, Any]


# ---------------------------------------------------------------------------
# Init


def init(config: ModelConfig, rng: jax.Array) -> Params:
    """Random params: N(0, init_std) matrices, output projections scaled by
    1/sqrt(2L) (GPT-2) so the residual stream's variance does not grow with depth."""
    config.validate()
    if config.lm_head_transform and config.mlp not in ("gelu", "gelu_exact"):
        raise ConfigError(f"model.lm_head_transform=True (BERT's head: dense + GELU + LayerNorm) takes its "
                          f"GELU from model.mlp, which is {config.mlp!r}; set model.mlp='gelu' or 'gelu_exact', "
                          "or lm_head_transform=False")
    c = config
    L, D, N, G, H, F, V = (c.num_layers, c.d_model, c.num_heads, c.kv_heads, c.head_size,
                           c.d_ff, c.vocab_size)
    pdt = jnp.dtype(c.param_dtype)
    keys = iter(jax.random.split(rng, 16))

    def normal(shape, std=c.init_std):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(pdt)

    def norm_params(*lead):
        p = {"scale": jnp.ones((*lead, D), pdt)}
        if c.norm == "layernorm":
            p["bias"] = jnp.zeros((*lead, D), pdt)
        return p

    out_std = c.init_std / math.sqrt(2 * L)
    attn = {"q": normal((L, D, N, H)), "k": normal((L, D, G, H)), "v": normal((L, D, G, H)),
            "o": normal((L, N, H, D), out_std)}
    mlp = {"up": normal((L, D, F)), "down": normal((L, F, D), out_std)}
    if c.mlp == "swiglu":
        mlp["gate"] = normal((L, D, F))
    if c.use_bias:
        attn.update(q_bias=jnp.zeros((L, N, H), pdt), k_bias=jnp.zeros((L, G, H), pdt),
                    v_bias=jnp.zeros((L, G, H), pdt), o_bias=jnp.zeros((L, D), pdt))
        mlp.update(up_bias=jnp.zeros((L, F), pdt), down_bias=jnp.zeros((L, D), pdt))
        if c.mlp == "swiglu":
            mlp["gate_bias"] = jnp.zeros((L, F), pdt)

    params: Params = {
        "embed": normal((V, D)),
        "layers": {"attn_norm": norm_params(L), "attn": attn, "mlp_norm": norm_params(L), "mlp": mlp},
    }
    if c.norm_position == "pre":
        params["final_norm"] = norm_params()
    else:
        params["embed_norm"] = norm_params()
    if c.positions == "learned":
        params["pos_embed"] = normal((c.max_len, D))
    if c.type_vocab_size:
        params["type_embed"] = normal((c.type_vocab_size, D))
    if not c.tie_embeddings:
        params["lm_head"] = normal((D, V))
    if c.lm_head_transform:
        params["lm_transform"] = {"kernel": normal((D, D)), "bias": jnp.zeros((D,), pdt),
                                  "norm": norm_params()}
    if c.lm_head_bias:
        params["lm_bias"] = jnp.zeros((V,), pdt)
    return params


def count_params(params: Params) -> int:
    """Number of array elements in a tree (params, LoRA adapters, optimizer state)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# Building blocks


def norm(config: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
    """LayerNorm or RMSNorm over D, computed in float32 for stability."""
    xf = x.astype(jnp.float32)
    if config.norm == "layernorm":
        xf = xf - xf.mean(-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + config.norm_eps)
    y = y * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """The rotary angular frequencies [H/2], float32: theta^(-2i/H), and with
    rope_scaling="llama3" Llama 3.1's rescaling (as Meta's reference code and
    Hugging Face compute it): long wavelengths slowed by rope_factor, short ones
    kept, a linear blend in the wavelengths between."""
    c = config
    half = c.head_size // 2
    freqs = c.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if c.rope_scaling == "llama3":
        wavelen = 2 * math.pi / freqs
        low_wavelen = c.rope_original_max_len / c.rope_low_freq_factor  # longer: slowed down
        high_wavelen = c.rope_original_max_len / c.rope_high_freq_factor  # shorter: kept
        smooth = ((c.rope_original_max_len / wavelen - c.rope_low_freq_factor)
                  / (c.rope_high_freq_factor - c.rope_low_freq_factor))
        blended = (1 - smooth) * freqs / c.rope_factor + smooth * freqs
        freqs = jnp.where(wavelen > low_wavelen, freqs / c.rope_factor,
                          jnp.where(wavelen < high_wavelen, freqs, blended))
    return freqs


def rotary(x: jax.Array, positions: jax.Array, *, freqs: jax.Array) -> jax.Array:
    """Rotary position embedding (RoFormer), half-split layout as in Llama/HF.

    x: [B, T, heads, H]; positions: [B, T]; freqs: [H/2] (`rope_frequencies`)."""
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def sinusoidal(positions: jax.Array, d_model: int) -> jax.Array:
    """Fixed sin/cos embeddings (Vaswani et al. 2017): [B, T] -> [B, T, D]."""
    i = jnp.arange(d_model // 2, dtype=jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] / (10_000.0 ** (2 * i / d_model))
    out = jnp.zeros((*positions.shape, d_model), jnp.float32)
    out = out.at[..., 0::2].set(jnp.sin(angles))
    return out.at[..., 1::2].set(jnp.cos(angles[..., : d_model - d_model // 2]))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
              causal: bool = False, scale: float | None = None, impl: str = "auto",
              segment_ids: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention: `jax.nn.dot_product_attention` ("xla", "cudnn")
    or the Pallas TPU splash kernel ("splash", `llm_jax.splash`).

    q: [B, T, N, H]; k, v: [B, S, G, H]. The mask comes one of two ways:
      mask: bool [B, 1, T, S] (True = may attend), or None with `causal` for the
        plain causal case; or
      segment_ids: [B, T] int with mask=None (self-attention, T == S): tokens
        attend within their segment, and with `causal` to earlier slots too.
        Splash takes them as they are and never forms a [T, S] mask; the other
        implementations build the dense mask from them.
    Returns [B, T, N, H].

    "auto" picks, by the platform being traced for (`target_platform`, so an
    ahead-of-time TPU compile on a CPU host picks the TPU kernel):
      TPU: splash when no dense mask is given and its shapes hold (T and S
        multiples of 128, float32/bfloat16: `splash.unsupported_reason`), else XLA;
      GPU: cuDNN flash attention for 16-bit batches without a mask or segment ids
        (cuDNN takes causal/padding masks only), else XLA;
      CPU: XLA (splash would run in the slow Pallas interpreter).
    """
    if mask is not None and segment_ids is not None:
        raise InputError("attention: got both mask and segment_ids; pass one (segment_ids build the "
                         "mask themselves)")
    if impl == "auto":
        platform = target_platform()
        if platform == "tpu" and mask is None and splash.fits(q.shape[1], k.shape[1], q.dtype):
            impl = "splash"
        elif (platform == "gpu" and mask is None and segment_ids is None
              and q.dtype in (jnp.bfloat16, jnp.float16)):
            impl = "cudnn"
        else:
            impl = "xla"
    if impl == "splash":
        if mask is not None:
            raise InputError("attention(impl='splash') got a dense mask; pass segment_ids and causal "
                             "instead, or impl='xla'")
        return splash.attention(q, k, v, segment_ids, causal=causal, scale=scale)
    if segment_ids is not None:
        slots = jnp.arange(q.shape[1])
        mask, causal = make_mask(causal, segment_ids, segment_ids, slots, slots), False
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                        implementation=impl)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _linear(x, w, b=None, spec="btd,df->btf"):
    y = jnp.einsum(spec, x, w)
    return y if b is None else y + b


def _project(x: jax.Array, p: Params, name: str, spec: str) -> jax.Array:
    """One projection of a block: x @ p[name] (+ p[name + "_bias"]), and with a LoRA
    adapter attached (`lora.attach`: p[name + "_lora"] = {"a": [in, r], "b": [r, out]},
    b already scaled by alpha / r) also + (x @ a) @ b, unmerged: the full-size
    W + a @ b is never formed, nor its gradient. x's trailing dims are the
    weight's input (o reads [B, T, N, H] as [B, T, N*H])."""
    y = _linear(x, p[name], p.get(name + "_bias"), spec)
    adapter = p.get(name + "_lora")
    if adapter is not None:
        x2 = x.reshape(*x.shape[:2], -1)  # [B, T, in]
        d = jnp.einsum("bti,ir->btr", x2, adapter["a"])
        y = y + jnp.einsum("btr,ro->bto", d, adapter["b"]).reshape(y.shape)
    return y


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_jvp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Same values as `jax.nn.gelu(x, approximate=True)`, with a hand-written
    derivative: autodiff of the tanh form keeps five [B, T, F] intermediates per
    layer for the backward pass, this keeps one (the derivative itself), which
    cuts the step's temporary memory and traffic on every backend. A custom JVP
    (not VJP) so forward-mode differentiation keeps working."""
    return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    x = jnp.asarray(x)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    t = jnp.tanh(_GELU_C * (xf + 0.044715 * xf ** 3))
    d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * xf * xf)
    # The primal exactly as jax.nn.gelu computes it (XLA shares the tanh).
    return jax.nn.gelu(x, approximate=True), (d * dx).astype(x.dtype)


def activation(config: ModelConfig, x: jax.Array) -> jax.Array:
    """The GELU of a non-gated MLP and of BERT's head transform: GPT-2's tanh form
    (mlp="gelu") or BERT's exact (erf) form (mlp="gelu_exact")."""
    if config.mlp == "gelu":
        return gelu_tanh(x)
    if config.mlp == "gelu_exact":
        return jax.nn.gelu(x, approximate=False)
    raise ConfigError(f"model.mlp={config.mlp!r} has no single activation function (expected 'gelu' or "
                      "'gelu_exact'; 'swiglu' is a gated MLP)")


def block(config: ModelConfig, p: Params, x: jax.Array, *, positions: jax.Array,
          mask: jax.Array | None, kv: tuple | None = None, dropout_rng: jax.Array | None = None,
          segment_ids: jax.Array | None = None):
    """One residual block. Pre-norm: x + Attn(Norm(x)), then x + MLP(Norm(x));
    post-norm (BERT): Norm(x + Attn(x)), then Norm(x + MLP(x)).

    x: [B, T, D]. Attention is masked by `mask` (dense, see `make_mask`) or, on the
    splash path, by `segment_ids` [B, T] and config.causal with mask=None.
    `kv`, when decoding, is (k_cache [B, S, G, H], v_cache, index): the new
    keys/values are written at [index, index + T) and attention reads the whole
    cache, always through `jax.nn.dot_product_attention` (see `apply_with_cache`).
    Returns (x, (k_cache, v_cache) or None)."""
    c = config
    rngs = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))
    a = p["attn"]
    pre = c.norm_position == "pre"
    h = norm(c, p["attn_norm"], x) if pre else x
    q = _project(h, a, "q", "btd,dnh->btnh")  # [B, T, N, H]
    k = _project(h, a, "k", "btd,dgh->btgh")  # [B, T, G, H]
    v = _project(h, a, "v", "btd,dgh->btgh")  # [B, T, G, H]
    if c.positions == "rotary":
        freqs = rope_frequencies(c)
        q = rotary(q, positions, freqs=freqs)
        k = rotary(k, positions, freqs=freqs)
    new_kv = None
    if kv is not None:
        k_cache, v_cache, index = kv
        k = k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v = v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        new_kv = (k_cache, v_cache)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    impl = c.attention_impl
    if kv is not None and impl == "splash":
        impl = "xla"  # decoding against a cache: the kernel does not fit (see apply_with_cache)
    if segment_ids is None:
        causal_only = mask is None and c.causal and kv is None
        o = attention(q, k, v, mask, causal=causal_only, impl=impl)  # [B, T, N, H]
    else:  # the splash path: segment ids and the causal flag, no dense [B, 1, T, S] mask
        o = attention(q, k, v, None, causal=c.causal, impl=impl, segment_ids=segment_ids)
    o = _project(o, a, "o", "btnh,nhd->btd")
    x = x + _dropout(o, c.dropout, rngs[0])
    if not pre:
        x = norm(c, p["attn_norm"], x)

    m = p["mlp"]
    h = norm(c, p["mlp_norm"], x) if pre else x
    up = _project(h, m, "up", "btd,df->btf")  # [B, T, F]
    if c.mlp == "swiglu":
        up = jax.nn.silu(_project(h, m, "gate", "btd,df->btf")) * up
    else:
        up = activation(c, up)
    out = _project(up, m, "down", "btf,fd->btd")
    x = x + _dropout(out, c.dropout, rngs[1])
    if not pre:
        x = norm(c, p["mlp_norm"], x)
    return constrain_activations(x), new_kv


# ---------------------------------------------------------------------------
# Masks and positions


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where a packed row's segment id changes. [B, T]."""
    t = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - first


def make_mask(causal: bool, q_segments: jax.Array | None, k_segments: jax.Array | None,
              q_slots: jax.Array, k_slots: jax.Array) -> jax.Array | None:
    """bool [B, 1, T, S]: same segment (packing / padding) and, if causal, key slot <= query slot.

    Slots are positions in the key buffer (the cache when decoding), not the
    model's positions, which may restart inside a packed row."""
    mask = None
    if causal:
        mask = (k_slots[None, :] <= q_slots[:, None])[None, None]  # [1, 1, T, S]
    if q_segments is not None:
        seg = (q_segments[:, :, None] == k_segments[:, None, :])[:, None]  # [B, 1, T, S]
        mask = seg if mask is None else mask & seg
    return mask


def _uses_splash(config: ModelConfig, length: int) -> bool:
    """Whether a forward pass without a cache runs attention through the splash
    kernel: always for attention_impl="splash" (bad shapes fail in
    `splash.attention` with a ConfigError), for "auto" when `attention` will pick
    it (TPU target, shapes the kernel takes)."""
    impl = config.attention_impl
    return impl == "splash" or (impl == "auto" and splash.fits(length, length, jnp.dtype(config.dtype)))


# ---------------------------------------------------------------------------
# Forward


def forward(config: ModelConfig, params: Params, tokens: jax.Array, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            cache: Params | None = None, dropout_rng: jax.Array | None = None,
            token_types: jax.Array | None = None):
    """Token ids [B, T] -> final hidden states [B, T, D] (after the final norm).

    positions: [B, T] model positions; default 0..T-1, restarted per segment when
      `segment_ids` is given, or continuing from the cache index when decoding.
    segment_ids: [B, T] int; tokens attend only within their own segment (packed
      rows; 0 may mark padding).
    cache: from `init_cache`; returns (hidden, new_cache) instead of hidden.
    dropout_rng: enables dropout (training); None is deterministic.
    token_types: [B, T] int segment-A/B ids (models with type_vocab_size > 0;
      default all 0, as Hugging Face's BERT does without token_type_ids).
    """
    c = config
    B, T = tokens.shape
    dtype = jnp.dtype(c.dtype)
    index = cache["index"] if cache is not None else 0
    if positions is None:
        if segment_ids is not None and cache is None:
            positions = positions_from_segments(segment_ids)
        else:
            positions = jnp.broadcast_to(index + jnp.arange(T), (B, T))

    x = gather_embedding_table(params["embed"]).astype(dtype)[tokens]  # [B, T, D]
    if c.positions == "learned":
        x = x + params["pos_embed"].astype(dtype)[positions]
    elif c.positions == "sinusoidal":
        x = x + sinusoidal(positions, c.d_model).astype(dtype)
    if c.type_vocab_size:
        type_embed = params["type_embed"].astype(dtype)
        x = x + (type_embed[0] if token_types is None else type_embed[token_types])
    elif token_types is not None:
        raise InputError("token_types given, but this model has no token-type embeddings "
                         "(model.type_vocab_size=0); drop token_types or set model.type_vocab_size")
    if c.norm_position == "post":
        x = norm(c, params["embed_norm"], x)
    emb_rng, layer_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    x = constrain_activations(_dropout(x, c.dropout, emb_rng))

    q_slots = index + jnp.arange(T)
    # The splash kernel takes the segment ids themselves: the dense [B, 1, T, T]
    # mask is not built at all (its O(T^2) memory is what the kernel saves).
    splash_ids = None
    if cache is None and _uses_splash(c, T):
        mask, splash_ids = None, segment_ids
    elif cache is None:
        mask = None if segment_ids is None else make_mask(c.causal, segment_ids, segment_ids, q_slots, q_slots)
    else:
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        k_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, index))
        k_slots = jnp.arange(k_segments.shape[1])
        # Empty cache slots hold segment 0: a real query (segment >= 1) never sees them.
        mask = make_mask(c.causal, segment_ids, k_segments, q_slots, k_slots)

    layer_rngs = None if layer_rng is None else jax.random.split(layer_rng, c.num_layers)
    cast = lambda tree: jax.tree.map(lambda w: w.astype(dtype), tree)  # noqa: E731

    def body(x, xs):
        p, rng, kv = xs
        kv = None if kv is None else (*kv, index)
        x, new_kv = block(c, cast(p), x, positions=positions, mask=mask, kv=kv, dropout_rng=rng,
                          segment_ids=splash_ids)
        return x, new_kv

    if c.remat != "none":
        policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if c.remat == "dots"
                  else jax.checkpoint_policies.nothing_saveable)
        body = jax.checkpoint(body, policy=policy, prevent_cse=not c.scan_layers)

    kv_in = None if cache is None else (cache["k"], cache["v"])
    if c.scan_layers:
        x, kv_out = jax.lax.scan(body, x, (params["layers"], layer_rngs, kv_in))
    else:  # unrolled: same params tree, one traced block per layer
        outs = []
        for i in range(c.num_layers):
            xs = jax.tree.map(lambda a: a[i], (params["layers"], layer_rngs, kv_in))
            x, o = body(x, xs)
            outs.append(o)
        kv_out = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

    hidden = norm(c, params["final_norm"], x) if c.norm_position == "pre" else x
    if cache is None:
        return hidden
    new_cache = {"k": kv_out[0], "v": kv_out[1], "segment_ids": k_segments, "index": index + T}
    return hidden, new_cache


@jax.custom_vjp
def _tied_logits(hidden: jax.Array, embed: jax.Array) -> jax.Array:
    """hidden [B, T, D] @ embed[V, D]^T -> float32 [B, T, V], with a backward that
    contracts in the order XLA:CPU handles without copying (see `lm_logits`)."""
    return jnp.einsum("btd,vd->btv", hidden, embed, preferred_element_type=jnp.float32)


def _tied_logits_fwd(hidden, embed):
    return _tied_logits(hidden, embed), (hidden, embed)


def _tied_logits_bwd(res, g):
    hidden, embed = res
    g = g.astype(jnp.promote_types(hidden.dtype, embed.dtype))
    d_hidden = jnp.einsum("btv,vd->btd", g, embed, preferred_element_type=jnp.float32)
    # (hidden^T @ g)^T, not g^T @ hidden: transposes the small [B*T, D] and [D, V]
    # operands instead of the whole [B*T, V] logits gradient.
    d_embed = jnp.einsum("btd,btv->dv", hidden, g, preferred_element_type=jnp.float32).T
    return d_hidden.astype(hidden.dtype), d_embed.astype(embed.dtype)


_tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def _cpu_tied_head() -> bool:
    return target_platform() == "cpu"


def lm_logits(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """[B, T, D] -> float32 logits [B, T, V] (tied: the embedding matrix transposed).

    With tied embeddings on CPU the head has a custom backward: autodiff forms the
    embedding gradient as dlogits^T @ hidden, which contracts the major axis of the
    [B*T, V] float32 dlogits, and XLA:CPU then writes a transposed copy of that
    whole array (64 MiB per step in the benchmark) and computes the fused dlogits
    twice. GPUs and TPUs take either operand order without a copy, and there the
    extra [D, V] transpose would be pure cost, so the choice is made by backend
    (like `attention(impl="auto")`). The forward-mode derivative is not defined
    for the CPU form; use untied embeddings or another backend for jvp."""
    dtype = jnp.dtype(config.dtype)
    if config.lm_head_transform:  # BERT: dense + GELU + LayerNorm, then the output matrix
        t = params["lm_transform"]
        hidden = activation(config, _linear(hidden, t["kernel"].astype(dtype), t["bias"].astype(dtype),
                                            "btd,de->bte"))
        hidden = norm(config, t["norm"], hidden)
    if config.tie_embeddings and _cpu_tied_head():
        logits = _tied_logits(hidden, params["embed"].astype(dtype))
    else:
        w = params["embed"].T if config.tie_embeddings else params["lm_head"]  # [D, V]
        logits = jnp.einsum("btd,dv->btv", hidden, w.astype(dtype), preferred_element_type=jnp.float32)
    if config.lm_head_bias:
        logits = logits + params["lm_bias"].astype(jnp.float32)
    return logits


def apply(config: ModelConfig, params: Params, tokens: jax.Array, **kwargs) -> jax.Array:
    """Token ids [B, T] -> LM logits [B, T, V] (float32). kwargs: see `forward`."""
    return lm_logits(config, params, forward(config, params, tokens, **kwargs))


# ---------------------------------------------------------------------------
# KV cache


def init_cache(config: ModelConfig, batch: int, length: int | None = None, dtype=None) -> Params:
    """An empty KV cache for `length` slots (default max_len).

    k, v: [L, B, S, G, H]; segment_ids [B, S] (0 = empty/padding); index: next slot."""
    S = length or config.max_len
    shape = (config.num_layers, batch, S, config.kv_heads, config.head_size)
    dt = jnp.dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
            "segment_ids": jnp.zeros((batch, S), jnp.int32), "index": jnp.array(0, jnp.int32)}


def apply_with_cache(config: ModelConfig, params: Params, tokens: jax.Array, cache: Params, *,
                     positions: jax.Array | None = None, segment_ids: jax.Array | None = None):
    """Runs `tokens` [B, T] after what the cache holds: (logits [B, T, V], new cache).

    Prefill a prompt with T = its length, then decode with T = 1. For left-padded
    prompts pass segment_ids (0 at padding) and positions counted from the first
    real token.

    Attention here is XLA's (`jax.nn.dot_product_attention`), also with
    attention_impl="splash" or "auto" on TPU: the splash kernel tiles queries in
    blocks of at least 128 (decoding runs T=1 query against the cache) and takes
    its causal mask as a static pattern, while a query's slot in the cache
    (`index`) is a traced value; the cache's own segment ids are a dense mask
    anyway, and a [B, 1, T, S] mask with T=1 is small."""
    if not config.causal:
        raise ConfigError("a KV cache needs a causal (decoder) model; this config has model.causal=False")
    slots = cache["segment_ids"].shape[1]
    if not isinstance(cache["index"], jax.core.Tracer) and int(cache["index"]) + tokens.shape[1] > slots:
        # Under jit this cannot be checked; outside it, an overflow would silently
        # overwrite earlier slots (dynamic_update_slice clamps its start).
        raise InputError(f"KV cache overflow: {int(cache['index'])} slots used + {tokens.shape[1]} new "
                         f"tokens > {slots} slots; make the cache longer (init_cache(length=...))")
    hidden, cache = forward(config, params, tokens, positions=positions, segment_ids=segment_ids,
                            cache=cache)
    return lm_logits(config, params, hidden), cache


# ---------------------------------------------------------------------------
# Scalar head (reward model, PPO value)


def init_scalar_head(config: ModelConfig, rng: jax.Array) -> Params:
    """A linear map D -> 1: {"kernel": [D], "bias": []}."""
    kernel = config.init_std * jax.random.normal(rng, (config.d_model,), jnp.float32)
    return {"kernel": kernel.astype(config.param_dtype), "bias": jnp.zeros((), config.param_dtype)}


def scalar_head(head: Params, hidden: jax.Array) -> jax.Array:
    """Per-token scalar [B, T] (float32) from hidden [B, T, D]: a value at every step
    (PPO) or, read at the last real token, a sequence's reward."""
    out = jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), head["kernel"].astype(jnp.float32))
    return out + head["bias"].astype(jnp.float32)


def last_token_values(values: jax.Array, segment_ids: jax.Array, num_segments: int = 1) -> jax.Array:
    """values [B, T] read at the last token of each segment 1..num_segments -> [B, num_segments].

    For unpacked rows pass segment_ids = the 0/1 real-token mask (num_segments=1).
    A segment absent from a row reads 0."""
    t = jnp.arange(values.shape[1])
    seg = jnp.arange(1, num_segments + 1)
    in_seg = segment_ids[:, None, :] == seg[None, :, None]  # [B, S, T]
    last = jnp.max(jnp.where(in_seg, t, -1), axis=-1)  # [B, S]
    picked = jnp.take_along_axis(values, jnp.maximum(last, 0), axis=1)
    return jnp.where(last >= 0, picked, 0.0)
