"""A plain-numpy (float64) reference transformer for the tests.

Written from the formulas, one layer, one sequence and one head at a time, with
no code shared with `llm_jax.model`. It reads the same params dict that
`llm_jax.model.init` builds (any array type; converted to float64 here) and
only the config fields a model card would give (causal, positions, norm, mlp,
norm_eps, rope_theta, tie_embeddings). Head counts and sizes are read off the
weight shapes: q [L, D, N, H], k/v [L, D, G, H].

    hidden = reference_forward(cfg, params, tokens, positions=None, segment_ids=None)
    logits = reference_logits(cfg, params, tokens, ...)
"""

from __future__ import annotations

import math

import numpy as np


def to_numpy(tree):
    """Nested dict of arrays -> nested dict of float64 numpy arrays."""
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    return np.asarray(np.asarray(tree, np.float32), np.float64)


def positions_from_segments_loop(segment_ids):
    """Positions restarting at 0 wherever the segment id changes along a row."""
    segment_ids = np.asarray(segment_ids)
    out = np.zeros(segment_ids.shape, np.int64)
    for b in range(segment_ids.shape[0]):
        pos = 0
        for t in range(segment_ids.shape[1]):
            if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                pos = 0
            out[b, t] = pos
            pos += 1
    return out


# ---------------------------------------------------------------------------
# Building blocks, one vector at a time.


def layer_norm(x, scale, bias, eps):
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    return (x - mu) / math.sqrt(var + eps) * scale + bias


def rms_norm(x, scale, eps):
    return x / math.sqrt((x * x).mean() + eps) * scale


def apply_norm(cfg, p, x):
    """p: {"scale"[, "bias"]} for one layer; x: [D]."""
    if cfg.norm == "layernorm":
        return layer_norm(x, p["scale"], p["bias"], cfg.norm_eps)
    assert cfg.norm == "rmsnorm"
    return rms_norm(x, p["scale"], cfg.norm_eps)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def sinusoidal_row(pos, d_model):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(same)."""
    out = np.zeros(d_model)
    for j in range(d_model):
        i = j // 2
        angle = pos / 10000.0 ** (2 * i / d_model)
        out[j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out


def rope(x, pos, theta):
    """HF/Llama layout: x * cos + rotate_half(x) * sin with
    inv_freq_i = theta^(-2i/H), cos/sin repeated over both halves and
    rotate_half(x) = concat(-x[H/2:], x[:H/2]). x: [H]."""
    H = x.shape[0]
    inv_freq = np.array([1.0 / theta ** (2 * i / H) for i in range(H // 2)])
    angles = np.concatenate([pos * inv_freq, pos * inv_freq])
    rotate_half = np.concatenate([-x[H // 2:], x[: H // 2]])
    return x * np.cos(angles) + rotate_half * np.sin(angles)


def softmax(z):
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


# ---------------------------------------------------------------------------
# The model


def _layer(params, l):
    """Layer l's weights out of the stacked [L, ...] tree."""
    return {k: ({kk: vv[l] for kk, vv in v.items()}) for k, v in params["layers"].items()}


def _attention_sequence(cfg, a, h, positions, segments):
    """One sequence. h: [T, D] normed inputs -> attention output [T, D] (after o)."""
    T, D = h.shape
    _, N, Hs = a["q"].shape
    G = a["k"].shape[1]
    group = N // G  # query heads per kv head: head n reads kv head n // group
    out = np.zeros((T, D))
    if "o_bias" in a:
        out += a["o_bias"]
    for n in range(N):
        g = n // group
        q = np.zeros((T, Hs))
        k = np.zeros((T, Hs))
        v = np.zeros((T, Hs))
        for t in range(T):
            q[t] = h[t] @ a["q"][:, n, :] + (a["q_bias"][n] if "q_bias" in a else 0.0)
            k[t] = h[t] @ a["k"][:, g, :] + (a["k_bias"][g] if "k_bias" in a else 0.0)
            v[t] = h[t] @ a["v"][:, g, :] + (a["v_bias"][g] if "v_bias" in a else 0.0)
            if cfg.positions == "rotary":
                q[t] = rope(q[t], positions[t], cfg.rope_theta)
                k[t] = rope(k[t], positions[t], cfg.rope_theta)
        for i in range(T):
            allowed = [j for j in range(T)
                       if (not cfg.causal or j <= i)
                       and (segments is None or segments[j] == segments[i])]
            scores = np.array([q[i] @ k[j] / math.sqrt(Hs) for j in allowed])
            w = softmax(scores)
            head_out = sum(wj * v[j] for wj, j in zip(w, allowed))
            out[i] += head_out @ a["o"][n]  # [H] @ [H, D]
    return out


def _mlp_vector(cfg, m, h):
    up = h @ m["up"] + m.get("up_bias", 0.0)
    if cfg.mlp == "swiglu":
        gate = h @ m["gate"] + m.get("gate_bias", 0.0)
        act = silu(gate) * up
    else:
        assert cfg.mlp == "gelu"
        act = gelu_tanh(up)
    return act @ m["down"] + m.get("down_bias", 0.0)


def reference_forward(cfg, params, tokens, positions=None, segment_ids=None):
    """tokens [B, T] -> hidden states after the final norm, [B, T, D] float64."""
    p = to_numpy(params)
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    if positions is None:
        if segment_ids is not None:
            positions = positions_from_segments_loop(segment_ids)
        else:
            positions = np.tile(np.arange(T), (B, 1))
    positions = np.asarray(positions)
    L = p["layers"]["attn"]["q"].shape[0]
    D = p["embed"].shape[1]
    hidden = np.zeros((B, T, D))
    for b in range(B):
        x = np.stack([p["embed"][tokens[b, t]] for t in range(T)])
        for t in range(T):
            if cfg.positions == "learned":
                x[t] = x[t] + p["pos_embed"][positions[b, t]]
            elif cfg.positions == "sinusoidal":
                x[t] = x[t] + sinusoidal_row(positions[b, t], D)
        segs = None if segment_ids is None else np.asarray(segment_ids)[b]
        for l in range(L):
            lp = _layer(p, l)
            h = np.stack([apply_norm(cfg, lp["attn_norm"], x[t]) for t in range(T)])
            x = x + _attention_sequence(cfg, lp["attn"], h, positions[b], segs)
            for t in range(T):
                x[t] = x[t] + _mlp_vector(cfg, lp["mlp"], apply_norm(cfg, lp["mlp_norm"], x[t]))
        for t in range(T):
            hidden[b, t] = apply_norm(cfg, p["final_norm"], x[t])
    return hidden


def reference_logits(cfg, params, tokens, positions=None, segment_ids=None):
    """tokens [B, T] -> logits [B, T, V] float64 (tied: hidden @ embed.T)."""
    hidden = reference_forward(cfg, params, tokens, positions, segment_ids)
    p = to_numpy(params)
    w = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return hidden @ w
