"""Demonstrations a task needs: SFT from the main job's SFT model, against the prompts its GRPO stage sees.

    cd /work/main && PYTHONPATH=. python -m benchmarks.sft_demos --sft runs/demo/sft   # about 2 min, 2 cores
    PYTHONPATH=. python -m benchmarks.sft_demos --sft runs/demo/sft --steps 2 --eval-per-task 2 \\
        --out /tmp/demos.md                                         # does it run? numbers mean nothing
    PYTHONPATH=. python -m benchmarks.sft_demos --report-only benchmarks/SFT_DEMOS.json --out /tmp/demos.md

Writes benchmarks/SFT_DEMOS.md and .json beside it (or `--out PATH.md` and PATH.json).
`--sft` is the SFT stage directory of a finished main job (`python -m
experiments.pipeline --workdir runs/demo`); it is only read.

For each step count N of `--steps` (default 40, 60, 100), supervised fine-tuning
continues from that SFT model for N steps on one task's training-split
instructions with their reference answers (`builtin:sft/TASK`, `--task`, default
add; the main job's SFT stage config with lr 1e-3 after 10 warmup steps, cosine to
1e-4, 16 packed rows of 96 tokens a step), each N from the same start in its own
stage directory. Every model, the start included, is judged on held-out
instructions of all seven tasks, greedy (`evals.instruction_accuracy`, 64 per
task, seed 1234: the main job's GRPO row). A row gives the demonstrations the
loader used (records, as the stage's eval.json counts them), the held-out
accuracy on the task and on the others.

Beside them, the prompts of the task the main job's GRPO stage samples: its steps
x prompts a step, split evenly over its tasks (`grpo_tasks`), and twice that at
most with dynamic sampling's one refill round. Why this yardstick: GRPO learns
from the completions it samples right, and a right completion teaches at best
what a demonstration of the same prompt teaches. A task whose held-out accuracy
needs more demonstrations than the stage has prompts of it cannot be taught by
the stage, whichever algorithm of the family runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = (40, 60, 100)


@dataclasses.dataclass(frozen=True)
class Settings:
    task: str = "add"
    steps: tuple[int, ...] = STEPS
    lr: float = 1e-3  # the SFT stage's 2e-3 halved: a finished model, further trained
    warmup_steps: int = 10
    batch_size: int = 16  # the main job's SFT batch: 16 packed rows of 96 tokens
    seq_len: int = 96
    seed: int = 11  # the data order; the main job's SFT used 1
    eval_per_task: int = 64
    eval_seed: int = 1234


def sft_config(base, s: Settings, steps: int):
    """The main job's SFT config `base` for `steps` steps on the task's instructions."""
    from llm_jax.config import OptimizerConfig
    from llm_jax.data.loader import DataConfig
    return dataclasses.replace(
        base, optim=OptimizerConfig(lr=s.lr, warmup_steps=min(s.warmup_steps, steps // 2), weight_decay=0.0),
        train=dataclasses.replace(base.train, steps=steps, batch_size=s.batch_size, seq_len=s.seq_len,
                                  log_every=max(1, steps // 4), seed=s.seed),
        data=DataConfig(source=f"builtin:sft/{s.task}", size=20_000))


def grpo_prompts(task: str) -> dict:
    """The main job's GRPO stage: prompts of `task` it samples, without and with its refill rounds."""
    from experiments import pipeline
    cfg = pipeline.Config()
    g = cfg.grpo
    per_task = g.train.steps * g.prompts / len(cfg.grpo_tasks) if task in cfg.grpo_tasks else 0.0
    rounds = 1 + (g.max_refill_rounds if g.resolved().dynamic_sampling else 0)
    return {"tasks": list(cfg.grpo_tasks), "steps": g.train.steps, "prompts": g.prompts,
            "group_size": g.group_size, "rounds_at_most": rounds, "task_prompts": per_task,
            "task_prompts_at_most": per_task * rounds}


def measure(sft_dir: str, workdir: str, s: Settings, progress=print) -> dict:
    """{"start": accuracy of the SFT model, "runs": {N: {...}}}; each N trains in workdir/sft_N."""
    from experiments import pipeline
    from llm_jax import evals, generate, sharding
    from llm_jax.config import MeshConfig
    from llm_jax.stages import runner, sft

    path = os.path.normpath(sft_dir)
    run_dir, name = os.path.dirname(path) or ".", os.path.basename(path)
    model_cfg, start, tok, _ = generate.load_stage(run_dir, name)
    mesh = sharding.make_mesh(MeshConfig())
    like = runner.model_like(model_cfg, mesh)

    def judge(params) -> dict:
        acc = evals.instruction_accuracy(model_cfg, runner.host_params(params), tok, per_task=s.eval_per_task,
                                         seed=s.eval_seed)
        return {"accuracy": acc["accuracy"], "by_task": acc["by_task"]}

    out = {"start": judge(start), "runs": {}}
    base = pipeline.Config().sft
    for n in s.steps:
        progress(f"sft on {s.task}: {n} steps")
        stage = sft.stage(model_cfg, sft_config(base, s, n), tok, name=f"sft_{n}",
                          init=lambda: runner.stage_params(run_dir, name, like), after=judge)
        r = runner.run(workdir, stage, mesh, progress=lambda _: None)
        out["runs"][str(n)] = {"steps": n, "demonstrations": r["data"]["records_used"],
                               "train_seconds": r["train_seconds"], "accuracy": r["accuracy"],
                               "by_task": r["by_task"]}
    return out


def report(r: dict) -> str:
    s, g, task = r["settings"], r["grpo"], r["settings"]["task"]
    lines: list[str] = []
    w = lines.append
    w(f"# Demonstrations `{task}` needs, against the prompts of the main job's GRPO stage")
    w("")
    w(f"{r['date']}, {r['machine']['cpu_model']}, {r['machine']['cores']} cores, load average "
      f"{r['machine']['loadavg_start'][0]:.1f} at the start; {r['runtime_s']:.0f} s in all.")
    w("")
    w(f"    {r['command']}")
    w("")
    w(f"- Start: the SFT stage `{r['sft']}`, read only.")
    w(f"- Each row: SFT from that model for N steps on training-split `{task}` instructions with their "
      f"reference answers (`builtin:sft/{task}`), {s['batch_size']} packed rows of {s['seq_len']} tokens a "
      f"step, lr {s['lr']:g} after {s['warmup_steps']} warmup steps (fewer for short runs), cosine to a tenth.")
    w(f"- Judged: held-out instructions, greedy, {s['eval_per_task']} per task (seed {s['eval_seed']}); "
      "'others' is the mean over the other tasks.")
    w("")
    w(f"| SFT steps | demonstrations of {task} | held-out {task} | others | all tasks | training (s) |")
    w("|---:|---:|---:|---:|---:|---:|")

    def row(label, demos, acc, seconds):
        others = [v for t, v in acc["by_task"].items() if t != task]
        w(f"| {label} | {demos} | {acc['by_task'][task]:.2f} | {sum(others) / len(others):.2f} | "
          f"{acc['accuracy']:.3f} | {seconds} |")

    row("0 (the SFT model)", 0, r["start"], "")
    for x in r["runs"].values():
        row(x["steps"], f"{x['demonstrations']:,}", x, f"{x['train_seconds']:.1f}")
    w("")
    w("By task (held-out, greedy):")
    w("")
    tasks = list(r["start"]["by_task"])
    w("| SFT steps | " + " | ".join(tasks) + " |")
    w("|---:|" + "---:|" * len(tasks))
    for label, acc in [("0", r["start"]), *[(str(x["steps"]), x) for x in r["runs"].values()]]:
        w(f"| {label} | " + " | ".join(f"{acc['by_task'][t]:.2f}" for t in tasks) + " |")
    w("")
    if g["task_prompts"]:
        w(f"The main job's GRPO stage ({g['steps']} steps x {g['prompts']} prompts x {g['group_size']} "
          f"completions over {', '.join(g['tasks'])}) samples about {g['task_prompts']:,.0f} `{task}` prompts, "
          f"at most {g['task_prompts_at_most']:,.0f} with its refill round. A right completion teaches at best "
          "what a demonstration teaches, and only the prompts it samples right give one.")
    else:
        w(f"The main job's GRPO stage does not train on `{task}` ({', '.join(g['tasks'])}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", help="the SFT stage directory of a finished main job (read only)")
    ap.add_argument("--task", default=Settings.task, help="a built-in task (default add)")
    ap.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated SFT step counts")
    ap.add_argument("--eval-per-task", type=int, default=Settings.eval_per_task)
    ap.add_argument("--workdir", default="", help="a new directory for the SFT runs (default: a fresh one under /tmp)")
    ap.add_argument("--out", default=os.path.join(HERE, "SFT_DEMOS.md"),
                    help="the report (default benchmarks/SFT_DEMOS.md); the JSON goes beside it")
    ap.add_argument("--report-only", metavar="JSON", help="measure nothing: re-render --out from a saved JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        common.rerender(args.report_only, args.out, report)
        return 0
    if not args.sft or not os.path.isfile(os.path.join(args.sft, "config.json")):
        ap.error(f"--sft {args.sft!r}: not a stage directory (no config.json); run the main job first")
    try:
        steps = tuple(int(x) for x in args.steps.split(","))
    except ValueError:
        ap.error(f"--steps {args.steps!r}: expected comma-separated integers, e.g. 40,60,100")
    if not steps or min(steps) < 1:
        ap.error(f"--steps {args.steps!r}: every step count must be at least 1")
    if args.eval_per_task < 1:
        ap.error(f"--eval-per-task {args.eval_per_task}: must be at least 1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this CPU, before jax loads (libtpu would probe for a TPU)
    from llm_jax import verifiers
    from llm_jax.errors import ConfigError
    try:
        verifiers.check_tasks((args.task,), "--task")  # a misspelt task fails before anything is trained
    except ConfigError as e:
        ap.error(str(e))
    s = Settings(task=args.task, steps=steps, eval_per_task=args.eval_per_task)
    if args.workdir and os.path.exists(args.workdir):
        ap.error(f"--workdir {args.workdir}: exists; remove it or name another (a finished run there would be "
                 "read, not measured)")
    workdir = args.workdir or tempfile.mkdtemp(prefix="sft_demos-")
    command = common.rerun_command("benchmarks.sft_demos", argv)
    machine = common.machine_info()
    t0 = time.perf_counter()
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine,
               "versions": common.versions(), "sft": args.sft, "settings": dataclasses.asdict(s),
               "grpo": grpo_prompts(s.task), "workdir": workdir}
    try:
        results.update(measure(args.sft, workdir, s))
    except ConfigError as e:  # e.g. --sft names a reward model's stage, which has no LM head to train
        ap.error(f"--sft {args.sft}: {e}")
    results["runtime_s"] = time.perf_counter() - t0
    results["command"] = command
    common.save_report(args.out, results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
