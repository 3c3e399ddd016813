"""Which TPU slice does each stage of Llama-3.2-1B, Llama-3-8B and Llama-2-7B need?

    cd /work/main && nohup python -m benchmarks.tpu_aot > /tmp/tpu_aot.log 2>&1 &   # hours on 2 cores
    python -m benchmarks.tpu_aot --minutes 50     # stop starting compiles after 50 min; rerun to continue
    python -m benchmarks.tpu_aot --report         # rewrite TPU_AOT.md from TPU_AOT.json, compile nothing

Compiles each stage's own jitted step (`llm_jax.aot.compile_stage`, libtpu on
this CPU host, nothing allocated) for v5p and v6e slices and writes
benchmarks/TPU_AOT.md and .json after every compile. A rerun reuses the
compiles already in the JSON, so an interrupted run continues where it stopped.

Settings, the same for every model:
  * sequence length 4096; global batch = 1 sequence per chip (rm, dpo: 1 pair,
    i.e. 2 rows; generate: 1 prompt of 2048 tokens + 2048 sampled; ppo: 1 rollout
    of 2048 + 2048, one epoch of one minibatch: the update's program, once; grpo:
    1 prompt per chip with its group of 8 completions of 2048 + 2048, one update
    accumulated over 8 microbatches of 1 row per chip). So the per-chip
    activations are the same on every slice and a bigger slice is only more data
    parallelism.
  * full fine-tuning: AdamW, bf16 compute (`model.dtype=bfloat16`), f32 master
    weights (`param_dtype=float32`), `remat=full`.
  * LoRA: rank 16 on q, k, v, o, up, gate, down, the frozen base stored in bf16
    (`param_dtype=bfloat16`: it is never updated, so f32 would only double it),
    adapters and their AdamW state f32, `remat=full`.
  * mesh: FSDP over every chip of one slice (data=1, fsdp=chips, tensor=1). FSDP
    shards params, gradients and optimizer state chips-ways, which is what these
    models need to fit; with 1 sequence per chip the all-gathered layer weights
    stay small next to it. Tensor parallelism is left out: none of these slices
    runs out of memory without it, and it would add activation all-reduces.
  * remat full because the question is the smallest slice; `remat=dots` trades
    memory back for ~1/3 fewer FLOPs where there is room.

Search: the planner (`llm_jax.plan`, checked against the compiler in
benchmarks/PLAN_VS_COMPILER.md) proposes the smallest slice of each generation
on which the sft step fits; one sft compile confirms it, stepping down while the
compiler says it fits and up while it does not. The other stages are then
compiled only at the chosen slice. Compiles run in priority order (8B full
fine-tuning on v5p first); what the time limit leaves out is listed as not
measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax

from llm_jax import aot, plan
from llm_jax.config import MeshConfig, preset
from llm_jax.lora import LoRAConfig
from llm_jax.stages.grpo import GRPOConfig
from llm_jax.stages.ppo import PPOConfig

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 1024 ** 3
SEQ = 4096
MODELS = {"llama3_8b": "Llama-3-8B", "llama7b": "Llama-2-7B", "llama": "Llama-3.2-1B"}
MODES = ("full", "lora")
# Slices per generation, smallest first (names libtpu accepts: aot.known_topologies()).
# v5p's smallest is 2x2x1 (v5p-8, 4 chips).
LADDER = {"v5p": ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4"),
          "v6e": ("v6e:1x1", "v6e:2x2", "v6e:2x4", "v6e:4x4")}
GROUP = 8  # grpo: completions per prompt, and the update's microbatches (1 row per chip each)
LORA = LoRAConfig(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "up", "gate", "down"))
STAGES = {"full": ("sft", "pretrain", "sft_kl", "rm", "dpo", "ppo", "generate", "grpo"),
          "lora": ("sft", "sft_kl", "rm", "dpo")}


def chips(topology: str) -> int:
    _, dims = aot.parse_topology(topology)
    n = 1
    for d in dims:
        n *= d
    return n


def model_config(name: str, mode: str):
    over = {"dtype": "bfloat16", "remat": "full",
            "param_dtype": "float32" if mode == "full" else "bfloat16"}
    if SEQ > preset(name).max_len:
        over["max_len"] = SEQ
    return preset(name, **over)


def settings(name: str, mode: str, topology: str, stage: str) -> aot.AOTSettings:
    n = chips(topology)
    return aot.AOTSettings(stage=stage, topology=topology, mesh=MeshConfig(1, n, 1), batch_size=n, seq_len=SEQ,
                           model=model_config(name, mode), label=name,
                           lora=LORA if mode == "lora" and stage in aot.LORA_STAGES else LoRAConfig(),
                           ppo=PPOConfig(epochs=1, minibatches=1),
                           grpo=GRPOConfig(group_size=GROUP, update_microbatches=GROUP))


def planned_bytes(name: str, mode: str, topology: str) -> int:
    """The planner's per-chip total of the sft step. LoRA: the frozen base and the
    activations (the adapters and their optimizer state are < 1% of it; no
    params-sized gradient or AdamW state)."""
    n = chips(topology)
    cfg = model_config(name, mode)
    p = plan.plan(cfg, plan.abstract_mesh(1, n, 1), n, SEQ)
    return p.total if mode == "full" else p.params + p.activations


def propose(name: str, mode: str, generation: str) -> str:
    """The smallest slice the planner says fits (the largest if none)."""
    hbm = aot.CHIPS[generation].usable_hbm_bytes
    for topology in LADDER[generation]:
        if planned_bytes(name, mode, topology) <= hbm:
            return topology
    return LADDER[generation][-1]


def key(name, mode, topology, stage) -> str:
    return f"{name}|{mode}|{topology}|{stage}"


class Runner:
    """Compiles on demand, caching every result (and every failure) in the JSON."""

    def __init__(self, path: str, deadline: float, compile_only_cached: bool):
        self.path, self.deadline, self.cached_only = path, deadline, compile_only_cached
        self.results, self.searches = {}, {}
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            self.results = saved.get("results", {})

    def get(self, name, mode, topology, stage):
        k = key(name, mode, topology, stage)
        if k in self.results:
            return self.results[k]
        if self.cached_only or time.time() > self.deadline:
            return None
        t0 = time.time()
        print(f"compiling {k} ...", flush=True)
        try:
            r = aot.compile_stage(settings(name, mode, topology, stage))
        except Exception as e:  # a compile that fails (e.g. XLA runs out of HBM while scheduling) is a result
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", "fits": False}
        r["wall_s"] = round(time.time() - t0, 1)
        self.results[k] = r
        print(f"  {'fits' if r.get('fits') else 'does NOT fit'}"
              + (f", {r['per_chip_bytes']['total'] / GiB:.2f} GiB" if r.get("per_chip_bytes")
                 else f" ({r.get('error') or r.get('compile_error')})")
              + f", {r['wall_s']} s", flush=True)
        self.save()
        return r

    def save(self):
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no TPU",
                "jax": jax.__version__, "libtpu": aot.libtpu_version()}
        with open(self.path, "w") as f:
            json.dump({"meta": meta, "results": self.results, "searches": self.searches}, f, indent=1)
        with open(self.path[:-5] + ".md", "w") as f:
            f.write(markdown(self, meta))


def search(run: Runner, name: str, mode: str, generation: str) -> str | None:
    """The smallest slice of the ladder on which the compiler says sft fits, starting at
    the planner's proposal; None when a needed compile was not run (time limit)."""
    ladder = LADDER[generation]
    start = propose(name, mode, generation)
    i = ladder.index(start)
    r = run.get(name, mode, ladder[i], "sft")
    trail = [] if r is None else [start]
    if r is None:
        chosen = None
    elif r["fits"]:
        while i > 0:  # step down while it still fits
            down = run.get(name, mode, ladder[i - 1], "sft")
            if down is None or not down["fits"]:
                trail += [] if down is None else [ladder[i - 1]]
                break
            trail.append(ladder[i - 1])
            i -= 1
        chosen = ladder[i] if down_known(run, name, mode, ladder, i) else None
    else:
        chosen = None
        while i + 1 < len(ladder):
            i += 1
            up = run.get(name, mode, ladder[i], "sft")
            if up is None:
                break
            trail.append(ladder[i])
            if up["fits"]:
                chosen = ladder[i]
                break
    run.searches[f"{name}|{mode}|{generation}"] = {"proposed": start, "compiled": trail, "chosen": chosen}
    return chosen


def down_known(run: Runner, name, mode, ladder, i) -> bool:
    """Smallest is only claimed when the next smaller slice was compiled and did not fit."""
    return i == 0 or key(name, mode, ladder[i - 1], "sft") in run.results


def gib(x) -> str:
    return f"{x / GiB:.2f}"


def row_md(name, mode, topology, stage, r) -> str:
    label = f"| {MODELS[name]} | {mode} | {stage} | {topology} ({chips(topology)}) |"
    if r is None:
        return label + " not measured (time limit) | | | | | | |"
    if "error" in r:
        return label + f" compile failed: {r['error']} | | | | | | {r['wall_s']:.0f} |"
    if r.get("compile_error"):  # the compiler refused the program for want of HBM
        need = r["compile_error"].split(":", 1)[-1].strip()[:160]
        return label + f" **no**: the compiler refuses it ({need}) | | | | | | {r['compile_s']:.0f} |"
    b, roof = r["per_chip_bytes"], r["roofline"]
    planned = "" if r.get("planned_total_bytes") is None else gib(r["planned_total_bytes"])
    flops = max(r["flops_per_chip"], r["traced_flops"] / r["chips"], r["model_flops"] / r["chips"])
    return (label + f" {'yes' if r['fits'] else '**no**'} | {gib(b['total'] + r['resident_bytes'])} "
            f"/ {r['hbm_bytes'] / GiB:g} | {planned} | {flops:.3g} "
            f"| {roof['step_s_lower_bound'] * 1e3:.0f} ms ({roof['bound_by']}) | {roof['mfu_upper_bound']:.0%} "
            f"| {r['compile_s']:.0f} |")


def markdown(run: Runner, meta: dict) -> str:
    lines = [
        "# Llama on TPU slices: what the compiler says fits, stage by stage",
        "",
        f"Written by `python -m benchmarks.tpu_aot` on {meta['date']} ({meta['machine']}; jax {meta['jax']}, "
        f"libtpu {meta['libtpu']}). Every number is XLA's own, for one chip, from compiling the stage's jitted "
        "step for the slice with the real TPU compiler on a CPU host (`llm_jax.aot`); no TPU ran anything.",
        "",
        f"Settings: sequence length {SEQ}; 1 sequence per chip (rm/dpo: 1 pair; generate: 2048-token prompt + "
        "2048 sampled; ppo: one update on a 2048 + 2048 rollout; grpo: one update on 1 prompt per chip x "
        f"{GROUP} completions of 2048 + 2048, accumulated over {GROUP} microbatches of 1 row per chip); FSDP over all chips of one slice; remat full. "
        "Full fine-tuning: AdamW, bf16 compute, f32 master weights. LoRA: rank 16 on q,k,v,o,up,gate,down, "
        "frozen base in bf16, adapters f32. GiB per chip = arguments + outputs + temp - alias (+ ppo's frozen "
        "reference and reward model, held beside the step); planned = `llm_jax.plan` (full-parameter "
        "training only). FLOPs per chip: the largest of XLA's count, the traced matmuls and the model's 6N "
        "per token (XLA counts a scanned layer once). Roofline: step >= max(FLOPs / peak, bytes / HBM "
        "bandwidth); MFU <= model FLOPs / (chips x peak x that bound).",
        "",
        "## Smallest slice (sft step, the compiler's verdict)",
        "",
        "| model | mode | generation | planner proposed | compiled | smallest that fits |",
        "|---|---|---|---|---|---|",
    ]
    for k, s in run.searches.items():
        name, mode, gen = k.split("|")
        verdict = s["chosen"] or "not established (compiles not run)"
        lines.append(f"| {MODELS[name]} | {mode} | {gen} | {s['proposed']} | {', '.join(s['compiled'])} "
                     f"| {verdict} |")
    lines += ["", "## Every compile", "",
              "| model | mode | stage | slice (chips) | fits | GiB per chip / HBM | planned GiB | FLOPs per chip "
              "| roofline step | MFU bound | compile s |",
              "|---|---|---|---|---|---|---|---:|---|---:|---:|"]
    for k in sorted(run.results, key=order):
        name, mode, topology, stage = k.split("|")
        lines.append(row_md(name, mode, topology, stage, run.results[k]))
    missing = [k for k in planned_keys(run) if k not in run.results]
    if missing:
        lines += ["", "## Not measured (the run's time limit; rerun the command to continue)", ""]
        lines += [f"- {MODELS[k.split('|')[0]]} {k.split('|')[1]} {k.split('|')[3]} on "
                  f"{k.split('|')[2]}" for k in missing]
    return "\n".join(lines) + "\n"


def order(k: str):
    name, mode, topology, stage = k.split("|")
    gen = topology.split(":")[0]
    return (list(MODELS).index(name), MODES.index(mode), gen, chips(topology), STAGES[mode].index(stage))


def planned_keys(run: Runner) -> list[str]:
    """The stage compiles at each chosen (or, not yet searched, proposed) slice."""
    keys = []
    for name in MODELS:
        for mode in MODES:
            for gen in LADDER:
                s = run.searches.get(f"{name}|{mode}|{gen}")
                topology = (s and s["chosen"]) or propose(name, mode, gen)
                keys += [key(name, mode, topology, st) for st in STAGES[mode]]
    return keys


def stages_at(run: Runner, job: tuple, topology: str | None) -> None:
    name, mode, _ = job
    for stage in STAGES[mode][1:]:
        if topology:
            run.get(name, mode, topology, stage)


def step_up(run: Runner, job: tuple, topology: str | None) -> None:
    name, mode, gen = job
    if not topology:
        return
    ladder = LADDER[gen]
    for stage in STAGES[mode][1:]:
        r = run.results.get(key(name, mode, topology, stage))
        i = ladder.index(topology)
        while r is not None and not r["fits"] and "error" not in r and i + 1 < len(ladder):
            i += 1
            r = run.get(name, mode, ladder[i], stage)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1e9, help="start no compile after this many minutes")
    ap.add_argument("--report", action="store_true", help="rewrite the markdown from the JSON only")
    ap.add_argument("--out", default=os.path.join(HERE, "TPU_AOT.json"))
    args = ap.parse_args(argv)
    # Before anything starts a backend (the planner's PRNGKey): the host has no TPU, and
    # libtpu must be told so before it loads (aot._quiet_libtpu's docstring).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    aot._quiet_libtpu(aot.CHIPS["v5p"], 4)
    run = Runner(args.out, time.time() + 60 * args.minutes, args.report)
    # Priority: 8B full fine-tuning, its smallest v5p and v6e slices, then its other stages
    # on v5p (the must-have); then every other search (smallest slices); then the other
    # stages at their slices.
    jobs = [(n, m, g) for n in MODELS for m in MODES for g in LADDER]
    chosen = {job: search(run, *job) for job in jobs[:2]}
    stages_at(run, jobs[0], chosen[jobs[0]])
    chosen.update({job: search(run, *job) for job in jobs[2:]})
    for job in jobs[1:]:
        stages_at(run, job, chosen[job])
    # Last: a stage that does not fit where sft does (ppo holds two trained models and two
    # frozen ones) gets the next slices up, until it fits.
    for job in jobs:
        step_up(run, job, chosen[job])
    run.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
