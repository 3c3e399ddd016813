"""Stage benchmarks on this machine's CPU: sampling, DPO vs SFT, the PPO iteration, run wall times.

    cd /work/main && PYTHONPATH=. python -m benchmarks.stages                  # the real run: ~7 min (432 s at load 0.7-2)
    PYTHONPATH=. python -m benchmarks.stages --quick --out /tmp/stages.md      # does it run? numbers mean nothing
    PYTHONPATH=. python -m benchmarks.stages --report-only benchmarks/stage_results.json --out /tmp/s.md
    PYTHONPATH=. python -m benchmarks.stages --report-only benchmarks/stage_results.json --run runs/demo
                                                     # section 4 from a newer pipeline run, the rest as measured

Writes benchmarks/STAGE_RESULTS.md and benchmarks/stage_results.json (or
`--out PATH.md` and PATH.json beside it). Two models, float32 on one CPU device:
`pipeline` is `experiments.pipeline.MODEL` (byte vocab 262, d_model 128, 4
layers, 4 heads, d_ff 512, max_len 256) and `large` the same architecture at
d_model 512, 8 heads, d_ff 2048, vocab 8192, max_len 512. Sections:

1. sampling tokens/s with the KV cache vs without (`generate.generate(...,
   use_cache=True/False)`; without a cache every step re-runs the whole
   [B, P + N] buffer): 8 prompts of 16 random byte tokens, 256 new tokens,
   greedy, no eos (every row generates all 256). The `large` model's direct
   no-cache call takes ~4 min here, so its no-cache time is by default 256 x
   one measured step of that loop (`--estimate-nocache ''` measures it
   directly); the `pipeline` model is measured both ways, checking the estimate;
2. one DPO train step (cached reference log-probs in the batch) against one
   SFT train step on exactly the same tokens (the chosen and rejected rows of
   the same `builtin:preferences` batch stacked as SFT rows), and a DPO step
   computing the reference log-probs inline (a reference forward in the step);
3. the PPO iteration (`ppo.make_ppo_step`, the pipeline's PPO config, a random
   reward model) split into its rollout / score / update seconds;
4. the stage wall times of a finished `experiments.pipeline` run (`--run DIR`).

Compile time is excluded everywhere: every program is compiled before its
timed calls (ahead of time with the same shapes, or by an untimed warm-up
call), and a listener on JAX's backend-compile event counts compilations
during the timed calls (the report shows that count; it must be 0).
Contenders of one comparison run interleaved (`core.time_round_robin`), so
load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import time

import numpy as np

from benchmarks import common, core

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RUN = "runs/demo"  # the README quick start's run directory
STAGES = ("pretrain", "sft", "rm", "ppo", "dpo")

# Targets (from the issue); met/missed is computed from the measurements.
TARGET_CACHE_SPEEDUP = 10.0  # KV-cache tokens/s / no-cache tokens/s at 256 new tokens, at least
TARGET_DPO_SFT_RATIO = 1.1  # DPO step (cached reference) / SFT step on the same tokens, at most

# Section 1 shapes (the issue's).
GEN_BATCH, GEN_PROMPT, GEN_NEW = 8, 16, 256

# The larger model: the pipeline architecture, wider, with a bigger vocabulary.
LARGE_OVERRIDES = dict(d_model=512, num_layers=4, num_heads=8, d_ff=2048, vocab_size=8192, max_len=512)


def model_configs(names: list[str]) -> dict:
    """{name: ModelConfig} for 'pipeline' and/or 'large'."""
    from experiments import pipeline
    known = {"pipeline": pipeline.MODEL, "large": dataclasses.replace(pipeline.MODEL, **LARGE_OVERRIDES)}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"--models: unknown {bad}; choose from {sorted(known)}")
    return {n: known[n].validate() for n in names}


def one_device_mesh():
    import jax
    from llm_jax import sharding
    from llm_jax.config import MeshConfig
    return sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def init_params(cfg, seed: int):
    """Random LM params of `cfg` (one jitted init: one compile, not one per random op)."""
    import jax
    from llm_jax import model
    return jax.jit(functools.partial(model.init, cfg))(jax.random.PRNGKey(seed))


def copy_tree(tree):
    """Fresh buffers (a train step donates its state's)."""
    import jax
    import jax.numpy as jnp
    return jax.tree.map(jnp.copy, tree)


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block: `with count_compiles() as c: ...; c[0]`."""
    import jax
    from jax._src import dispatch
    counter = [0]

    def listener(event, duration_secs, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            counter[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def timed_round_robin(fns: dict, rounds: int, warm: tuple = (), tokens: int | None = None) -> dict:
    """One untimed call of each fn named in `warm`, then `core.time_round_robin`
    (no further warm-up) with the compilations during the timed rounds counted."""
    for k in warm:
        fns[k]()
    with count_compiles() as c:
        res = core.time_round_robin(fns, rounds=rounds, warmup=0, tokens=tokens)
    for x in res.values():
        x["compiles_in_timed_calls"] = c[0]  # over all contenders of the comparison
    return res


# ---------------------------------------------------------------------------
# 1. Sampling with and without the KV cache


def gen_prompts(seed: int = 1) -> list[list[int]]:
    """GEN_BATCH prompts of GEN_PROMPT random byte tokens (valid in every vocabulary here)."""
    from llm_jax.data.tokenizer import ByteTokenizer
    rng = np.random.default_rng(seed)
    return rng.integers(ByteTokenizer.offset, ByteTokenizer.vocab_size, (GEN_BATCH, GEN_PROMPT)).tolist()


def compile_sampler(cfg, params, prompts, new_tokens: int, use_cache: bool) -> float:
    """Compiles `generate._sample` exactly as `generate.generate(cfg, params, prompts,
    max_new_tokens=new_tokens, use_cache=use_cache)` calls it (greedy, no eos), so
    that call finds it compiled. Returns the lower + compile seconds."""
    import jax
    import jax.numpy as jnp
    from llm_jax import generate
    tokens, mask = generate.left_pad(prompts, 0)
    t0 = time.perf_counter()
    generate._sample.lower(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0),
                           max_new_tokens=new_tokens, temperature=0.0, top_k=0, top_p=1.0, eos_id=-1,
                           use_cache=use_cache).compile()
    return time.perf_counter() - t0


def nocache_step_fn(cfg, params, prompts, new_tokens: int):
    """A zero-argument fn running ONE step of `generate`'s no-cache greedy loop
    (the body of its `lax.scan`: the model over the whole [B, P + N] buffer,
    the argmax at the last filled slot, the buffer update), blocked on. Every
    step of that loop does this same fixed-shape work, so N x its time is the
    no-cache call's time without running all N steps (minutes on a larger
    model). Returns (fn, compile seconds)."""
    import jax
    import jax.numpy as jnp
    from llm_jax import generate, model
    tokens, mask = generate.left_pad(prompts, 0)
    B, P = tokens.shape
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    buf = jnp.asarray(np.concatenate([tokens, np.zeros((B, new_tokens), np.int32)], axis=1))
    seg = jnp.asarray(np.concatenate([mask, np.zeros((B, new_tokens), np.int32)], axis=1))
    pos = jnp.asarray(np.concatenate([positions, positions[:, -1:] + 1 + np.arange(new_tokens)], axis=1))

    @jax.jit
    def step(params, buf, seg, pos, i):  # as generate._sample's step_nocache, temperature 0
        logits = model.apply(cfg, params, buf, positions=pos, segment_ids=seg)
        last = jax.lax.dynamic_index_in_dim(logits, P + i - 1, axis=1, keepdims=False)
        new = jnp.argmax(last, axis=-1).astype(jnp.int32)
        buf = jax.lax.dynamic_update_index_in_dim(buf, new, P + i, axis=1)
        seg = jax.lax.dynamic_update_index_in_dim(seg, jnp.ones((B,), jnp.int32), P + i, axis=1)
        return buf, seg

    i = jnp.int32(0)
    t0 = time.perf_counter()
    compiled = step.lower(params, buf, seg, pos, i).compile()
    compile_s = time.perf_counter() - t0

    def run():
        jax.block_until_ready(compiled(params, buf, seg, pos, i))
    return run, compile_s


def section_sampling(cfg, new_tokens: int, rounds: int, direct_nocache: bool) -> dict:
    """Greedy tokens/s of `generate.generate` with and without the KV cache.

    Contenders, round-robin: `kv_cache` and (when `direct_nocache`) `no_cache`,
    the `generate.generate` calls, both compiled ahead of time with the call's
    exact arguments, and `no_cache_step`, one step of the no-cache loop
    (`nocache_step_fn`), whose time x N estimates the no-cache call. The
    kv_cache and step programs get an untimed warm-up call; the no-cache call
    does not (one call is N such steps: its first-call costs are negligible).
    The speed-up uses the direct no-cache time when measured, else the
    estimate. Outputs are compared token by token: greedy decoding with and
    without the cache should agree up to float ties (reported, not asserted)."""
    from llm_jax import generate, model
    params = init_params(cfg, 0)
    prompts = gen_prompts()
    compile_s = {"kv_cache": compile_sampler(cfg, params, prompts, new_tokens, True)}
    fns = {"kv_cache": lambda: generate.generate(cfg, params, prompts, max_new_tokens=new_tokens,
                                                 use_cache=True)}
    if direct_nocache:
        compile_s["no_cache"] = compile_sampler(cfg, params, prompts, new_tokens, False)
        fns["no_cache"] = lambda: generate.generate(cfg, params, prompts, max_new_tokens=new_tokens,
                                                    use_cache=False)
    fns["no_cache_step"], compile_s["no_cache_step"] = nocache_step_fn(cfg, params, prompts, new_tokens)
    res = timed_round_robin(fns, rounds, warm=("kv_cache", "no_cache_step"), tokens=GEN_BATCH * new_tokens)
    for name, x in res.items():
        x["compile_s"] = compile_s[name]
    step = res.pop("no_cache_step")
    step.pop("losses")
    out = {"params": model.count_params(params), "new_tokens": new_tokens, "batch": GEN_BATCH,
           "prompt_len": GEN_PROMPT, "rounds": rounds, "direct_nocache": direct_nocache, "timings": res,
           "nocache_step": step,
           "nocache_estimate_median_s": new_tokens * step["wall"]["median"],
           "nocache_estimate_best_s": new_tokens * step["wall"]["min"]}
    kv = res["kv_cache"]["wall"]
    if direct_nocache:
        a, b = np.asarray(res["kv_cache"]["losses"][-1]), np.asarray(res["no_cache"]["losses"][-1])
        agree = a == b
        mism = np.nonzero(~agree.all(axis=0))[0]
        out.update(tokens_agree_fraction=float(agree.mean()),
                   first_disagreement_step=int(mism[0]) if len(mism) else None,
                   estimate_error=out["nocache_estimate_median_s"] / res["no_cache"]["wall"]["median"] - 1,
                   speedup_median=res["no_cache"]["wall"]["median"] / kv["median"],
                   speedup_best=res["no_cache"]["wall"]["min"] / kv["min"])
    else:
        out.update(speedup_median=out["nocache_estimate_median_s"] / kv["median"],
                   speedup_best=out["nocache_estimate_best_s"] / kv["min"])
    for x in res.values():
        x.pop("losses")  # the generated tokens, compared above
    return out


# ---------------------------------------------------------------------------
# 2. DPO step vs SFT step on the same tokens


def preference_batch(stage) -> dict:
    """The first `builtin:preferences` batch of the pipeline's DPO data config (host numpy)."""
    from llm_jax.data.loader import Loader
    from llm_jax.data.tokenizer import ByteTokenizer
    data = dataclasses.replace(stage.data, seq_len=stage.train.seq_len,
                               batch_size=stage.train.batch_size, kind="preferences")
    return next(Loader(data, ByteTokenizer(), shard_index=0, shard_count=1))


def sft_batch_from_pairs(batch: dict) -> dict:
    """The chosen_* and rejected_* rows stacked as one SFT batch of twice the rows:
    the same tokens, weights, positions and segments, so the same policy FLOPs."""
    from llm_jax.stages import dpo
    keys = ("inputs", "targets", "weights", "positions", "segment_ids")
    return {k: np.concatenate([batch[p + k] for p in dpo.PREFIXES]) for k in keys}


def dpo_inline_reference_loss_fn(cfg, max_segments: int, beta: float):
    """`dpo.dpo_loss_fn` with the reference log-probs computed inside the step from
    `frozen` (the reference params: one extra forward of both sides, no backward)
    instead of read from the batch."""
    import jax
    from llm_jax.stages import dpo
    cached = dpo.dpo_loss_fn(cfg, max_segments, beta=beta)

    def loss_fn(params, batch, rng, normalizer, frozen):
        refs = {k: jax.lax.stop_gradient(dpo.pair_logps(cfg, frozen, batch, p, max_segments))
                for k, p in zip(dpo.REF_KEYS, dpo.PREFIXES)}
        return cached(params, {**batch, **refs}, rng, normalizer)

    return loss_fn


def train_runner(step, state, batch, frozen=None):
    """A zero-argument fn: one train step (the state is donated and replaced), blocked on, -> loss."""
    import jax
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch, frozen)
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"])
    return run


def section_dpo(cfg, rounds: int) -> dict:
    """Times three train steps round-robin, all from the same initial params with
    the same optimizer (the pipeline's DPO one): `dpo_cached` (reference
    log-probs in the batch, any values), `sft` (the same sequences as SFT rows)
    and `dpo_inline_ref` (reference forward inside the step)."""
    from experiments import pipeline
    from llm_jax import model, sharding, train
    from llm_jax.stages import dpo, reward, sft
    stage = pipeline.Config().dpo
    S = stage.data.max_segments
    host = preference_batch(stage)
    rows = host["pair_mask"].shape[0]
    rng = np.random.default_rng(0)
    cached_host = {**host, **{k: rng.normal(-60.0, 10.0, (rows, S)).astype(np.float32) for k in dpo.REF_KEYS}}
    sft_host = sft_batch_from_pairs(host)
    mesh = one_device_mesh()
    tx, sched = train.make_optimizer(stage.optim, 1000)
    contenders = {
        "dpo_cached": (dpo.dpo_loss_fn(cfg, S, beta=stage.beta), reward.pair_count, cached_host, False),
        "sft": (sft.sft_loss_fn(cfg), sft.weight_sum, sft_host, False),
        "dpo_inline_ref": (dpo_inline_reference_loss_fn(cfg, S, stage.beta), reward.pair_count, host, True),
    }
    fns, compile_s, ref_params = {}, {}, None
    for name, (loss_fn, norm_fn, batch_host, inline) in contenders.items():
        state, shard = train.create_train_state(lambda r: model.init(cfg, r), tx, mesh, 0)
        if ref_params is None:  # the reference is the initial policy, as in a run (reference = SFT)
            ref_params = copy_tree(state.params)
        step = train.jit_train_step(train.make_train_step(loss_fn, norm_fn, tx, sched, microbatches=1),
                                    mesh, shard)
        batch = sharding.shard_batch(batch_host, mesh)
        frozen = ref_params if inline else None
        t0 = time.perf_counter()
        step.lower(state, batch, frozen).compile()
        compile_s[name] = time.perf_counter() - t0
        fns[name] = train_runner(step, state, batch, frozen)
    res = timed_round_robin(fns, rounds, warm=tuple(fns))
    for name in res:
        res[name]["compile_s"] = compile_s[name]
    med = {k: res[k]["wall"]["median"] for k in res}
    cpu = {k: res[k]["cpu"]["median"] for k in res}
    tokens = int(sft_host["inputs"].size)
    return {"params": model.count_params(ref_params), "pairs": int(host["pair_mask"].sum()), "rows_per_side": rows,
            "seq_len": int(host["chosen_inputs"].shape[1]), "tokens_per_step": tokens,
            "real_tokens": int((sft_host["segment_ids"] > 0).sum()),
            "scored_tokens": float(sft_host["weights"].sum()), "rounds": rounds, "timings": res,
            "ratio_dpo_sft_median": med["dpo_cached"] / med["sft"],
            "ratio_dpo_sft_best": res["dpo_cached"]["wall"]["min"] / res["sft"]["wall"]["min"],
            "ratio_dpo_sft_cpu": cpu["dpo_cached"] / cpu["sft"],
            "ratio_inline_cached_median": med["dpo_inline_ref"] / med["dpo_cached"],
            "ratio_inline_sft_median": med["dpo_inline_ref"] / med["sft"],
            "cache_saves_s": med["dpo_inline_ref"] - med["dpo_cached"]}


# ---------------------------------------------------------------------------
# 3. The PPO iteration's time split


def section_ppo(cfg, iterations: int) -> dict:
    """`iterations` PPO iterations after one warm-up iteration (which compiles the
    sample, reward, score and update programs), with the pipeline's PPO config
    and prompts; policy = reference = one random init, value and reward model =
    one random scalar model (as in the pipeline: the value model starts as the
    reward model)."""
    import jax
    from experiments import pipeline
    from llm_jax import model, sharding, train
    from llm_jax.data.tokenizer import ByteTokenizer
    from llm_jax.stages import ppo
    stage = pipeline.Config().ppo
    p = stage.ppo
    tok = ByteTokenizer()
    mesh = one_device_mesh()
    policy = init_params(cfg, 0)
    reward_params = {"model": init_params(cfg, 1), "head": model.init_scalar_head(cfg, jax.random.PRNGKey(2))}
    tx, schedule = train.make_optimizer(stage.optim, ppo.optimizer_steps(stage.train.steps, p))
    state, shardings = ppo.create_ppo_state({"policy": copy_tree(policy), "value": copy_tree(reward_params)},
                                            tx, mesh, stage.train.seed, p.kl_coef)
    loader = ppo.PromptLoader(pipeline.ppo_prompts(stage.prompts, stage.train.seed, "train"), tok,
                              p.rollout_batch, stage.train.seed)
    step = ppo.make_ppo_step(cfg, p, tx, reference_params=policy, reward_params=reward_params,
                             schedule=schedule, mesh=mesh, state_shardings=shardings,
                             eos_id=tok.eos_id, pad_id=tok.pad_id)
    t0 = time.perf_counter()
    state, warm = step(state, sharding.shard_batch(next(loader), mesh))
    warm_s = time.perf_counter() - t0
    phases = ("rollout_seconds", "score_seconds", "update_seconds")
    rows = []
    with count_compiles() as c:
        for _ in range(iterations):
            batch = sharding.shard_batch(next(loader), mesh)
            t0 = time.perf_counter()
            state, m = step(state, batch)
            wall = time.perf_counter() - t0
            rows.append({**{k: float(m[k]) for k in phases}, "wall": wall,
                         "response_length": float(m["response_length"]), "loss": float(m["loss"])})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in (*phases, "wall")}
    total = sum(mean[k] for k in phases)
    return {"params_policy": model.count_params(policy), "config": dataclasses.asdict(p),
            "prompt_len": loader.prompt_len, "iterations": iterations, "warmup_s": warm_s,
            "warmup_phases": {k: float(warm[k]) for k in phases}, "rows": rows, "mean": mean,
            "shares": {k: mean[k] / total for k in phases}, "compiles_in_timed_calls": c[0],
            "updates_per_iteration": p.epochs * p.minibatches}


# ---------------------------------------------------------------------------
# 4. Stage wall times of a finished pipeline run


def section_run(run_dir: str) -> dict:
    """Reads each stage's eval.json (train_seconds, steps; dpo reference_seconds),
    run.json (start time, devices, revision) and report.md's mtime (the end)."""
    out: dict = {"dir": run_dir}
    run_json = os.path.join(run_dir, "run.json")
    if not os.path.isdir(run_dir) or not os.path.exists(run_json):
        out["missing"] = f"{run_dir} has no run.json"
        return out
    with open(run_json) as f:
        run = json.load(f)
    out.update({k: run.get(k) for k in ("experiment", "started", "devices", "git_revision", "process_count")})
    out["stages"] = {}
    for name in STAGES:
        path = os.path.join(run_dir, name, "eval.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            ev = json.load(f)
        out["stages"][name] = {k: ev[k] for k in ("steps", "train_seconds", "reference_seconds") if k in ev}
    report = os.path.join(run_dir, "report.md")
    if os.path.exists(report) and run.get("started"):
        start = datetime.datetime.strptime(run["started"], "%Y-%m-%dT%H:%M:%S%z")
        end = datetime.datetime.fromtimestamp(os.path.getmtime(report), datetime.timezone.utc)
        out["report_mtime"] = end.isoformat(timespec="seconds")
        out["total_wall_s"] = (end - start).total_seconds()
    return out


# ---------------------------------------------------------------------------
# Report


def _load_note(load) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def write_report(path: str, r: dict) -> None:
    L: list[str] = []
    w = L.append
    m, v = r["machine"], r["versions"]
    w("# llm_jax stage benchmarks\n")
    w(f"Generated by `benchmarks/stages.py` on {r['date']}; the run took {r['runtime_s']:.0f} s"
      + (" (**--quick**: tiny counts, the numbers mean nothing)." if r["args"]["quick"] else "."))
    w(f"\n```\n{r['command']}\n```\n")
    w("## Machine and versions\n")
    w(f"- CPU: {m['cpu_model']}; {m['cores']} cores visible; ISA: {', '.join(m['isa'])}; "
      f"RAM {m['ram_bytes'] / 2**30:.1f} GiB; {m['platform']}")
    busy = max(m["loadavg_start"][0], r["loadavg_end"][0]) > 0.5 * (m["cores"] or 1)
    w(f"- load average (1, 5, 15 min) at start ({_load_note(m['loadavg_start'])}), at end "
      f"({_load_note(r['loadavg_end'])})"
      + (" -- other processes were using the CPUs: absolute times are inflated and noisy; the ratios come "
         "from interleaved runs." if busy else ""))
    w("- " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "torch"))
    w(f"- one CPU device (XLA_FLAGS: {m['xla_flags'] or 'none'}), float32 params and compute")
    w("")
    w("## Models and method\n")
    w("| name | vocab | d_model | layers | heads | d_ff | max_len | params |")
    w("|---|---|---|---|---|---|---|---|")
    for name, mc in r["models"].items():
        w(f"| {name} | {mc['vocab_size']} | {mc['d_model']} | {mc['num_layers']} | {mc['num_heads']} | "
          f"{mc['d_ff']} | {mc['max_len']} | {r['params'].get(name, 0):,} |")
    arch = next(iter(r["models"].values()))
    w(f"\nBoth: `mlp={arch['mlp']}`, `norm={arch['norm']}`, `positions={arch['positions']}`, "
      f"`tie_embeddings={arch['tie_embeddings']}`, `scan_layers={arch['scan_layers']}`, dropout "
      f"{arch['dropout']} (`pipeline` is `experiments.pipeline.MODEL`; `large` overrides "
      f"{', '.join(f'{k}={x}' for k, x in LARGE_OVERRIDES.items())}).\n")
    w("Every program is compiled before it is timed (ahead of time with the call's exact arguments, or by an "
      "untimed warm-up call); a listener on JAX's backend-compile event counts compilations during the timed "
      "calls ('compiles' below, must be 0). Contenders of one comparison take turns, one call each per round, "
      "the order rotated every round (`core.time_round_robin`); 'median' is over the timed rounds, 'best' the "
      "fastest. Each call blocks on its result. CPU s = this process's user + system seconds per call.\n")

    # 1
    if r.get("sampling"):
        _sampling_md(r, w)
    if r.get("dpo"):
        _dpo_md(r, w)
    if r.get("ppo"):
        _ppo_md(r, w)
    if "run" in r:
        _run_md(r, w)
    _targets_md(r, w)
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def _sampling_md(r: dict, w) -> None:
    w("## 1. Sampling: KV cache vs no cache\n")
    w(f"`generate.generate(cfg, params, prompts, max_new_tokens=N, use_cache=...)`, greedy, {GEN_BATCH} prompts "
      f"of {GEN_PROMPT} random byte tokens, no eos (every row generates all N tokens); tokens/s counts new "
      f"tokens ({GEN_BATCH} x N per call). Without the cache each of the N steps runs the model over the whole "
      f"fixed [{GEN_BATCH}, {GEN_PROMPT} + N] buffer. (With N = {GEN_NEW}, {GEN_PROMPT} + N = "
      f"{GEN_PROMPT + GEN_NEW} positions exceed the pipeline model's max_len 256: allowed with rotary positions, "
      "which `generate` checks only for learned ones; the weights are random, so it changes no timing.)\n")
    w("Contenders, round-robin: `kv_cache` and `no_cache` are the `generate.generate` calls (`no_cache` only "
      "where measured directly); `no_cache_step` is one step of the no-cache loop alone (the body of "
      "`generate._sample`'s scan, greedy: the model over the whole buffer, argmax, buffer update), and N x its "
      "time estimates the no-cache call: every step does the same fixed-shape work. The `large` model's direct "
      "no-cache call would take minutes here, so by default its speed-up uses that estimate; the `pipeline` "
      "model measures both, which checks the estimate. Untimed warm-up calls: kv_cache and no_cache_step; "
      "no_cache is compiled ahead of time only (one call is N steps, so first-call costs vanish in it).\n")
    w("| model | N | contender | compile | median | best | CPU s | new tokens/s median | new tokens/s best | "
      "timed calls | compiles |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in r.get("sampling", {}).items():
        N, st = s["new_tokens"], s["nocache_step"]
        for path_, x in s["timings"].items():
            w(f"| {name} | {N} | {path_} | {x['compile_s']:.1f} s | {x['wall']['median']:.2f} s | "
              f"{x['wall']['min']:.2f} s | {x['cpu']['median']:.2f} | {x['tokens_per_s_median']:.0f} | "
              f"{x['tokens_per_s_best']:.0f} | {x['wall']['n']} | {x['compiles_in_timed_calls']} |")
        tok = GEN_BATCH * N
        w(f"| {name} | {N} | no_cache_step x {N} (estimate) | {st['compile_s']:.1f} s | "
          f"{s['nocache_estimate_median_s']:.2f} s | {s['nocache_estimate_best_s']:.2f} s | "
          f"{N * st['cpu']['median']:.2f} | {tok / s['nocache_estimate_median_s']:.0f} | "
          f"{tok / s['nocache_estimate_best_s']:.0f} | {st['wall']['n']} x 1 step | {st['compiles_in_timed_calls']} |")
    w("")
    for name, s in r.get("sampling", {}).items():
        how = "direct" if s["direct_nocache"] else "from the no-cache step estimate"
        line = (f"- {name}: KV-cache speed-up **{s['speedup_median']:.1f}x** ({how}; median; best "
                f"{s['speedup_best']:.1f}x)")
        if s["direct_nocache"]:
            dis = s["first_disagreement_step"]
            line += (f"; the step estimate is {100 * s['estimate_error']:+.1f}% off the direct no-cache time; "
                     f"greedy tokens equal with and without the cache: {100 * s['tokens_agree_fraction']:.1f}%"
                     + ("" if dis is None else f" (first difference at new token {dis}: float ties of a random "
                                               "model make the two paths diverge from there)"))
        w(line + ".")
    w("")


def _dpo_md(r: dict, w) -> None:
    w("## 2. DPO step vs SFT step on the same tokens\n")
    w("One `builtin:preferences` batch of the pipeline's DPO config (`experiments.pipeline.Config().dpo`: batch "
      "and seq_len as there), its `chosen_*` and `rejected_*` rows. Steps from `train.jit_train_step("
      "train.make_train_step(...))`, same initial params, same optimizer (the DPO stage's):\n")
    w("- `dpo_cached`: `dpo.dpo_loss_fn` with `ref_chosen_logps` / `ref_rejected_logps` [rows, max_segments] in "
      "the batch (random values), normalizer `reward.pair_count` -- what the pipeline runs;")
    w("- `sft`: `sft.sft_loss_fn(cfg)` on the chosen and rejected rows stacked (twice the rows): the same "
      "tokens, so the same policy forward + backward FLOPs;")
    w("- `dpo_inline_ref`: the DPO loss with the reference log-probs computed inside the step (a reference "
      "forward of both sides, `frozen` = reference params).\n")
    w("| model | step | compile | median | best | CPU s | timed rounds | compiles | loss (last) |")
    w("|---|---|---|---|---|---|---|---|---|")
    for name, d in r.get("dpo", {}).items():
        for k, x in d["timings"].items():
            w(f"| {name} | {k} | {x['compile_s']:.1f} s | {x['wall']['median']:.3f} s | {x['wall']['min']:.3f} s | "
              f"{x['cpu']['median']:.3f} | {x['wall']['n']} | {x['compiles_in_timed_calls']} | "
              f"{x['losses'][-1]:.4f} |")
    w("")
    for name, d in r.get("dpo", {}).items():
        w(f"- {name}: {d['pairs']} pairs in {d['rows_per_side']} rows x {d['seq_len']} per side "
          f"({d['tokens_per_step']} token slots per step, {d['real_tokens']} real, {d['scored_tokens']:.0f} "
          f"scored); DPO / SFT **{d['ratio_dpo_sft_median']:.3f}x** (median; best {d['ratio_dpo_sft_best']:.3f}x, "
          f"CPU s {d['ratio_dpo_sft_cpu']:.3f}x); inline reference / cached {d['ratio_inline_cached_median']:.2f}x "
          f"(/ SFT {d['ratio_inline_sft_median']:.2f}x): the cache saves {1000 * d['cache_saves_s']:.0f} ms per step.")
    w("")


def _ppo_md(r: dict, w) -> None:
    w("## 3. The PPO iteration: rollout / score / update\n")
    p0 = next(iter(r["ppo"].values()))
    c = p0["config"]
    w(f"`ppo.make_ppo_step` with `experiments.pipeline.Config().ppo.ppo`: rollout_batch {c['rollout_batch']}, "
      f"max_new_tokens {c['max_new_tokens']}, temperature {c['temperature']}, epochs {c['epochs']} x "
      f"minibatches {c['minibatches']} = {p0['updates_per_iteration']} optimizer updates per iteration; "
      f"pipeline prompts (left-padded to {p0['prompt_len']} tokens). Policy = reference = a random init; "
      "value model = reward model = a random scalar model (`{model, head}`). The phase seconds are the "
      "step's own metrics (each phase blocks before the clock is read): rollout = KV-cache sampling; score "
      "= reward-model forward + policy, reference and value forwards, rewards, GAE; update = the "
      "policy + value optimizer updates. Means over the timed iterations after one warm-up iteration "
      "(which compiles).\n")
    w("| model | iterations | rollout | score | update | iteration wall | rollout % | score % | update % | "
      "mean response length | compiles |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, p in r["ppo"].items():
        mn, sh = p["mean"], p["shares"]
        w(f"| {name} | {p['iterations']} | {mn['rollout_seconds']:.2f} s | {mn['score_seconds']:.2f} s | "
          f"{mn['update_seconds']:.2f} s | {mn['wall']:.2f} s | {100 * sh['rollout_seconds']:.0f}% | "
          f"{100 * sh['score_seconds']:.0f}% | {100 * sh['update_seconds']:.0f}% | "
          f"{np.mean([x['response_length'] for x in p['rows']]):.1f} | {p['compiles_in_timed_calls']} |")
    w("")
    for name, p in r["ppo"].items():
        w(f"- {name}: warm-up iteration (with compilation) {p['warmup_s']:.1f} s.")
    w("")


def _run_md(r: dict, w) -> None:
    m = r["machine"]
    w("## 4. Stage wall times of the pipeline run\n")
    run = r.get("run", {})
    if "missing" in run or not run:
        w(f"Skipped: {run.get('missing', 'not requested')}.\n")
    else:
        w(f"`{run['dir']}`: `{run.get('experiment')}` started {run.get('started')} on {run.get('devices')} "
          f"({run.get('process_count')} process), git {run.get('git_revision')}. Seconds from each stage's "
          "`eval.json` (`train_seconds`: the training loop with its logging, checkpoints and compiles; not the "
          "stage's evaluations).\n")
        w("| stage | steps | train seconds | seconds / step | other |")
        w("|---|---|---|---|---|")
        for name, s in run["stages"].items():
            other = f"reference log-prob pre-pass {s['reference_seconds']:.1f} s" if "reference_seconds" in s else ""
            w(f"| {name} | {s.get('steps', '?')} | {s['train_seconds']:.1f} | "
              f"{s['train_seconds'] / s['steps']:.3f} | {other} |" if s.get("steps") else
              f"| {name} | ? | {s['train_seconds']:.1f} | ? | {other} |")
        missing = [s for s in STAGES if s not in run["stages"]]
        train_sum = sum(s["train_seconds"] + s.get("reference_seconds", 0.0) for s in run["stages"].values())
        w("")
        if missing:
            w(f"- no eval.json (stage not finished) for: {', '.join(missing)}.")
        if "total_wall_s" in run:
            w(f"- total wall time: **{run['total_wall_s']:.0f} s** ({run['total_wall_s'] / 60:.1f} min) from "
              f"run.json's `started` to report.md's modification time ({run['report_mtime']}); the stages' train "
              f"(+ reference pre-pass) seconds add up to {train_sum:.0f} s, the remaining "
              f"{run['total_wall_s'] - train_sum:.0f} s are process start, the evaluations (held-out loss, "
              "in-context and instruction accuracy, win rates with sampling) and the report.")
        else:
            w(f"- no report.md (or no start time): total wall time not known; stage seconds add up to {train_sum:.0f} s.")
        after = None
        if "report_mtime" in run:
            after = (datetime.datetime.fromisoformat(r["date"])
                     - datetime.datetime.fromisoformat(run["report_mtime"])).total_seconds()
        if after is not None and after < 0:
            # The run is newer than the measurements (its section re-read later): no load figure fits it.
            w("- machine and load: the run used the devices listed above; run.json records neither the host nor "
              f"the load, and the run ended {-after / 3600:.1f} h after this benchmark measured, so the load "
              "figures above say nothing about it.")
        else:
            gap = "" if after is None else f", {after / 60:.1f} min after the run wrote report.md"
            w("- machine and load: the run used the devices listed above; run.json records neither the host nor "
              f"the load. If it ran here (this {m['cores']}-core machine, shared with other sessions): when this "
              f"benchmark started{gap}, the 1/5/15-min load averages were "
              f"{_load_note(m['loadavg_start'])}: the 15-min figure overlaps the run's last part only when that "
              "gap is small.")
        w("")


def _targets_md(r: dict, w) -> None:
    if not r.get("sampling") and not r.get("dpo"):
        return
    w("## Targets\n")
    w("| target | measured | status |")
    w("|---|---|---|")
    for name, s in r.get("sampling", {}).items():
        ok = s["speedup_median"] >= TARGET_CACHE_SPEEDUP
        w(f"| KV cache >= {TARGET_CACHE_SPEEDUP:g}x no-cache tokens/s at {s['new_tokens']} new tokens ({name}) | "
          f"{s['speedup_median']:.1f}x median, {s['speedup_best']:.1f}x best"
          + ("" if s["direct_nocache"] else " (no-cache time estimated from one step x N)")
          + f" | {'met' if ok else 'missed'}"
          + ("" if s["new_tokens"] == GEN_NEW else f" (at {s['new_tokens']}, not {GEN_NEW}: --quick)") + " |")
    for name, d in r.get("dpo", {}).items():
        ok = d["ratio_dpo_sft_median"] <= TARGET_DPO_SFT_RATIO
        w(f"| DPO step (cached reference) <= {TARGET_DPO_SFT_RATIO:g}x SFT step, same tokens ({name}) | "
          f"{d['ratio_dpo_sft_median']:.3f}x median, {d['ratio_dpo_sft_best']:.3f}x best, "
          f"{d['ratio_dpo_sft_cpu']:.3f}x CPU s | {'met' if ok else 'missed'} |")
    w("")


# ---------------------------------------------------------------------------


def json_path(md_path: str) -> str:
    """benchmarks/STAGE_RESULTS.md -> benchmarks/stage_results.json; /tmp/x.md -> /tmp/x.json."""
    d, base = os.path.split(md_path)
    stem = os.path.splitext(base)[0]
    return os.path.join(d, (stem.lower() if stem == "STAGE_RESULTS" else stem) + ".json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny counts (16 new tokens, 1 round): checks that it runs")
    ap.add_argument("--models", default="pipeline,large", help="comma-separated: pipeline, large")
    ap.add_argument("--sections", default="sampling,dpo,ppo,run", help="comma-separated: sampling, dpo, ppo, run")
    ap.add_argument("--new-tokens", type=int, default=None, help=f"section 1 (default {GEN_NEW}, quick 16)")
    ap.add_argument("--gen-rounds", type=int, default=None, help="section 1 timed rounds (default 3, quick 2)")
    ap.add_argument("--estimate-nocache", default="large",
                    help="models whose no-cache sampling time is N x one measured step instead of a direct "
                         "generate call (default 'large': its direct call takes ~4 min here; '' for none)")
    ap.add_argument("--dpo-rounds", type=int, default=None, help="section 2 timed rounds (default 5, large 3)")
    ap.add_argument("--ppo-iterations", type=int, default=None, help="section 3 timed iterations (default 3, large 2)")
    ap.add_argument("--run", default=None,
                    help=f"finished pipeline run directory for section 4 (default {DEFAULT_RUN}); with "
                         "--report-only, section 4 is re-read from it and saved into that JSON")
    ap.add_argument("--out", default=os.path.join(HERE, "STAGE_RESULTS.md"),
                    help="the report (default benchmarks/STAGE_RESULTS.md); the JSON goes beside it")
    ap.add_argument("--report-only", metavar="JSON", help="measure nothing: re-render --out from a saved JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        with open(args.report_only) as f:
            results = json.load(f)
        if args.run is not None:  # a newer pipeline run: only its section changes
            results["run"] = section_run(args.run)
            with open(args.report_only, "w") as f:
                json.dump(results, f, indent=1, default=str)
        write_report(args.out, results)
        print(f"wrote {args.out} from {args.report_only}", flush=True)
        return
    q = args.quick
    new_tokens = args.new_tokens or (16 if q else GEN_NEW)
    sections = args.sections.split(",")
    bad = sorted(set(sections) - {"sampling", "dpo", "ppo", "run"})
    if bad:
        ap.error(f"--sections: unknown {bad}")
    models = model_configs(args.models.split(","))
    bad = sorted(set(filter(None, args.estimate_nocache.split(","))) - {"pipeline", "large"})
    if bad:
        ap.error(f"--estimate-nocache: unknown models {bad}")
    import jax
    from llm_jax import model

    def count(name, arg, full, large, quick):
        v = getattr(args, arg)
        return v if v is not None else (quick if q else (large if name == "large" else full))

    command = common.rerun_command("benchmarks.stages", argv)
    t_start = time.perf_counter()
    results: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": core.machine_info(), "versions": core.versions(), "args": vars(args),
                     "models": {k: dataclasses.asdict(c) for k, c in models.items()}}
    results["versions"].pop("torch", None)
    results["params"] = {k: model.count_params(jax.eval_shape(functools.partial(model.init, c), jax.random.PRNGKey(0)))
                         for k, c in models.items()}
    for name, cfg in models.items():
        if "sampling" in sections:
            direct = name not in args.estimate_nocache.split(",")
            print(f"[{time.perf_counter() - t_start:.0f}s] sampling {name}", flush=True)
            s = section_sampling(cfg, new_tokens, count(name, "gen_rounds", 3, 3, 2), direct)
            results.setdefault("sampling", {})[name] = s
        if "dpo" in sections:
            print(f"[{time.perf_counter() - t_start:.0f}s] dpo {name}", flush=True)
            d = section_dpo(cfg, count(name, "dpo_rounds", 5, 3, 1))
            results.setdefault("dpo", {})[name] = d
        if "ppo" in sections:
            print(f"[{time.perf_counter() - t_start:.0f}s] ppo {name}", flush=True)
            p = section_ppo(cfg, count(name, "ppo_iterations", 3, 2, 1))
            results.setdefault("ppo", {})[name] = p
    if "run" in sections:
        results["run"] = section_run(args.run or DEFAULT_RUN)
    results["loadavg_end"] = os.getloadavg()
    results["runtime_s"] = time.perf_counter() - t_start
    results["command"] = command
    with open(json_path(args.out), "w") as f:  # the numbers first: --report-only can redo the report
        json.dump(results, f, indent=1, default=str)
    write_report(args.out, results)
    print(f"wrote {args.out} and {json_path(args.out)} ({results['runtime_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
