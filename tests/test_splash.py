"""Tests for attention_impl="splash" (`llm_jax.splash`, routed by `model.attention`).

Expected numbers come from computations independent of the kernel: a float64
numpy attention (`reference_attention`) and XLA's path
(`jax.nn.dot_product_attention` with the dense mask built by `model.make_mask`).
On CPU the kernel runs in Pallas interpret mode: the same kernel code (online
softmax over q/kv blocks, causal block skipping, in-block segment masks), which
is slow, so shapes are the smallest the kernel takes (T a multiple of 128).
The last tests compile for a TPU topology with the real TPU compiler (libtpu)
and check that the Mosaic kernel is in the program.

Tolerances, relative to the largest magnitude of the expected array (rounding
error in a sum scales with the terms summed, not with the result's own value);
eps = 2^-23 (float32), u = 2^-8 (bfloat16's unit roundoff):

  float32: the compared paths compute the same sums in different orders: the
    kernel sums scores block by block with an online softmax (rescaling partial
    sums by exp(m_old - m_new)) and its backward recomputes probabilities from
    the saved log-sum-exp, where XLA makes one pass over a full row; under a
    mesh, the model's sharded matmuls reduce across devices. Reordering a sum
    of n terms moves it by a random walk of ~sqrt(n) eps of the terms' scale,
    and the largest of thousands of such errors stays within ~4 of those:
    `f32_tol(n)` = 4 sqrt(n) eps, n the longest sum behind the number (S keys
    for attention, B*T tokens for a weight's gradient). Measured, in eps:
    attention forward 2.0 vs numpy float64 (XLA: 2.3), input gradients 7.4 vs
    XLA (bound 78); model gradients 12 vs XLA (bound 64); model gradients on 8
    devices vs one 23 (bound 90; XLA's path: 21).
  bfloat16: the forward rounds twice to bfloat16 (q after the 1/sqrt(H)
    scaling, the output; scores, softmax and the p @ v accumulation are float32
    inside the kernel): allow 2u. Measured: 0.6u (XLA's bfloat16 path, which
    also rounds the probabilities: 1.0u). The backward also reads the rounded
    output (D = rowsum(dO * O)) and rounds the gradient: allow 3u. Measured:
    1.8u (XLA: 1.1u).
  bfloat16 through the whole model: see `test_model_gradients_match_xla`.

A wrong mask, head grouping or scale moves results by O(1) of their scale
(dropping the segment ids moves the model's gradients by 94% relative RMS),
> 10^4 times the float32 bounds and > 30 times the bfloat16 ones.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import aot, model, sharding, splash, train
from llm_jax.config import ConfigError, MeshConfig, OptimizerConfig, preset
from llm_jax.stages import pretrain
from tpu_compiler import require_libtpu


def f32_tol(n: int) -> float:
    """4 sqrt(n) float32 eps: see the module docstring."""
    return 4 * np.sqrt(n) * float(np.finfo(np.float32).eps)


BF16_U = 2.0 ** -8  # bfloat16 keeps 8 significant bits
BF16_FWD_TOL = 2 * BF16_U
BF16_GRAD_TOL = 3 * BF16_U

N, G, H = 4, 2, 32  # grouped-query: query head n reads key/value head n // 2


def packed_segments(lengths_per_row, T):
    """[B, T] int32 segment ids 1, 2, ... of the given lengths, then 0 (padding)."""
    rows = []
    for lengths in lengths_per_row:
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
        rows.append(np.concatenate([ids, np.zeros(T - len(ids))]))
    return np.stack(rows).astype(np.int32)


# T = 384: three 128-blocks (`splash.block_size`), so the online softmax crosses
# block boundaries and causal blocks above the diagonal are skipped. Segments
# are ragged, start mid-block, one spans all three blocks, rows end in padding.
T_ATTN = 384
SEGMENTS = packed_segments([(150, 100, 90), (7, 250, 60, 20)], T_ATTN)


def reference_attention(q, k, v, segment_ids, causal):
    """float64 numpy: softmax(q k^T / sqrt(H), masked) v, query head n reading
    key/value head n // (N / G); tokens see their own segment (and, if causal,
    earlier slots)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    T, n_heads, h = q.shape[1:]
    k, v = (np.repeat(x, n_heads // x.shape[2], axis=2) for x in (k, v))
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    allowed = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if causal:
        allowed = allowed & (np.arange(T)[None, :] <= np.arange(T)[:, None])
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


def random_qkv(B, T, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H))
    k, v = rng.standard_normal((2, B, T, G, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@functools.partial(jax.jit, static_argnames=("impl", "causal"))
def attend(q, k, v, segment_ids, *, impl, causal):
    return model.attention(q, k, v, None, causal=causal, impl=impl, segment_ids=segment_ids)


@functools.partial(jax.jit, static_argnames=("impl", "causal"))
def attend_grads(q, k, v, segment_ids, cotangent, *, impl, causal):
    """d/d(q, k, v) of sum(out * cotangent), in float32 whatever q's dtype."""
    def f(q, k, v):
        out = model.attention(q, k, v, None, causal=causal, impl=impl, segment_ids=segment_ids)
        return jnp.sum(out.astype(jnp.float32) * cotangent)
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)


def assert_close(actual, expected, tol, what):
    expected = np.asarray(expected, np.float64)
    err = np.abs(np.asarray(actual, np.float64) - expected).max()
    scale = np.abs(expected).max()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} x scale {scale:.3g}"


def jaxpr_text(f, *args):
    return str(jax.make_jaxpr(f)(*args))


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_compiles():
    """As in test_model: LLVM's optimization passes dominate these small CPU
    programs' compile time; without them the module takes ~50 s instead of ~90 s
    on a busy 2-core machine (the measured errors are the same to 2 digits).
    Restored afterwards, and around the TPU compile, which must compile what a
    TPU run compiles."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# ---------------------------------------------------------------------------
# 1. The kernel against float64 numpy and XLA: forward and input gradients.


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_matches_reference_and_xla(dtype, causal):
    q, k, v = random_qkv(2, T_ATTN, dtype)
    seg = jnp.asarray(SEGMENTS)
    expected = reference_attention(q, k, v, SEGMENTS, causal)  # from the same (rounded) inputs
    got = attend(q, k, v, seg, impl="splash", causal=causal)
    assert got.dtype == q.dtype and got.shape == q.shape
    fwd_tol = f32_tol(T_ATTN) if dtype == "float32" else BF16_FWD_TOL
    assert_close(got, expected, fwd_tol, "splash vs float64")
    # The bound is one XLA meets too (so it is not tailored to the kernel).
    assert_close(attend(q, k, v, seg, impl="xla", causal=causal), expected, fwd_tol, "xla vs float64")

    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    grads = attend_grads(q, k, v, seg, cotangent, impl="splash", causal=causal)
    # Gradients are checked against XLA's in float32 on the same input values
    # (for bfloat16: those values upcast, so only the kernel's rounding shows).
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    expected_grads = attend_grads(*f32, seg, cotangent, impl="xla", causal=causal)
    grad_tol = f32_tol(T_ATTN) if dtype == "float32" else BF16_GRAD_TOL
    for name, g, e in zip("qkv", grads, expected_grads):
        assert g.dtype == q.dtype
        assert_close(g, e, grad_tol, f"d{name}")


def test_segments_are_isolated():
    """Changing another segment's keys/values (or padding's) leaves a segment's
    outputs bitwise unchanged; with causal masking, so does changing its own future."""
    q, k, v = random_qkv(2, T_ATTN, "float32")
    seg = jnp.asarray(SEGMENTS)
    out = np.asarray(attend(q, k, v, seg, impl="splash", causal=True))
    # Row 1: segment 2 is slots [7, 257); perturb everything outside it and its
    # own slots after 200.
    outside = (SEGMENTS[1] != 2) | (np.arange(T_ATTN) > 200)
    noise = 10.0 * jnp.asarray(outside, jnp.float32)[:, None, None]
    k2, v2 = k.at[1].add(noise), v.at[1].add(noise)
    out2 = np.asarray(attend(q, k2, v2, seg, impl="splash", causal=True))
    np.testing.assert_array_equal(out2[1, 7:201], out[1, 7:201])
    assert np.abs(out2[1, 201:257] - out[1, 201:257]).max() > 0.1  # its future is visible to later slots
    np.testing.assert_array_equal(out2[0], out[0])


# ---------------------------------------------------------------------------
# 2. Through the whole model: loss and parameter gradients, "splash" vs "xla".


T_MODEL = 128
MODEL_SEGMENTS = packed_segments([(50, 37, 31), (13, 100)], T_MODEL)  # + 10 and 15 padding tokens


def model_config(**kw):
    # tiny: GQA 4/2 heads of 16, rotary, SwiGLU. Untied embeddings: the tied
    # head's CPU backward contracts bfloat16 x bfloat16 -> float32, which
    # XLA:CPU's dot does not implement (whatever the attention).
    return dataclasses.replace(preset("tiny"), **{"max_len": T_MODEL, "tie_embeddings": False, **kw}).validate()


def o1_params(cfg, seed=0):
    """Params at O(1) activation scale with peaked attention: init's 0.02-std
    weights make every attention row nearly uniform, which would hide a mask or
    head-grouping mistake."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name, s = str(path[-1].key), x.shape
        if name == "scale":
            return jnp.ones(s, x.dtype)
        if name == "embed":
            return jnp.asarray(rng.standard_normal(s), x.dtype)
        fan_in = s[1] * s[2] if name == "o" else s[-2] if name == "lm_head" else s[1]
        gain = 2.0 if name in ("q", "k") else 1.0
        return jnp.asarray(gain * rng.standard_normal(s) / np.sqrt(fan_in), x.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda r: model.init(cfg, r),
                                                                  jax.random.PRNGKey(0)))


def clm_batch(B, segments, seed=0):
    T = segments.shape[1]
    tokens = np.random.default_rng(seed).integers(1, 256, (B, T + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "weights": (segments > 0).astype(np.float32)}


def loss_and_grads(cfg, params, batch):
    loss_fn = pretrain.clm_loss_fn(cfg)
    return jax.value_and_grad(lambda p: loss_fn(p, batch, None, pretrain.weight_sum(batch))[0])(params)


def rel_rms(tree, ref_tree):
    d = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
            for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree)))
    r = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree.leaves(ref_tree))
    return np.sqrt(d / r)


def test_model_gradients_match_xla():
    """jax.grad of the pretraining (CLM) loss w.r.t. all params on a packed GQA
    batch: attention_impl="splash" against "xla", float32 and bfloat16 compute."""
    cfg32 = model_config()
    params, batch = o1_params(cfg32), clm_batch(2, MODEL_SEGMENTS)
    run = jax.jit(loss_and_grads, static_argnums=0)
    loss_x, grads_x = run(dataclasses.replace(cfg32, attention_impl="xla"), params, batch)

    # float32: the same numbers up to summation order.
    loss_s, grads_s = run(dataclasses.replace(cfg32, attention_impl="splash"), params, batch)
    tol = f32_tol(MODEL_SEGMENTS.size)  # a weight's gradient sums over B * T tokens
    assert abs(float(loss_s) - float(loss_x)) <= tol * abs(float(loss_x))
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(grads_x)):
        assert_close(g, e, tol, jax.tree_util.keystr(path))

    # bfloat16 compute (float32 params): every matmul, norm and residual add
    # rounds, so the gradient's distance from float32 is set by the whole model,
    # not by attention (~25 roundings on the forward path and as many backward,
    # each up to u = 0.4%: a few % relative RMS). XLA's bfloat16 path measures
    # that noise floor; splash must not be noisier by more than a quarter
    # (measured: 2.7% relative RMS, XLA 2.8%; without the segment ids: 94%).
    _, grads16_x = run(model_config(dtype="bfloat16", attention_impl="xla"), params, batch)
    _, grads16_s = run(model_config(dtype="bfloat16", attention_impl="splash"), params, batch)
    floor = rel_rms(grads16_x, grads_x)
    assert 0 < floor < 0.05  # the bfloat16 path really ran, and is sane
    assert rel_rms(grads16_s, grads_x) <= 1.25 * floor


# ---------------------------------------------------------------------------
# 3. Sharded: batch over (data, fsdp), heads over tensor == one device.


@pytest.fixture(scope="module")
def cpu_mesh():
    return sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices=jax.devices()[:8])


def test_sharded_equals_one_device(cpu_mesh):
    B = 4  # one row per data x fsdp shard; 2 query + 1 key/value heads per tensor shard
    q, k, v = random_qkv(B, T_ATTN, "float32", seed=3)
    seg = jnp.asarray(np.concatenate([SEGMENTS, SEGMENTS[::-1]]))
    cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    args = (q, k, v, seg, cotangent)
    one_out = attend(q, k, v, seg, impl="splash", causal=True)
    one_grads = attend_grads(*args, impl="splash", causal=True)

    heads = NamedSharding(cpu_mesh, P(sharding.BATCH, None, "tensor", None))
    placed = jax.device_put(args, (heads, heads, heads, sharding.batch_sharding(cpu_mesh), heads))
    with jax.set_mesh(cpu_mesh):
        text = jaxpr_text(lambda *a: attend(*a[:4], impl="splash", causal=True), *placed)
        out = attend(*placed[:4], impl="splash", causal=True)
        grads = attend_grads(*placed, impl="splash", causal=True)
    assert "shard_map" in text and "pallas_call" in text  # really split, really the kernel
    # Each shard runs the same kernel on its own rows and heads: bitwise equal.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(one_out))
    for g, e in zip(grads, one_grads):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_sharded_model_gradients_equal_one_device(cpu_mesh):
    cfg = model_config(attention_impl="splash")
    params, batch = o1_params(cfg, seed=1), clm_batch(4, np.concatenate([MODEL_SEGMENTS] * 2), seed=1)
    run = jax.jit(loss_and_grads, static_argnums=0)
    loss1, grads1 = run(cfg, params, batch)
    placed_params = jax.device_put(params, sharding.tree_shardings(params, cpu_mesh))
    placed_batch = sharding.shard_batch(batch, cpu_mesh)
    with jax.set_mesh(cpu_mesh):
        loss8, grads8 = run(cfg, placed_params, placed_batch)
    # Attention is bitwise the same (test above); the sharded matmuls around it
    # reduce over devices in another order than one device does.
    tol = f32_tol(batch["inputs"].size)
    assert abs(float(loss8) - float(loss1)) <= tol * abs(float(loss1))
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads8), jax.tree.leaves(grads1)):
        assert_close(g, e, tol, jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------
# 4. Settings: bad shapes, decoding.


def test_explicit_splash_with_bad_shapes_is_a_config_error():
    cfg = model_config(attention_impl="splash", max_len=96)
    tokens = jnp.zeros((1, 96), jnp.int32)
    with pytest.raises(ConfigError, match=r"model\.attention_impl='splash': sequence length 96 is not a "
                                          r"multiple of 128.*attention_impl='auto'"):
        jax.eval_shape(lambda p: model.apply(cfg, p, tokens), o1_params(cfg))
    assert "float16" in splash.unsupported_reason(128, 128, jnp.float16, platform="tpu")
    assert "model.dtype='bfloat16'" in splash.unsupported_reason(128, 128, jnp.float16, platform="tpu")
    assert "cannot run on gpu" in splash.unsupported_reason(128, 128, jnp.bfloat16, platform="gpu")
    assert splash.unsupported_reason(256, 256, jnp.bfloat16, platform="tpu") is None
    with pytest.raises(ConfigError, match="attention_impl"):
        model_config(attention_impl="flash")


def test_decoding_keeps_the_xla_path():
    """apply_with_cache with attention_impl='splash' runs XLA's attention (T=1
    queries against a cache do not fit the kernel): no Pallas call, and exactly
    the logits of attention_impl='xla', prefill (T=128, a shape the kernel
    would take) and one decoding step alike."""
    cfg_s, cfg_x = model_config(attention_impl="splash"), model_config(attention_impl="xla")
    params = o1_params(cfg_s)
    prompt = jnp.asarray(clm_batch(2, MODEL_SEGMENTS)["inputs"])

    def prefill_then_step(cfg, params):
        cache = model.init_cache(cfg, batch=2, length=2 * T_MODEL)
        logits, cache = model.apply_with_cache(cfg, params, prompt, cache)
        step, _ = model.apply_with_cache(cfg, params, prompt[:, -1:], cache)
        return logits, step

    assert "pallas_call" not in jaxpr_text(lambda p: prefill_then_step(cfg_s, p), params)
    got = jax.jit(prefill_then_step, static_argnums=0)(cfg_s, params)
    want = jax.jit(prefill_then_step, static_argnums=0)(cfg_x, params)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ---------------------------------------------------------------------------
# 5. For a TPU: "auto" picks the kernel, and a train step compiles with it.


@pytest.fixture(scope="module")
def tpu_devices():
    """The 4 devices of a v5e 2x2 slice, from libtpu's topology description (no
    TPU needed: the real TPU compiler runs on this host). `aot.topology_devices`
    first sets what libtpu's host probe needs to stay quiet (TPU_ACCELERATOR_TYPE,
    TPU_WORKER_HOSTNAMES; TPU_SKIP_MDS_QUERY) and ALLOW_MULTIPLE_LIBTPU_LOAD, so
    this compile can share the host with another libtpu process."""
    require_libtpu()
    return aot.topology_devices("v5e:2x2")[1]


def test_auto_picks_splash_for_tpu_only(tpu_devices, cpu_mesh):
    """"auto" follows the traced-for platform (`target_platform`): under a mesh of
    TPU devices it takes the kernel, with no dense [B, 1, T, T] mask anywhere,
    when T is a multiple of 128, and XLA otherwise; on CPU it is XLA."""
    tpu_mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=tpu_devices)
    cfg = model_config(attention_impl="auto")
    params = o1_params(cfg)

    def trace(mesh, T):
        seg = jnp.asarray(packed_segments([(T // 2,)] * 2, T))
        with jax.set_mesh(mesh):
            return jaxpr_text(lambda p: model.forward(cfg, p, jnp.zeros((2, T), jnp.int32), segment_ids=seg),
                              params)

    tpu_128 = trace(tpu_mesh, 128)
    assert "pallas_call" in tpu_128 and "bool[2,1,128,128]" not in tpu_128
    tpu_96, cpu_128 = trace(tpu_mesh, 96), trace(cpu_mesh, 128)
    assert "pallas_call" not in tpu_96 and "bool[2,1,96,96]" in tpu_96
    assert "pallas_call" not in cpu_128 and "bool[2,1,128,128]" in cpu_128


def test_train_step_compiles_for_tpu_with_the_splash_kernel(tpu_devices):
    """A pretraining step (forward, backward, AdamW) of a small GQA model with
    attention_impl='splash', compiled for a v5e 2x2 slice (fsdp=2, tensor=2):
    the program holds the kernel's forward and both backward Mosaic calls, so a
    silent fall-back to XLA fails here."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=tpu_devices)
    B, T = 4, 512  # T = one 512-block, the size long sequences use; not V (256), D or F
    cfg = dataclasses.replace(preset("tiny"), max_len=T, dtype="bfloat16", attention_impl="splash").validate()
    sharding.check_model_fits_mesh(cfg, mesh)
    optimizer, schedule = train.make_optimizer(OptimizerConfig(), total_steps=10)

    def init(rng):
        params = model.init(cfg, rng)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = sharding.tree_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    rows = sharding.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct((B, T), dtype, sharding=rows) for name, dtype in
             (("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32), ("segment_ids", jnp.int32))}
    step = train.jit_train_step(train.make_train_step(pretrain.clm_loss_fn(cfg), pretrain.weight_sum,
                                                      optimizer, schedule), mesh, shardings)
    optimizing = not jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)  # see _fast_cpu_compiles
    try:
        start = time.perf_counter()
        hlo = step.lower(state, batch).compile().as_text()
        print(f"TPU v5e 2x2 train step compile: {time.perf_counter() - start:.1f} s")
    finally:
        jax.config.update("jax_disable_most_optimizations", not optimizing)

    kernels = set()
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line:
            kernels.update(re.findall(r"%(splash_mha_\w+?)(?:\.\d+)? = ", line))
    # Packed rows: the segmented variants; the forward saves the log-sum-exp for
    # the backward's dq and dkv kernels.
    assert kernels == {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
                       "splash_mha_dkv_segmented_no_residuals"}, kernels
    # No dense [T, T] score or mask array anywhere in the step (the XLA path has
    # [B, N, T, T] scores): the point of the kernel.
    assert not re.search(rf"\[[\d,]*{T},{T}\]", hlo), "a [.., T, T] array in the compiled step"
