"""The GRPO iteration on this machine's CPU: sampling / verifying / update seconds, and the sampler's tokens/s.

    cd /work/main && PYTHONPATH=. python -m benchmarks.grpo                     # 147 s on 2 cores at load 2.6-4.5
    PYTHONPATH=. python -m benchmarks.grpo --tiny --out /tmp/grpo.md            # does it run? numbers mean nothing
    PYTHONPATH=. python -m benchmarks.grpo --report-only benchmarks/GRPO_RESULTS.json --out /tmp/grpo.md
    PYTHONPATH=. python -m benchmarks.grpo --verifier my_rewards:exact_match    # your verifier's share

Writes benchmarks/GRPO_RESULTS.md and .json beside it (or `--out PATH.md` and
PATH.json). One GRPO step (`stages.grpo.make_grpo_step`, exactly as the stage
runs it) per iteration, with the GRPO config of `experiments.grpo` (the
experiment's default: algorithm grpo, 16 prompts x 8 completions, 48 new
tokens, temperature 1), on the built-in instruction prompts scored by the
built-in verifier (or `--verifier module:function`, which gets the built-in
records {"prompt", "answer", "task", "query"}), float32 on one CPU device
(JAX_PLATFORMS=cpu unless set), for the models of
benchmarks/stages.py: `pipeline` (`experiments.pipeline.MODEL`: d_model 128,
4 layers, 1.08M parameters) and `large` (d_model 512, 4 layers, vocab 8192:
21.0M parameters). The weights are random: the sampler runs all
max_new_tokens steps for every row whatever it samples (a fixed-length scan)
and the update's shapes are fixed, so the times do not depend on them.

The split is the step's own metrics, each phase blocking before its clock is
read: sample (the KV-cache sampler on prompts x G rows, and the rollout to the
host), verify (decoding the completions and the verifier on each, on the host),
update (the rows to the device, advantages, the optimizer step(s)). `other` =
the iteration's wall time (the step call) less the three: the host work between
them (rollout metrics). One untimed warm-up iteration compiles; a listener on
JAX's backend-compile event counts compilations in the timed iterations (must
be 0). Medians with the spread (min-max) over the timed iterations.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import time

import numpy as np

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("sample", "verify", "update")
MODELS = ("pipeline", "large")
RECORDS = 2000  # built-in training prompts the loader draws from (the experiment draws 20,000)
ITERATIONS = {"pipeline": 5, "large": 3}  # timed iterations per model
# What the report claims of the split: in every timed iteration sample + verify + update
# is the iteration's wall time to within the larger of these (the rest: host work between
# the phases, and on a shared machine a descheduling that falls between two clocks).
SPLIT_REL, SPLIT_ABS_S = 0.05, 0.02
# --tiny: a model and a config small enough that the whole script runs in seconds.
TINY_MODEL = dict(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=128)
TINY_GRPO = dict(prompts=2, group_size=2, max_new_tokens=4)
TINY_RECORDS, TINY_ITERATIONS = 50, 2


def grpo_config(tiny: bool):
    from experiments import grpo as experiment
    g = experiment.Config().grpo
    return dataclasses.replace(g, **TINY_GRPO) if tiny else g


def model_configs(names: list[str], tiny: bool) -> dict:
    from benchmarks import stages
    models = stages.model_configs(names)
    if tiny:
        models = {k: dataclasses.replace(v, **TINY_MODEL).validate() for k, v in models.items()}
    return models


def measure(cfg, g, records: list[dict], iterations: int, verifier: str) -> dict:
    """One warm-up and `iterations` timed GRPO steps from random weights."""
    from benchmarks import stages
    from llm_jax import model, sharding, train, verifiers
    from llm_jax.data.tokenizer import ByteTokenizer
    from llm_jax.stages import grpo
    tok = ByteTokenizer()
    grpo.check_prompts_fit(records, tok, g, cfg, "benchmark prompts")
    mesh = stages.one_device_mesh()
    params = stages.init_params(cfg, 0)
    tx, schedule = train.make_optimizer(g.optim, g.train.steps * g.optimizer_steps_per_step)
    state, shardings = train.state_from_params(params, tx, mesh, g.train.seed)
    loader = grpo.GroupPromptLoader(records, tok, g.prompts, g.train.seed, prompt_len=g.prompt_len)
    step = grpo.make_grpo_step(cfg, g, tx, tok, records=records, verifier=verifiers.load_verifier(verifier),
                               verifier_name=verifier,
                               reference_params=params if g.kl_coef > 0 else None,
                               refill=lambda: next(loader), schedule=schedule, mesh=mesh, state_shardings=shardings)

    def iteration(state):
        batch = sharding.shard_batch(next(loader), mesh)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        wall = time.perf_counter() - t0
        rounds = 1 + int(m.get("refill_rounds", 0))  # dynamic sampling samples more rounds
        row = {"wall": wall, **{p: float(m[f"{p}_seconds"]) for p in PHASES},
               "response_length": float(m["response_length"]), "loss": float(m["loss"]),
               "sampled_tokens": rounds * g.rows * g.max_new_tokens}
        row["other"] = wall - sum(row[p] for p in PHASES)
        row["sampler_tokens_per_s"] = row["sampled_tokens"] / row["sample"]
        return state, row

    t0 = time.perf_counter()
    state, warm = iteration(state)
    warmup_s = time.perf_counter() - t0
    rows = []
    with stages.count_compiles() as c:
        for _ in range(iterations):
            state, row = iteration(state)
            rows.append(row)
    keys = (*PHASES, "other", "wall", "sampler_tokens_per_s")
    return {"params": model.count_params(params), "rows_per_iteration": g.rows, "prompt_len": loader.prompt_len,
            "warmup_s": warmup_s, "warmup": warm, "iterations": rows,
            "stats": {k: common.stats([r[k] for r in rows]) for k in keys},
            "shares": {p: float(np.median([r[p] / r["wall"] for r in rows])) for p in (*PHASES, "other")},
            "largest_gap_s": max(abs(r["other"]) for r in rows),
            "largest_gap_share": max(abs(r["other"]) / r["wall"] for r in rows),
            "compiles_in_timed_calls": c[0]}


def split_holds(row: dict) -> bool:
    """The report's claim for one iteration: the three phases add up to its wall time."""
    return abs(row["wall"] - sum(row[p] for p in PHASES)) <= max(SPLIT_REL * row["wall"], SPLIT_ABS_S)


# ---------------------------------------------------------------------------
# The report


def _spread(s: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"


def _load(x) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in x) + ")"


def report(r: dict) -> str:
    m, v, g = r["machine"], r["versions"], r["grpo"]
    lines: list[str] = []
    w = lines.append
    w("# GRPO iteration benchmark\n")
    w(f"Generated by `benchmarks/grpo.py` on {r['date']}; the run took {r['runtime_s']:.0f} s. To measure again:\n")
    w("```")
    w(r["command"])
    w("```\n")
    w(f"**Provisional figures**: measured on a shared {m['cores']}-core machine; the load average (1, 5, 15 min) "
      f"was {_load(m['loadavg_start'])} at the start and {_load(r['loadavg_end'])} at the end, so other "
      "processes took CPU time during the run: absolute seconds are inflated and noisy. Rerun the command "
      "above on a quiet machine for the figures to quote.\n")
    w("## Machine and versions\n")
    w(f"- CPU: {m['cpu_model']}; {m['cores']} cores visible; ISA: {', '.join(m['isa']) or 'n/a'}; "
      f"RAM {m['ram_bytes'] / 2**30:.1f} GiB; {m['platform']}")
    w(f"- load average (1, 5, 15 min) at start {_load(m['loadavg_start'])}, at end {_load(r['loadavg_end'])}")
    w(f"- python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']}, numpy {v['numpy']}")
    w(f"- one CPU device (XLA_FLAGS: {m['xla_flags'] or 'none'}), float32 params and compute\n")
    w("## Setup\n")
    w(f"`stages.grpo.make_grpo_step` with {'the --tiny config' if r['tiny'] else '`experiments.grpo.Config().grpo`'}: "
      f"algorithm {g['algorithm']}, {g['prompts']} prompts x {g['group_size']} completions = "
      f"{g['prompts'] * g['group_size']} rows, {g['max_new_tokens']} new tokens, temperature {g['temperature']}, "
      f"{g['updates']} update(s) x {g['minibatches']} minibatch(es), dynamic sampling "
      f"{'on' if r['dynamic_sampling'] else 'off'}; {r['records']} built-in instruction prompts "
      "(`verifiers.builtin_records`, train split) scored by "
      + ("the built-in verifier" if r["verifier"] == "builtin" else f"the verifier `{r['verifier']}`")
      + "; random initial weights.\n")
    w("| model | vocab | d_model | layers | heads | d_ff | params | prompt tokens |")
    w("|---|---|---|---|---|---|---|---|")
    for name, x in r["models"].items():
        c = r["model_configs"][name]
        w(f"| {name} | {c['vocab_size']} | {c['d_model']} | {c['num_layers']} | {c['num_heads']} | {c['d_ff']} | "
          f"{x['params']:,} | {x['prompt_len']} |")
    w("")
    w("## The iteration: sample / verify / update\n")
    w("Seconds per iteration, median [min-max] over the timed iterations; the phases are the step's own "
      "metrics (module docstring), `other` the step call's wall time less the three.\n")
    w("| model | iterations | sample | verify | update | other | iteration | sample % | verify % | update % "
      "| compiles |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, x in r["models"].items():
        s, sh = x["stats"], x["shares"]
        w(f"| {name} | {s['wall']['n']} | {_spread(s['sample'])} | {_spread(s['verify'], '{:.4f}')} | "
          f"{_spread(s['update'])} | {_spread(s['other'], '{:.4f}')} | {_spread(s['wall'])} | "
          f"{100 * sh['sample']:.1f}% | {100 * sh['verify']:.2f}% | {100 * sh['update']:.1f}% | "
          f"{x['compiles_in_timed_calls']} |")
    w("")
    held = sum(split_holds(it) for x in r["models"].values() for it in x["iterations"])
    total = sum(len(x["iterations"]) for x in r["models"].values())
    w(f"- The split adds up: sample + verify + update is the iteration's wall time to within the larger of "
      f"{100 * SPLIT_REL:g}% and {1000 * SPLIT_ABS_S:g} ms in {held} of the {total} timed iterations. Largest "
      "gap measured: " + "; ".join(f"{name} {1000 * x['largest_gap_s']:.1f} ms ({100 * x['largest_gap_share']:.2f}%)"
                                   for name, x in r["models"].items()) + ".")
    for name, x in r["models"].items():
        w(f"- {name}: warm-up iteration (compiles the sampler and the update) {x['warmup_s']:.1f} s.")
    w("")
    w("## The sampler\n")
    w("Tokens per second of the sample phase: rows x new tokens per round (x rounds with dynamic sampling) / "
      "sample seconds. Every row runs all new-token steps (a fixed-length scan): the count is of token slots, "
      "the real tokens before an eos are fewer (mean response length below).\n")
    w("| model | rows x new tokens | sampler tokens/s | mean response length |")
    w("|---|---|---|---|")
    for name, x in r["models"].items():
        w(f"| {name} | {x['rows_per_iteration']} x {g['max_new_tokens']} | "
          f"{_spread(x['stats']['sampler_tokens_per_s'], '{:.0f}')} | "
          f"{np.mean([it['response_length'] for it in x['iterations']]):.1f} |")
    w("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model and config: checks that it runs")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: pipeline, large")
    ap.add_argument("--iterations", type=int, default=None,
                    help=f"timed iterations per model (default {ITERATIONS}; --tiny {TINY_ITERATIONS})")
    ap.add_argument("--out", default=os.path.join(HERE, "GRPO_RESULTS.md"),
                    help="the report (default benchmarks/GRPO_RESULTS.md); the JSON goes beside it")
    ap.add_argument("--verifier", default="builtin", help="builtin, or module:function (llm_jax.verifiers)")
    ap.add_argument("--report-only", metavar="JSON", help="measure nothing: re-render --out from a saved JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        common.rerender(args.report_only, args.out, report)
        return 0
    names = args.models.split(",")
    bad = sorted(set(names) - set(MODELS))
    if bad:
        ap.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    command = common.rerun_command("benchmarks.grpo", argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this CPU, before jax loads (libtpu would probe for a TPU)
    machine = common.machine_info()  # the load average before any work
    t_start = time.perf_counter()
    from llm_jax import verifiers
    verifiers.load_verifier(args.verifier)  # a bad name fails before anything is measured
    g = grpo_config(args.tiny)
    models = model_configs(names, args.tiny)
    n_records = TINY_RECORDS if args.tiny else RECORDS
    records = verifiers.builtin_records(n_records, g.train.seed, "train")
    versions = common.versions()
    versions.pop("torch", None)
    results: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": machine, "versions": versions, "args": vars(args), "tiny": args.tiny,
                     "grpo": dataclasses.asdict(g), "dynamic_sampling": g.resolved().dynamic_sampling,
                     "records": n_records, "verifier": args.verifier,
                     "model_configs": {k: dataclasses.asdict(c) for k, c in models.items()},
                     "models": {}}
    for name, cfg in models.items():
        n = args.iterations or (TINY_ITERATIONS if args.tiny else ITERATIONS[name])
        print(f"[{time.perf_counter() - t_start:.0f}s] {name}: warm-up + {n} iterations", flush=True)
        results["models"][name] = measure(cfg, g, records, n, args.verifier)
    results["loadavg_end"] = os.getloadavg()
    results["runtime_s"] = time.perf_counter() - t_start
    results["command"] = command
    common.save_report(args.out, results, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
