"""Tests for llm_jax.model (llm_jax.config's own tests are in test_config.py).

Expected numbers come from an independent computation, never from the code
under test: the float64 numpy loop transformer in `tests/reference_model.py`,
hand arithmetic with `math`, plain Python loops, or (for equivalences such as
KV-cache decoding == one full forward, packed == unpacked, scan == unrolled) a
second, differently computed path whose agreement is the property under test.

Speed: every model call goes through one jit cache (`_jit_apply`, keyed on the
frozen config and shapes), the configs are tiny (D=32, L=2, T<=10) and tests
reuse each other's compiled shapes where they can.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

# reference_model.py sits beside this file; pytest's rootdir import mode may not
# put tests/ on sys.path, so add it (the package itself is installed).
TESTS = pathlib.Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from llm_jax import model  # noqa: E402
from llm_jax.config import ConfigError, ModelConfig, preset  # noqa: E402
from llm_jax.errors import InputError  # noqa: E402

import reference_model as ref  # noqa: E402

# ---------------------------------------------------------------------------
# Tolerances
#
# float32 vs the float64 reference: float32's unit roundoff is 6e-8; a 2-layer
# forward with dot products of length <= 48 and two norms per layer accumulates
# ~1e-6 relative error (measured: <= 3e-7 of the logits' scale). Rounding error
# in a logit is proportional to the size of the terms summed into it, i.e. to the
# logits' scale, not to that logit's own value (a logit near 0 carries the same
# absolute error as a large one), so atol is 1e-5 of the scale and rtol 1e-4.
# A real formula error (wrong head grouping, RoPE layout, mask, norm) moves
# logits by O(scale), i.e. >1000x these bounds.
REF_RTOL, REF_ATOL = 1e-4, 1e-5
# float32 vs float32 computed in a different order (KV cache vs full forward,
# scan vs unrolled, remat): both sides carry ~1e-7 relative error.
SAME_RTOL, SAME_ATOL = 1e-5, 1e-6


def assert_logits_close(actual, expected, rtol, atol_of_scale):
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                               atol=atol_of_scale * scale)


# ---------------------------------------------------------------------------
# Configs and params


# All small test configs derive from the shared `tiny` preset, with smaller dims.
BASE = preset("tiny", vocab_size=61, d_model=32, d_ff=48, max_len=16)
B, T = 2, 8


def make_config(**kw) -> ModelConfig:
    return dataclasses.replace(BASE, **kw).validate()


def randomize(params, seed):
    """Every leaf redrawn at O(1) activation scale, so that biases are nonzero,
    norm scales are not 1, and attention is far from uniform (init's 0.02-std
    weights would make every attention row nearly flat and hide mask / RoPE /
    head-grouping mistakes)."""
    rng = np.random.default_rng(seed)

    def redraw(path, x):
        name, s = str(path[-1].key), x.shape
        if name == "scale":
            v = 1.0 + 0.2 * rng.standard_normal(s)
        elif "bias" in name:
            v = 0.2 * rng.standard_normal(s)
        elif name in ("embed", "pos_embed"):
            v = rng.standard_normal(s)
        elif name in ("q", "k"):  # [L, D, heads, H]
            v = 2.0 * rng.standard_normal(s) / math.sqrt(s[1])
        elif name == "v":
            v = rng.standard_normal(s) / math.sqrt(s[1])
        elif name == "o":  # [L, N, H, D]
            v = rng.standard_normal(s) / math.sqrt(s[1] * s[2])
        elif name in ("up", "gate", "down"):  # [L, in, out]
            v = rng.standard_normal(s) / math.sqrt(s[1])
        elif name == "lm_head":  # [D, V]
            v = rng.standard_normal(s) / math.sqrt(s[0])
        else:
            raise KeyError(f"randomize: unknown param {name}")
        return jnp.asarray(v, x.dtype)

    return jax.tree_util.tree_map_with_path(redraw, params)


def abstract_params(cfg):
    """init's tree of ShapeDtypeStructs: traced, never run or compiled."""
    return jax.eval_shape(lambda r: model.init(cfg, r), jax.random.PRNGKey(0))


def random_params(cfg, seed=0):
    """init's tree and dtypes, filled by numpy (eager init would compile a
    random-number kernel per new shape, which dominates a CPU test run)."""
    return randomize(abstract_params(cfg), seed)


def random_tokens(shape, seed=0, vocab=BASE.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_compiles():
    """This module compiles ~40 tiny programs whose compile time (LLVM's
    optimization passes) dwarfs their run time: turn those passes off for this
    module only (XLA's HLO passes, fusion included, still run) and restore the
    flag for the rest of the session. Halves the module's CPU time."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@functools.lru_cache(maxsize=None)
def _jit_apply(cfg):
    return jax.jit(functools.partial(model.apply, cfg))


@functools.lru_cache(maxsize=None)
def _jit_apply_with_cache(cfg):
    return jax.jit(functools.partial(model.apply_with_cache, cfg))


def logits_of(cfg, params, tokens, **kw):
    return np.asarray(_jit_apply(cfg)(params, jnp.asarray(tokens), **kw))


# Packed rows: [a a a b b b b pad] and a right-padded row.
PACKED = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)


# ---------------------------------------------------------------------------
# 1. The model against the numpy reference, over a covering grid of options.

GRID = {
    # name: (config overrides, segment_ids, explicit positions)
    "gpt2_like": (dict(positions="learned", norm="layernorm", mlp="gelu", causal=True,
                       num_kv_heads=None, use_bias=True, tie_embeddings=True), None, None),
    "llama_like_packed": (dict(positions="rotary", norm="rmsnorm", mlp="swiglu", causal=True,
                               num_kv_heads=2, use_bias=False, tie_embeddings=True), PACKED, None),
    "bert_like_packed": (dict(positions="learned", norm="layernorm", mlp="gelu", causal=False,
                              num_kv_heads=None, use_bias=True, tie_embeddings=True), PACKED, None),
    "sinusoidal_gqa_bias_untied": (dict(positions="sinusoidal", norm="rmsnorm", mlp="swiglu",
                                        causal=True, num_kv_heads=2, use_bias=True,
                                        tie_embeddings=False), None, None),
    "sinusoidal_encoder_mqa": (dict(positions="sinusoidal", norm="layernorm", mlp="gelu",
                                    causal=False, num_kv_heads=1, use_bias=False,
                                    tie_embeddings=False), None, None),
    "rotary_encoder_headdim6_packed": (dict(positions="rotary", norm="layernorm", mlp="gelu",
                                            causal=False, num_kv_heads=2, head_dim=6,
                                            rope_theta=500.0, use_bias=True,
                                            tie_embeddings=False), PACKED, None),
    "rotary_mha_bias_unrolled": (dict(positions="rotary", norm="rmsnorm", mlp="swiglu",
                                      causal=True, num_kv_heads=None, use_bias=True,
                                      tie_embeddings=False, scan_layers=False), None, None),
    "learned_mqa_packed_positions": (dict(positions="learned", norm="rmsnorm", mlp="gelu",
                                          causal=True, num_kv_heads=1, use_bias=False,
                                          tie_embeddings=True), PACKED,
                                     np.array([[3, 4, 5, 0, 1, 2, 3, 9], [5, 6, 7, 8, 9, 10, 11, 12]])),
}


@pytest.mark.parametrize("name", list(GRID))
def test_logits_match_numpy_reference(name):
    overrides, segment_ids, positions = GRID[name]
    cfg = make_config(**overrides)
    params = random_params(cfg, seed=len(name))
    # The params tree has the documented shapes.
    N, G, H = cfg.num_heads, cfg.kv_heads, cfg.head_size
    attn = params["layers"]["attn"]
    assert attn["q"].shape == (cfg.num_layers, cfg.d_model, N, H)
    assert attn["k"].shape == attn["v"].shape == (cfg.num_layers, cfg.d_model, G, H)
    assert attn["o"].shape == (cfg.num_layers, N, H, cfg.d_model)
    assert ("pos_embed" in params) == (cfg.positions == "learned")
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    assert ("q_bias" in attn) == cfg.use_bias
    assert ("gate" in params["layers"]["mlp"]) == (cfg.mlp == "swiglu")
    assert ("bias" in params["final_norm"]) == (cfg.norm == "layernorm")

    tokens = random_tokens((B, T), seed=1)
    kw = {}
    if segment_ids is not None:
        kw["segment_ids"] = jnp.asarray(segment_ids)
    if positions is not None:
        kw["positions"] = jnp.asarray(positions)
    got = logits_of(cfg, params, tokens, **kw)
    assert got.shape == (B, T, cfg.vocab_size) and got.dtype == np.float32
    expected = ref.reference_logits(cfg, params, tokens, positions=positions, segment_ids=segment_ids)
    assert_logits_close(got, expected, REF_RTOL, REF_ATOL)


def test_reference_is_sensitive_to_head_grouping_and_rope_layout():
    """Guards the reference itself. (a) Serving query head n from kv head n % G
    (instead of n // (N/G), as jax.nn.dot_product_attention groups them) is the
    same as permuting the query heads; that moves the logits by O(scale), so the
    grid above would catch a grouping mistake. (b) The reference's RoPE rotates
    the half-split pairs (x[i], x[i + H/2]) by pos * theta^(-2i/H)."""
    cfg = make_config(num_kv_heads=2)
    params = random_params(cfg, seed=3)
    tokens = random_tokens((1, 6), seed=2)
    good = ref.reference_logits(cfg, params, tokens)
    N, G = cfg.num_heads, cfg.kv_heads
    wrong_slot = [(n % G) * (N // G) + n // G for n in range(N)]  # head n -> slot served by kv n % G
    perm = np.argsort(wrong_slot)
    swapped = jax.tree.map(lambda x: x, params)
    swapped["layers"]["attn"]["q"] = params["layers"]["attn"]["q"][:, :, perm]
    swapped["layers"]["attn"]["o"] = params["layers"]["attn"]["o"][:, perm]
    assert np.abs(ref.reference_logits(cfg, swapped, tokens) - good).max() > 1e-2 * np.abs(good).max()

    x = np.random.default_rng(0).standard_normal(8)
    pos, theta = 3.0, 10_000.0
    rot = ref.rope(x, pos, theta)
    for i in range(4):
        a = pos * theta ** (-2 * i / 8)
        np.testing.assert_allclose(rot[i], x[i] * math.cos(a) - x[i + 4] * math.sin(a), rtol=1e-12)
        np.testing.assert_allclose(rot[i + 4], x[i + 4] * math.cos(a) + x[i] * math.sin(a), rtol=1e-12)


def test_rotary_and_sinusoidal_building_blocks():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 2, 8)).astype(np.float32)
    pos = np.array([[0, 1, 7], [4, 2, 11]])
    freqs = (10_000.0 ** (-np.arange(4) / 4)).astype(np.float32)  # theta^(-2i/H), H = 8
    got = np.asarray(jax.jit(model.rotary)(jnp.asarray(x), jnp.asarray(pos), freqs=jnp.asarray(freqs)))
    expected = np.zeros(x.shape)
    for b, t, n in np.ndindex(2, 3, 2):
        expected[b, t, n] = ref.rope(x[b, t, n].astype(np.float64), pos[b, t], 10_000.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Rotation preserves norms; position 0 is the identity.
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(got[0, 0], x[0, 0], rtol=1e-6)
    got = np.asarray(jax.jit(model.sinusoidal, static_argnums=1)(jnp.asarray(pos), 16))
    expected = np.array([[ref.sinusoidal_row(p, 16) for p in row] for row in pos])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# 2. The seeds' attention toy.


def test_attention_toy_from_the_seeds():
    # Query "sat" (0.2, 0.8); keys cat (0.9, 0.1), sat (0.3, 0.7); values one-hot.
    q = jnp.array([0.2, 0.8], jnp.float32).reshape(1, 1, 1, 2)
    k = jnp.array([[0.9, 0.1], [0.3, 0.7]], jnp.float32).reshape(1, 2, 1, 2)
    v = jnp.array([[1.0, 0.0], [0.0, 1.0]], jnp.float32).reshape(1, 2, 1, 2)
    out = np.asarray(model.attention(q, k, v, None, scale=1.0))
    assert out.shape == (1, 1, 1, 2)
    s_cat, s_sat = 0.2 * 0.9 + 0.8 * 0.1, 0.2 * 0.3 + 0.8 * 0.7  # 0.26, 0.62
    assert (round(s_cat, 2), round(s_sat, 2)) == (0.26, 0.62)
    w_cat = math.exp(s_cat) / (math.exp(s_cat) + math.exp(s_sat))
    w_sat = math.exp(s_sat) / (math.exp(s_cat) + math.exp(s_sat))
    assert [round(float(o), 2) for o in out[0, 0, 0]] == [0.41, 0.59]
    np.testing.assert_allclose(out[0, 0, 0], [w_cat, w_sat], rtol=1e-6)
    # Default scale 1/sqrt(H) = 1/sqrt(2).
    out = np.asarray(model.attention(q, k, v, None))
    w = 1.0 / (1.0 + math.exp((s_sat - s_cat) / math.sqrt(2)))
    np.testing.assert_allclose(out[0, 0, 0], [w, 1 - w], rtol=1e-6)
    # A mask that hides "sat" puts all weight on "cat".
    mask = jnp.array([True, False]).reshape(1, 1, 1, 2)
    np.testing.assert_allclose(np.asarray(model.attention(q, k, v, mask, scale=1.0))[0, 0, 0], [1.0, 0.0])


# ---------------------------------------------------------------------------
# 3. KV cache

KV_CONFIGS = {
    "rotary_gqa": dict(positions="rotary", norm="rmsnorm", mlp="swiglu", num_kv_heads=2, use_bias=True),
    "learned_mha": dict(positions="learned", norm="layernorm", mlp="gelu", num_kv_heads=None,
                        use_bias=True),
}
KV_T = 10  # tokens per row in the KV tests; the cache holds max_len = 16 slots


def _kv_setup(name):
    cfg = make_config(**KV_CONFIGS[name])
    params = random_params(cfg, seed=11)
    tokens = random_tokens((B, KV_T), seed=12)
    full = logits_of(cfg, params, tokens)
    return cfg, params, tokens, full


def _decode_in_chunks(cfg, params, tokens, chunks):
    step = _jit_apply_with_cache(cfg)
    cache = model.init_cache(cfg, tokens.shape[0])
    assert cache["k"].shape == (cfg.num_layers, tokens.shape[0], cfg.max_len, cfg.kv_heads, cfg.head_size)
    out, start = [], 0
    for n in chunks:
        logits, cache = step(params, jnp.asarray(tokens[:, start:start + n]), cache)
        assert logits.shape == (tokens.shape[0], n, cfg.vocab_size)
        out.append(np.asarray(logits))
        start += n
        assert int(cache["index"]) == start
    assert start == tokens.shape[1]
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("name", list(KV_CONFIGS))
def test_kv_cache_prefill_then_decode_matches_full_forward(name):
    cfg, params, tokens, full = _kv_setup(name)
    # The full forward itself is right (against the numpy reference) ...
    assert_logits_close(full, ref.reference_logits(cfg, params, tokens), REF_RTOL, REF_ATOL)
    # ... and prefill 4 + six single-token steps reproduce it.
    got = _decode_in_chunks(cfg, params, tokens, [4] + [1] * (KV_T - 4))
    assert_logits_close(got, full, SAME_RTOL, SAME_ATOL)


def test_kv_cache_chunked_prefill():
    cfg, params, tokens, full = _kv_setup("rotary_gqa")
    got = _decode_in_chunks(cfg, params, tokens, [5, 3, 1, 1])
    assert_logits_close(got, full, SAME_RTOL, SAME_ATOL)


def test_kv_cache_left_padded_batch():
    """Row 0: 3 pad tokens (segment 0), then 5 real prompt tokens with positions
    counted from the first real token; row 1: 8 real tokens. Both then decode 2
    tokens. Each row's real logits equal an unpadded forward of that row alone."""
    cfg, params, tokens, full = _kv_setup("rotary_gqa")
    pad = 3
    row0 = random_tokens((1, 7), seed=13)[0]  # 5 prompt + 2 decoded
    prompt = np.stack([np.concatenate([[0] * pad, row0[:5]]), tokens[1, :8]]).astype(np.int32)
    segs = np.array([[0] * pad + [1] * 5, [1] * 8], np.int32)
    pos = np.array([[0] * pad + list(range(5)), list(range(8))], np.int32)
    step = _jit_apply_with_cache(cfg)
    cache = model.init_cache(cfg, B)
    logits, cache = step(params, jnp.asarray(prompt), cache, positions=jnp.asarray(pos),
                         segment_ids=jnp.asarray(segs))
    outs = [np.asarray(logits)]
    for i in range(2):
        new = np.array([[row0[5 + i]], [tokens[1, 8 + i]]], np.int32)
        new_pos = np.array([[5 + i], [8 + i]], np.int32)
        logits, cache = step(params, jnp.asarray(new), cache, positions=jnp.asarray(new_pos))
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, axis=1)  # [2, 10, V]
    alone0 = logits_of(cfg, params, row0[None])  # [1, 7, V]
    assert_logits_close(got[0, pad:], alone0[0], SAME_RTOL, SAME_ATOL)
    assert_logits_close(got[1], full[1], SAME_RTOL, SAME_ATOL)  # row 1 = tokens[1]
    # Independent check of the unpadded row too.
    assert_logits_close(alone0, ref.reference_logits(cfg, params, row0[None]), REF_RTOL, REF_ATOL)


def test_kv_cache_rejects_encoder():
    cfg = make_config(causal=False)
    params = random_params(cfg)
    with pytest.raises(ConfigError, match="model.causal=False"):
        model.apply_with_cache(cfg, params, jnp.zeros((1, 2), jnp.int32), model.init_cache(cfg, 1, 4))


# ---------------------------------------------------------------------------
# 4. Packing


def test_positions_from_segments_matches_loop():
    rng = np.random.default_rng(7)
    # Packed, left-padded, random ids (0 anywhere, repeats, singletons), sorted.
    seg = np.concatenate([PACKED, [[0, 0, 0, 1, 1, 1, 1, 1]], rng.integers(0, 3, (5, 8)),
                          np.sort(rng.integers(1, 4, (3, 8)), axis=1)]).astype(np.int32)
    got = np.asarray(jax.jit(model.positions_from_segments)(jnp.asarray(seg)))
    np.testing.assert_array_equal(got, ref.positions_from_segments_loop(seg))
    np.testing.assert_array_equal(got[:3], [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 0, 1, 2, 3],
                                            [0, 1, 2, 0, 1, 2, 3, 4]])


@pytest.mark.parametrize("name", ["llama_like_packed", "bert_like_packed"])
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_packed_row_equals_sequences_run_alone(name, explicit_positions):
    overrides, _, _ = GRID[name]
    cfg = make_config(**overrides)
    params = random_params(cfg, seed=len(name))  # same params/compile as the grid test
    tokens = random_tokens((B, T), seed=1)
    kw = dict(segment_ids=jnp.asarray(PACKED))
    if explicit_positions:
        kw["positions"] = jnp.asarray(ref.positions_from_segments_loop(PACKED))
    packed = logits_of(cfg, params, tokens, **kw)
    a, b = tokens[:1, :3], tokens[:1, 3:7]
    assert_logits_close(packed[0, :3], logits_of(cfg, params, a)[0], SAME_RTOL, SAME_ATOL)
    assert_logits_close(packed[0, 3:7], logits_of(cfg, params, b)[0], SAME_RTOL, SAME_ATOL)
    # The right-padded row: its 4 real tokens as if alone.
    assert_logits_close(packed[1, :4], logits_of(cfg, params, tokens[1:, :4])[0],
                        SAME_RTOL, SAME_ATOL)


# ---------------------------------------------------------------------------
# 5. scan vs unrolled layers, rematerialization


def test_scan_unrolled_and_remat_agree_on_logits_and_gradients():
    overrides = dict(GRID["llama_like_packed"][0], use_bias=True)
    tokens = jnp.asarray(random_tokens((B, T), seed=21))
    w = jnp.asarray(np.random.default_rng(22).standard_normal((B, T, BASE.vocab_size)), jnp.float32)

    def run(**variant):
        cfg = make_config(**overrides, **variant)

        def loss(params):
            logits = model.apply(cfg, params, tokens, segment_ids=jnp.asarray(PACKED))
            return jnp.sum(logits * w), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    params = random_params(make_config(**overrides), seed=23)
    (_, base_logits), base_grads = run(scan_layers=True, remat="none")
    # The loss is sum(w * logits) with random w: every logit and every weight gets a gradient.
    assert np.abs(np.asarray(base_logits)).max() > 1.0
    base_by_path = dict(jax.tree_util.tree_leaves_with_path(base_grads))
    for variant in (dict(scan_layers=False, remat="none"), dict(scan_layers=True, remat="full"),
                    dict(scan_layers=True, remat="dots")):
        (_, logits), grads = run(**variant)
        assert_logits_close(logits, base_logits, SAME_RTOL, SAME_ATOL)
        assert jax.tree.structure(grads) == jax.tree.structure(base_grads)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            g0 = base_by_path[path]
            assert np.abs(np.asarray(g0)).max() > 0, path
            gscale = max(1.0, float(np.abs(np.asarray(g0)).max()))
            np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=SAME_RTOL,
                                       atol=SAME_ATOL * gscale, err_msg=f"{variant} {path}")


# ---------------------------------------------------------------------------
# 6. dtypes


def test_bfloat16_compute_with_float32_params():
    overrides, segment_ids, _ = GRID["llama_like_packed"]
    cfg32 = make_config(**overrides)
    cfg16 = make_config(**overrides, dtype="bfloat16")
    params = random_params(cfg32, seed=len("llama_like_packed"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract_params(cfg16)))
    tokens = random_tokens((B, T), seed=1)
    kw = dict(segment_ids=jnp.asarray(segment_ids))
    l32 = logits_of(cfg32, params, tokens, **kw)
    l16 = logits_of(cfg16, params, tokens, **kw)
    assert l16.dtype == np.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # not cast in place
    # The residual stream really is bfloat16 (abstract evaluation: no compile).
    hidden = jax.eval_shape(lambda p, t: model.forward(cfg16, p, t, **kw), params, jnp.asarray(tokens))
    assert hidden.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits: each rounding costs up to 2^-9 ~ 0.2%
    # relative. Along the path embed -> 2 x (norm, q/k/v, attention, o, residual,
    # norm, up/gate, down, residual) -> final norm -> logits there are ~25
    # roundings, so the hidden state is off by ~sqrt(25) x 0.2% = 1% (random
    # walk) and each logit by ~1% of the logits' scale; allow 5% of the scale
    # elementwise and 2% in relative RMS. A float32 -> bfloat16 mistake that
    # changes the math (wrong cast of a mask, lost bias) is far larger.
    scale = np.abs(l32).max()
    np.testing.assert_allclose(l16, l32, rtol=0, atol=0.05 * scale)
    rel_rms = np.sqrt(np.mean((l16 - l32) ** 2) / np.mean(l32 ** 2))
    assert rel_rms < 0.02, rel_rms
    assert rel_rms > 0  # it really ran in bfloat16


def test_param_dtype_bfloat16():
    cfg = make_config(param_dtype="bfloat16", use_bias=True, norm="layernorm", tie_embeddings=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(abstract_params(cfg)))
    head = jax.eval_shape(lambda r: model.init_scalar_head(cfg, r), jax.random.PRNGKey(1))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(head))
    params = random_params(cfg, seed=4)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    # bfloat16 storage, float32 compute: the same logits as the float32 model
    # given the same (bfloat16-representable) weights.
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    cfg32 = dataclasses.replace(cfg, param_dtype="float32")
    tokens = random_tokens((1, 4), seed=5)
    logits = logits_of(cfg, params, tokens)
    assert logits.dtype == np.float32
    assert_logits_close(logits, ref.reference_logits(cfg32, params32, tokens), REF_RTOL, REF_ATOL)


def test_init_statistics():
    """init: N(0, init_std) matrices, output projections N(0, init_std/sqrt(2L)),
    norm scales 1, biases 0 (GPT-2's scheme)."""
    cfg = make_config(use_bias=True, norm="layernorm", d_model=64, d_ff=128, vocab_size=256)
    # An "rbg" key: the same init code and statistics, half the compile time of threefry on CPU.
    params = jax.jit(functools.partial(model.init, cfg))(jax.random.key(0, impl="rbg"))
    std = lambda x: float(np.asarray(x).std())  # noqa: E731
    assert std(params["embed"]) == pytest.approx(0.02, rel=0.05)
    assert std(params["layers"]["attn"]["q"]) == pytest.approx(0.02, rel=0.05)
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    assert std(params["layers"]["attn"]["o"]) == pytest.approx(out_std, rel=0.05)
    assert std(params["layers"]["mlp"]["down"]) == pytest.approx(out_std, rel=0.05)
    assert np.all(np.asarray(params["final_norm"]["scale"]) == 1.0)
    assert np.all(np.asarray(params["layers"]["attn"]["q_bias"]) == 0.0)
    # Different leaves get different random draws.
    q, k = np.asarray(params["layers"]["attn"]["q"]), np.asarray(params["layers"]["attn"]["k"])
    assert not np.allclose(q[..., : k.shape[2], :], k)


# ---------------------------------------------------------------------------
# 7. Dropout


def test_dropout():
    overrides, _, _ = GRID["gpt2_like"]
    cfg0 = make_config(**overrides)
    cfg = make_config(**overrides, dropout=0.3)
    params = random_params(cfg0, seed=len("gpt2_like"))
    tokens = random_tokens((B, T), seed=1)
    base = logits_of(cfg0, params, tokens)
    # No rng: deterministic, identical to the dropout=0 model.
    np.testing.assert_array_equal(logits_of(cfg, params, tokens), base)
    r1, r2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a = logits_of(cfg, params, tokens, dropout_rng=r1)
    b = logits_of(cfg, params, tokens, dropout_rng=r2)
    np.testing.assert_array_equal(logits_of(cfg, params, tokens, dropout_rng=r1), a)  # reproducible
    assert np.abs(a - b).max() > 1e-2 * np.abs(base).max()
    assert np.abs(a - base).max() > 1e-2 * np.abs(base).max()


def test_dropout_is_inverted_dropout():
    """Each element is zeroed with probability `rate` and the kept ones are scaled
    by 1/(1 - rate), so the expected activation is unchanged."""
    rate, n = 0.3, 64_000
    x = jnp.ones((4, 250, 64), jnp.float32)
    y = np.asarray(jax.jit(model._dropout, static_argnums=1)(x, rate, jax.random.PRNGKey(0)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-6)
    # Binomial: the dropped fraction is within 5 standard deviations (0.009) of 0.3.
    assert abs((~kept).mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    np.testing.assert_array_equal(model._dropout(x, rate, None), x)


# ---------------------------------------------------------------------------
# 8. Scalar head and last-token reads


def test_scalar_head_matches_numpy():
    cfg = make_config()
    head = model.init_scalar_head(cfg, jax.random.PRNGKey(0))
    assert head["kernel"].shape == (cfg.d_model,) and head["bias"].shape == ()
    head = {"kernel": head["kernel"] * 10, "bias": jnp.asarray(0.7, jnp.float32)}
    hidden = np.random.default_rng(0).standard_normal((2, 5, cfg.d_model)).astype(np.float32)
    got = np.asarray(model.scalar_head(head, jnp.asarray(hidden)))
    kernel = np.asarray(head["kernel"], np.float64)
    expected = np.zeros((2, 5))
    for b, t in np.ndindex(2, 5):
        expected[b, t] = sum(hidden[b, t, d] * kernel[d] for d in range(cfg.d_model)) + 0.7
    assert got.shape == (2, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # bfloat16 hidden still gives float32 values.
    assert model.scalar_head(head, jnp.asarray(hidden, jnp.bfloat16)).dtype == jnp.float32


def last_token_loop(values, segment_ids, num_segments):
    out = np.zeros((values.shape[0], num_segments))
    for b in range(values.shape[0]):
        for s in range(1, num_segments + 1):
            for t in range(values.shape[1]):
                if segment_ids[b, t] == s:
                    out[b, s - 1] = values[b, t]  # the last one wins
    return out


def test_last_token_values():
    last_token_values = jax.jit(model.last_token_values, static_argnames="num_segments")
    values = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    # Unpacked rows, right padding (0/1 mask); the last row is all padding -> 0.
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.int32)
    got = np.asarray(last_token_values(jnp.asarray(values), jnp.asarray(mask)))
    assert got.shape == (3, 1)
    np.testing.assert_array_equal(got, last_token_loop(values, mask, 1))
    np.testing.assert_array_equal(got[:, 0], [values[0, 2], values[1, 5], 0.0])
    # Packed rows with two segments; row 2 lacks segment 2 -> 0.
    segs = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0]], np.int32)
    got = np.asarray(last_token_values(jnp.asarray(values), jnp.asarray(segs), num_segments=2))
    assert got.shape == (3, 2)
    np.testing.assert_array_equal(got, last_token_loop(values, segs, 2))
    np.testing.assert_array_equal(got[2], [values[2, 3], 0.0])


# ---------------------------------------------------------------------------
# 9. Model checks of its config (the config's own tests are in test_config.py)


def test_lm_head_transform_needs_a_gelu_mlp():
    # BERT's head transform takes its GELU from model.mlp; a swiglu model has none
    # to give, and used to get erf GELU silently.
    with pytest.raises(ConfigError, match=r"lm_head_transform=True .* model.mlp, which is 'swiglu'"):
        model.init(ModelConfig(mlp="swiglu", lm_head_transform=True), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match=r"model.mlp='swiglu' has no single activation"):
        model.activation(ModelConfig(mlp="swiglu"), jnp.ones(3))
    x = np.linspace(-3.0, 3.0, 7)
    erf_gelu = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    tanh_gelu = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(model.activation(ModelConfig(mlp="gelu_exact"), jnp.asarray(x, jnp.float32)),
                               erf_gelu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.activation(ModelConfig(mlp="gelu"), jnp.asarray(x, jnp.float32)),
                               tanh_gelu, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# 10. Presets: parameter counts, abstractly (no big arrays materialized).


def abstract_count(cfg):
    shapes = jax.eval_shape(lambda r: model.init(cfg, r), jax.random.PRNGKey(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_preset_param_counts():
    # GPT-2 small, by hand: tokens + 1024 learned positions (tied output), per layer
    # qkv+o weights and biases, MLP weights and biases, two LayerNorms; final LN.
    V, D, P, L, F = 50257, 768, 1024, 12, 3072
    gpt2 = V * D + P * D + L * (4 * D * D + 4 * D + 2 * D * F + F + D + 4 * D) + 2 * D
    assert gpt2 == 124_439_808  # the published GPT-2 small count
    assert abstract_count(preset("gpt2")) == gpt2
    # Llama 3.2 1B: tied 128256 x 2048 embedding, GQA 32/8 heads of 64, SwiGLU 8192, RMSNorm.
    V, D, L, F, N, G, H = 128256, 2048, 16, 8192, 32, 8, 64
    llama = V * D + L * (D * N * H + 2 * D * G * H + N * H * D + 3 * D * F + 2 * D) + D
    assert llama == 1_235_814_400
    assert abstract_count(preset("llama")) == llama
    # Llama 2 7B: untied 32000 x 4096 embedding and head, MHA, SwiGLU 11008.
    V, D, L, F = 32000, 4096, 32, 11008
    llama7b = 2 * V * D + L * (4 * D * D + 3 * D * F + 2 * D) + D
    assert llama7b == 6_738_415_616
    assert abstract_count(preset("llama7b")) == llama7b
    # Llama 3 8B: untied 128256 x 4096 embedding and head, GQA 32/8 heads of 128, SwiGLU 14336.
    V, D, L, F, N, G, H = 128256, 4096, 32, 14336, 32, 8, 128
    llama3_8b = 2 * V * D + L * (D * N * H + 2 * D * G * H + N * H * D + 3 * D * F + 2 * D) + D
    assert llama3_8b == 8_030_261_248  # the published Meta-Llama-3-8B count
    assert abstract_count(preset("llama3_8b")) == llama3_8b
    # GPT-2 medium: 355M (the published count, tied head).
    V, D, P, L, F = 50257, 1024, 1024, 24, 4096
    assert abstract_count(preset("gpt2_medium")) == (
        V * D + P * D + L * (4 * D * D + 4 * D + 2 * D * F + F + D + 4 * D) + 2 * D) == 354_823_168
    # BERT-base is 110M with token types and pooler, which this pre-norm shape lacks.
    assert 85e6 < abstract_count(preset("bert")) < 115e6
    # model.count_params agrees on a small materialized model.
    cfg = make_config()
    assert model.count_params(random_params(cfg)) == abstract_count(cfg)


def test_kv_cache_overflow_is_an_error_outside_jit():
    cfg = preset("tiny")
    params = jax.eval_shape(lambda r: model.init(cfg, r), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    cache = model.init_cache(cfg, batch=1, length=4)
    _, cache = model.apply_with_cache(cfg, params, jnp.ones((1, 3), jnp.int32), cache)
    with pytest.raises(InputError, match="KV cache overflow: 3 slots used \\+ 2 new tokens > 4"):
        model.apply_with_cache(cfg, params, jnp.ones((1, 2), jnp.int32), cache)


# ---------------------------------------------------------------------------
# Hand-written derivatives (GELU, tied LM head on CPU)


def test_gelu_tanh_values_and_derivatives():
    """The custom-JVP GELU gives jax.nn.gelu's values, and its first derivative in both
    modes agrees with finite differences and with autodiff of the plain tanh form."""
    x = jnp.linspace(-6.0, 6.0, 97, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(model.gelu_tanh(x)),
                                  np.asarray(jax.nn.gelu(x, approximate=True)))
    check_grads(model.gelu_tanh, (x,), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    plain = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=True)))(x)
    ours = jax.vmap(jax.grad(model.gelu_tanh))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=1e-5, atol=1e-6)
    # x64-free hand value: d/dx gelu at 0 is 0.5.
    assert abs(float(jax.grad(model.gelu_tanh)(0.0)) - 0.5) < 1e-7


@pytest.mark.parametrize("tied", [True, False])
def test_cpu_tied_head_backward_matches_autodiff(monkeypatch, tied):
    """The LM head's backward in both of its forms, switched by `_cpu_tied_head`
    (the CPU-only custom backward of the tied head, and the plain einsum other
    backends use), against float64 numpy: logits = h @ W with W = embed^T (tied)
    or lm_head, so d sum(logits * g) is g @ W^T for h and h^T @ g for W. Untied,
    the switch must not matter (there is no custom form) and the head's gradient
    goes to lm_head, none of it to the embedding. Tied, the two forms also agree
    through the whole model (the head's and the input lookup's embedding
    gradients add up)."""
    cfg = make_config(tie_embeddings=tied)
    params = random_params(cfg, seed=31)
    rng = np.random.default_rng(33)
    w = jnp.asarray(rng.standard_normal((B, T, cfg.vocab_size)), jnp.float32)
    hidden = jnp.asarray(rng.standard_normal((B, T, cfg.d_model)), jnp.float32)
    g64, h64 = np.asarray(w, np.float64), np.asarray(hidden, np.float64)
    W = np.asarray(params["embed"], np.float64).T if tied else np.asarray(params["lm_head"], np.float64)
    want_h = np.einsum("btv,dv->btd", g64, W)
    want_w = np.einsum("btd,btv->dv", h64, g64)  # [D, V]

    def close(got, want, what):
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=REF_RTOL, atol=REF_ATOL * scale,
                                   err_msg=what)

    for custom in (True, False):
        monkeypatch.setattr(model, "_cpu_tied_head", lambda custom=custom: custom)
        d_h, d_p = jax.jit(jax.grad(lambda h, p: jnp.sum(model.lm_logits(cfg, p, h) * w),
                                    argnums=(0, 1)))(hidden, params)
        close(d_h, want_h, f"d hidden, custom={custom}")
        if tied:
            close(np.asarray(d_p["embed"]).T, want_w, f"d embed, custom={custom}")
        else:
            close(d_p["lm_head"], want_w, f"d lm_head, custom={custom}")
            assert not np.any(np.asarray(d_p["embed"])), "the untied head's gradient reached the embedding"
    if not tied:
        return

    tokens = jnp.asarray(random_tokens((B, T), seed=32))

    def grads():
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply(cfg, p, tokens) * w)))(params)

    monkeypatch.setattr(model, "_cpu_tied_head", lambda: True)
    custom = grads()
    monkeypatch.setattr(model, "_cpu_tied_head", lambda: False)
    plain = grads()
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(custom), jax.tree.leaves(plain)):
        scale = max(1.0, float(np.abs(np.asarray(b)).max()))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=str(path))
