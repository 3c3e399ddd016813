"""Core benchmark of the llm_jax training step on this machine's CPU.

    cd /work/main && PYTHONPATH=. python -m benchmarks.core     # the real run: ~7 min on a quiet 2-core machine
    PYTHONPATH=. python -m benchmarks.core --quick --out /tmp/bench_check.md   # does it run? ~4 min quiet, 9 loaded
    PYTHONPATH=. python -m benchmarks.core --report-only benchmarks/results.json --out /tmp/r.md  # re-render only

Writes benchmarks/RESULTS.md and benchmarks/results.json (the raw numbers), or
`--out PATH.md` and PATH.json. `--quick` runs every section with 1-2 rounds and
small counts: it checks that the script works, its numbers mean nothing.

One fixed GPT-2-shaped model (vocab 8192, d_model 512, 4 layers, 8 heads, d_ff
2048, seq 256, batch 8, float32; GELU MLP, LayerNorm, learned positions,
biases, tied embeddings) so that the PyTorch side (benchmarks/torch_reference.py)
is a plain GPT-2 block. Sections:

1. train-step tokens/s and achieved model FLOP/s against the matmul peak
   measured in the same run, for `jax` (llm_jax as it is) and `jax_before`
   (the same step with the changes P1-P3 reverted by monkeypatching);
2. the compiled HLO's FLOP count against the model count;
3. compile time of the train step at 2 vs 24 layers (scan and unrolled);
4. per-device bytes of params + optimizer state under FSDP over 1/2/4/8 host
   devices (a subprocess: the device count is fixed when jax starts);
5. the same model in PyTorch eager, timed interleaved with JAX;
6. investigation of the JAX step: an op-level profile, forward / backward /
   optimizer split, and alternatives (each P1-P3 reverted alone, remat, no
   scan, einsum attention, Eigen dots) measured A/B in the same process;
7. `jax`, `jax_before` and torch again under tcmalloc (a subprocess with
   LD_PRELOAD, skipped if libtcmalloc is not installed), to separate XLA:CPU's
   per-step page faults from compute.

The machine may be shared: every comparison runs its contenders interleaved
(round-robin, one step each, `time_round_robin`) so that load from other
processes hits all of them alike, and CPU seconds per step are reported beside
wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import gzip
import json
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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fixed benchmark model (see the module docstring for why these choices).
MODEL_KW = dict(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, d_ff=2048, max_len=256,
                positions="learned", norm="layernorm", mlp="gelu", use_bias=True,
                tie_embeddings=True, dtype="float32", param_dtype="float32")
BATCH, SEQ = 8, 256
TOTAL_STEPS = 1000  # for the lr schedule only

# Targets of the benchmark (see the "Targets" table of the report).
TARGET_PEAK_FRACTION = 0.70  # model FLOP/s of the train step / measured matmul peak
TARGET_TORCH_RATIO = 0.75  # JAX tokens/s / PyTorch eager tokens/s

# torch contenders: name -> manual_attention (see torch_reference.Block)
TORCH_CONTENDERS = {"torch_sdpa": False, "torch_manual_attention": True}


# ---------------------------------------------------------------------------
# Small helpers


def rusage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def model_config(**overrides):
    from llm_jax.config import ModelConfig
    return ModelConfig(**{**MODEL_KW, **overrides}).validate()


def model_flops_per_step(cfg, batch: int | None = None, seq: int | None = None) -> dict:
    """6 * N * tokens with N = every matmul weight (q, k, v, o, up, [gate], down per
    layer, plus the LM head: the tied embedding used as a [D, V] matmul), plus
    attention 12 * L * T * D per token (QK^T and AV, forward + backward; the causal
    mask is NOT halved, as XLA and PyTorch both compute the full T x T scores)."""
    batch, seq = batch or BATCH, seq or SEQ
    L, D, F, V = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    NH, GH = cfg.num_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    per_layer = D * NH + 2 * D * GH + NH * D + (3 if cfg.mlp == "swiglu" else 2) * D * F
    n_matmul = L * per_layer + D * V
    tokens = batch * seq
    dense = 6 * n_matmul * tokens
    attn = 12 * L * seq * D * tokens
    return {"n_matmul_params": n_matmul, "tokens": tokens, "dense_flops": dense,
            "attention_flops": attn, "total_flops": dense + attn}


def random_batch(seed: int = 0):
    """The one fixed batch of the benchmark: uniform random tokens, all weights 1."""
    batch, seq, vocab = BATCH, SEQ, MODEL_KW["vocab_size"]
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "targets": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "weights": np.ones((batch, seq), np.float32)}


def stats(xs: list[float]) -> dict:
    a = np.asarray(xs, float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def time_round_robin(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                     tokens: int | None = None) -> dict:
    """The one timing loop of the benchmark: each fn runs once per round,
    round-robin, the order rotated every round so that no contender always runs
    first or last; `warmup` untimed rounds first (run the same way).

    Returns {name: {wall, cpu, sys, minflt: stats over the timed rounds,
    losses: every round's return value (warm-up included), and with `tokens`
    tokens_per_s_median / tokens_per_s_best}}. cpu/sys are this process's
    user+system / system seconds, minflt its minor page faults, per call."""
    raw = {k: {"wall": [], "cpu": [], "sys": [], "minflt": [], "out": []} for k in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            (c0, s0, f0), t0 = rusage(), time.perf_counter()
            out = fns[k]()
            wall = time.perf_counter() - t0
            c1, s1, f1 = rusage()
            raw[k]["out"].append(out)
            if r >= warmup:
                for key, val in (("wall", wall), ("cpu", c1 - c0), ("sys", s1 - s0), ("minflt", f1 - f0)):
                    raw[k][key].append(val)
    res = {}
    for k, x in raw.items():
        res[k] = {key: stats(x[key]) for key in ("wall", "cpu", "sys", "minflt")}
        res[k]["losses"] = x["out"]
        if tokens:
            res[k]["tokens_per_s_median"] = tokens / res[k]["wall"]["median"]
            res[k]["tokens_per_s_best"] = tokens / res[k]["wall"]["min"]
    return res


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def pct(x):
    return f"{100 * x:.1f}%"


def _ratio(a, b):
    return a / b if b else float("nan")


def first(ca):
    """Compiled.cost_analysis() is a dict in new jax, a list of dicts in older ones."""
    if isinstance(ca, (list, tuple)):
        return ca[0] if ca else {}
    return ca or {}


def emit(tag: str, obj: dict):
    """A subprocess part's result: one stdout line `TAG {json}` (see run_part)."""
    print(f"{tag} " + json.dumps(obj), flush=True)


def run_part(flags: list[str], tag: str, env_extra: dict, timeout: int = 900) -> dict:
    """Runs `python -m benchmarks.core FLAGS` in a subprocess with `env_extra`
    added to the environment and returns the JSON of its last `TAG ...` line;
    RuntimeError with the tail of its output if it failed."""
    env = {**os.environ, **env_extra}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        p = subprocess.run([sys.executable, "-m", "benchmarks.core", *flags], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(flags)}: timed out after {timeout} s") from e
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(tag + " ")]
    if p.returncode or not lines:
        raise RuntimeError((p.stderr or p.stdout)[-2000:])
    return json.loads(lines[-1][len(tag) + 1:])


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
            "platform": platform.platform(), "loadavg_start": os.getloadavg(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


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


def _optimizer_and_mesh():
    import jax
    from llm_jax import sharding, train
    from llm_jax.config import MeshConfig, OptimizerConfig
    tx, sched = train.make_optimizer(OptimizerConfig(), TOTAL_STEPS)
    return tx, sched, sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def _jit_step(cfg, tx, sched, mesh, shard):
    """The pretraining train step, jitted with the state shardings (donates the state)."""
    from llm_jax import train
    from llm_jax.stages import pretrain
    return train.jit_train_step(
        train.make_train_step(pretrain.clm_loss_fn(cfg), pretrain.weight_sum, tx, sched, microbatches=1),
        mesh, shard)


def jax_setup(cfg, seed: int = 0):
    """(jitted step, state, batch) on one CPU device; the initial params depend on
    `seed` only, so every contender built from it starts from the same weights."""
    from llm_jax import model, sharding, train
    tx, sched, mesh = _optimizer_and_mesh()
    state, shard = train.create_train_state(lambda r: model.init(cfg, r), tx, mesh, seed)
    return _jit_step(cfg, tx, sched, mesh, shard), state, sharding.shard_batch(random_batch(), mesh)


def abstract_state_and_step(cfg):
    """The train step and ShapeDtypeStruct state/batch for `cfg`, no arrays made
    (for compile-time measurements at any depth)."""
    import jax
    import jax.numpy as jnp
    from llm_jax import model, sharding, train
    tx, sched, mesh = _optimizer_and_mesh()

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
    return _jit_step(cfg, tx, sched, mesh, shard), state, batch


def jax_runner(step, state, batch) -> Callable[[], float]:
    """A zero-argument fn that runs one train step (jitted or compiled; it donates
    the state, so the new state replaces it in `fn.holder['state']`), waits for
    it and returns the loss. `fn.batch` is the batch it steps on."""
    import jax
    holder = {"state": state}

    def run():
        # frozen=None passed explicitly: a Compiled step takes exactly the args it was lowered with
        holder["state"], m = step(holder["state"], batch, None)
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"])
    run.holder, run.batch = holder, batch
    return run


def torch_runners(cfg, init_params, names, results: dict | None = None) -> dict:
    """{name: zero-argument fn running one torch train step, returning the loss} for
    the TORCH_CONTENDERS `names`, each a fresh model loaded with `init_params` (a
    host copy of the JAX params). {} (and results['torch_error']) without torch."""
    try:
        import torch
        from benchmarks import torch_reference as tr
    except ImportError as e:
        if results is not None:
            results["torch_error"] = f"torch not importable: {e}"
        return {}
    if results is not None:
        results["torch_threads"] = torch.get_num_threads()
    tb = tr.to_torch_batch(random_batch())
    out = {}
    for name in names:
        torch.manual_seed(0)
        tm = tr.GPT(cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff, cfg.max_len,
                    eps=cfg.norm_eps, manual_attention=TORCH_CONTENDERS[name])
        tr.load_from_jax(tm, init_params)
        tstep = tr.make_train_step(tm, tr.make_optimizer(tm), TOTAL_STEPS)
        out[name] = (lambda ts: lambda: float(ts(tb)))(tstep)
    return out


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
    def discard(_):  # the round-robin keeps return values, and these are 16 MiB each
        return None
    fns = {"jax": lambda: discard(f(ja, jb).block_until_ready()), "numpy": lambda: discard(a @ b)}
    try:
        import torch
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns["torch"] = lambda: discard(ta @ tb)
    except ImportError:
        pass
    res = time_round_robin(fns, reps, warmup=1)
    flops = 2 * n**3
    out = {k: {"best_flops_per_s": flops / r["wall"]["min"],
               "median_flops_per_s": flops / r["wall"]["median"],
               "flops_per_cpu_s": flops / r["cpu"]["median"],
               "cpu_per_wall": r["cpu"]["median"] / r["wall"]["median"]} for k, r in res.items()}
    out["n"], out["reps"] = n, reps
    return out


# ---------------------------------------------------------------------------
# Variants of the step, by monkeypatching llm_jax while the step is traced
# (llm_jax itself is not edited). The P1-P3 rows put back the code that the
# changes replaced, so `jax_before` is llm_jax as it was before them.


def _gather_token_logprobs(logits, targets):
    """losses.token_logprobs before P2: the target's log-prob picked with
    take_along_axis (whose transpose is a scatter-add into a zero-filled [B, T, V])."""
    import jax
    import jax.numpy as jnp
    lp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]


def _autodiff_gelu(x):
    """model.gelu_tanh before P3: jax.nn.gelu's tanh form, differentiated by autodiff."""
    import jax
    return jax.nn.gelu(x, approximate=True)


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


def variant_patches(name: str) -> list[tuple[Any, str, Any]]:
    """(module, attribute, replacement) for the variants that monkeypatch llm_jax."""
    from llm_jax import losses, model
    return {
        "autodiff_tied_head": [(model, "_cpu_tied_head", lambda: False)],
        "gather_loss": [(losses, "token_logprobs", _gather_token_logprobs)],
        "autodiff_gelu": [(model, "gelu_tanh", _autodiff_gelu)],
        "einsum_attention": [(model, "attention", _einsum_attention)],
    }.get(name, [])


VARIANTS = {
    # name: (description, model-config overrides, XLA compiler options)
    "baseline": ("llm_jax as is (P1-P3 in; scan over layers, jax.nn.dot_product_attention 'xla')", {}, {}),
    "autodiff_tied_head": ("P1 reverted: tied LM head differentiated by autodiff (`model._cpu_tied_head` -> "
                           "False)", {}, {}),
    "gather_loss": ("P2 reverted: `losses.token_logprobs` picks the target with take_along_axis", {}, {}),
    "autodiff_gelu": ("P3 reverted: `jax.nn.gelu(approximate=True)` differentiated by autodiff in place of "
                      "`model.gelu_tanh`", {}, {}),
    "remat_dots": ("remat='dots' (recompute elementwise ops in backward, save matmul outputs)",
                   {"remat": "dots"}, {}),
    "unrolled": ("scan_layers=False (layers unrolled)", {"scan_layers": False}, {}),
    "einsum_attention": ("model.attention as plain einsum + softmax instead of jax.nn.dot_product_attention",
                         {}, {}),
    "eigen_dots": ("XLA option xla_cpu_experimental_ynn_fusion_type='' (Eigen dots instead of YNNPACK)",
                   {}, {"xla_cpu_experimental_ynn_fusion_type": ""}),
    "softmax_custom_jvp": ("jax_softmax_custom_jvp=True (attention softmax saves only its output)", {}, {}),
}

# jax config flags a variant sets while it is traced
VARIANT_FLAGS = {"softmax_custom_jvp": {"jax_softmax_custom_jvp": True}}

# The changes applied to llm_jax, each named by the variant that reverts it.
CHANGES = {"P1": "autodiff_tied_head", "P2": "gather_loss", "P3": "autodiff_gelu"}
# llm_jax before P1-P3: timed as `jax_before` beside `jax` in sections 1 and 7.
BEFORE = "+".join(CHANGES.values())
DEFAULT_VARIANTS = ("baseline", *CHANGES.values(), "remat_dots", "unrolled", "einsum_attention", "eigen_dots")


def parse_spec(spec: str) -> list[str]:
    """'+'-joined VARIANTS names -> the names other than 'baseline'."""
    parts = [p for p in spec.split("+") if p and p != "baseline"]
    unknown = [p for p in parts if p not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} in {spec!r}; known: {sorted(VARIANTS)}")
    return parts


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
    """Builds and compiles the train step of `spec` ('+'-joined VARIANTS names;
    'baseline' is llm_jax as is). Returns (compiled, state, batch, info) with
    info = {lower_s, compile_s, cost: HLO flops/transcendentals/bytes accessed,
    memory: the compiled memory_analysis() sizes, temp_bytes}."""
    parts = parse_spec(spec)
    overrides, opts = {}, {}
    for p in parts:
        overrides.update(VARIANTS[p][1])
        opts.update(VARIANTS[p][2])
    cfg = model_config(**overrides)
    with patched(parts):  # the patches must be in place while the step is traced
        step, state, batch = jax_setup(cfg)
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile(compiler_options=opts or None)
        t2 = time.perf_counter()
    ca = first(compiled.cost_analysis())
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                "alias_size_in_bytes", "temp_size_in_bytes")
              if mem is not None and hasattr(mem, k)}
    info = {"lower_s": t1 - t0, "compile_s": t2 - t1,
            "cost": {k: float(ca.get(k, float("nan"))) for k in ("flops", "transcendentals", "bytes accessed")},
            "memory": memory, "temp_bytes": memory.get("temp_size_in_bytes", 0)}
    return compiled, state, batch, info


def build_runners(specs: dict[str, str], log: str = "") -> tuple[dict, dict, Any]:
    """Compiles each {contender name: variant spec}; returns ({name: jax_runner},
    {name: build info}, host copy of the initial params, taken before any step
    donates the state; all contenders share it, see jax_setup)."""
    import jax
    runners, infos, init_params = {}, {}, None
    for name, spec in specs.items():
        compiled, state, batch, info = build_variant(spec)
        if init_params is None:
            init_params = jax.device_get(state.params)
        infos[name] = {"spec": spec, **info}
        runners[name] = jax_runner(compiled, state, batch)
        runners[name].compiled = compiled
        print(f"  {log}{name} ({spec}): lower {info['lower_s']:.1f}s + compile {info['compile_s']:.1f}s, "
              f"temp {fmt_bytes(info['temp_bytes'])}", flush=True)
    return runners, infos, init_params


def run_variants(specs: list[str], rounds: int, with_torch: bool) -> dict:
    """Every variant (and a fresh torch_sdpa from the same initial params) timed
    round-robin; all start from the same weights, so their losses must agree."""
    runners, infos, init_params = build_runners({s: s for s in specs}, log="variant ")
    if with_torch:
        runners.update(torch_runners(model_config(), init_params, ("torch_sdpa",)))
    out = time_round_robin(runners, rounds, warmup=1)
    for s in specs:
        out[s].update(infos[s])
    return out


def _numel(shape: str) -> int:
    dims = re.findall(r"\d+", shape.split("[", 1)[-1]) if "[" in shape else []
    return int(np.prod([int(d) for d in dims])) if dims else 0


def _op_category(name: str, op: str, shape: str) -> str:
    """A profile category for one HLO op, from its name, op_name metadata and shape."""
    o = op.lower()
    if "dot_general" in o and any(s in o for s in ("btd,dv->btv", "btd,vd->btv", "btv,vd->btd", "btd,btv->dv")):
        return "LM head matmul (tied embedding)"
    # log-softmax over V and the target pick: the ops over the whole [B, T, V]
    if ("take_along_axis" in o or "log_softmax" in o or _numel(shape) == BATCH * SEQ * MODEL_KW["vocab_size"]
            or "scatter" in name and "jvp()" not in o):
        return "loss (log_softmax over V, target pick)"
    if "dot_product_attention" in o or "bnts" in o or "bgrts" in o or "btnh,bsnh" in o:
        return "attention core (scores, softmax, AV)"
    if "dot_general" in o:
        return "layer matmuls (qkv, o, up, down)"
    last = o.split("/")[-1]
    if ("adam" in o or "clip" in o or "global_norm" in o or "/square" in o
            or ("while" not in o and "train_step)/" in o and ("mul" in last or "add" in last)
                and "jvp" not in o and "transpose" not in o)):
        return "optimizer (AdamW, clipping)"
    if name.startswith("wrapped_broadcast") or "broadcast" in name and "jvp" not in o and "transpose" not in o:
        return "memset / broadcast buffers"
    if "scatter" in name or "gather" in o:
        return "embedding gather / scatter"
    if "copy" in name or "transpose" in name:
        return "copies / transposes (layout)"
    return "other elementwise / reductions (norms, gelu, residual)"


def profile_step(compiled, run: Callable[[], float], nsteps: int = 2, top: int = 14) -> dict:
    """Per-op times from jax.profiler (perfetto trace) over `nsteps` calls of `run`
    (a jax_runner of `compiled`), mapped to the compiled HLO's op_name metadata.
    Ops run concurrently inside one step (the thunk executor overlaps independent
    ops), so per-op wall times can add up to more than the step."""
    import jax
    hlo = compiled.as_text()
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
                    run()
        except Exception as e:  # profiler plugins missing etc.
            return {"error": repr(e)}
        files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
        if not files:
            return {"error": "no perfetto trace written"}
        with gzip.open(files[0]) as f:
            tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    agg: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("name") in info:
            agg[e["name"]] = agg.get(e["name"], 0.0) + e["dur"] / 1e3 / nsteps  # ms per step
    cats: dict[str, float] = {}
    rows = []
    for k, ms in agg.items():
        shape, op = info[k]
        c = _op_category(k, op, shape)
        cats[c] = cats.get(c, 0.0) + ms
        rows.append({"name": k, "ms": ms, "shape": shape, "op": op[-90:], "category": c})
    rows.sort(key=lambda r: -r["ms"])
    return {"total_ms_per_step": sum(agg.values()), "categories": dict(sorted(cats.items(), key=lambda x: -x[1])),
            "top": rows[:top], "nsteps": nsteps,
            "serial_loop_fusions": len(serial), "loop_fusions": len(re.findall(r"kind=kLoop", hlo)),
            "serial_loop_ms": sum(ms for k, ms in agg.items() if k in serial)}


def phase_split(cfg, run: Callable[[], float], batch, rounds: int) -> dict:
    """Forward loss only, forward without the LM head, forward+backward
    (value_and_grad) and the full step (`run`), round-robin."""
    import jax
    from llm_jax import model
    from llm_jax.stages import pretrain
    loss_fn = pretrain.clm_loss_fn(cfg)

    def f(p, b):
        return loss_fn(p, b, None, pretrain.weight_sum(b))[0]

    def loss_of(out):  # wait for every output, not only the loss
        jax.block_until_ready(out)
        return float(out[0] if isinstance(out, tuple) else out)

    params = jax.tree.map(lambda x: x.copy(), run.holder["state"].params)  # the step donates the state
    fwd = jax.jit(f).lower(params, batch).compile()
    grad = jax.jit(jax.value_and_grad(f)).lower(params, batch).compile()
    fwd_nohead = jax.jit(lambda p, b: model.forward(cfg, p, b["inputs"]).sum()).lower(params, batch).compile()
    fns = {"forward (loss)": lambda: loss_of(fwd(params, batch)),
           "forward, no LM head/loss": lambda: loss_of(fwd_nohead(params, batch)),
           "forward + backward": lambda: loss_of(grad(params, batch)),
           "full train step (+ AdamW)": run}
    res = time_round_robin(fns, rounds, warmup=1)
    return {k: {"wall": v["wall"], "cpu": v["cpu"]} for k, v in res.items()}


# ---------------------------------------------------------------------------
# Sections


def contender_specs(args) -> dict[str, str]:
    """The JAX contenders of sections 1 and 7: {name: variant spec}."""
    return {"jax": "baseline", **({"jax_before": args.before} if args.before else {})}


def section_train_step(args, results: dict):
    """1 + 5: the JAX contenders and PyTorch steps interleaved, and the matmul peak."""
    from llm_jax import model as llm_model
    print("[1] matmul peak", flush=True)
    results["matmul_peak"] = matmul_peak(reps=args.matmul_reps)
    cfg = model_config()
    results["model_flops"] = model_flops_per_step(cfg)
    print("[1] JAX train steps: compile", flush=True)
    runners, infos, init_params = build_runners(contender_specs(args))
    results["compiled"] = infos
    results["param_count"] = llm_model.count_params(init_params)
    if not args.no_torch:
        names = ["torch_sdpa"] + ([] if args.quick else ["torch_manual_attention"])
        runners.update(torch_runners(cfg, init_params, names, results))
    print(f"[1/5] timing {list(runners)} round-robin: {args.warmup} warm-up + {args.steps} timed rounds",
          flush=True)
    results["loadavg_steps"] = os.getloadavg()
    results["steps"] = time_round_robin(runners, args.steps, args.warmup, tokens=results["model_flops"]["tokens"])
    return cfg, runners["jax"]


def section_hlo_unrolled(results: dict):
    """2: the scan's while body is counted once by cost_analysis; the unrolled
    step's count is the real total."""
    print("[2] HLO FLOPs of the unrolled step", flush=True)
    step, state, batch = abstract_state_and_step(model_config(scan_layers=False))
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
        step, state, batch = abstract_state_and_step(model_config(num_layers=L, scan_layers=scan))
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
    flags = os.environ.get("XLA_FLAGS", "")
    env = {"XLA_FLAGS": flags if FSDP_FLAG in flags else f"{flags} {FSDP_FLAG}".strip(),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    try:
        results["fsdp"] = run_part(["--fsdp-part"], "FSDP_JSON", env)
    except RuntimeError as e:
        results["fsdp_error"] = str(e)


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
    emit("FSDP_JSON", out)


TCMALLOC_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                       "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                       "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def alloc_part(args):
    """Runs in the subprocess started by section_allocator (under LD_PRELOAD=tcmalloc):
    the section-1 JAX contenders and torch_sdpa, round-robin."""
    load = os.getloadavg()[0]
    runners, infos, init_params = build_runners(contender_specs(args))
    runners.update(torch_runners(model_config(), init_params, ("torch_sdpa",)))
    emit("ALLOC_JSON", {"loadavg": load, "preload": os.environ.get("LD_PRELOAD", ""),
                        "rounds": args.alloc_rounds,
                        "temp_bytes": {k: v["temp_bytes"] for k, v in infos.items()},
                        "steps": time_round_robin(runners, args.alloc_rounds, warmup=1)})


def section_allocator(args, results: dict):
    """7: the same contenders with an allocator that keeps freed memory (tcmalloc, if installed),
    to separate the page-fault cost of XLA's per-step temp buffer from compute."""
    lib = next((p for p in TCMALLOC_CANDIDATES if os.path.exists(p)), None)
    if lib is None:
        results["alloc_error"] = ("no tcmalloc found (Debian: apt-get install libtcmalloc-minimal4); "
                                  "section skipped")
        return
    print(f"[7] allocator: {list(contender_specs(args))} + torch_sdpa under LD_PRELOAD={lib}", flush=True)
    env = {"LD_PRELOAD": lib, "TCMALLOC_RELEASE_RATE": "0",
           "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
    try:
        results["allocator"] = run_part(["--alloc-part", "--alloc-rounds", str(args.alloc_rounds),
                                         "--before", args.before], "ALLOC_JSON", env)
    except RuntimeError as e:
        results["alloc_error"] = str(e)


def section_investigation(args, results: dict, cfg, run):
    """6: profile and phase split of `run` (the `jax` runner of section 1), then the variants."""
    print("[6] profile of the JAX step", flush=True)
    results["profile"] = profile_step(run.compiled, run, nsteps=1 if args.quick else 2)
    print("[6] forward / backward split", flush=True)
    results["phases"] = phase_split(cfg, run, run.batch, rounds=args.variant_rounds)
    specs = args.variants.split(",")
    print(f"[6] variants {specs}", flush=True)
    results["loadavg_variants"] = os.getloadavg()
    results["variants"] = run_variants(specs, rounds=args.variant_rounds, with_torch=not args.no_torch)


# ---------------------------------------------------------------------------
# Report: every statement below is computed from this run's numbers; fixed text
# only describes the code and the method.

LOSS_CAT = "loss (log_softmax over V, target pick)"
MATMUL_CATS = ("layer matmuls (qkv, o, up, down)", "LM head matmul (tied embedding)")

# What each change does and where it lives (descriptions of the code, not measurements).
CHANGE_TEXT = {
    "P1": ("tied LM head with a custom VJP, on CPU",
           "`llm_jax/model.py`: `lm_logits` calls `_tied_logits` (a `jax.custom_vjp`, backward "
           "`_tied_logits_bwd`) when `config.tie_embeddings` and `_cpu_tied_head()` (the CPU backend)",
           "Autodiff forms the embedding gradient as `dlogits^T @ hidden`, contracting the major axis of "
           "the float32 [B*T, V] `dlogits`; XLA:CPU (YNNPACK dot) then writes a transposed copy of that whole "
           "array and computes the dlogits fusion twice, once per layout. The custom backward computes "
           "`(hidden^T @ dlogits)^T`, so only the [B*T, D] hidden and the [D, V] result are transposed. Other "
           "backends take either operand order without a copy and keep the autodiff form (the extra [D, V] "
           "transpose would be pure cost there), chosen by backend like `attention(impl='auto')`. The CPU "
           "form has no forward-mode derivative."),
    "P2": ("one-hot select for the target log-prob",
           "`llm_jax/losses.py`: `token_logprobs`",
           "The target's log-prob is picked with `jnp.where(targets[..., None] == jnp.arange(V), log_probs, 0)"
           ".sum(-1)` instead of `take_along_axis`. The gather's transpose is a scatter-add into a zero-filled "
           "float32 [B, T, V] buffer (a memset + scatter per step); the select fuses into the log-softmax's "
           "elementwise pass in both directions (a select, not a multiply by the one-hot, so a -inf log-prob "
           "does not give NaN). Every loss built on `token_logprobs` (CLM, SFT, `sequence_logprobs` for "
           "DPO/PPO) gets it. Behaviour differs only for ids outside [0, V): log-prob 0 instead of a wrapped "
           "index (-1) or NaN."),
    "P3": ("tanh-GELU with a hand-written derivative",
           "`llm_jax/model.py`: `gelu_tanh` (a `jax.custom_jvp`, rule `_gelu_tanh_jvp`), called by `block` "
           "for `mlp='gelu'` in place of `jax.nn.gelu(approximate=True)`",
           "Autodiff of the tanh form saves five float32 [B, T, F] intermediates per layer for the backward "
           "pass (counted with `jax.ad_checkpoint.print_saved_residuals` when the change was made); the JVP "
           "rule computes the derivative in the forward pass, and that one array is all the backward needs. "
           "A JVP rather than a VJP, so forward-mode differentiation keeps working."),
}

# Measured and not adopted: (variant or None, what, why it stays out of llm_jax)
NOT_ADOPTED = (
    ("unrolled", "`scan_layers=False` (layers unrolled)", "its compile time grows with depth (section 3)"),
    ("einsum_attention", "attention as plain einsums + softmax instead of `jax.nn.dot_product_attention`",
     "the library call is what gives the cuDNN flash-attention path on GPUs"),
    ("eigen_dots", "Eigen instead of YNNPACK dots (`xla_cpu_experimental_ynn_fusion_type=''`)",
     "an experimental XLA:CPU compiler option, a launcher setting rather than llm_jax code"),
    ("remat_dots", "`remat='dots'` (already a config option)",
     "it trades recomputation for memory: a per-run choice, not a default"),
    ("softmax_custom_jvp", "`jax_softmax_custom_jvp=True`", "a global jax flag, not llm_jax code"),
)
NOT_ADOPTED_EXPLORATORY = (
    "From exploratory runs, not repeated by this script: `xla_cpu_prefer_vector_width=512`, "
    "`xla_cpu_enable_fast_math`, `xla_cpu_use_xnnpack` and `xla_cpu_multi_thread_eigen=false` gave no gain "
    "beyond noise. Matmul precision is not a lever on CPU: `precision=DEFAULT/HIGH/HIGHEST` gave bit-identical "
    "float32 results at the same speed on XLA:CPU. `xla_cpu_use_thunk_runtime` is gone from jaxlib 0.10.2 "
    "(\"No such compile option\"); the thunk runtime is the only one. glibc with `MALLOC_MMAP_MAX_=0` or a high "
    "trim threshold (env or `mallopt` via ctypes) did not remove the page faults; tcmalloc (section 7) and "
    "jemalloc with `MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1` did: an environment setting for CPU runs "
    "(Debian libtcmalloc-minimal4), not an llm_jax change.")


def _peak(r) -> float:
    return r["matmul_peak"]["jax"]["best_flops_per_s"]


def _util(r, seconds: float) -> float:
    """Model FLOP/s of a step taking `seconds`, as a fraction of the matmul peak."""
    return r["model_flops"]["total_flops"] / seconds / _peak(r)


def _util_cpu(r, cpu_seconds: float) -> float:
    """Model FLOPs per CPU-second, as a fraction of the matmul's FLOPs per CPU-second."""
    return r["model_flops"]["total_flops"] / cpu_seconds / r["matmul_peak"]["jax"]["flops_per_cpu_s"]


def _fault_bytes(r, x) -> float:
    return x["minflt"]["median"] * r["machine"]["page_size"]


def torch_ratios(r: dict, key: str = "jax") -> list[tuple[str, float, float, float]]:
    """(where, `key`/torch_sdpa tokens/s ratio of medians, 1-min load average, torch CPU/wall) for every
    round-robin of the main process that timed `key` beside torch_sdpa."""
    out = []
    st = r["steps"]
    if "torch_sdpa" in st and key in st:
        out.append(("section 1", st["torch_sdpa"]["wall"]["median"] / st[key]["wall"]["median"],
                    r.get("loadavg_steps", (float("nan"),))[0],
                    st["torch_sdpa"]["cpu"]["median"] / st["torch_sdpa"]["wall"]["median"]))
    v = r.get("variants", {})
    vkey = {"jax": "baseline", "jax_before": BEFORE}.get(key)
    if "torch_sdpa" in v and vkey in v:
        out.append(("section 6 (variants)", v["torch_sdpa"]["wall"]["median"] / v[vkey]["wall"]["median"],
                    r.get("loadavg_variants", (float("nan"),))[0],
                    v["torch_sdpa"]["cpu"]["median"] / v["torch_sdpa"]["wall"]["median"]))
    return out


def _spread(x: dict) -> float:
    return (x["max"] - x["min"]) / x["median"] if x["median"] else float("nan")


def changes_md(r: dict) -> list[str]:
    """The 'Changes applied to llm_jax (P1-P3)' section."""
    L = []
    w = L.append
    st, comp = r["steps"], r["compiled"]
    w("## Changes applied to llm_jax (P1–P3)\n")
    w("Three rewrites of the same math (the loss row below checks that they change nothing), measured "
      "here against `jax_before`: "
      f"llm_jax with all three reverted by monkeypatching (`benchmarks/core.py`: variants "
      f"{', '.join(f'`{v}`' for v in CHANGES.values())}, which put back the code each change replaced). "
      "The variants table of section 6 reverts each change alone.\n")
    if "jax_before" in st:
        a, b = st["jax"], st["jax_before"]
        ta, tb = comp["jax"]["temp_bytes"], comp["jax_before"]["temp_bytes"]
        n = min(len(a["losses"]), len(b["losses"]))
        dl = float(np.abs(np.array(a["losses"][:n]) - np.array(b["losses"][:n])).max())
        w(f"Section 1 round-robin ({a['wall']['n']} timed rounds):\n")
        w("| | jax (P1–P3) | jax_before | jax / jax_before |")
        w("|---|---|---|---|")
        rows = [("step wall, median", a["wall"]["median"], b["wall"]["median"], "s"),
                ("step wall, best round", a["wall"]["min"], b["wall"]["min"], "s"),
                ("CPU s/step", a["cpu"]["median"], b["cpu"]["median"], ""),
                ("system CPU s/step", a["sys"]["median"], b["sys"]["median"], ""),
                ("tokens/s, median", a["tokens_per_s_median"], b["tokens_per_s_median"], "tok")]
        for label, x, y, unit in rows:
            fmt = (lambda v: f"{v:.0f}") if unit == "tok" else (lambda v: f"{v:.2f}" + (" s" if unit else ""))
            w(f"| {label} | {fmt(x)} | {fmt(y)} | {_ratio(x, y):.2f}× |")
        w(f"| page faults/step | {a['minflt']['median']:.0f} ({fmt_bytes(_fault_bytes(r, a))}) | "
          f"{b['minflt']['median']:.0f} ({fmt_bytes(_fault_bytes(r, b))}) | "
          f"{_ratio(a['minflt']['median'], b['minflt']['median']):.2f}× |")
        w(f"| compiled temp memory (`memory_analysis().temp_size_in_bytes`) | {fmt_bytes(ta)} | {fmt_bytes(tb)} | "
          f"{_ratio(ta, tb):.2f}× |")
        w(f"| % of matmul peak, median | {pct(_util(r, a['wall']['median']))} | "
          f"{pct(_util(r, b['wall']['median']))} | |")
        w(f"| loss over {n} steps from the same weights | {a['losses'][0]:.6f} → {a['losses'][n - 1]:.6f} | "
          f"{b['losses'][0]:.6f} → {b['losses'][n - 1]:.6f} | max \\|Δ\\| {dl:.2e}"
          f"{' (identical)' if dl == 0 else ''} |")
        w("")
        al = r.get("allocator", {}).get("steps", {})
        if "jax" in al and "jax_before" in al:
            w(f"Under tcmalloc (section 7, no per-step page faults): `jax` {al['jax']['wall']['median']:.2f} s vs "
              f"`jax_before` {al['jax_before']['wall']['median']:.2f} s median "
              f"(`jax` takes {_ratio(al['jax']['wall']['median'], al['jax_before']['wall']['median']):.2f}× the "
              f"time of `jax_before`; {al['jax']['wall']['n']} timed round(s)), CPU s "
              f"{al['jax']['cpu']['median']:.2f} vs {al['jax_before']['cpu']['median']:.2f}.\n")
    v = r.get("variants", {})
    base = v.get("baseline")
    for label, variant in CHANGES.items():
        title, where, what = CHANGE_TEXT[label]
        w(f"**{label}. {title}.** Where: {where}. {what}")
        x = v.get(variant)
        if base and x:
            w(f"Measured here (variants table, `{variant}` reverts only {label}): with {label} "
              f"{base['cpu']['median']:.2f} CPU s/step and {base['wall']['median']:.2f} s median wall, without "
              f"{x['cpu']['median']:.2f} CPU s and {x['wall']['median']:.2f} s (reverting it multiplies CPU "
              f"time by {_ratio(x['cpu']['median'], base['cpu']['median']):.2f} and wall time by "
              f"{_ratio(x['wall']['median'], base['wall']['median']):.2f}); temp "
              f"memory {fmt_bytes(base['temp_bytes'])} with, {fmt_bytes(x['temp_bytes'])} without; page faults "
              f"{base['minflt']['median']:.0f} vs {x['minflt']['median']:.0f} per step.")
        w("")
    w("### Not adopted\n")
    ct = r.get("compile_time", {})
    for variant, what, why in NOT_ADOPTED:
        x = v.get(variant)
        if base and x:
            meas = (f"this run: {_ratio(base['cpu']['median'], x['cpu']['median']):.2f}× CPU-seconds speed-up, "
                    f"{_ratio(base['wall']['median'], x['wall']['median']):.2f}× median wall, temp memory "
                    f"{fmt_bytes(x['temp_bytes'])} (baseline {fmt_bytes(base['temp_bytes'])})")
        else:
            meas = "not measured in this run (`--variants`)"
        if variant == "unrolled" and ct.get("L=2 scan=False") and ct.get("L=24 scan=False"):
            why += (f": 24 layers compile {ct['L=24 scan=False']['total_s'] / ct['L=2 scan=False']['total_s']:.1f}× "
                    f"as long as 2 layers")
        w(f"- {what}: {meas}. Not adopted: {why}.")
    w(f"- {NOT_ADOPTED_EXPLORATORY}")
    w("")
    return L


FAULT_WHY = ("XLA:CPU allocates the step's temp buffer anew on every run, and glibc serves an allocation that "
             "large with mmap and returns it with munmap (strace in an exploratory run: one mmap + munmap of the "
             "temp size per step), so the kernel hands out and zero-fills fresh pages for every step.")


def faults_matter(r: dict) -> bool:
    """Whether the `jax` step's page faults cover most of its temp buffer (the per-step
    re-allocation FAULT_WHY describes) and cost a visible share of its CPU time."""
    js = r["steps"]["jax"]
    temp = r["compiled"]["jax"]["temp_bytes"]
    return (_fault_bytes(r, js) >= 0.5 * temp and temp > 0
            and js["sys"]["median"] >= 0.05 * js["cpu"]["median"])


def limits_md(r: dict) -> list[str]:
    """'What limits the JAX step', from the profile, phase split and counters of this run."""
    L = []
    w = L.append
    st = r["steps"]
    js = st["jax"]
    prof = r.get("profile", {})
    if "categories" in prof:
        cats, tot = prof["categories"], prof["total_ms_per_step"]
        mm = sum(cats.get(k, 0) for k in MATMUL_CATS) / tot
        rest = ", ".join(f"{k} {pct(ms / tot)}" for k, ms in cats.items() if k not in MATMUL_CATS)
        w(f"- Matmuls (layers + LM head) are {pct(mm)} of the profiled op time of the `jax` step; the other "
          f"{pct(1 - mm)} is work the 6·N·tokens count does not credit: {rest}.")
    if "phases" in r:
        ph = r["phases"]
        f, fnh, fb, stp = (ph[k]["cpu"]["median"] for k in (
            "forward (loss)", "forward, no LM head/loss", "forward + backward", "full train step (+ AdamW)"))
        bwd = (fb - f) / f
        w(f"- CPU seconds: forward {f:.2f} (LM head + loss {f - fnh:.2f} of it), forward + backward {fb:.2f}, "
          f"full step {stp:.2f} (so AdamW + clipping ≈ {stp - fb:.2f}). The backward costs {bwd:.1f}× the "
          f"forward, against 2× for its FLOPs"
          + (": the excess is memory traffic, writing and re-reading the saved activations (with the page "
             "faults below)." if bwd > 2.3 else "."))
    temp = r["compiled"]["jax"]["temp_bytes"]
    pf = _fault_bytes(r, js)
    others = "; ".join(f"`{k}` {st[k]['minflt']['median']:.0f} faults ({fmt_bytes(_fault_bytes(r, st[k]))}), "
                       f"{st[k]['sys']['median']:.2f} s system time"
                       for k in ("jax_before", "torch_sdpa") if k in st)
    w(f"- Page faults: each `jax` step takes {js['minflt']['median']:.0f} minor page faults "
      f"({fmt_bytes(pf)}, {_ratio(pf, temp):.2f}× its compiled temp size of {fmt_bytes(temp)}) and "
      f"{js['sys']['median']:.2f} s of system CPU time, {pct(_ratio(js['sys']['median'], js['cpu']['median']))} "
      f"of its CPU seconds" + (f" (per step: {others})" if others else "") + ". "
      + (FAULT_WHY if faults_matter(r) else
         "That is well under the temp size: here the scratch memory is mostly reused between steps, and page "
         "faults are not what limits the step."))
    al = r.get("allocator", {}).get("steps", {})
    if "jax" in al:
        w(f"  Under tcmalloc (section 7), which keeps freed memory: {al['jax']['minflt']['median']:.0f} faults and "
          f"{al['jax']['sys']['median']:.2f} s system time per `jax` step, "
          f"{pct(_util(r, al['jax']['wall']['median']))} of peak (median).")
    if "torch_sdpa" in st:
        ts = st["torch_sdpa"]
        cores = r["machine"]["cores"]
        ser = (f" {prof['serial_loop_fusions']} of the step's {prof['loop_fusions']} XLA:CPU loop fusions carry "
               f"no outer-dimension partitioning, i.e. run on one thread ({prof['serial_loop_ms']:.0f} ms/step of "
               f"profiled op time)." if "serial_loop_fusions" in prof else "")
        w(f"- Parallelism: CPU seconds / wall seconds per step {js['cpu']['median'] / js['wall']['median']:.2f} for "
          f"`jax` and {ts['cpu']['median'] / ts['wall']['median']:.2f} for torch_sdpa ({cores} cores visible; "
          f"{cores} would be no idle core).{ser}")
    return L


def targets_md(r: dict) -> list[str]:
    """Met / missed for the two throughput targets, and what limits them when missed."""
    L = []
    w = L.append
    st = r["steps"]
    js = st["jax"]
    al = r.get("allocator", {}).get("steps", {})
    prof = r.get("profile", {})
    u, ub, uc = _util(r, js["wall"]["median"]), _util(r, js["wall"]["min"]), _util_cpu(r, js["cpu"]["median"])
    tgt = TARGET_PEAK_FRACTION
    fault_why = (f"the per-step page faults of the scratch (temp) buffer: {js['sys']['median']:.2f} of "
                 f"{js['cpu']['median']:.2f} CPU s per step are system time ({js['minflt']['median']:.0f} "
                 f"faults, {fmt_bytes(_fault_bytes(r, js))}; see 'What limits the JAX step')")
    if u >= tgt:
        w(f"- **≥ {pct(tgt)} of matmul peak: met** ({pct(u)} median, {pct(ub)} best round).")
    else:
        why = []
        ut = _util(r, al["jax"]["wall"]["median"]) if "jax" in al else None
        if faults_matter(r):
            why.append(fault_why)
            if ut is None:
                why.append("section 7 (tcmalloc, no page faults) did not run"
                           + (f": {r['alloc_error'][:200]}" if "alloc_error" in r else ""))
            else:
                why.append(f"without them (section 7, tcmalloc: {al['jax']['minflt']['median']:.0f} faults/step) "
                           f"the step reaches {pct(ut)} median, "
                           + ("which meets the target: on this machine the allocator's page faults account for "
                              "the miss" if ut >= tgt else f"still {100 * (tgt - ut):.1f} points short"))
        if "categories" in prof and (ut is None or ut < tgt):
            cats, tot = prof["categories"], prof["total_ms_per_step"]
            mm = sum(cats.get(k, 0) for k in MATMUL_CATS) / tot
            why.append(f"{pct(1 - mm)} of the profiled op time is memory-bound work that earns no credit in the "
                       f"count (loss over V {pct(cats.get(LOSS_CAT, 0) / tot)}), and the step's matmuls are "
                       f"skinny (K or N = {r['model']['d_model']}) beside the {r['matmul_peak']['n']}² square "
                       f"matmul that sets the peak")
        if uc > u + 0.02:
            why.append(f"per CPU-second the step reaches {pct(uc)}: part of the gap is idle cores, not slow kernels")
        w(f"- **≥ {pct(tgt)} of matmul peak: missed** ({pct(u)} median, {pct(ub)} best round). Limited by: "
          + "; ".join(why) + ".")
    tr_ = torch_ratios(r)
    ttgt = TARGET_TORCH_RATIO
    if tr_:
        ok = [x[1] >= ttgt for x in tr_]
        meas = "; ".join(f"{x[1]:.2f}× in {x[0]} (load {x[2]:.1f}, torch CPU/wall {x[3]:.2f})" for x in tr_)
        if all(ok):
            w(f"- **JAX ≥ {ttgt}× PyTorch eager tokens/s: met** ({meas}).")
        else:
            ts = st["torch_sdpa"]
            why = [f"`jax` spends {js['sys']['median']:.2f} s/step in system time on page faults of its scratch "
                   f"buffer ({fmt_bytes(_fault_bytes(r, js))}) against torch's {ts['sys']['median']:.2f} s "
                   f"({fmt_bytes(_fault_bytes(r, ts))})"] if faults_matter(r) else []
            if "jax" in al and "torch_sdpa" in al:
                rt = _ratio(al["torch_sdpa"]["wall"]["median"], al["jax"]["wall"]["median"])
                why.append(f"under tcmalloc (section 7) the ratio is {rt:.2f}×"
                           + (", which meets the target" if rt >= ttgt else ", still short"))
            if len(tr_) > 1 and max(x[1] for x in tr_) - min(x[1] for x in tr_) > 0.1:
                why.append("the two round-robins of this run disagree by more than 0.1, so the ratio also moves "
                           "with machine load")
            why.append(f"CPU/wall {js['cpu']['median'] / js['wall']['median']:.2f} for `jax` vs "
                       f"{ts['cpu']['median'] / ts['wall']['median']:.2f} for torch")
            w(f"- **JAX ≥ {ttgt}× PyTorch eager tokens/s: {'missed' if not any(ok) else 'met in some, missed in others'}"
              f"** ({meas}). Limited by: " + "; ".join(why) + ".")
    return L


# The stage benchmarks (sampling, DPO vs SFT, the PPO split, the pipeline's stage
# times) have their own script and report; RESULTS.md points there.
STAGES_POINTER = [
    "## Stage benchmarks\n",
    "Sampling with and without the KV cache, a DPO step against an SFT step on the same tokens, "
    "the PPO iteration's rollout / score / update split and the wall time of each stage of the "
    "main job: `python -m benchmarks.stages` writes them to [STAGE_RESULTS.md](STAGE_RESULTS.md).",
]


def write_report(path: str, r: dict, command: str):
    m, v = r["machine"], r["versions"]
    mf = r["model_flops"]
    flops = mf["total_flops"]
    peak = _peak(r)
    st = r["steps"]
    js = st["jax"]
    comp = r["compiled"]
    L = []
    w = L.append
    w("# llm_jax benchmark results\n")
    w(f"Generated by `benchmarks/core.py` on {r['date']}; the run took {r['runtime_s']:.0f} s.\n")
    w("```\n" + command + "\n```\n")
    if r["args"].get("quick"):
        w("**`--quick` run: 1-2 rounds per section, a check that the script runs; the numbers mean nothing.**\n")
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
          f"default intra-op pool (one thread per core); XLA_FLAGS for sections 1-3, 5, 6: "
          f"{'`' + m['xla_flags'] + '`' if m['xla_flags'] else 'none'}.")
    w("")
    w("## Model and method\n")
    c = model_config(**{k: r["model"][k] for k in MODEL_KW})  # as measured (--report-only may differ)
    w(f"GPT-2-style decoder: vocab {c.vocab_size}, d_model {c.d_model}, {c.num_layers} layers, "
      f"{c.num_heads} heads (head size {c.head_size}), d_ff {c.d_ff}, seq {r['model']['seq']}, "
      f"batch {r['model']['batch']} "
      f"({mf['tokens']} tokens/step), float32 params and compute, on the CPU. Chosen so that the PyTorch side is a "
      f"plain GPT-2 block: `mlp='gelu'` (tanh form), `norm='layernorm'`, `positions='learned'`, `use_bias=True`, "
      f"`tie_embeddings=True`; also `scan_layers=True`, `remat='none'`, dropout 0, `attention_impl='auto'` "
      f"(= XLA on CPU). {r['param_count']:,} parameters. Optimizer `train.make_optimizer(OptimizerConfig())`: "
      f"AdamW (b2 0.95, weight decay 0.1 on matrices/embeddings), global-norm clip 1.0, warmup + cosine; the torch "
      f"side uses `torch.optim.AdamW` (its default foreach implementation) with the same settings and "
      f"`clip_grad_norm_`.\n")
    w("Contenders: `jax` is llm_jax as it is, with the changes P1–P3 (see 'Changes applied to llm_jax'); "
      f"`jax_before` is the same step with the three reverted by monkeypatching (`{r['args'].get('before', '')}`); "
      "`torch_*` are in section 5.\n")
    w("Timing: contenders take turns, one step each per round (round-robin, the order rotated every round), after "
      "warm-up rounds; JAX steps end with `block_until_ready` on the new state and metrics, torch steps with "
      "`float(loss)`. 'median' is over the timed rounds, 'best' is the fastest round. CPU s = process user+system "
      "time per step (insensitive to other processes taking cores, but inflated by spin-waiting threads). One fixed "
      "random batch is used for every step. Every contender starts from the same initial parameters (the torch "
      "model is loaded with the JAX ones), so the loss curves must agree.\n")
    w(f"Model FLOPs per step = 6·N·tokens + 12·L·T·D·tokens = 6 × {mf['n_matmul_params']:,} × {mf['tokens']} "
      f"+ {mf['attention_flops'] / 1e9:.2f} G = **{flops / 1e9:.1f} GFLOP**. N counts every matmul weight: "
      f"q, k, v, o, up, down in each layer and the LM head (the tied embedding used as a [D, V] matmul); biases, "
      f"norms, positions and the embedding gather are not matmuls. The attention term is QK^T and AV, forward + "
      f"backward, with the causal mask **not** halving it (both frameworks compute all T×T scores). Softmaxes, "
      f"norms, GELU and the optimizer are not counted.\n")

    # 1
    w("## 1. Train-step throughput and model FLOP utilization\n")
    mp = r["matmul_peak"]
    w(f"Matmul peak, float32 {mp['n']}×{mp['n']} @ {mp['n']}×{mp['n']}, 2n³ FLOPs, best of {mp['reps']} "
      "interleaved runs:\n")
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
      "% of peak (median / best) | CPU s/step | % of peak per CPU-s | sys s/step | page faults/step | "
      "compiled temp |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, s_ in st.items():
        med, best = s_["wall"]["median"], s_["wall"]["min"]
        pf = s_["minflt"]["median"]
        temp = fmt_bytes(comp[k]["temp_bytes"]) if k in comp else "—"
        w(f"| {k} | {med:.2f} s | {best:.2f} s | {s_['tokens_per_s_median']:.0f} | {s_['tokens_per_s_best']:.0f} | "
          f"{flops / med / 1e9:.1f} | {pct(flops / med / peak)} / {pct(flops / best / peak)} | "
          f"{s_['cpu']['median']:.2f} | {pct(_util_cpu(r, s_['cpu']['median']))} | {s_['sys']['median']:.2f} | "
          f"{pf:.0f} ({fmt_bytes(pf * m['page_size'])}) | {temp} |")
    w("")
    w(f"1-minute load average when these rounds started: {r.get('loadavg_steps', (float('nan'),))[0]:.2f}.\n")
    for k, x in comp.items():
        w(f"- `{k}` compile: lower {x['lower_s']:.1f} s + compile {x['compile_s']:.1f} s; compiled memory "
          "(`memory_analysis()`): " + ", ".join(
              f"{mk.replace('_size_in_bytes', '')} {fmt_bytes(val)}" for mk, val in x["memory"].items()) + ".")
    w("")

    # 2
    w("## 2. Compiled HLO FLOPs vs the model count\n")
    hs, hu = comp["jax"]["cost"], r.get("hlo_unrolled", {})
    w("`lowered.compile().cost_analysis()['flops']` of the whole `jax` train step (forward, backward, AdamW):\n")
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
        w(f"- The excess is the work the 6·N·tokens rule leaves out; hand estimates: "
          + ", ".join(f"{k.replace('_', ' ')} ≈ {val / 1e9:.2f} G" for k, val in ex.items())
          + f" (sum ≈ {sum(ex.values()) / 1e9:.2f} G against the measured "
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
    torch_keys = [k for k in st if k.startswith("torch")]
    if torch_keys:
        w("`benchmarks/torch_reference.py`: `torch_sdpa` is the nanoGPT form (fused qkv Linear, "
          "`F.scaled_dot_product_attention(is_causal=True)`, a flash-attention kernel on CPU); "
          "`torch_manual_attention` is the textbook form (materialized T×T scores, masked_fill, softmax). "
          "Timed in the same round-robin as section 1.\n")
        w("| JAX contender | vs | tokens/s ratio (median) | (best rounds) | (CPU seconds) |")
        w("|---|---|---|---|---|")
        for jk in [k for k in st if k.startswith("jax")]:
            for tk in torch_keys:
                a, b = st[jk], st[tk]
                w(f"| {jk} | {tk} | **{_ratio(b['wall']['median'], a['wall']['median']):.2f}×** | "
                  f"{_ratio(b['wall']['min'], a['wall']['min']):.2f}× | "
                  f"{_ratio(b['cpu']['median'], a['cpu']['median']):.2f}× |")
        w("")
    else:
        w("PyTorch not run: " + r.get("torch_error", "--no-torch") + "\n")
    jl = np.array(js["losses"])
    for k in st:
        if k != "jax":
            tl = np.array(st[k]["losses"])
            n = min(len(jl), len(tl))
            w(f"- loss, jax vs {k} over {n} steps from the same initial parameters: step 1 {jl[0]:.6f} vs "
              f"{tl[0]:.6f}, max |Δ| {np.abs(jl[:n] - tl[:n]).max():.2e} (loss {jl[0]:.4f} → {jl[n - 1]:.4f}).")
    w("")

    # targets
    w("## Targets\n")
    w("| target | measured | status |")
    w("|---|---|---|")
    if hu:
        d = abs(hu["flops"] / flops - 1)
        w(f"| HLO FLOPs within 5% of the model count | {100 * (hu['flops'] / flops - 1):+.1f}% (unrolled; the scanned "
          f"step's {100 * (hs['flops'] / flops - 1):+.0f}% is the loop body counted once) | "
          f"{'met' if d <= 0.05 else 'missed'} |")
    al = r.get("allocator", {}).get("steps", {})
    u = _util(r, js["wall"]["median"])
    extra = "".join(f"; jax_before {pct(_util(r, st['jax_before']['wall']['median']))} median"
                    for _ in [0] if "jax_before" in st)
    if al:
        extra += "; under tcmalloc (section 7) " + ", ".join(
            f"{k} {pct(_util(r, al[k]['wall']['median']))}" for k in ("jax", "jax_before") if k in al)
    w(f"| ≥ {pct(TARGET_PEAK_FRACTION)} of measured matmul peak (`jax`, median) | {pct(u)} median, "
      f"{pct(_util(r, js['wall']['min']))} best round, {pct(_util_cpu(r, js['cpu']['median']))} per CPU-second"
      f"{extra} | {'met' if u >= TARGET_PEAK_FRACTION else 'missed'} |")
    if ct.get("L=2 scan=True") and ct.get("L=24 scan=True"):
        rr = ct["L=24 scan=True"]["total_s"] / ct["L=2 scan=True"]["total_s"]
        w(f"| 24-layer compile ≤ 1.5× the 2-layer | {rr:.2f}× (scan_layers=True) | {'met' if rr <= 1.5 else 'missed'} |")
    if "fsdp" in r:
        worst = max(r["fsdp"]["rows"], key=lambda row: row["ratio"])
        w(f"| FSDP per-device state ≤ 1.15× ideal | worst {worst['ratio']:.3f}× (n={worst['n']}) | "
          f"{'met' if worst['ratio'] <= 1.15 else 'missed'} |")
    tr_ = torch_ratios(r)
    if tr_:
        extra = "".join(f"; jax_before {x[1]:.2f}× in {x[0]}" for x in torch_ratios(r, "jax_before")[:1])
        if "torch_sdpa" in al:
            extra += "; under tcmalloc (section 7) " + ", ".join(
                f"{k} {_ratio(al['torch_sdpa']['wall']['median'], al[k]['wall']['median']):.2f}×"
                for k in ("jax", "jax_before") if k in al)
        ok = [x[1] >= TARGET_TORCH_RATIO for x in tr_]
        status = "met" if all(ok) else ("missed" if not any(ok) else "met in some measurements, missed in others")
        w(f"| `jax` ≥ {TARGET_TORCH_RATIO}× PyTorch eager (torch_sdpa) tokens/s | "
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
            w(f"Profile: `jax.profiler.trace` over {p['nsteps']} step(s) of `jax`, per-op wall time per "
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
        vb = r["variants"].get("baseline")
        noise = (f" The baseline's own timed rounds spread {pct(_spread(vb['wall']))} (wall) and "
                 f"{pct(_spread(vb['cpu']))} (CPU s), max − min over median: smaller differences are noise."
                 if vb and vb["wall"]["n"] > 1 else "")
        w("Alternatives: each row is a full train step compiled on its own and timed round-robin with the others, "
          "all from the same initial parameters (speed-up > 1 is faster than `baseline`, llm_jax as is; the P1–P3 "
          "rows revert one change each, so their speed-up below 1 is what that change buys; CPU s is the least "
          "load-sensitive column; 1-minute load average at the start: "
          f"{r.get('loadavg_variants', (float('nan'),))[0]:.2f}).{noise}\n")
        w("| variant | what | compile | temp memory | median | best | CPU s | sys s | speed-up median / best / CPU | "
          "loss after the run |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for k, x in r["variants"].items():
            desc = (" + ".join(VARIANTS[p_][0] for p_ in k.split("+")) if k in VARIANTS or "+" in k
                    else "PyTorch reference (section 5), timed in the same rounds")
            sp = ""
            if vb:
                sp = (f"{vb['wall']['median'] / x['wall']['median']:.2f} / {vb['wall']['min'] / x['wall']['min']:.2f}"
                      f" / {vb['cpu']['median'] / x['cpu']['median']:.2f}")
            comp_s = f"{x['compile_s']:.1f} s" if "compile_s" in x else "—"
            temp = fmt_bytes(x["temp_bytes"]) if x.get("temp_bytes") else "—"
            w(f"| {k} | {desc} | {comp_s} | {temp} | "
              f"{x['wall']['median']:.2f} s | {x['wall']['min']:.2f} s | {x['cpu']['median']:.2f} | "
              f"{x['sys']['median']:.2f} | {sp} | {x['losses'][-1]:.6f} |")
        w("")

    # 7
    if "allocator" in r or "alloc_error" in r:
        w("## 7. Without the page faults: the same contenders under tcmalloc\n")
        if "allocator" in r:
            a7 = r["allocator"]
            w(f"A subprocess with `LD_PRELOAD={a7['preload']} TCMALLOC_RELEASE_RATE=0` (an allocator that keeps "
              f"freed memory instead of returning it with munmap), {a7['rounds']} timed round(s) after 1 warm-up, "
              f"round-robin, load {a7['loadavg']:.2f} at the start. Everything else as in section 1.\n")
            w("| contender | step median | step best | tokens/s median | % of peak (median / best) | CPU s | "
              "sys s | page faults/step |")
            w("|---|---|---|---|---|---|---|---|")
            for k, x in al.items():
                med, best = x["wall"]["median"], x["wall"]["min"]
                w(f"| {k} | {med:.2f} s | {best:.2f} s | {mf['tokens'] / med:.0f} | "
                  f"{pct(flops / med / peak)} / {pct(flops / best / peak)} | {x['cpu']['median']:.2f} | "
                  f"{x['sys']['median']:.2f} | {x['minflt']['median']:.0f} |")
            if "torch_sdpa" in al:
                w("")
                for k in ("jax", "jax_before"):
                    if k in al:
                        w(f"- {k} / torch_sdpa tokens/s: **{_ratio(al['torch_sdpa']['wall']['median'], al[k]['wall']['median']):.2f}×**"
                          f" (median), {_ratio(al['torch_sdpa']['wall']['min'], al[k]['wall']['min']):.2f}× (best)")
            w("")
        else:
            w("Not run: " + r["alloc_error"] + "\n")

    L.extend(changes_md(r))
    w("## Findings\n")
    w("### What limits the JAX step\n")
    L.extend(limits_md(r))
    w("")
    w("### Targets: met or missed, and why\n")
    L.extend(targets_md(r))
    w("")
    L.extend(STAGES_POINTER)
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


# ---------------------------------------------------------------------------


def json_path(md_path: str) -> str:
    """benchmarks/RESULTS.md -> benchmarks/results.json; /tmp/x.md -> /tmp/x.json."""
    d, base = os.path.split(md_path)
    return os.path.join(d, os.path.splitext(base)[0].replace("RESULTS", "results") + ".json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fsdp-part", action="store_true", help="internal: the FSDP subprocess")
    ap.add_argument("--alloc-part", action="store_true", help="internal: the allocator subprocess")
    ap.add_argument("--quick", action="store_true",
                    help="every section with 1-2 rounds and small counts: checks that the script runs")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds of section 1 (default 6, quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds of section 1 (default 2, quick 1)")
    ap.add_argument("--matmul-reps", type=int, default=None, help="matmul peak runs (default 10, quick 2)")
    ap.add_argument("--variant-rounds", type=int, default=None,
                    help="timed rounds of section 6's phase split and variants (default 3, quick 1)")
    ap.add_argument("--alloc-rounds", type=int, default=None, help="timed rounds of section 7 (default 4, quick 1)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-investigate", action="store_true", help="skip sections 6 and 7")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"section 6 rows: comma-separated '+'-joined names of {sorted(VARIANTS)}")
    ap.add_argument("--before", default=BEFORE,
                    help="'+'-joined variants timed as `jax_before` beside `jax` in sections 1 and 7 ('' to skip)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                    help="the report (default benchmarks/RESULTS.md); the JSON goes beside it")
    ap.add_argument("--report-only", metavar="JSON",
                    help="measure nothing: write --out from a results JSON saved by an earlier run")
    args = ap.parse_args(argv)
    if args.report_only:
        with open(args.report_only) as f:
            saved = json.load(f)
        write_report(args.out, saved, saved["command"])
        print(f"wrote {args.out} from {args.report_only}", flush=True)
        return
    for name, full, quick in (("steps", 6, 2), ("warmup", 2, 1), ("matmul_reps", 10, 2),
                              ("variant_rounds", 3, 1), ("alloc_rounds", 4, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for spec in [args.before, *args.variants.split(",")]:
        parse_spec(spec)  # fail now, not after minutes of measuring
    if args.fsdp_part:
        fsdp_part()
        return
    if args.alloc_part:
        alloc_part(args)
        return

    command = (f"cd {os.getcwd()} && PYTHONPATH={os.environ.get('PYTHONPATH', '')} "
               f"{sys.executable} -m benchmarks.core {' '.join(argv if argv is not None else sys.argv[1:])}"
               ).strip().replace("  ", " ")
    t_start = time.perf_counter()
    results: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": {**machine_info(), "page_size": os.sysconf("SC_PAGE_SIZE")},
                     "versions": versions(), "args": vars(args),
                     "model": {**MODEL_KW, "batch": BATCH, "seq": SEQ}}
    cfg, jax_run = section_train_step(args, results)
    section_hlo_unrolled(results)
    section_compile_time(results, args.quick)
    section_fsdp(results)
    if not args.no_investigate:
        section_investigation(args, results, cfg, jax_run)
        del jax_run  # free the section-1 state before the subprocess
        section_allocator(args, results)
    results["loadavg_end"] = os.getloadavg()
    results["runtime_s"] = time.perf_counter() - t_start
    results["command"] = command
    # the numbers first: a report that fails to render can be redone with --report-only
    with open(json_path(args.out), "w") as f:
        json.dump(results, f, indent=1, default=str)
    write_report(args.out, results, command)
    print(f"wrote {args.out} and {json_path(args.out)} ({results['runtime_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
