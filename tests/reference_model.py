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


def lora_merged(params, adapters, scale):
    """LoRA merged by hand in float64: W[l] viewed as (in, out) plus scale * A[l] @ B[l]
    (`llm_jax.lora`'s adapter tree: layers -> group -> target -> {"a", "b"})."""
    out = to_numpy(params)
    for group, targets in adapters["layers"].items():
        for t, ab in targets.items():
            w = out["layers"][group][t]
            a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
            n_in, n_out = a.shape[1], b.shape[2]  # shapes are checked against MATRIX elsewhere
            upd = np.stack([w[l].reshape(n_in, n_out) + scale * a[l] @ b[l] for l in range(w.shape[0])])
            out["layers"][group][t] = upd.reshape(w.shape)
    return out


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


# ---------------------------------------------------------------------------
# Test weights and decoding (for the sampler's tests)


def random_params(shapes, seed, *, residual_scale=6.0):
    """A params tree shaped like `shapes` (nested dicts whose leaves have .shape,
    e.g. `jax.eval_shape` of `llm_jax.model.init`), drawn by numpy at O(1)
    activation scale, float32.

    Why not init's weights: at init (std 0.02) a tied-embedding model's
    residual stream is its input embedding, so the greedy next token is the
    current token at every position whatever the cache, padding or positions
    do. Here the attention and MLP outputs (o, down) are `residual_scale` times
    a unit-variance map, so what the layers compute (context, positions) decides
    the argmax, and norms and biases are not the identity either."""
    rng = np.random.default_rng(seed)

    def draw(name, s):
        if name == "scale":
            return 1.0 + 0.2 * rng.standard_normal(s)
        if "bias" in name:
            return 0.2 * rng.standard_normal(s)
        if name in ("embed", "pos_embed", "type_embed"):
            return rng.standard_normal(s)
        if name in ("q", "k"):  # [L, D, heads, H]: scores of O(1), attention far from uniform
            return 2.0 * rng.standard_normal(s) / math.sqrt(s[1])
        if name == "v":
            return rng.standard_normal(s) / math.sqrt(s[1])
        if name == "o":  # [L, N, H, D]
            return residual_scale * rng.standard_normal(s) / math.sqrt(s[1] * s[2])
        if name in ("up", "gate"):  # [L, D, F]
            return rng.standard_normal(s) / math.sqrt(s[1])
        if name == "down":  # [L, F, D]
            return residual_scale * rng.standard_normal(s) / math.sqrt(s[1])
        if name in ("lm_head", "kernel"):  # [D, V] / [D, ...]
            return rng.standard_normal(s) / math.sqrt(s[0])
        raise KeyError(f"random_params: no rule for a param named {name!r}")

    def walk(tree, name=""):
        if isinstance(tree, dict):
            return {k: walk(v, k) for k, v in tree.items()}
        return np.asarray(draw(name, tuple(tree.shape)), np.float32)

    return walk(shapes)


def greedy_pick(step, logits, min_gap=1e-4):
    """argmax of each row of logits [B, V]; fails on a near tie (top two within
    `min_gap` of the row's scale), where float32 rounding in the model under
    test could pick the other token: such weights cannot decide a test."""
    out = []
    for row in np.asarray(logits, np.float64):
        top2 = np.sort(row)[-2:]
        scale = max(1.0, float(np.abs(row).max()))
        assert top2[1] - top2[0] > min_gap * scale, (
            f"step {step}: near tie in the reference's argmax ({top2[1] - top2[0]:.2e} of scale "
            f"{scale:.1f}); use weights with clear argmaxes")
        out.append(int(np.argmax(row)))
    return out


def decode(cfg, params, prompts, max_new_tokens, *, pick=greedy_pick, eos_id=-1, last_logits=None):
    """Decodes every prompt alone, with no padding and no cache: at each step the
    full forward over each row's whole sequence so far, its last position's
    logits stacked into [B, V] float64 (rows in prompt order), and
    `pick(step, logits) -> B token ids`. A row that produced `eos_id` is done:
    its output stops before the eos and it gets `eos_id` for the later steps
    (as a batched sampler fills a finished row).

    last_logits(seq) -> [V]: the forward to use; default the float64 reference
    forward of this module (`reference_logits`)."""
    if last_logits is None:
        def last_logits(seq):
            return reference_logits(cfg, params, np.asarray([seq]))[0, -1]
    seqs = [list(p) for p in prompts]
    outs = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        if all(done):
            break
        rows = {i: np.asarray(last_logits(s), np.float64) for i, s in enumerate(seqs) if not done[i]}
        finished = np.zeros_like(next(iter(rows.values())))
        finished[eos_id] = 1.0  # a finished row's logits: never read, but a clear argmax
        new = pick(step, np.stack([rows.get(i, finished) for i in range(len(seqs))]))
        for i, tok in enumerate(new):
            if done[i]:
                continue
            if int(tok) == eos_id:
                done[i] = True
                continue
            seqs[i].append(int(tok))
            outs[i].append(int(tok))
    return outs
