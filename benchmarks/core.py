"""Core benchmark: llm_jax's pretraining step against a plain PyTorch eager GPT of the same shape.

    cd /work/main && PYTHONPATH=. python -m benchmarks.core            # the real run: 11 min at load average 5-11
    PYTHONPATH=. python -m benchmarks.core --tiny --out /tmp/core.md   # does it run? tiny model, ~1-2 min
    PYTHONPATH=. python -m benchmarks.core --report-only benchmarks/results.json --out /tmp/r.md

Writes benchmarks/results.json (every figure, the machine and the versions) and
benchmarks/RESULTS.md (a short table rendered from it), or `--out PATH.md` and
PATH.json beside it. What the figures mean and why they are measured this way
is written by hand in docs/benchmarks.md.

Each contender (llm_jax at a public config, or benchmarks/torch_reference.py)
runs alone in a fresh process of its own, one process per contender per round,
the order rotated every round; this parent process never imports torch. Two
frameworks in one process disturb each other (two thread pools, two
allocators), and that in-process round robin is what an earlier version of
this script published. Besides the step: the compiled HLO's FLOPs against the
model count, compile time against depth, and per-device state bytes under FSDP.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Re-exported: benchmarks.stages, .lora and .device import these from here.
from benchmarks.common import (fmt_bytes, machine_info, model_flops_per_step, rusage, stats,  # noqa: F401
                               time_round_robin, versions)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP_FLAG = "--xla_force_host_platform_device_count=8"
TOTAL_STEPS = 1000  # for the lr schedule only

# The benchmark model: GPT-2-shaped, so that the PyTorch side is a plain GPT-2 block.
MODEL_KW = dict(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, d_ff=2048, max_len=256,
                positions="learned", norm="layernorm", mlp="gelu", use_bias=True,
                tie_embeddings=True, dtype="float32", param_dtype="float32")
BATCH, SEQ = 8, 256
# --tiny: the same architecture small enough that the whole script runs in seconds.
TINY_KW = dict(MODEL_KW, vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_ff=256, max_len=32)
TINY_BATCH, TINY_SEQ = 2, 32


@dataclasses.dataclass(frozen=True)
class Contender:
    """One program timed in its own process. `model` overrides MODEL_KW through
    public ModelConfig fields only; `vs` names the contender its tokens/s is
    divided by in the ratio table."""
    framework: str  # "jax" | "torch"
    what: str
    model: dict = dataclasses.field(default_factory=dict)
    env: dict = dataclasses.field(default_factory=dict)
    manual_attention: bool = False  # torch only
    vs: str | None = None


CONTENDERS = {
    "jax": Contender("jax", "llm_jax as is (projection biases, like GPT-2)", vs="torch"),
    "torch": Contender("torch", "torch_reference.GPT: nanoGPT form, F.scaled_dot_product_attention"),
    "jax_nobias": Contender("jax", "llm_jax, use_bias=False", {"use_bias": False}, vs="torch_nobias"),
    "torch_nobias": Contender("torch", "torch_reference.GPT, bias=False", {"use_bias": False}),
    "jax_remat_dots": Contender("jax", "llm_jax, remat='dots'", {"remat": "dots"}, vs="jax"),
    "jax_unrolled": Contender("jax", "llm_jax, scan_layers=False", {"scan_layers": False}, vs="jax"),
    "jax_eigen_dots": Contender("jax", "llm_jax, Eigen dots instead of YNNPACK (an XLA:CPU flag)", {},
                                {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}, vs="jax"),
    "torch_manual_attention": Contender("torch", "torch_reference.GPT, materialized T x T attention",
                                        manual_attention=True, vs="torch"),
}
# The two llm_jax-vs-PyTorch pairs; the other variants are opt-in (--contenders) to keep the run short.
DEFAULT_CONTENDERS = ("jax", "torch", "jax_nobias", "torch_nobias")
TINY_CONTENDERS = ("jax", "torch", "torch_nobias")  # both torch_reference paths, one jax compile


def model_config(model_kw: dict):
    from llm_jax.config import ModelConfig
    return ModelConfig(**model_kw).validate()


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """The one fixed batch: uniform random tokens, all weights 1. Every contender
    steps on it, so every loss curve from the same initial weights must agree."""
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "targets": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "weights": np.ones((batch, seq), np.float32)}


def first(ca):
    """Compiled.cost_analysis() is a dict in new jax, a list of dicts in older ones."""
    if isinstance(ca, (list, tuple)):
        return ca[0] if ca else {}
    return ca or {}


# ---------------------------------------------------------------------------
# Worker processes: one contender, `warmup` untimed then `steps` timed steps.


def timed_steps(one_step, warmup: int, steps: int) -> dict:
    """Per-step wall, CPU, system CPU seconds and page faults of the timed steps;
    the loss of every step (warm-up included)."""
    out = {"wall": [], "cpu": [], "sys": [], "minflt": [], "losses": []}
    for i in range(warmup + steps):
        (c0, s0, f0), t0 = rusage(), time.perf_counter()
        loss = one_step()
        wall = time.perf_counter() - t0
        c1, s1, f1 = rusage()
        out["losses"].append(loss)
        if i >= warmup:
            for k, v in (("wall", wall), ("cpu", c1 - c0), ("sys", s1 - s0), ("minflt", f1 - f0)):
                out[k].append(v)
    return out


def jax_state(cfg, seed: int = 0):
    """(state, state shardings, optimizer, schedule, mesh) on one CPU device, built
    as the pretraining stage builds them; the params depend on `seed` only."""
    import jax
    from llm_jax import model, sharding, train
    from llm_jax.config import MeshConfig, OptimizerConfig
    tx, sched = train.make_optimizer(OptimizerConfig(), TOTAL_STEPS)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    state, shard = train.create_train_state(lambda r: model.init(cfg, r), tx, mesh, seed)
    return state, shard, tx, sched, mesh


def jit_step(cfg, tx, sched, mesh, shard):
    """The pretraining train step, jitted with the state shardings (donates the state)."""
    from llm_jax import train
    from llm_jax.stages import pretrain
    return train.jit_train_step(
        train.make_train_step(pretrain.clm_loss_fn(cfg), pretrain.weight_sum, tx, sched, microbatches=1),
        mesh, shard)


def jax_worker(job: dict) -> dict:
    import jax
    from llm_jax import sharding
    cfg = model_config(job["model"])
    state, shard, tx, sched, mesh = jax_state(cfg)
    step = jit_step(cfg, tx, sched, mesh, shard)
    batch = sharding.shard_batch(random_batch(job["batch"], job["seq"], cfg.vocab_size), mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    holder = {"state": state}

    def one_step():
        # frozen=None passed explicitly: a Compiled step takes exactly the args it was lowered with
        holder["state"], m = compiled(holder["state"], batch, None)
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"])
    out = timed_steps(one_step, job["warmup"], job["steps"])
    return {**out, "compile_s": compile_s, "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0)}


def torch_worker(job: dict) -> dict:
    import torch

    from benchmarks import torch_reference as tr
    kw = job["model"]
    with np.load(job["params"]) as z:
        params: dict = {}
        for key in z.files:  # "layers/attn/q" -> params["layers"]["attn"]["q"]
            *path, leaf = key.split("/")
            d = params
            for p in path:
                d = d.setdefault(p, {})
            d[leaf] = z[key]
    torch.manual_seed(0)
    tm = tr.GPT(kw["vocab_size"], kw["d_model"], kw["num_layers"], kw["num_heads"], kw["d_ff"],
                kw["max_len"], manual_attention=job["manual_attention"], bias=kw["use_bias"])
    tr.load_from_jax(tm, params)
    tstep = tr.make_train_step(tm, tr.make_optimizer(tm), TOTAL_STEPS)
    tb = tr.to_torch_batch(random_batch(job["batch"], job["seq"], kw["vocab_size"]))
    out = timed_steps(lambda: float(tstep(tb)), job["warmup"], job["steps"])
    return {**out, "threads": torch.get_num_threads()}


def worker_main(job: dict) -> None:
    """Runs in the child: one contender, its result as one stdout line `RESULT {json}`."""
    load = os.getloadavg()[0]
    if job["framework"] == "fsdp":
        res = fsdp_worker(job)
    else:
        res = (jax_worker if job["framework"] == "jax" else torch_worker)(job)
        res["jax_imported"], res["torch_imported"] = "jax" in sys.modules, "torch" in sys.modules
    print("RESULT " + json.dumps({**res, "loadavg": load}), flush=True)


def run_worker(job: dict, env: dict | None = None, timeout: int = 900) -> dict:
    """`python -m benchmarks.core --worker JOB` in a fresh process; its RESULT, or
    {"error": the tail of its output}."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), **(env or {})}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "benchmarks.core", "--worker", json.dumps(job)], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    return {**json.loads(lines[-1][len("RESULT "):]), "process_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------
# The parent's sections


def write_init_params(model_kw: dict, path: str) -> None:
    """The initial params the jax workers will create (same config, same seed, same
    public function), saved flat for the torch workers: every contender of one
    model config starts from the same weights."""
    import jax
    state = jax_state(model_config(model_kw))[0]
    flat = {"/".join(str(k.key) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
    np.savez(path, **flat)


def matmul_peak(n: int, reps: int) -> dict:
    """f32 n x n matmul FLOP/s, jitted jnp.dot (the peak that utilization is quoted
    against) and numpy, interleaved in this process (no torch here)."""
    import jax
    import jax.numpy as jnp
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(jnp.dot)
    f(ja, jb).block_until_ready()
    res = time_round_robin({"jax": lambda: f(ja, jb).block_until_ready() is None,
                            "numpy": lambda: (a @ b) is None}, reps, warmup=1)
    return {"n": n, "reps": reps, **{k: {"best_flops_per_s": 2 * n**3 / r["wall"]["min"],
                                         "median_flops_per_s": 2 * n**3 / r["wall"]["median"]}
                                     for k, r in res.items()}}


def time_contenders(names: list[str], args, shape: dict, tmp: str) -> dict:
    """Rounds of one fresh process per contender, order rotated every round."""
    jobs, params = {}, {}  # params: model config (as JSON) -> its initial params file
    for name in names:
        c = CONTENDERS[name]
        kw = {**shape["model"], **c.model}
        job = {"framework": c.framework, "model": kw, "batch": shape["batch"], "seq": shape["seq"],
               "warmup": args.warmup, "steps": args.steps, "manual_attention": c.manual_attention}
        if c.framework == "torch":
            key = json.dumps(kw, sort_keys=True)
            if key not in params:
                params[key] = os.path.join(tmp, f"params{len(params)}.npz")
                write_init_params(kw, params[key])
            job["params"] = params[key]
        jobs[name] = job
    runs: dict[str, list] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            res = run_worker(jobs[name], CONTENDERS[name].env)
            runs[name].append(res)
            msg = res.get("error", "").strip().splitlines()[-1:] or [
                f"median step {np.median(res['wall']):.3f} s, load {res['loadavg']:.2f}"]
            print(f"  round {r + 1}/{args.rounds} {name}: {msg[0]}", flush=True)
    return {name: summarize(CONTENDERS[name], jobs[name], runs[name], shape["tokens"]) for name in names}


def summarize(c: Contender, job: dict, runs: list[dict], tokens: int) -> dict:
    """Per contender: the median step of each round's process, then the median and
    spread (min, max, quartiles) of those over rounds."""
    ok = [r for r in runs if "error" not in r]
    out = {"framework": c.framework, "what": c.what, "model": job["model"], "env": c.env, "vs": c.vs,
           "runs": runs, "errors": [r["error"] for r in runs if "error" in r]}
    if not ok:
        return out
    step = [float(np.median(r["wall"])) for r in ok]
    out.update(step_s=stats(step), tokens_per_s=stats([tokens / s for s in step]),
               cpu_s=stats([float(np.median(r["cpu"])) for r in ok]),
               sys_s=stats([float(np.median(r["sys"])) for r in ok]),
               minflt=stats([float(np.median(r["minflt"])) for r in ok]),
               best_step_s=min(min(r["wall"]) for r in ok), losses=ok[0]["losses"],
               loadavg=stats([r["loadavg"] for r in ok]))
    if c.framework == "jax":
        out.update(compile_s=stats([r["compile_s"] for r in ok]), temp_bytes=ok[0]["temp_bytes"])
    else:
        out["threads"] = ok[0]["threads"]
    return out


def ratios(contenders: dict) -> list[dict]:
    """tokens/s of each contender over its `vs`: the ratio within each round (both
    processes ran minutes apart at most, under the same load), median and spread."""
    out = []
    for name, x in contenders.items():
        peer = contenders.get(x["vs"] or "")
        if not peer or "step_s" not in x or "step_s" not in peer:
            continue
        per_round = [float(np.median(b["wall"]) / np.median(a["wall"]))
                     for a, b in zip(x["runs"], peer["runs"]) if "error" not in a and "error" not in b]
        d0 = abs(x["losses"][0] - peer["losses"][0]) if x["model"] == peer["model"] else None
        out.append({"contender": name, "vs": x["vs"], "ratio": stats(per_round),
                    "ratio_of_medians": peer["step_s"]["median"] / x["step_s"]["median"],
                    "first_loss_abs_diff": d0})
    return out


def hlo_flops(shape: dict) -> dict:
    """cost_analysis() FLOPs of the unrolled step (a scanned step's loop body is
    counted once, so only the unrolled count is comparable with the model's)."""
    cfg = model_config({**shape["model"], "scan_layers": False})
    step, state, batch = abstract_step(cfg, shape)
    ca = first(step.lower(state, batch).compile().cost_analysis())
    model = model_flops_per_step(cfg, shape["batch"], shape["seq"])["total_flops"]
    hlo = float(ca.get("flops", float("nan")))
    return {"hlo_flops": hlo, "model_flops": model, "ratio": hlo / model}


def abstract_step(cfg, shape: dict):
    """The train step and ShapeDtypeStruct state/batch for `cfg`, no arrays made
    (compile-time measurements at any depth)."""
    import jax
    import jax.numpy as jnp
    from llm_jax import model, sharding, train
    from llm_jax.config import MeshConfig, OptimizerConfig
    tx, sched = train.make_optimizer(OptimizerConfig(), TOTAL_STEPS)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])

    def init(rng):  # what train.create_train_state builds
        params = model.init(cfg, rng)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), rng=rng)

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shard = sharding.tree_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
    bs = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((shape["batch"], shape["seq"]), jnp.float32 if k == "weights" else jnp.int32,
                                     sharding=bs) for k in ("inputs", "targets", "weights")}
    return jit_step(cfg, tx, sched, mesh, shard), state, batch


def compile_times(shape: dict, depths: tuple[int, int], unrolled: bool, reps: int) -> dict:
    """Trace + compile seconds of the full step at two depths, scanned (and
    unrolled), a fresh trace each time; a scanned depth measured `reps` times, the
    fastest kept (the unrolled 24 layers take long enough to be measured once)."""
    out = {}
    for scan in (True, False) if unrolled else (True,):
        for layers in depths:
            cfg = model_config({**shape["model"], "num_layers": layers, "scan_layers": scan})
            best = float("inf")
            for _ in range(reps if scan else 1):
                step, state, batch = abstract_step(cfg, shape)
                t0 = time.perf_counter()
                step.lower(state, batch).compile()
                best = min(best, time.perf_counter() - t0)
            out[f"L={layers} scan={scan}"] = {"layers": layers, "scan_layers": scan, "seconds": best}
    return out


def fsdp_worker(job: dict) -> dict:
    """Runs in a child with 8 host devices: per-device bytes of params + AdamW
    state under MeshConfig(fsdp=n), against the ideal total / n."""
    import jax
    from llm_jax import model, sharding, train
    from llm_jax.config import MeshConfig, OptimizerConfig
    cfg = model_config(job["model"])
    tx, _ = train.make_optimizer(OptimizerConfig(), TOTAL_STEPS)
    rows = []
    for n in job["devices"]:
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=n, tensor=1), jax.devices()[:n])
        state, _ = train.create_train_state(lambda r: model.init(cfg, r), tx, mesh, 0)
        tree = (state.params, state.opt_state)
        total = sum(x.nbytes for x in jax.tree.leaves(tree))
        per_device = sharding.per_device_bytes(tree)
        rows.append({"n": n, "total_bytes": total, "per_device_bytes": per_device, "ratio": per_device * n / total})
        del state, tree
    return {"rows": rows}


# ---------------------------------------------------------------------------
# The table


def write_table(path: str, r: dict) -> None:
    """RESULTS.md: the figures of `r` as tables, no prose (that is docs/benchmarks.md)."""
    m, v, s = r["machine"], r["versions"], r["shape"]
    load0 = m["loadavg_start"][0]
    flops = r["model_flops"]["total_flops"]
    peak = r["matmul_peak"]["jax"]["best_flops_per_s"]
    L = ["# llm_jax core benchmark\n",
         f"`{r['command']}` on {r['date']}, {r['runtime_s']:.0f} s. Generated from "
         f"[results.json]({os.path.splitext(os.path.basename(path))[0].replace('RESULTS', 'results')}.json); "
         "method and reading: [docs/benchmarks.md](../docs/benchmarks.md).\n"]
    if r["args"].get("tiny"):
        L.append("**`--tiny` run: a check that the script works; its numbers mean nothing.**\n")
    if load0 > r["args"]["load_limit"]:
        L.append(f"**Measured under load (load avg {load0:.2f} at start)**: other processes shared the "
                 "cores; rerun on a quiet machine before quoting.\n")
    L += [f"- Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB; "
          f"load average (1, 5, 15 min) {tuple(round(x, 2) for x in m['loadavg_start'])} at start, "
          f"{tuple(round(x, 2) for x in r['loadavg_end'])} at end",
          "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
          f"- Model: vocab {s['model']['vocab_size']}, d_model {s['model']['d_model']}, "
          f"{s['model']['num_layers']} layers, {s['model']['num_heads']} heads, d_ff {s['model']['d_ff']}, "
          f"batch {s['batch']} x seq {s['seq']} ({s['tokens']} tokens/step), float32; "
          f"{flops / 1e9:.1f} GFLOP per step (6·N·tokens + attention); jnp.dot peak "
          f"{peak / 1e9:.1f} GFLOP/s (best of {r['matmul_peak']['reps']}, {r['matmul_peak']['n']}²)",
          f"- Each contender: a fresh process per round, {r['args']['rounds']} rounds (order rotated), "
          f"{r['args']['warmup']} warm-up + {r['args']['steps']} timed steps per process; figures are the "
          "median over rounds of each process's median step, (min–max over rounds)\n",
          "## Train step\n",
          "| contender | what | step s | tokens/s | % of jnp.dot peak | CPU s/step | compile s | loss, step 1 |",
          "|---|---|---|---|---|---|---|---|"]
    for name, x in r["contenders"].items():
        if "step_s" not in x:
            L.append(f"| {name} | {x['what']} | failed: {x['errors'][0].strip().splitlines()[-1][:120]} |"
                     " | | | | |")
            continue
        st, tp = x["step_s"], x["tokens_per_s"]
        comp = f"{x['compile_s']['median']:.1f}" if "compile_s" in x else "—"
        L.append(f"| {name} | {x['what']} | {st['median']:.3f} ({st['min']:.3f}–{st['max']:.3f}) | "
                 f"{tp['median']:.0f} ({tp['min']:.0f}–{tp['max']:.0f}) | "
                 f"{100 * flops / st['median'] / peak:.1f}% | {x['cpu_s']['median']:.2f} | {comp} | "
                 f"{x['losses'][0]:.6f} |")
    L += ["", "## Ratios (tokens/s of the contender over its peer, within each round)\n",
          "| contender | vs | ratio, median (min–max over rounds) | ratio of medians | |Δ loss| at step 1 |",
          "|---|---|---|---|---|"]
    for q in r["ratios"]:
        d = "—" if q["first_loss_abs_diff"] is None else f"{q['first_loss_abs_diff']:.1e}"
        L.append(f"| {q['contender']} | {q['vs']} | **{q['ratio']['median']:.2f}×** ({q['ratio']['min']:.2f}–"
                 f"{q['ratio']['max']:.2f}) | {q['ratio_of_medians']:.2f}× | {d} |")
    h = r["hlo"]
    L += ["", "## Compiled step\n", "| measure | value |", "|---|---|",
          f"| HLO FLOPs of the unrolled step / model count | {h['hlo_flops'] / 1e9:.1f} G / "
          f"{h['model_flops'] / 1e9:.1f} G = {h['ratio']:.3f} |"]
    ct = r["compile_time"]
    for scan in (True, False):
        rows = [x for x in ct.values() if x["scan_layers"] == scan]
        if len(rows) == 2:
            L.append(f"| compile s, scan_layers={scan}: {rows[0]['layers']} → {rows[1]['layers']} layers | "
                     f"{rows[0]['seconds']:.1f} → {rows[1]['seconds']:.1f} "
                     f"({rows[1]['seconds'] / rows[0]['seconds']:.2f}×) |")
    fs = r["fsdp"]
    if "rows" in fs:
        L.append("| FSDP per-device params + AdamW state / ideal (n = " + ", ".join(str(x["n"]) for x in fs["rows"])
                 + ") | " + ", ".join(f"{x['ratio']:.3f}" for x in fs["rows"]) + " |")
    else:
        L.append(f"| FSDP | failed: {fs.get('error', '?').strip().splitlines()[-1][:120]} |")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def json_path(md_path: str) -> str:
    """benchmarks/RESULTS.md -> benchmarks/results.json; /tmp/x.md -> /tmp/x.json."""
    d, base = os.path.split(md_path)
    return os.path.join(d, os.path.splitext(base)[0].replace("RESULTS", "results") + ".json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", metavar="JOB", help="internal: run one contender (a JSON job) and print RESULT")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and few steps: checks that the script runs")
    ap.add_argument("--contenders", help=f"comma-separated names of {sorted(CONTENDERS)} "
                                         f"(default {','.join(DEFAULT_CONTENDERS)})")
    ap.add_argument("--rounds", type=int, help="processes per contender (default 4, tiny 2)")
    ap.add_argument("--warmup", type=int, help="untimed steps per process (default 2, tiny 1)")
    ap.add_argument("--steps", type=int, help="timed steps per process (default 4, tiny 2)")
    ap.add_argument("--load-limit", type=float, default=3.0,
                    help="a 1-minute load average above this at start marks the table 'measured under load'")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"),
                    help="the table (default benchmarks/RESULTS.md); the JSON goes beside it")
    ap.add_argument("--report-only", metavar="JSON", help="measure nothing: render --out from a saved JSON")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.report_only:
        with open(args.report_only) as f:
            write_table(args.out, json.load(f))
        return 0
    for name, full, tiny in (("rounds", 4, 2), ("warmup", 2, 1), ("steps", 4, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    names = (args.contenders.split(",") if args.contenders
             else list(TINY_CONTENDERS if args.tiny else DEFAULT_CONTENDERS))
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        ap.error(f"unknown contender(s) {unknown}; known: {sorted(CONTENDERS)}")
    kw, b, t = (TINY_KW, TINY_BATCH, TINY_SEQ) if args.tiny else (MODEL_KW, BATCH, SEQ)
    shape = {"model": kw, "batch": b, "seq": t, "tokens": b * t}
    command = "python -m benchmarks.core " + " ".join(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    r = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
         "machine": machine_info(), "versions": versions(), "args": vars(args), "command": command.strip(),
         "shape": shape, "model_flops": model_flops_per_step(model_config(kw), b, t)}
    print(f"load average at start {r['machine']['loadavg_start']}", flush=True)
    section_s: dict[str, float] = {}

    def section(key, fn, *a, **kw):
        t0 = time.perf_counter()
        r[key] = fn(*a, **kw)
        section_s[key] = time.perf_counter() - t0

    section("matmul_peak", matmul_peak, 256 if args.tiny else 2048, 3 if args.tiny else 10)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"train step: {names}, {args.rounds} rounds", flush=True)
        section("contenders", time_contenders, names, args, shape, tmp)
    r["ratios"] = ratios(r["contenders"])
    print("compiled step: HLO FLOPs, compile time, FSDP", flush=True)
    section("hlo", hlo_flops, shape)
    section("compile_time", compile_times, shape, (1, 2) if args.tiny else (2, 24), unrolled=not args.tiny,
            reps=1 if args.tiny else 2)
    flags = os.environ.get("XLA_FLAGS", "")
    fsdp_env = {"XLA_FLAGS": flags if FSDP_FLAG in flags else f"{flags} {FSDP_FLAG}".strip()}
    section("fsdp", run_worker, {"framework": "fsdp", "model": kw, "devices": [1, 2] if args.tiny else [1, 2, 4, 8]},
            fsdp_env)
    r["loadavg_end"] = os.getloadavg()
    r["section_s"] = {k: round(v, 1) for k, v in section_s.items()}
    r["runtime_s"] = time.perf_counter() - t_start
    r["torch_in_parent"] = "torch" in sys.modules  # must stay False: torch is timed in its own processes
    with open(json_path(args.out), "w") as f:  # the numbers first: --report-only can redo the table
        json.dump(r, f, indent=1, default=str)
    write_table(args.out, r)
    print(f"wrote {args.out} and {json_path(args.out)} ({r['runtime_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
