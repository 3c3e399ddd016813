"""Core benchmark of the llm_jax training step on this machine's CPU.

    cd /work/main && PYTHONPATH=. python -m benchmarks.core            # ~5-10 min
    PYTHONPATH=. python -m benchmarks.core --quick                     # fewer steps, no variants

Writes benchmarks/RESULTS.md (and benchmarks/results.json with the raw numbers).

One fixed GPT-2-shaped model (vocab 8192, d_model 512, 4 layers, 8 heads, d_ff
2048, seq 256, batch 8, float32; GELU MLP, LayerNorm, learned positions,
biases, tied embeddings) so that the PyTorch side (benchmarks/torch_reference.py)
is a plain GPT-2 block. Sections:

1. train-step tokens/s and achieved model FLOP/s against the matmul peak
   measured in the same run;
2. the compiled HLO's FLOP count against the model count;
3. compile time of the train step at 2 vs 24 layers (scan and unrolled);
4. per-device bytes of params + optimizer state under FSDP over 1/2/4/8 host
   devices (a subprocess: the device count is fixed when jax starts);
5. the same model in PyTorch eager, timed interleaved with JAX;
6. investigation of the JAX step: an op-level profile, forward / backward /
   optimizer split, and alternatives measured A/B in the same process;
7. JAX (current and proposed) and torch again under tcmalloc (a subprocess with
   LD_PRELOAD, skipped if libtcmalloc is not installed), to separate XLA:CPU's
   per-step page faults from compute.

The proposed llm_jax changes are applied here by monkeypatching only
(`_make_tied_head`, `_onehot_token_logprobs`, `_make_gelu`; see RESULTS.md).

The machine may be shared: every comparison runs its contenders interleaved
(round-robin, one step each) so that load from other processes hits all of them
alike, and CPU seconds per step are reported beside wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gzip
import json
import glob
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

FSDP_FLAG = "--xla_force_host_platform_device_count=8"

# The fixed benchmark model (see the module docstring for why these choices).
MODEL_KW = dict(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, d_ff=2048, max_len=256,
                positions="learned", norm="layernorm", mlp="gelu", use_bias=True,
                tie_embeddings=True, dtype="float32", param_dtype="float32")
BATCH, SEQ = 8, 256
TOTAL_STEPS = 1000  # for the lr schedule only


# ---------------------------------------------------------------------------
# Small helpers


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rusage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def model_config(**overrides):
    from llm_jax.config import ModelConfig
    return ModelConfig(**{**MODEL_KW, **overrides}).validate()


def model_flops_per_step(cfg, batch: int = BATCH, seq: int = SEQ) -> dict:
    """6 * N * tokens with N = every matmul weight (q, k, v, o, up, [gate], down per
    layer, plus the LM head: the tied embedding used as a [D, V] matmul), plus
    attention 12 * L * T * D per token (QK^T and AV, forward + backward; the causal
    mask is NOT halved, as XLA and PyTorch both compute the full T x T scores)."""
    L, D, F, V = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    NH, GH = cfg.num_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    per_layer = D * NH + 2 * D * GH + NH * D + (3 if cfg.mlp == "swiglu" else 2) * D * F
    n_matmul = L * per_layer + D * V
    tokens = batch * seq
    dense = 6 * n_matmul * tokens
    attn = 12 * L * seq * D * tokens
    return {"n_matmul_params": n_matmul, "tokens": tokens, "dense_flops": dense,
            "attention_flops": attn, "total_flops": dense + attn}


def random_batch(seed: int = 0, batch: int = BATCH, seq: int = SEQ, vocab: int = MODEL_KW["vocab_size"]):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "targets": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "weights": np.ones((batch, seq), np.float32)}


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict:
    """Runs each fn once per round, round-robin (order rotated each round); returns
    {name: {wall, cpu, sys, minflt, out: [...]}}.
    Warm-up rounds are run the same way and not timed (their outputs are kept)."""
    res = {k: {"wall": [], "cpu": [], "sys": [], "minflt": [], "out": []} for k in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        # rotate the order every round so that no contender always runs first/last
        for k in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[k]
            (c0, s0, f0), t0 = rusage(), time.perf_counter()
            out = fn()
            w = time.perf_counter() - t0
            c1, s1, f1 = rusage()
            res[k]["out"].append(out)
            if r >= warmup:
                res[k]["wall"].append(w)
                res[k]["cpu"].append(c1 - c0)
                res[k]["sys"].append(s1 - s0)
                res[k]["minflt"].append(f1 - f0)
    return res


def stats(xs: list[float]) -> dict:
    a = np.asarray(xs, float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def first(ca):
    """Compiled.cost_analysis() is a dict in new jax, a list of dicts in older ones."""
    if isinstance(ca, (list, tuple)):
        return ca[0] if ca else {}
    return ca or {}


# ---------------------------------------------------------------------------
# Machine and versions


def machine_info() -> dict:
    cpu_model, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu_model = m.group(1).strip() if m else platform.processor()
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = m.group(1) if m else ""
        fam = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M)
        mod = re.search(r"^model\s*:\s*(\d+)$", text, re.M)
        if fam and mod:
            cpu_model += f" (family {fam.group(1)}, model {mod.group(1)})"
    except OSError:
        pass
    ram = 0
    try:
        with open("/proc/meminfo") as f:
            ram = int(re.search(r"MemTotal:\s*(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags.split()]
    return {"cpu_model": cpu_model, "cores": os.cpu_count(), "ram_bytes": ram, "isa": isa,
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


def versions() -> dict:
    import jax
    import jaxlib
    import optax
    v = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "optax": optax.__version__, "numpy": np.__version__}
    try:
        import flax
        v["flax"] = flax.__version__
    except ImportError:
        pass
    try:
        import torch
        v["torch"] = torch.__version__
    except ImportError:
        v["torch"] = "not installed"
    return v


# ---------------------------------------------------------------------------
# JAX pieces


def jax_setup(cfg, seed: int = 0):
    """(step, state, state_shardings, batch, mesh, tx) for one CPU device."""
    import jax
    from llm_jax import model, sharding, train
    from llm_jax.config import MeshConfig, OptimizerConfig
    from llm_jax.stages import pretrain

    tx, sched = train.make_optimizer(OptimizerConfig(), TOTAL_STEPS)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    state, shard = train.create_train_state(lambda r: model.init(cfg, r), tx, mesh, seed)
    step = train.jit_train_step(
        train.make_train_step(pretrain.clm_loss_fn(cfg), pretrain.weight_sum, tx, sched, microbatches=1),
        mesh, shard)
    batch = sharding.shard_batch(random_batch(), mesh)
    return step, state, shard, batch, mesh, tx


def abstract_state_and_step(cfg):
    """The train step and ShapeDtypeStruct state/batch for `cfg`, no arrays made
    (for compile-time measurements at any depth)."""
    import jax
    import jax.numpy as jnp
    from llm_jax import model, sharding, train
    from llm_jax.config import MeshConfig, OptimizerConfig
    from llm_jax.stages import pretrain

    tx, sched = train.make_optimizer(OptimizerConfig(), TOTAL_STEPS)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])

    def init(rng):  # what train.create_train_state builds
        p_rng, s_rng = jax.random.split(rng)
        params = model.init(cfg, p_rng)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), rng=s_rng)

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shard = sharding.tree_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
    bs = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((BATCH, SEQ), jnp.float32 if k == "weights" else jnp.int32, sharding=bs)
             for k in ("inputs", "targets", "weights")}
    step = train.jit_train_step(
        train.make_train_step(pretrain.clm_loss_fn(cfg), pretrain.weight_sum, tx, sched), mesh, shard)
    return step, state, batch


def matmul_peak(n: int = 2048, reps: int = 10) -> dict:
    """f32 n x n matmul FLOP/s: jitted jnp.dot (the peak used for utilization),
    numpy (its BLAS) and torch, interleaved, best of `reps` (and per CPU-second)."""
    import jax
    import jax.numpy as jnp
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(jnp.dot)
    f(ja, jb).block_until_ready()
    fns = {"jax": lambda: f(ja, jb).block_until_ready(), "numpy": lambda: a @ b}
    try:
        import torch
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns["torch"] = lambda: ta @ tb
    except ImportError:
        pass
    res = interleaved(fns, reps, warmup=1)
    flops = 2 * n**3
    out = {}
    for k, r in res.items():
        out[k] = {"best_flops_per_s": flops / min(r["wall"]),
                  "median_flops_per_s": flops / float(np.median(r["wall"])),
                  "flops_per_cpu_s": flops / float(np.median(r["cpu"])),
                  "cpu_per_wall": float(np.median(np.array(r["cpu"]) / np.array(r["wall"])))}
    out["n"] = n
    return out


# ---------------------------------------------------------------------------
# Investigation: alternatives to the current model / loss code, by monkeypatching
# (llm_jax itself is not edited; see RESULTS.md for the proposed changes).


def _onehot_token_logprobs(logits, targets):
    """losses.token_logprobs without take_along_axis: the target log-prob picked by
    a one-hot multiply-reduce, so the backward pass has no scatter-add into a
    zero-filled [B, T, V] buffer."""
    import jax
    import jax.numpy as jnp
    lp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return jnp.sum(lp * jax.nn.one_hot(targets, lp.shape[-1], dtype=lp.dtype), axis=-1)


def _einsum_attention(q, k, v, mask, *, causal=False, scale=None, impl="auto"):
    """model.attention written as plain einsums + softmax (what the 'xla' path of
    jax.nn.dot_product_attention does, without its [B, N, T, S] layout choices)."""
    import jax
    import jax.numpy as jnp
    B, T, N, H = q.shape
    S, G = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    qg = q.reshape(B, T, G, N // G, H)
    s = jnp.einsum("btgrh,bsgh->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
    m = None
    if causal:
        m = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])[None, None, None]
    elif mask is not None:
        m = mask[:, :, None]  # [B, 1, 1, T, S]
    if m is not None:
        s = jnp.where(m, s, jnp.finfo(s.dtype).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bgrts,bsgh->btgrh", p, v).reshape(B, T, N, H)


def _make_tied_head():
    """model.lm_logits for tied embeddings with a custom VJP whose embedding
    gradient is computed as (hidden^T @ dlogits)^T: XLA:CPU then transposes the
    small [B*T, D] hidden instead of materializing a transposed copy of the
    [B*T, V] dlogits (which it does for the autodiff form dlogits^T @ hidden,
    whose contracting dimension is dlogits' major one). Same math, same dtypes."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def tied_logits(hidden, embed):  # [B, T, D], [V, D] -> f32 [B, T, V]
        return jnp.einsum("btd,vd->btv", hidden, embed, preferred_element_type=jnp.float32)

    def fwd(hidden, embed):
        return tied_logits(hidden, embed), (hidden, embed)

    def bwd(res, g):
        hidden, embed = res
        g = g.astype(jnp.promote_types(hidden.dtype, embed.dtype))
        d_hidden = jnp.einsum("btv,vd->btd", g, embed, preferred_element_type=jnp.float32)
        d_embed_t = jnp.einsum("btd,btv->dv", hidden, g, preferred_element_type=jnp.float32)
        return d_hidden.astype(hidden.dtype), d_embed_t.T.astype(embed.dtype)

    tied_logits.defvjp(fwd, bwd)

    def lm_logits(config, params, hidden):
        if not config.tie_embeddings:
            return _ORIG["lm_logits"](config, params, hidden)
        return tied_logits(hidden, params["embed"].astype(jnp.dtype(config.dtype)))
    return lm_logits


def _make_gelu():
    """jax.nn.gelu(approximate=True) with a custom VJP that saves only its input
    (autodiff of the tanh form saves five [B, T, F] intermediates per layer)."""
    import jax
    import jax.numpy as jnp
    c = float(np.sqrt(2 / np.pi))

    @jax.custom_vjp
    def gelu_tanh(x):
        return _ORIG["gelu"](x, approximate=True)

    def fwd(x):
        return gelu_tanh(x), x

    def bwd(x, g):
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        t = jnp.tanh(c * (xf + 0.044715 * xf ** 3))
        d = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * c * (1 + 3 * 0.044715 * xf * xf)
        return ((g * d).astype(x.dtype),)

    gelu_tanh.defvjp(fwd, bwd)

    def gelu(x, approximate=True):
        return gelu_tanh(x) if approximate else _ORIG["gelu"](x, approximate=False)
    return gelu


_ORIG: dict = {}


def variant_patches(name: str):
    import jax
    from llm_jax import losses, model
    _ORIG.setdefault("lm_logits", model.lm_logits)
    _ORIG.setdefault("gelu", jax.nn.gelu)
    if name == "tied_head_vjp":
        return [(model, "lm_logits", _make_tied_head())]
    if name == "gelu_vjp":
        return [(jax.nn, "gelu", _make_gelu())]
    return {
        "onehot_loss": [(losses, "token_logprobs", _onehot_token_logprobs)],
        "einsum_attention": [(model, "attention", _einsum_attention)],
    }.get(name, [])


VARIANTS = {
    # name: (description, model-config overrides, XLA compiler options, patches)
    "baseline": ("llm_jax as is (scan over layers, jax.nn.dot_product_attention 'xla', take_along_axis loss)",
                 {}, {}),
    "onehot_loss": ("losses.token_logprobs via one-hot multiply-reduce instead of take_along_axis", {}, {}),
    "unrolled": ("scan_layers=False (layers unrolled)", {"scan_layers": False}, {}),
    "einsum_attention": ("model.attention as plain einsum + softmax instead of jax.nn.dot_product_attention",
                         {}, {}),
    "eigen_dots": ("XLA option xla_cpu_experimental_ynn_fusion_type='' (Eigen dots instead of YNNPACK)",
                   {}, {"xla_cpu_experimental_ynn_fusion_type": ""}),
    "remat_dots": ("remat='dots' (recompute elementwise ops in backward, save matmul outputs)",
                   {"remat": "dots"}, {}),
    "tied_head_vjp": ("tied LM head with a custom VJP: d_embed = (hidden^T dlogits)^T", {}, {}),
    "gelu_vjp": ("tanh-GELU with a custom VJP that saves only its input", {}, {}),
    "softmax_custom_jvp": ("jax_softmax_custom_jvp=True (attention softmax saves only its output)", {}, {}),
}

# The changes proposed for llm_jax (see RESULTS.md), timed together in section 1.
PROPOSED = "tied_head_vjp+onehot_loss+gelu_vjp"

# jax config flags a variant sets while it is traced
VARIANT_FLAGS = {"softmax_custom_jvp": {"jax_softmax_custom_jvp": True}}


@contextlib.contextmanager
def patched(names):
    import jax
    saved, flags = [], []
    for n in names:
        for mod, attr, fn in variant_patches(n):
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, fn)
        for flag, val in VARIANT_FLAGS.get(n, {}).items():
            flags.append((flag, getattr(jax.config, flag)))
            jax.config.update(flag, val)
    try:
        yield
    finally:
        for mod, attr, fn in reversed(saved):
            setattr(mod, attr, fn)
        for flag, val in reversed(flags):
            jax.config.update(flag, val)


def build_variant(spec: str):
    """spec: '+'-joined VARIANTS names. Returns (compiled, state, batch, info)."""
    import jax
    parts = [p for p in spec.split("+") if p != "baseline"]
    overrides, opts = {}, {}
    for p in parts:
        overrides.update(VARIANTS[p][1])
        opts.update(VARIANTS[p][2])
    cfg = model_config(**overrides)
    with patched(parts):
        step, state, _, batch, _, _ = jax_setup(cfg)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile(compiler_options=opts or None)
        compile_s = time.perf_counter() - t0
    return compiled, state, batch, {"compile_s": compile_s,
                                    "hlo_flops": first(compiled.cost_analysis()).get("flops", float("nan"))}


def run_variants(specs: list[str], rounds: int, extra: dict | None = None) -> dict:
    import jax
    built = {}
    for s in specs:
        compiled, state, batch, info = build_variant(s)
        built[s] = {"compiled": compiled, "state": state, "batch": batch, "info": info}
        print(f"  variant {s}: compiled in {info['compile_s']:.1f}s", flush=True)

    def runner(s):
        def run():
            b = built[s]
            b["state"], m = b["compiled"](b["state"], b["batch"])
            jax.block_until_ready((b["state"], m))
            return float(m["loss"])
        return run

    fns = {s: runner(s) for s in specs}
    fns.update(extra or {})
    res = interleaved(fns, rounds, warmup=1)
    out = {}
    for s in specs:
        out[s] = {"wall": stats(res[s]["wall"]), "cpu": stats(res[s]["cpu"]), "sys": stats(res[s]["sys"]),
                  "minflt": stats(res[s]["minflt"]),
                  "temp_bytes": getattr(built[s]["compiled"].memory_analysis(), "temp_size_in_bytes", 0),
                  "losses": res[s]["out"], **built[s]["info"]}
    for k in (extra or {}):
        out[k] = {"wall": stats(res[k]["wall"]), "cpu": stats(res[k]["cpu"]), "sys": stats(res[k]["sys"]),
                  "minflt": stats(res[k]["minflt"]), "losses": res[k]["out"], "compile_s": float("nan"),
                  "temp_bytes": 0}
    return out


def profile_step(step, state, batch, nsteps: int = 2, top: int = 14) -> dict:
    """Per-op times from jax.profiler (perfetto trace), mapped to the compiled HLO's
    op_name metadata. Ops run concurrently inside one step (the thunk executor
    overlaps independent ops), so per-op wall times can add up to more than the step."""
    import jax
    hlo = step.lower(state, batch).compile().as_text()
    info, serial = {}, set()
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) [\w\-]+\(.*?\)(.*)$", hlo, re.M):
        op = re.search(r'op_name="([^"]*)"', m.group(3))
        info[m.group(1)] = (m.group(2).split("{")[0], op.group(1) if op else "")
        # XLA:CPU loop fusions split across threads carry outer_dimension_partitions=[k>1]
        if "kind=kLoop" in m.group(3) and not re.search(r'"outer_dimension_partitions":\["[2-9]', m.group(3)):
            serial.add(m.group(1))
    with tempfile.TemporaryDirectory() as d:
        try:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(nsteps):
                    state, m = step(state, batch)
                    jax.block_until_ready((state, m))
        except Exception as e:  # profiler plugins missing etc.
            return {"error": repr(e)}, state
        files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
        if not files:
            return {"error": "no perfetto trace written"}, state
        with gzip.open(files[0]) as f:
            tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    agg: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("name") in info:
            agg[e["name"]] = agg.get(e["name"], 0.0) + e["dur"] / 1e3 / nsteps  # ms per step
    total = sum(agg.values())

    def category(name, op):
        o = op.lower()
        if "take_along_axis" in o or "log_softmax" in o or "scatter" in name and "jvp()" not in o:
            return "loss (log_softmax over V, target pick)"
        if "btd,dv->btv" in o or "btd,vd->btv" in o:
            return "LM head matmul (tied embedding)"
        if "dot_product_attention" in o or "bnts" in o or "bgrts" in o or "btnh,bsnh" in o:
            return "attention core (scores, softmax, AV)"
        if "dot_general" in o:
            return "layer matmuls (qkv, o, up, down)"
        if "adam" in o or "clip" in o or "global_norm" in o or "/square" in o or "while" not in o and "train_step)/" in o and (
                "mul" in o.split("/")[-1] or "add" in o.split("/")[-1]) and "jvp" not in o and "transpose" not in o:
            return "optimizer (AdamW, clipping)"
        if name.startswith("wrapped_broadcast") or "broadcast" in name and "jvp" not in o and "transpose" not in o:
            return "memset / broadcast buffers"
        if "scatter" in name or "gather" in o:
            return "embedding gather / scatter"
        if "copy" in name or "transpose" in name:
            return "copies / transposes (layout)"
        return "other elementwise / reductions (norms, gelu, residual)"

    cats: dict[str, float] = {}
    rows = []
    for k, ms in agg.items():
        shape, op = info[k]
        c = category(k, op)
        cats[c] = cats.get(c, 0.0) + ms
        rows.append({"name": k, "ms": ms, "shape": shape, "op": op[-90:], "category": c})
    rows.sort(key=lambda r: -r["ms"])
    return {"total_ms_per_step": total, "categories": dict(sorted(cats.items(), key=lambda x: -x[1])),
            "top": rows[:top], "nsteps": nsteps,
            "serial_loop_fusions": len(serial), "loop_fusions": len(re.findall(r"kind=kLoop", hlo)),
            "serial_loop_ms": sum(ms for k, ms in agg.items() if k in serial)}, state


def phase_split(cfg, step, holder, batch, rounds: int) -> dict:
    """Forward loss only, forward+backward (value_and_grad) and the full step, interleaved."""
    import jax
    from llm_jax.stages import pretrain
    loss_fn = pretrain.clm_loss_fn(cfg)

    def f(p, b):
        return loss_fn(p, b, None, pretrain.weight_sum(b))[0]

    params = jax.tree.map(lambda x: x.copy(), holder["state"].params)  # the step donates the state
    fwd = jax.jit(f).lower(params, batch).compile()
    grad = jax.jit(jax.value_and_grad(f)).lower(params, batch).compile()
    fwd_nohead = jax.jit(lambda p, b: __import__("llm_jax.model", fromlist=["forward"]).forward(
        cfg, p, b["inputs"]).sum()).lower(params, batch).compile()
    fns = {"forward (loss)": lambda: jax.block_until_ready(fwd(params, batch)),
           "forward, no LM head/loss": lambda: jax.block_until_ready(fwd_nohead(params, batch)),
           "forward + backward": lambda: jax.block_until_ready(grad(params, batch))}

    def full_step():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], m))
    fns["full train step (+ AdamW)"] = full_step
    res = interleaved(fns, rounds, warmup=1)
    return {k: {"wall": stats(v["wall"]), "cpu": stats(v["cpu"])} for k, v in res.items()}


# ---------------------------------------------------------------------------
# Sections


def section_train_step(args, results: dict):
    """1 + 5: JAX and PyTorch steps interleaved, and the matmul peak."""
    import jax
    print("[1] matmul peak", flush=True)
    results["matmul_peak"] = matmul_peak()
    cfg = model_config()
    results["model_flops"] = model_flops_per_step(cfg)

    print("[1] JAX train step: compile", flush=True)
    step, state, shard, batch, mesh, tx = jax_setup(cfg)
    from llm_jax import model as llm_model
    results["param_count"] = llm_model.count_params(state.params)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ca = first(compiled.cost_analysis())
    mem = compiled.memory_analysis()
    results["jax_step_compile"] = {"lower_s": t1 - t0, "compile_s": t2 - t1}
    results["hlo_scan"] = {k: float(ca.get(k, float("nan"))) for k in ("flops", "transcendentals", "bytes accessed")}
    if mem is not None:
        results["memory_analysis"] = {k: int(getattr(mem, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
            if hasattr(mem, k)}

    holder = {"state": state}

    def jax_step():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"])

    fns = {"jax": jax_step}
    if args.proposed:
        print(f"[1] JAX train step with the proposed changes ({args.proposed}): compile", flush=True)
        p_compiled, p_state, p_batch, p_info = build_variant(args.proposed)
        results["jax_proposed_compile_s"] = p_info["compile_s"]
        p_holder = {"state": p_state}

        def proposed_step():
            p_holder["state"], m = p_compiled(p_holder["state"], p_batch)
            jax.block_until_ready((p_holder["state"], m))
            return float(m["loss"])
        fns["jax_proposed"] = proposed_step
    if not args.no_torch:
        try:
            import torch
            from benchmarks import torch_reference as tr
        except ImportError as e:
            results["torch_error"] = f"torch not importable: {e}"
        else:
            results["torch_threads"] = torch.get_num_threads()
            init_params = jax.device_get(state.params)
            hb = random_batch()
            tb = tr.to_torch_batch(hb)
            for name, manual in (("torch_sdpa", False), ("torch_manual_attention", True)):
                if manual and args.quick:
                    continue
                torch.manual_seed(0)
                tm = tr.GPT(cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff,
                            cfg.max_len, eps=cfg.norm_eps, manual_attention=manual)
                tr.load_from_jax(tm, init_params)
                tstep = tr.make_train_step(tm, tr.make_optimizer(tm), TOTAL_STEPS)
                fns[name] = (lambda ts: lambda: float(ts(tb)))(tstep)
                results.setdefault("_torch_fns", {})[name] = fns[name]

    print(f"[1/5] timing {list(fns)} interleaved: {args.warmup} warm-up + {args.steps} timed rounds",
          flush=True)
    results["loadavg_steps"] = os.getloadavg()
    res = interleaved(fns, args.steps, warmup=args.warmup)
    tokens = results["model_flops"]["tokens"]
    results["steps"] = {}
    for k, r in res.items():
        results["steps"][k] = {"wall": stats(r["wall"]), "cpu": stats(r["cpu"]), "sys": stats(r["sys"]),
                               "minflt": stats(r["minflt"]), "losses": r["out"],
                               "tokens_per_s_median": tokens / float(np.median(r["wall"])),
                               "tokens_per_s_best": tokens / min(r["wall"])}
    return step, holder, batch, cfg


def section_hlo_unrolled(results: dict):
    """2: the scan's while body is counted once by cost_analysis; the unrolled
    step's count is the real total."""
    print("[2] HLO FLOPs of the unrolled step", flush=True)
    cfg = model_config(scan_layers=False)
    step, state, batch = abstract_state_and_step(cfg)
    ca = first(step.lower(state, batch).compile().cost_analysis())
    results["hlo_unrolled"] = {k: float(ca.get(k, float("nan"))) for k in ("flops", "transcendentals",
                                                                           "bytes accessed")}
    # What the model count leaves out, counted by hand for this config:
    c = model_config()
    L, D, F, V, T, N = c.num_layers, c.d_model, c.d_ff, c.vocab_size, SEQ, c.num_heads
    tok = BATCH * SEQ
    results["hlo_extras_estimate"] = {
        # softmax over V: max, sub, exp, sum, log, sub fwd; ~same again in backward
        "loss_softmax": 10 * tok * V,
        # attention softmax over S (fwd ~5/elt, bwd ~5/elt) + scale + mask
        "attention_softmax": 12 * L * BATCH * N * T * T,
        # bias adds (fwd) and bias grads (bwd reductions): q,k,v,o,up,down
        "biases": 2 * L * tok * (4 * D + F + D),
        "layernorm_gelu_residual": L * tok * (2 * 20 * D + 30 * F + 4 * D),
        "adamw_and_clip": 20 * results.get("param_count", 0),
    }


def section_compile_time(results: dict, quick: bool):
    print("[3] compile times", flush=True)
    out = {}
    order = [(2, True), (24, True), (2, True), (24, True), (2, False), (24, False)]
    if quick:
        order = [(2, True), (24, True), (2, False)]
    for L, scan in order:
        cfg = model_config(num_layers=L, scan_layers=scan)
        step, state, batch = abstract_state_and_step(cfg)
        t0 = time.perf_counter()
        low = step.lower(state, batch)
        t1 = time.perf_counter()
        low.compile()
        t2 = time.perf_counter()
        key = f"L={L} scan={scan}"
        prev = out.get(key)
        cur = {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}
        out[key] = cur if prev is None or cur["total_s"] < prev["total_s"] else prev
        out[key]["runs"] = (prev or {}).get("runs", 0) + 1
        print(f"  {key}: lower {t1 - t0:.1f}s compile {t2 - t1:.1f}s", flush=True)
    results["compile_time"] = out


def section_fsdp(results: dict):
    print("[4] FSDP per-device state bytes (subprocess with 8 host devices)", flush=True)
    env = dict(os.environ)
    if FSDP_FLAG not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FSDP_FLAG).strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "benchmarks.core", "--fsdp-part"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("FSDP_JSON ")]
    if p.returncode or not lines:
        results["fsdp_error"] = (p.stderr or p.stdout)[-2000:]
        return
    results["fsdp"] = json.loads(lines[-1][len("FSDP_JSON "):])


def fsdp_part():
    """Runs in the subprocess: create the sharded train state on fsdp = 1, 2, 4, 8."""
    import jax
    from llm_jax import model, sharding, train
    from llm_jax.config import MeshConfig, OptimizerConfig
    cfg = model_config()
    tx, _ = train.make_optimizer(OptimizerConfig(), TOTAL_STEPS)
    out = {"devices": len(jax.devices()), "rows": []}
    for n in (1, 2, 4, 8):
        if n > len(jax.devices()):
            break
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=n, tensor=1), jax.devices()[:n])
        state, _ = train.create_train_state(lambda r: model.init(cfg, r), tx, mesh, 0)
        total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
        p_dev = sharding.per_device_bytes(state.params)
        o_dev = sharding.per_device_bytes(state.opt_state)
        both = sharding.per_device_bytes((state.params, state.opt_state))
        replicated = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))
                         if x.sharding.is_fully_replicated)
        out["rows"].append({"n": n, "total_bytes": total, "params_per_device": p_dev,
                            "opt_per_device": o_dev, "state_per_device": both,
                            "ideal": total / n, "ratio": both / (total / n),
                            "replicated_bytes": replicated})
        del state
    print("FSDP_JSON " + json.dumps(out), flush=True)


TCMALLOC_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                       "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                       "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def alloc_part(rounds: int):
    """Runs in the subprocess started by section_allocator (under LD_PRELOAD=tcmalloc):
    the current JAX step, the proposed one and torch_sdpa, round-robin."""
    import jax
    cfg = model_config()
    step, state, _, batch, _, _ = jax_setup(cfg)
    holder = {"state": state}

    def jax_step():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"])
    fns = {"jax": jax_step}
    p_compiled, p_state, p_batch, _ = build_variant(PROPOSED)
    p_holder = {"state": p_state}

    def proposed_step():
        p_holder["state"], m = p_compiled(p_holder["state"], p_batch)
        jax.block_until_ready((p_holder["state"], m))
        return float(m["loss"])
    fns["jax_proposed"] = proposed_step
    try:
        import torch  # noqa: F401
        from benchmarks import torch_reference as tr
        tm = tr.GPT(cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff, cfg.max_len,
                    eps=cfg.norm_eps)
        tr.load_from_jax(tm, jax.device_get(state.params))
        tstep = tr.make_train_step(tm, tr.make_optimizer(tm), TOTAL_STEPS)
        tb = tr.to_torch_batch(random_batch())
        fns["torch_sdpa"] = lambda: float(tstep(tb))
    except ImportError:
        pass
    load = os.getloadavg()[0]
    res = interleaved(fns, rounds, warmup=1)
    out = {"loadavg": load, "preload": os.environ.get("LD_PRELOAD", ""), "steps": {}}
    for k, r in res.items():
        out["steps"][k] = {"wall": stats(r["wall"]), "cpu": stats(r["cpu"]), "sys": stats(r["sys"]),
                           "minflt": stats(r["minflt"])}
    print("ALLOC_JSON " + json.dumps(out), flush=True)


def section_allocator(args, results: dict):
    """7: the same contenders with an allocator that keeps freed memory (tcmalloc, if installed),
    to separate the page-fault cost of XLA's per-step temp buffer from compute."""
    lib = next((p for p in TCMALLOC_CANDIDATES if os.path.exists(p)), None)
    if lib is None:
        results["alloc_error"] = ("no tcmalloc found (Debian: apt-get install libtcmalloc-minimal4); "
                                  "section skipped")
        return
    print(f"[7] allocator: JAX / proposed / torch under LD_PRELOAD={lib}", flush=True)
    env = dict(os.environ, LD_PRELOAD=lib, TCMALLOC_RELEASE_RATE="0",
               TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(1 << 40))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "benchmarks.core", "--alloc-part",
                        "--variant-rounds", str(args.alloc_rounds)],
                       env=env, cwd=root, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("ALLOC_JSON ")]
    if p.returncode or not lines:
        results["alloc_error"] = (p.stderr or p.stdout)[-2000:]
        return
    results["allocator"] = json.loads(lines[-1][len("ALLOC_JSON "):])


def section_investigation(args, results: dict, step, holder, batch, cfg):
    print("[6] profile of the JAX step", flush=True)
    prof, holder["state"] = profile_step(step, holder["state"], batch)
    results["profile"] = prof
    print("[6] forward / backward split", flush=True)
    results["phases"] = phase_split(cfg, step, holder, batch, rounds=args.variant_rounds)
    specs = args.variants.split(",")
    print(f"[6] variants {specs}", flush=True)
    extra = {k: v for k, v in results.get("_torch_fns", {}).items() if k == "torch_sdpa"}
    results["loadavg_variants"] = os.getloadavg()
    results["variants"] = run_variants(specs, rounds=args.variant_rounds, extra=extra)


# ---------------------------------------------------------------------------
# Report


def pct(x):
    return f"{100 * x:.1f}%"


def _ratio(a, b):
    return a / b if b else float("nan")


PROPOSALS_MD = """\
The three changes below are what `jax_proposed` (section 1) and the matching rows of the
variants table measure; the benchmark applies them by monkeypatching (`benchmarks/core.py`:
`_make_tied_head`, `_onehot_token_logprobs`, `_make_gelu`); llm_jax itself is unchanged.
All three are exact rewrites (same math; the loss trajectories in the tables agree to
float32 rounding).

**P1. `llm_jax/model.py`, `lm_logits`: custom VJP for the tied LM head, on CPU only.**
Autodiff computes the embedding gradient as `dlogits^T @ hidden`, contracting the
*major* dimension of the f32 [B*T, V] `dlogits`; XLA:CPU (YNNPACK dot) then writes a
transposed copy of the whole [V, B*T] array (`copy_bitcast_fusion` f32[8192,2048], 64 MiB,
one of the most expensive ops of the step, see the profile) and computes the dlogits
fusion twice (once per layout). Computing `(hidden^T @ dlogits)^T` instead transposes
only the small [B*T, D] hidden and the [D, V] result. GPUs/TPUs take either operand
order without a copy, and for a large vocab the extra [D, V] transpose is pure cost
there, so choose it by backend like `attention(impl="auto")`:

```python
@jax.custom_vjp
def _tied_logits(hidden, embed):  # [B, T, D], [V, D] -> float32 [B, T, V]
    return jnp.einsum("btd,vd->btv", hidden, embed, preferred_element_type=jnp.float32)

def _tied_logits_fwd(hidden, embed):
    return _tied_logits(hidden, embed), (hidden, embed)

def _tied_logits_bwd(res, g):
    hidden, embed = res
    g = g.astype(jnp.promote_types(hidden.dtype, embed.dtype))
    d_hidden = jnp.einsum("btv,vd->btd", g, embed, preferred_element_type=jnp.float32)
    d_embed_t = jnp.einsum("btd,btv->dv", hidden, g, preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_embed_t.T.astype(embed.dtype)

_tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)

def lm_logits(config, params, hidden):
    dtype = jnp.dtype(config.dtype)
    if config.tie_embeddings and jax.default_backend() == "cpu":
        return _tied_logits(hidden, params["embed"].astype(dtype))
    w = params["embed"].T if config.tie_embeddings else params["lm_head"]  # [D, V]
    return jnp.einsum("btd,dv->btv", hidden, w.astype(dtype), preferred_element_type=jnp.float32)
```

**P2. `llm_jax/losses.py`, `token_logprobs`: pick the target log-prob with a one-hot
multiply-reduce instead of `take_along_axis`.** The gather's transpose is a scatter-add
into a zero-filled f32 [B, T, V] buffer (a 64 MiB memset + scatter per step here); the
one-hot form fuses into the log-softmax's elementwise pass in both directions. One-hot
is what TPU code uses anyway (t5x/flax cross-entropy) and XLA:GPU fuses it the same way,
so no backend switch is needed:

```python
def token_logprobs(logits, targets):
    log_probs = jax.nn.log_softmax(_float(logits), axis=-1)
    one_hot = jax.nn.one_hot(targets, log_probs.shape[-1], dtype=log_probs.dtype)
    return jnp.sum(log_probs * one_hot, axis=-1)
```
Every loss built on `token_logprobs` (CLM, SFT, `sequence_logprobs` for DPO/PPO) gets it.
Behaviour difference only for invalid target ids: today `-1` wraps to the last vocab entry
and an id >= V gives NaN (which survives a zero weight: NaN·0 = NaN); with one-hot both
give log-prob 0.

**P3. `llm_jax/model.py`, `block`: a tanh-GELU with a custom VJP that saves only its input.**
Autodiff of `jax.nn.gelu(approximate=True)` keeps five f32 [B, T, F] intermediates per
layer for the backward pass (`jax.ad_checkpoint.print_saved_residuals` on one block);
recomputing tanh from the input in the backward is cheap elementwise work. This cuts the
step's temp memory (see the variants table) and the memory traffic on every backend:

```python
_C = float(np.sqrt(2 / np.pi))

@jax.custom_vjp
def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)

def _gelu_fwd(x):
    return gelu_tanh(x), x

def _gelu_bwd(x, g):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    t = jnp.tanh(_C * (xf + 0.044715 * xf ** 3))
    d = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * _C * (1 + 3 * 0.044715 * xf * xf)
    return ((g * d).astype(x.dtype),)

gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)
# in block():  up = gelu_tanh(up)   # instead of jax.nn.gelu(up, approximate=True)
```

**Not proposed** (measured, no gain beyond noise here, see the variants table):
`scan_layers=False` (and it multiplies compile time at depth, section 3), attention as
plain einsums instead of `jax.nn.dot_product_attention`, Eigen instead of YNNPACK dots
(`xla_cpu_experimental_ynn_fusion_type=''`), and, from exploratory runs not repeated
here, `jax_softmax_custom_jvp=True`, `xla_cpu_prefer_vector_width=512`,
`xla_cpu_enable_fast_math`, `xla_cpu_use_xnnpack`, `xla_cpu_multi_thread_eigen=false`.
Matmul precision is not a lever on CPU: `precision=DEFAULT/HIGH/HIGHEST` give bit-identical f32
results at the same speed on XLA:CPU. `xla_cpu_use_thunk_runtime` is gone from jaxlib 0.10.2
(compiling with it fails: "No such compile option"); the thunk runtime is the only one.
Running glibc with `MALLOC_MMAP_MAX_=0` / a high trim threshold (env or `mallopt` via ctypes)
did not remove the page faults; tcmalloc/jemalloc did (section 7).
`remat='dots'` (already a config option) halves temp memory and page faults for a small
net gain on CPU; it costs recomputation, so leave it a per-run choice.
"""


def torch_ratios(r: dict) -> list[tuple[str, float, float, float]]:
    """(where, JAX/torch_sdpa tokens/s ratio of medians, 1-min load average, torch CPU/wall) for every
    round-robin that timed the current JAX step beside torch_sdpa."""
    out = []
    st = r["steps"]
    if "torch_sdpa" in st:
        out.append(("section 1", st["torch_sdpa"]["wall"]["median"] / st["jax"]["wall"]["median"],
                    r.get("loadavg_steps", (float("nan"),))[0],
                    st["torch_sdpa"]["cpu"]["median"] / st["torch_sdpa"]["wall"]["median"]))
    v = r.get("variants", {})
    if "torch_sdpa" in v and "baseline" in v:
        out.append(("section 6 (variants)", v["torch_sdpa"]["wall"]["median"] / v["baseline"]["wall"]["median"],
                    r.get("loadavg_variants", (float("nan"),))[0],
                    v["torch_sdpa"]["cpu"]["median"] / v["torch_sdpa"]["wall"]["median"]))
    return out


def findings_md(r: dict) -> str:
    """Findings computed from this run's numbers."""
    L = []
    w = L.append
    mf = r["model_flops"]
    flops = mf["total_flops"]
    steps = r["steps"]
    js = steps["jax"]
    peak = r["matmul_peak"]["jax"]["best_flops_per_s"]
    w("### What limits the JAX step\n")
    if "profile" in r and "categories" in r["profile"]:
        cats = r["profile"]["categories"]
        tot = r["profile"]["total_ms_per_step"]
        mm = sum(v for k, v in cats.items() if "matmul" in k)
        w(f"- Matmuls (layers + LM head) are {pct(mm / tot)} of the profiled op time; the rest is memory-bound "
          f"work: the loss (log-softmax over V={MODEL_KW['vocab_size']} and the target pick, "
          f"{pct(cats.get('loss (log_softmax over V, target pick)', 0) / tot)}), norms/GELU/residuals, attention "
          f"softmax, layout copies and buffer memsets, all of it time that the 6·N·tokens count does not "
          f"credit.")
    if "phases" in r:
        ph = r["phases"]
        f, fnh, fb, st = (ph[k]["cpu"]["median"] for k in (
            "forward (loss)", "forward, no LM head/loss", "forward + backward", "full train step (+ AdamW)"))
        w(f"- CPU seconds per step: forward {f:.2f} (of which LM head + loss {f - fnh:.2f}), forward+backward "
          f"{fb:.2f}, full step {st:.2f}: the backward costs {(fb - f) / f:.1f}× the forward (about 2× would match "
          f"its FLOPs); AdamW + clipping are cheap (under 1% of the profile). The LM-head/loss backward "
          f"(transposed dlogits copy, scatter into a zero-filled [B, T, V] buffer, dlogits computed twice) and "
          f"writing/re-reading the saved activations (with their page faults) are where the excess goes.")
    if js.get("minflt"):
        pf = js["minflt"]["median"] * 4096
        temp = r.get("memory_analysis", {}).get("temp_size_in_bytes", 0)
        w(f"- Every JAX step touches {fmt_bytes(pf)} of fresh pages ({js['minflt']['median']:.0f} minor page "
          f"faults; {js['sys']['median']:.2f} s of system CPU time per step): XLA:CPU allocates the step's "
          f"{fmt_bytes(temp)} temp buffer anew on each run and glibc serves allocations that large with "
          f"mmap/munmap (strace: one {fmt_bytes(temp)} mmap + munmap per step), so the kernel zero-fills "
          f"every page again. On this VM the cost per fault varies a lot from run to run (system time "
          f"between about 0.5 and 2 s per step for the same ~288k faults), which is most of the run-to-run "
          f"spread of the JAX numbers. Less saved activation memory (P2, P3, remat) shrinks it. Outside the code, an allocator "
          f"that keeps freed memory removes it entirely (section 7: tcmalloc with TCMALLOC_RELEASE_RATE=0; "
          f"jemalloc with `MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1` did the same in an exploratory "
          f"run). That is a launcher/environment setting for CPU runs (Debian libtcmalloc-minimal4), not an "
          f"llm_jax change.")
        for k in ("torch_sdpa",):
            if k in steps and steps[k].get("minflt"):
                w(f"  For comparison {k}: {fmt_bytes(steps[k]['minflt']['median'] * 4096)} of page faults, "
                  f"{steps[k]['sys']['median']:.2f} s system time per step.")
    if "torch_sdpa" in steps:
        ts = steps["torch_sdpa"]
        w(f"- Parallelism: CPU-seconds / wall-seconds per step was {js['cpu']['median'] / js['wall']['median']:.2f} "
          f"for JAX and {ts['cpu']['median'] / ts['wall']['median']:.2f} for torch ({r['machine']['cores']} cores; "
          f"the closer to {r['machine']['cores']}, the fewer idle cores). "
          + (f"{r['profile']['serial_loop_fusions']} of the step's {r['profile']['loop_fusions']} XLA:CPU loop "
             f"fusions carry no outer-dimension partitioning, i.e. run on one thread "
             f"({r['profile']['serial_loop_ms']:.0f} ms/step of profiled op time), "
             if "serial_loop_fusions" in r.get("profile", {}) else "")
          + f"while torch's kernels are all OpenMP-parallel. When other "
          f"processes hold cores the picture flips: torch's OpenMP barriers wait for descheduled threads while "
          f"XLA's task pool does not, so the JAX/torch ratio swings with machine load (compare median and best "
          f"columns, and runs at different load averages).")
    w("")
    w("### Targets missed and why\n")
    util = flops / js["wall"]["median"] / peak
    if util < 0.7:
        w(f"- **≥ 70% of matmul peak: missed** ({pct(util)} median). The peak is a single large square matmul; "
          f"the step is {mf['n_matmul_params'] * 6 * mf['tokens'] / 1e9:.0f} GFLOP of skinnier matmuls "
          f"(K or N = 512, several at a fraction of the square-matmul rate) plus the memory-bound work above, "
          f"which takes real time on 2 cores but earns no credit in the 6·N·tokens count. "
          + (f"With P1–P3 the step reaches {pct(flops / steps['jax_proposed']['wall']['median'] / peak)} median / "
             f"{pct(flops / steps['jax_proposed']['wall']['min'] / peak)} best round "
             f"({pct((flops / steps['jax_proposed']['cpu']['median']) / r['matmul_peak']['jax']['flops_per_cpu_s'])}"
             f" per CPU-second). "
             if "jax_proposed" in steps else "")
          + (f"Without the page faults (section 7, tcmalloc) the current step reaches "
             f"{pct(flops / r['allocator']['steps']['jax']['wall']['median'] / peak)} and the proposed one "
             f"{pct(flops / r['allocator']['steps']['jax_proposed']['wall']['median'] / peak)} (medians). "
             if "allocator" in r and "jax_proposed" in r["allocator"]["steps"] else "")
          + f"Closing the rest would need fusing the LM head "
          f"with the loss (chunked/online softmax, never materializing [B, T, V] f32 logits) and fewer "
          f"single-threaded ops in XLA:CPU. Per CPU-second the utilization is higher "
          f"({pct((flops / js['cpu']['median']) / r['matmul_peak']['jax']['flops_per_cpu_s'])}), i.e. part of "
          f"the gap is idle cores, not slow kernels.")
    tr_ = torch_ratios(r)
    if tr_:
        rt = min(x[1] for x in tr_)
        if rt < 0.75:
            w(f"- **JAX ≥ 0.75× PyTorch: missed in at least one measurement** ("
              + "; ".join(f"{x[1]:.2f}× in {x[0]} at load {x[2]:.1f}, torch CPU/wall {x[3]:.2f}" for x in tr_)
              + "). Torch wins when it gets both cores (CPU/wall near 2) and loses when other processes "
              "hold them. Torch's step is mostly oneDNN/MKL GEMMs "
              f"with fused flash attention (no T×T residuals saved), a fused log-softmax/NLL (no [B, T, V] scatter, "
              f"no transposed logits copy), fewer and smaller temporaries (far fewer page faults) and full 2-thread use. "
              f"The JAX-side gaps are the ones listed above.")
        if "jax_proposed" in steps:
            rp = _ratio(steps["torch_sdpa"]["wall"]["median"], steps["jax_proposed"]["wall"]["median"])
            w(f"- With P1–P3 (`jax_proposed`): {rp:.2f}× torch_sdpa (median), "
              f"{_ratio(js['wall']['median'], steps['jax_proposed']['wall']['median']):.2f}× the current JAX step "
              f"(median wall), {_ratio(js['cpu']['median'], steps['jax_proposed']['cpu']['median']):.2f}× "
              f"(CPU seconds).")
    w("")
    w("### Proposed changes to llm_jax\n")
    w(PROPOSALS_MD)
    return "\n".join(L)


def write_report(path: str, results: dict, command: str):
    r = results
    m, v = r["machine"], r["versions"]
    mf = r["model_flops"]
    flops = mf["total_flops"]
    peak = r["matmul_peak"]["jax"]["best_flops_per_s"]
    peak_cpu = r["matmul_peak"]["jax"]["flops_per_cpu_s"]
    js = r["steps"]["jax"]
    L = []
    w = L.append
    w("# llm_jax benchmark results\n")
    w(f"Generated by `benchmarks/core.py` on {r['date']}; the run took {r['runtime_s']:.0f} s.\n")
    w("```\n" + command + "\n```\n")
    w("## Machine and versions\n")
    shared = max(m["loadavg_start"][0], r["loadavg_end"][0]) > 0.5 * (m["cores"] or 1) + 0.5
    w(f"- CPU: {m['cpu_model']}; {m['cores']} cores visible to the process; ISA: {', '.join(m['isa'])}")
    w(f"- RAM: {m['ram_bytes'] / 2**30:.1f} GiB; {m['platform']}")
    w(f"- load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in m['loadavg_start'])}, "
      f"at end {tuple(round(x, 2) for x in r['loadavg_end'])}"
      + (" -- **other processes were using the CPUs during this run**: absolute numbers are depressed and "
         "noisy (compare 'median' with 'best'); comparisons come from interleaved runs (see Method)."
         if shared else ""))
    w("- " + ", ".join(f"{k} {val}" for k, val in v.items()))
    if "torch_threads" in r:
        w(f"- torch intra-op threads: {r['torch_threads']} (torch's default here, not changed); XLA:CPU uses its "
          f"default intra-op pool (one thread per core); no XLA_FLAGS set for sections 1-3, 5, 6.")
    w("")
    w("## Model and method\n")
    c = model_config()
    w(f"GPT-2-style decoder: vocab {c.vocab_size}, d_model {c.d_model}, {c.num_layers} layers, "
      f"{c.num_heads} heads (head size {c.head_size}), d_ff {c.d_ff}, seq {SEQ}, batch {BATCH} "
      f"({mf['tokens']} tokens/step), float32 params and compute, on the CPU. Chosen so that the PyTorch side is a "
      f"plain GPT-2 block: `mlp='gelu'` (tanh form), `norm='layernorm'`, `positions='learned'`, `use_bias=True`, "
      f"`tie_embeddings=True`; also `scan_layers=True`, `remat='none'`, dropout 0, `attention_impl='auto'` "
      f"(= XLA on CPU). {r['param_count']:,} parameters. Optimizer `train.make_optimizer(OptimizerConfig())`: "
      f"AdamW (b2 0.95, weight decay 0.1 on matrices/embeddings), global-norm clip 1.0, warmup + cosine; the torch "
      f"side uses `torch.optim.AdamW` (its default foreach implementation) with the same settings and "
      f"`clip_grad_norm_`.\n")
    w("Timing: contenders take turns, one step each per round (round-robin), after warm-up rounds; JAX steps "
      "end with `block_until_ready` on the new state and metrics, torch steps with `float(loss)`. 'median' is over "
      "the timed rounds, 'best' is the fastest round. CPU s = process user+system time per step (insensitive to "
      "other processes taking cores, but inflated by spin-waiting threads). One fixed random batch is used for "
      "every step. The torch model is loaded with the JAX initial parameters, so the two loss curves must agree.\n")
    w(f"Model FLOPs per step = 6·N·tokens + 12·L·T·D·tokens = 6 × {mf['n_matmul_params']:,} × {mf['tokens']} "
      f"+ {mf['attention_flops'] / 1e9:.2f} G = **{flops / 1e9:.1f} GFLOP**. N counts every matmul weight: "
      f"q, k, v, o, up, down in each layer and the LM head (the tied embedding used as a [D, V] matmul); biases, "
      f"norms, positions and the embedding gather are not matmuls. The attention term is QK^T and AV, forward + "
      f"backward, with the causal mask **not** halving it (both frameworks compute all T×T scores). Softmaxes, "
      f"norms, GELU and the optimizer are not counted.\n")

    # 1
    w("## 1. Train-step throughput and model FLOP utilization\n")
    mp = r["matmul_peak"]
    w(f"Matmul peak, float32 {mp['n']}×{mp['n']} @ {mp['n']}×{mp['n']}, 2n³ FLOPs, best of 10 interleaved runs:\n")
    w("| library | best GFLOP/s | median GFLOP/s | GFLOP per CPU-second | CPU/wall |")
    w("|---|---|---|---|---|")
    for k in ("jax", "numpy", "torch"):
        if k in mp:
            x = mp[k]
            w(f"| {k}{' (jitted jnp.dot: the peak used below)' if k == 'jax' else ''} | "
              f"{x['best_flops_per_s'] / 1e9:.1f} | {x['median_flops_per_s'] / 1e9:.1f} | "
              f"{x['flops_per_cpu_s'] / 1e9:.1f} | {x['cpu_per_wall']:.2f} |")
    w("")
    w("| contender | step median | step best | tokens/s median | tokens/s best | model GFLOP/s median | "
      "% of peak (median / best) | CPU s/step | % of peak per CPU-s | sys s/step | page faults/step |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, s_ in r["steps"].items():
        med, best = s_["wall"]["median"], s_["wall"]["min"]
        util_cpu = (flops / s_["cpu"]["median"]) / peak_cpu
        pf = s_.get("minflt", {}).get("median", 0)
        w(f"| {k} | {med:.2f} s | {best:.2f} s | {s_['tokens_per_s_median']:.0f} | {s_['tokens_per_s_best']:.0f} | "
          f"{flops / med / 1e9:.1f} | {pct(flops / med / peak)} / {pct(flops / best / peak)} | "
          f"{s_['cpu']['median']:.2f} | {pct(util_cpu)} | {s_.get('sys', {}).get('median', float('nan')):.2f} | "
          f"{pf:.0f} ({fmt_bytes(pf * 4096)}) |")
    w("")
    w(f"1-minute load average when these rounds started: {r.get('loadavg_steps', (float('nan'),))[0]:.2f}. "
      "`jax` is llm_jax as it is; `jax_proposed` is the same step with the changes proposed at the end "
      f"(`{r['args'].get('proposed', '')}`, monkeypatched); `torch_*` are in section 5.\n")
    w(f"JAX step compile: lower {r['jax_step_compile']['lower_s']:.1f} s + compile "
      f"{r['jax_step_compile']['compile_s']:.1f} s.")
    if "memory_analysis" in r:
        ma = r["memory_analysis"]
        w("Compiled memory (`memory_analysis()`): " + ", ".join(
            f"{k.replace('_size_in_bytes', '')} {fmt_bytes(val)}" for k, val in ma.items()) + ".")
    w("")

    # 2
    w("## 2. Compiled HLO FLOPs vs the model count\n")
    hs, hu = r["hlo_scan"], r.get("hlo_unrolled", {})
    w("`lowered.compile().cost_analysis()['flops']` of the whole train step (forward, backward, AdamW):\n")
    w("| compiled step | HLO flops | / model count | transcendentals | bytes accessed |")
    w("|---|---|---|---|---|")
    w(f"| scan_layers=True (default) | {hs['flops'] / 1e9:.1f} G | {hs['flops'] / flops:.3f} | "
      f"{hs['transcendentals'] / 1e6:.1f} M | {hs['bytes accessed'] / 2**30:.2f} GiB |")
    if hu:
        w(f"| scan_layers=False (unrolled) | {hu['flops'] / 1e9:.1f} G | {hu['flops'] / flops:.3f} | "
          f"{hu['transcendentals'] / 1e6:.1f} M | {hu['bytes accessed'] / 2**30:.2f} GiB |")
    w("")
    if hu:
        ex = r["hlo_extras_estimate"]
        w(f"- XLA's cost analysis counts a `while` loop's body **once**, not once per iteration, so the scanned "
          f"step reports roughly LM head + one layer + optimizer ({hs['flops'] / 1e9:.1f} G). The unrolled step "
          f"(the same math with one copy of the block per layer) gives the real total: {hu['flops'] / 1e9:.1f} G, "
          f"**{100 * (hu['flops'] / flops - 1):+.2f}%** vs the model count.")
        w(f"- The small excess is the work the 6·N·tokens rule leaves out; hand estimates: "
          + ", ".join(f"{k.replace('_', ' ')} ≈ {val / 1e9:.2f} G" for k, val in ex.items())
          + f" (sum ≈ {sum(ex.values()) / 1e9:.2f} G, same order as the measured "
            f"{(hu['flops'] - flops) / 1e9:.2f} G; exp/tanh/rsqrt are counted as transcendentals, not flops).")
    w("")

    # 3
    ct = r.get("compile_time", {})
    if ct:
        w("## 3. Compile time vs depth\n")
        w("`step.lower(state, batch).compile()` of the full train step for abstract (ShapeDtypeStruct) inputs, a "
          "fresh trace and compile each time (no compilation cache); rows measured more than once show the "
          "fastest run.\n")
        w("| layers | scan_layers | runs | lower | compile | total |")
        w("|---|---|---|---|---|---|")
        for k, x in ct.items():
            Lk, sc = k.split(" ")
            w(f"| {Lk[2:]} | {sc[5:]} | {x['runs']} | {x['lower_s']:.1f} s | {x['compile_s']:.1f} s | "
              f"{x['total_s']:.1f} s |")
        w("")
        for sc in ("True", "False"):
            a, b = ct.get(f"L=2 scan={sc}"), ct.get(f"L=24 scan={sc}")
            if a and b:
                w(f"- scan_layers={sc}: 24 layers / 2 layers = **{b['total_s'] / a['total_s']:.2f}×**")
        w("")

    # 4
    w("## 4. FSDP: per-device bytes of params + AdamW state\n")
    if "fsdp" in r:
        w(f"`MeshConfig(data=1, fsdp=n, tensor=1)` on n of {r['fsdp']['devices']} host devices "
          f"(`XLA_FLAGS={FSDP_FLAG}` in a subprocess), state from `train.create_train_state`; "
          f"`sharding.per_device_bytes` of (params, opt_state) on the most-loaded device.\n")
        w("| n | total params+opt | per device: params | per device: opt state | per device: both | ideal total/n | "
          "ratio | replicated leaves |")
        w("|---|---|---|---|---|---|---|---|")
        for row in r["fsdp"]["rows"]:
            rep = "—" if row["n"] == 1 else fmt_bytes(row["replicated_bytes"])
            w(f"| {row['n']} | {fmt_bytes(row['total_bytes'])} | {fmt_bytes(row['params_per_device'])} | "
              f"{fmt_bytes(row['opt_per_device'])} | {fmt_bytes(row['state_per_device'])} | "
              f"{fmt_bytes(row['ideal'])} | **{row['ratio']:.3f}** | {rep} |")
        w("\nThe excess over ideal is the replicated leaves (held whole on every device): norm scales/biases, "
          "`o_bias`/`down_bias`, and, under fsdp alone, `q/k/v_bias` and `up_bias`, whose partition rules name "
          "only the tensor axis, plus the optimizer's step counters.\n")
    else:
        w("FSDP part failed:\n```\n" + r.get("fsdp_error", "?") + "\n```\n")

    # 5
    w("## 5. JAX vs PyTorch eager (same model, init, batch and optimizer)\n")
    torch_keys = [k for k in r["steps"] if k.startswith("torch")]
    if torch_keys:
        w("`benchmarks/torch_reference.py`: `torch_sdpa` is the nanoGPT form (fused qkv Linear, "
          "`F.scaled_dot_product_attention(is_causal=True)`, a flash-attention kernel on CPU); "
          "`torch_manual_attention` is the textbook form (materialized T×T scores, masked_fill, softmax). "
          "Timed in the same round-robin as section 1.\n")
        w("| JAX contender | vs | tokens/s ratio (median) | (best rounds) | (CPU seconds) |")
        w("|---|---|---|---|---|")
        for jk in [k for k in r["steps"] if k.startswith("jax")]:
            for tk in torch_keys:
                a, b = r["steps"][jk], r["steps"][tk]
                w(f"| {jk} | {tk} | **{_ratio(b['wall']['median'], a['wall']['median']):.2f}×** | "
                  f"{_ratio(b['wall']['min'], a['wall']['min']):.2f}× | "
                  f"{_ratio(b['cpu']['median'], a['cpu']['median']):.2f}× |")
        w("")
        jl = np.array(js["losses"])
        for k in r["steps"]:
            if k == "jax":
                continue
            tl = np.array(r["steps"][k]["losses"])
            n = min(len(jl), len(tl))
            w(f"- loss, jax vs {k} over {n} steps from the same initial parameters: step 1 {jl[0]:.6f} vs "
              f"{tl[0]:.6f}, max |Δ| {np.abs(jl[:n] - tl[:n]).max():.2e} (loss {jl[0]:.4f} → {jl[n - 1]:.4f}).")
        w("")
    else:
        w("PyTorch not run: " + r.get("torch_error", "--no-torch") + "\n")

    # targets
    w("## Targets\n")
    w("| target | measured | status |")
    w("|---|---|---|")
    if hu:
        d = abs(hu["flops"] / flops - 1)
        w(f"| HLO FLOPs within 5% of the model count | {100 * (hu['flops'] / flops - 1):+.1f}% (unrolled; the scanned "
          f"step's {100 * (hs['flops'] / flops - 1):+.0f}% is the loop body counted once) | "
          f"{'met' if d <= 0.05 else 'missed'} |")
    util = flops / js["wall"]["median"] / peak
    util_best = flops / js["wall"]["min"] / peak
    util_cpu = (flops / js["cpu"]["median"]) / peak_cpu
    extra = ""
    if "jax_proposed" in r["steps"]:
        jp = r["steps"]["jax_proposed"]
        extra = f"; with proposals {pct(flops / jp['wall']['median'] / peak)} median"
    if "allocator" in r:
        al = r["allocator"]["steps"]
        extra += "; under tcmalloc (section 7) " + ", ".join(
            f"{k} {pct(flops / al[k]['wall']['median'] / peak)}" for k in ("jax", "jax_proposed") if k in al)
    w(f"| ≥ 70% of measured matmul peak | {pct(util)} median, {pct(util_best)} best round, {pct(util_cpu)} per "
      f"CPU-second{extra} | {'met' if util >= 0.7 else 'missed'} |")
    if ct.get("L=2 scan=True") and ct.get("L=24 scan=True"):
        rr = ct["L=24 scan=True"]["total_s"] / ct["L=2 scan=True"]["total_s"]
        w(f"| 24-layer compile ≤ 1.5× the 2-layer | {rr:.2f}× (scan_layers=True) | {'met' if rr <= 1.5 else 'missed'} |")
    if "fsdp" in r:
        worst = max(row["ratio"] for row in r["fsdp"]["rows"])
        w(f"| FSDP per-device state ≤ 1.15× ideal | worst {worst:.3f}× (n=8) | {'met' if worst <= 1.15 else 'missed'} |")
    tr_ = torch_ratios(r)
    if tr_:
        extra = ""
        if "jax_proposed" in r["steps"]:
            extra = (f"; with proposals "
                     f"{r['steps']['torch_sdpa']['wall']['median'] / r['steps']['jax_proposed']['wall']['median']:.2f}×"
                     f" in section 1")
        if "allocator" in r and "torch_sdpa" in r["allocator"]["steps"]:
            al = r["allocator"]["steps"]
            extra += "; under tcmalloc (section 7) " + ", ".join(
                f"{k} {_ratio(al['torch_sdpa']['wall']['median'], al[k]['wall']['median']):.2f}×"
                for k in ("jax", "jax_proposed") if k in al)
        ok = [x[1] >= 0.75 for x in tr_]
        status = "met" if all(ok) else ("missed" if not any(ok) else "load-dependent: met under load, missed "
                                                                        "when torch gets both cores")
        w("| JAX ≥ 0.75× PyTorch eager tokens/s | "
          + "; ".join(f"{x[1]:.2f}× in {x[0]} (load {x[2]:.1f}, torch CPU/wall {x[3]:.2f})" for x in tr_)
          + f"{extra} | {status} |")
    w("")

    # 6
    if "profile" in r:
        w("## 6. Investigation of the JAX step\n")
        p = r["profile"]
        if "error" in p:
            w(f"profile failed: {p['error']}\n")
        else:
            w(f"Profile: `jax.profiler.trace` over {p['nsteps']} steps of the current step, per-op wall time per "
              f"step mapped to the compiled HLO's `op_name`. Independent ops overlap and other processes preempt "
              f"them, so the sum ({p['total_ms_per_step']:.0f} ms/step) is not the step time; the shares are what "
              f"matter.\n")
            w("| category | ms/step | share |")
            w("|---|---|---|")
            for k, ms in p["categories"].items():
                w(f"| {k} | {ms:.0f} | {pct(ms / p['total_ms_per_step'])} |")
            w("\nTop ops:\n")
            w("| op | ms/step | shape | from (op_name) |")
            w("|---|---|---|---|")
            for row in p["top"]:
                w(f"| {row['name']} | {row['ms']:.0f} | {row['shape']} | `{row['op']}` |")
            w("")
    if "phases" in r:
        w("Forward vs backward (same params, timed round-robin; no optimizer):\n")
        w("| computation | median | best | CPU s |")
        w("|---|---|---|---|")
        for k, x in r["phases"].items():
            w(f"| {k} | {x['wall']['median']:.2f} s | {x['wall']['min']:.2f} s | {x['cpu']['median']:.2f} |")
        w("")
    if "variants" in r:
        w("Alternatives: each row is a full train step compiled on its own and timed round-robin with the others "
          "(speed-up > 1 is faster than `baseline`; CPU s is the least load-sensitive column; 1-minute load "
          f"average at the start: {r.get('loadavg_variants', (float('nan'),))[0]:.2f}). Differences of a few "
          "percent are within this machine's run-to-run noise.\n")
        w("| variant | what | compile | temp memory | median | best | CPU s | sys s | speed-up median / best / CPU | "
          "loss after the run |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        vb = r["variants"].get("baseline")
        for k, x in r["variants"].items():
            desc = (" + ".join(VARIANTS[p_][0] for p_ in k.split("+")) if k in VARIANTS or "+" in k
                    else "PyTorch reference (section 5), timed in the same rounds")
            sp = ""
            if vb:
                sp = (f"{vb['wall']['median'] / x['wall']['median']:.2f} / {vb['wall']['min'] / x['wall']['min']:.2f}"
                      f" / {vb['cpu']['median'] / x['cpu']['median']:.2f}")
            comp = f"{x['compile_s']:.1f} s" if x["compile_s"] == x["compile_s"] else "—"
            temp = fmt_bytes(x["temp_bytes"]) if x.get("temp_bytes") else "—"
            w(f"| {k} | {desc} | {comp} | {temp} | "
              f"{x['wall']['median']:.2f} s | {x['wall']['min']:.2f} s | {x['cpu']['median']:.2f} | "
              f"{x['sys']['median']:.2f} | {sp} | {x['losses'][-1]:.6f} |")
        w("")
    if "allocator" in r or "alloc_error" in r:
        w("## 7. Without the page faults: the same contenders under tcmalloc\n")
        if "allocator" in r:
            al = r["allocator"]
            w(f"A subprocess with `LD_PRELOAD={al['preload']} TCMALLOC_RELEASE_RATE=0` (an allocator that keeps "
              f"freed memory instead of returning it with munmap), {r['args'].get('alloc_rounds')} rounds, "
              f"round-robin, load {al['loadavg']:.2f} at the start. Everything else as in section 1.\n")
            w("| contender | step median | step best | tokens/s median | % of peak (median / best) | CPU s | "
              "sys s | page faults/step |")
            w("|---|---|---|---|---|---|---|---|")
            for k, x in al["steps"].items():
                med, best = x["wall"]["median"], x["wall"]["min"]
                w(f"| {k} | {med:.2f} s | {best:.2f} s | {mf['tokens'] / med:.0f} | "
                  f"{pct(flops / med / peak)} / {pct(flops / best / peak)} | {x['cpu']['median']:.2f} | "
                  f"{x['sys']['median']:.2f} | {x['minflt']['median']:.0f} |")
            st = al["steps"]
            if "torch_sdpa" in st:
                w("")
                for k in ("jax", "jax_proposed"):
                    if k in st:
                        w(f"- {k} / torch_sdpa tokens/s: **{_ratio(st['torch_sdpa']['wall']['median'], st[k]['wall']['median']):.2f}×**"
                          f" (median), {_ratio(st['torch_sdpa']['wall']['min'], st[k]['wall']['min']):.2f}× (best)")
            w("")
        else:
            w(r["alloc_error"] + "\n")
    w("## Findings and proposals\n")
    w(findings_md(r))
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")

# ---------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fsdp-part", action="store_true", help="internal: the FSDP subprocess")
    ap.add_argument("--alloc-part", action="store_true", help="internal: the allocator subprocess")
    ap.add_argument("--alloc-rounds", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="fewer steps, no variants, shorter compile section")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default 6, quick 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-investigate", action="store_true", help="skip section 6")
    ap.add_argument("--variants", default="baseline,tied_head_vjp,onehot_loss,gelu_vjp,remat_dots,unrolled,"
                    "einsum_attention,eigen_dots")
    ap.add_argument("--variant-rounds", type=int, default=3)
    ap.add_argument("--proposed", default=PROPOSED,
                    help="'+'-joined variants timed as 'jax_proposed' beside the baseline in section 1 ('' to skip)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    args = ap.parse_args(argv)
    if args.fsdp_part:
        fsdp_part()
        return
    if args.alloc_part:
        alloc_part(args.variant_rounds)
        return
    if args.steps is None:
        args.steps = 3 if args.quick else 6

    command = (f"cd {os.getcwd()} && PYTHONPATH={os.environ.get('PYTHONPATH', '')} "
               f"{sys.executable} -m benchmarks.core {' '.join(argv if argv is not None else sys.argv[1:])}").replace("  ", " ")
    t_start = time.perf_counter()
    results: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": machine_info(), "versions": versions(), "args": vars(args)}
    step, holder, batch, cfg = section_train_step(args, results)
    section_hlo_unrolled(results)
    section_compile_time(results, args.quick)
    section_fsdp(results)
    if not (args.quick or args.no_investigate):
        section_investigation(args, results, step, holder, batch, cfg)
        del step, holder, batch
        section_allocator(args, results)
    results["loadavg_end"] = os.getloadavg()
    results["runtime_s"] = time.perf_counter() - t_start
    results.pop("_torch_fns", None)
    write_report(args.out, results, command)
    with open(os.path.splitext(args.out)[0].replace("RESULTS", "results") + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {args.out} ({results['runtime_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
