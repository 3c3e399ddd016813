"""The whole path on the built-in world: pretrain -> SFT -> reward model -> PPO, and DPO and GRPO.

    python -m experiments.pipeline --workdir runs/pipeline [--set sft.train.steps=400 ...]

One small decoder goes through every stage on one CPU in minutes:
  pretrain  causal LM on few-shot documents (no instructions): in-context
            accuracy at 0, 1 and k shots;
  sft       completion-only loss on demonstrations: instructions ("Translate
            Blume from German to English." -> "flower") mixed with requests,
            thanks and questions answered politely or bluntly, plainly or in
            jargon (`builtin:chat`): instruction accuracy of the base model (it
            continues text, it does not answer) and of the SFT model;
  rm        the SFT model + a scalar head (and a learned weight on the
            response's log-likelihood, `rm.likelihood`), Bradley-Terry on
            preference pairs (correct vs wrong, polite vs blunt, plain vs
            jargon): held-out pairwise accuracy;
  ppo       policy and reference = SFT, frozen reward model, value head from the
            reward model: win rate against the SFT policy under the programs
            that verify each preference, and the KL to SFT;
  dpo       from the same SFT model, reference log-probs computed once and
            stored: the same win rate and KL;
  grpo      from the same SFT model, RL from verifiable rewards: groups of
            sampled answers to the training split's instructions, each scored
            by its task's program (Dr. GRPO with dynamic sampling): held-out
            instruction accuracy (SFT -> GRPO) and the KL to SFT.
Rerunning the command skips finished stages and resumes an interrupted one.
Writes report.md (one table), loss/ppo/dpo/grpo PNG curves, TensorBoard event files
under each stage, and each stage's eval.json.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time

from llm_jax import cli, evals, launch, report, sharding, verifiers
from llm_jax.config import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data import preferences
from llm_jax.data.loader import DataConfig
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.rundir import is_primary, parse_args, say, write_run_json
from llm_jax.stages import dpo, grpo, ppo, pretrain, reward, runner, sft

MODEL = ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=128, num_layers=4, num_heads=4,
                    d_ff=512, max_len=256)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    shots: int = 3  # in-context accuracy at 0, 1 and this many shots
    icl_per_task: int = 16
    instruction_per_task: int = 16
    rm_pairs: int = 300  # held-out pairs for the reward model's accuracy by kind and task
    win_prompts: int = 96  # held-out preference prompts for the win rates
    max_new_tokens: int = 64  # response length for the win rates
    kl_budget: float = 8.0  # nats of KL(policy || SFT) per response that PPO/DPO may spend
    # GRPO's before/after: more held-out instructions than SFT's row, since one item of 16 is
    # 0.06 of a task's accuracy (SFT's copy was 0.44 on the first 16 items, 0.23 on 64).
    grpo_instruction_per_task: int = 64
    seed: int = 1234


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = MODEL
    mesh: MeshConfig = MeshConfig()
    pretrain: pretrain.PretrainConfig = pretrain.PretrainConfig(
        optim=OptimizerConfig(lr=3e-3, warmup_steps=60, weight_decay=0.01),
        # Batch 16: on this CPU a step costs the same per token at 16 or 32 rows, and
        # twice the updates per token learned more (held-out loss 0.64 vs 0.76 for 600 x 16
        # vs 300 x 32 rows, 229 s vs 250 s).
        train=TrainConfig(steps=600, batch_size=16, seq_len=128, log_every=50),
        data=DataConfig(source="builtin:pretrain", size=20_000))
    sft: sft.SFTConfig = sft.SFTConfig(
        optim=OptimizerConfig(lr=2e-3, warmup_steps=20, weight_decay=0.0),
        # Most of the budget: the algorithmic tasks are learned here, where the loss is on
        # answers only (pretraining spends most of its loss on random queries).
        train=TrainConfig(steps=1100, batch_size=16, seq_len=96, log_every=50, seed=1),
        # Instructions plus requests/thanks/questions answered well or badly (mixed-quality
        # demonstrations, as real SFT data is): see `preferences.chat_record`.
        data=DataConfig(source="builtin:chat", size=20_000))
    rm: reward.RMConfig = reward.RMConfig(
        # No median spike rule: a 16-row Bradley-Terry batch's loss varies 3x around its
        # median from noise alone (a rollback to step 0 was the result); non-finite still rolls back.
        train=TrainConfig(steps=100, batch_size=16, seq_len=128, log_every=20, seed=2, spike_factor=0.0))
    # lr 1e-4 (was 5e-5): on the same SFT model (2026-12-03) 5e-5 spent 0.33 nats of KL for a
    # win rate of 0.55, 1e-4 2.8 nats for 0.57 (17% wins, 2% losses), 2e-4 9.1 nats (over the
    # budget) for 0.52.
    ppo: ppo.PPOStageConfig = ppo.PPOStageConfig(
        train=TrainConfig(steps=30, log_every=5, seed=3, spike_factor=0.0),
        ppo=ppo.PPOConfig(rollout_batch=32, max_new_tokens=48, epochs=2, minibatches=2, kl_coef=0.05))
    # lr 1e-4 (was 2e-5): on the same SFT model (2026-12-03) 2e-5 moved it 0.15 nats for a win
    # rate of 0.54, 5e-5 0.40 nats for 0.57, 1e-4 3.8 nats for 0.59 (19% wins, 1% losses).
    dpo: dpo.DPOConfig = dpo.DPOConfig(
        optim=OptimizerConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0),
        train=TrainConfig(steps=60, batch_size=16, seq_len=128, log_every=10, seed=4, spike_factor=0.0),
        data=DataConfig(source="builtin:preferences", size=10_000))
    # 10 warmup steps (was 0): Adam's first steps move every weight by about the full lr
    # whatever the gradient's size, and most early groups are flat, so those steps are mostly
    # noise. On the main job's SFT model (docs/grpo.md, 2026-12-05), held-out add/copy/sort
    # 0.547 -> 0.573 (seed 6) and 0.552 -> 0.589 (seed 7); without warmup at lr 5e-4 add-only
    # GRPO lost add's right answers within 4 steps.
    grpo: grpo.GRPOConfig = grpo.GRPOConfig(
        optim=OptimizerConfig(lr=2e-4, warmup_steps=10, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(steps=80, log_every=10, seed=6, spike_factor=0.0),
        algorithm="dr_grpo", dynamic_sampling=True, max_refill_rounds=1,
        group_size=8, prompts=16, max_new_tokens=12)
    # The open tasks SFT answers worst; format and reverse are at 1.00 and would give flat
    # groups only. 12 new tokens hold the longest answer of these three (sort, 11) and its eos.
    grpo_tasks: tuple[str, ...] = ("add", "copy", "sort")
    grpo_prompts: int = 20_000  # training-split instructions drawn for GRPO
    eval: EvalConfig = EvalConfig()
    # Data shards of every stage's loader (pretrain, sft, rm, dpo; PPO's prompt batches are the
    # same on any process count already): 0 = one per process; a fixed N gives the same global
    # batches on any process count that divides it (`data.loader.ShardedLoader`).
    data_shards: int = 0


# ---------------------------------------------------------------------------
# The stages: what each is judged by


def icl(cfg: Config, tok, params) -> dict:
    """In-context accuracy of the pretrained model on held-out probes at 0, 1 and k shots."""
    shots = sorted({0, 1, cfg.eval.shots})
    return {"icl_accuracy": evals.icl_accuracy(cfg.model, runner.host_params(params), tok, shots=shots,
                                               per_task=cfg.eval.icl_per_task, seed=cfg.pretrain.data.seed + 1)}


def instructions(cfg: Config, tok, params, when: str, per_task: int | None = None) -> dict:
    """Held-out instruction accuracy, greedy, `per_task` items of each task (default the eval's)."""
    acc = evals.instruction_accuracy(cfg.model, runner.host_params(params), tok,
                                     per_task=per_task or cfg.eval.instruction_per_task, seed=cfg.eval.seed)
    out = {f"instruction_accuracy_{when}": acc["accuracy"], f"by_task_{when}": acc["by_task"]}
    return out if when == "before" else {**out, "samples": acc.get("samples", [])[:10]}


def rm_breakdown(cfg: Config, tok, params) -> dict:
    """Which pairs it gets wrong: a second, separately drawn held-out sample, scored pair by pair."""
    return {"breakdown": evals.pairwise_accuracy_by_kind(
        cfg.model, runner.host_params(params), tok, evals.preference_records(cfg.eval.rm_pairs, seed=cfg.eval.seed))}


def judge_policy(cfg: Config, tok, policy, base) -> dict:
    """Win rate of `policy` against the SFT policy `base` on held-out preference prompts."""
    prompts = evals.preference_prompts(cfg.eval.win_prompts, seed=cfg.eval.seed)
    return evals.win_rate(cfg.model, runner.host_params(policy), runner.host_params(base), tok, prompts,
                          evals.builtin_judge, temperature=1.0, max_new_tokens=cfg.eval.max_new_tokens,
                          seed=cfg.eval.seed)


def grpo_eval(cfg: Config, tok, policy, when: str, sft_params=None) -> dict:
    """Held-out instruction accuracy (greedy, all tasks, `grpo_instruction_per_task` each);
    after GRPO also the KL to SFT: sampled answers (temperature 1) to the same held-out
    instructions, log pi - log pi_SFT summed per response (`evals.win_rate`)."""
    out = instructions(cfg, tok, policy, when, cfg.eval.grpo_instruction_per_task)
    if sft_params is None:
        return out
    prompts = [r["prompt"] for r in evals.instruction_records(cfg.eval.instruction_per_task, cfg.eval.seed)]
    vs = evals.win_rate(cfg.model, runner.host_params(policy), runner.host_params(sft_params), tok, prompts,
                        evals.builtin_judge, temperature=1.0, max_new_tokens=cfg.eval.max_new_tokens,
                        seed=cfg.eval.seed)
    return {**out, "kl_to_base": vs["kl_to_base"], "win_rate": vs["win_rate"],
            "sampled_accuracy": vs["policy_score"], "sampled_accuracy_sft": vs["base_score"]}


def ppo_prompts(count: int, seed: int, split: str) -> list[str]:
    """Prompts of the preference world (instructions, requests, thanks, questions)."""
    rng = random.Random(seed)
    return [preferences.preference_record(rng, split)["prompt"] for _ in range(count)]


def stages(workdir: str, cfg: Config, mesh, tok) -> list[runner.Stage]:
    """pretrain -> sft -> rm -> ppo, and dpo and grpo from the same SFT model."""
    lm_like = runner.model_like(cfg.model, mesh)

    def weights(name: str):
        return lambda: runner.stage_params(workdir, name, lm_like)

    shards = cfg.data_shards
    return [
        pretrain.stage(cfg.model, cfg.pretrain, tok, mesh, data_shards=shards,
                       after=lambda p: icl(cfg, tok, p)),
        sft.stage(cfg.model, cfg.sft, tok, init=weights("pretrain"), data_shards=shards,
                  before=lambda p: instructions(cfg, tok, p, "before"),
                  after=lambda p: instructions(cfg, tok, p, "after")),
        reward.stage(cfg.model, cfg.rm, tok, mesh, lm=weights("sft"), data_shards=shards,
                     after=lambda p: rm_breakdown(cfg, tok, p)),
        ppo.stage(cfg.model, cfg.ppo, tok, mesh, policy=weights("sft"),
                  reward_model=lambda: runner.stage_params(workdir, "rm", reward.like(cfg.model, mesh,
                                                                                        cfg.rm.likelihood)),
                  prompts=lambda: ppo_prompts(cfg.ppo.prompts, cfg.ppo.train.seed, "train"),
                  after=lambda p: judge_policy(cfg, tok, p, weights("sft")())),
        dpo.stage(cfg.model, cfg.dpo, tok, mesh, init=weights("sft"), data_shards=shards,
                  after=lambda p: judge_policy(cfg, tok, p, weights("sft")())),
        grpo.stage(cfg.model, cfg.grpo, tok, mesh, init=weights("sft"),
                   records=lambda: verifiers.builtin_records(cfg.grpo_prompts, cfg.grpo.train.seed, "train",
                                                            cfg.grpo_tasks),
                   verifier=verifiers.BUILTIN,
                   before=lambda p: grpo_eval(cfg, tok, p, "before"),
                   after=lambda p: grpo_eval(cfg, tok, p, "after", weights("sft")())),
    ]


def by_task(before: dict, after: dict) -> str:
    """"add 0.19 -> 0.25, ..." (n/a where a task had no item that fit the model)."""
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"
    return ", ".join(f"{t} {f(before.get(t))} -> {f(v)}" for t, v in after.items())


def trained_accuracy(by_task_before: dict, by_task_after: dict, tasks, per_task: int) -> dict:
    """Held-out accuracy over the tasks GRPO trained on (`per_task` items each; a task with
    no score, "n/a", is left out), before and after, and one standard error of an accuracy
    near the before on that many items, sqrt(p (1 - p) / n): the yardstick for whether the
    stage moved what it trained on."""
    scored = [t for t in tasks if by_task_before.get(t) is not None and by_task_after.get(t) is not None]
    if not scored:
        return {"tasks": [], "items": 0, "before": None, "after": None, "standard_error": None}
    before = sum(by_task_before[t] for t in scored) / len(scored)
    after = sum(by_task_after[t] for t in scored) / len(scored)
    n = per_task * len(scored)
    return {"tasks": scored, "items": n, "before": before, "after": after,
            "standard_error": math.sqrt(before * (1.0 - before) / n)}


def summary(name: str, r: dict) -> str:
    """The stage's result in one line."""
    if name == "pretrain":
        by = r["icl_accuracy"]["by_shots"]
        return (f"pretrain: held-out loss {r['heldout_loss_before']:.3f} -> {r['heldout_loss_after']:.3f}; "
                "in-context accuracy " + ", ".join(f"{k}-shot {'n/a' if v is None else f'{v:.2f}'}"
                                                   for k, v in sorted(by.items(), key=lambda kv: int(kv[0]))))
    if name == "sft":
        return (f"sft: instruction accuracy {r['instruction_accuracy_before']:.2f} (pretrained) -> "
                f"{r['instruction_accuracy_after']:.2f}")
    if name == "rm":
        b = r["breakdown"]
        return (f"rm: held-out pairwise accuracy {r['pairwise_accuracy_before']:.3f} (fresh head) -> "
                f"{r['pairwise_accuracy_after']:.3f}\nrm: on {b['pairs']} more held-out pairs {b['accuracy']:.3f}; "
                "by kind " + ", ".join(f"{k} {v:.2f}" for k, v in b["by_kind"].items())
                + "; correct-vs-wrong by task " + ", ".join(f"{k} {v:.2f}" for k, v in b["by_task"].items()))
    if name == "grpo":
        return (f"grpo: instruction accuracy {r['instruction_accuracy_before']:.3f} (SFT) -> "
                f"{r['instruction_accuracy_after']:.3f}, KL to SFT {r['kl_to_base']:.2f} nats; by task "
                + by_task(r["by_task_before"], r["by_task_after"]))
    return f"{name}: win rate vs SFT {r['win_rate']:.2f}, KL to SFT {r['kl_to_base']:.2f} nats"


# ---------------------------------------------------------------------------
# Report


def write_report(workdir: str, cfg: Config, results: dict) -> None:
    pt, s, r, p, d, g = (results.get(k) for k in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo"))
    rows = []
    if pt:
        icl = pt["icl_accuracy"]["by_shots"]
        rows.append({"stage": "pretrain", "metric": "held-out loss per token",
                     "before": pt["heldout_loss_before"], "after": pt["heldout_loss_after"],
                     "seconds": pt["train_seconds"]})
        rows.append({"stage": "pretrain", "metric": f"in-context accuracy, 0 -> {cfg.eval.shots} shots",
                     "before": icl[min(icl, key=int)], "after": icl[max(icl, key=int)], "seconds": None})
    if s:
        rows.append({"stage": "sft", "metric": "instruction accuracy (base -> SFT)",
                     "before": s["instruction_accuracy_before"], "after": s["instruction_accuracy_after"],
                     "seconds": s["train_seconds"]})
    if r:
        rows.append({"stage": "rm", "metric": "held-out pairwise accuracy", "before": r["pairwise_accuracy_before"],
                     "after": r["pairwise_accuracy_after"], "seconds": r["train_seconds"]})
    for name, x in (("ppo", p), ("dpo", d)):
        if x:
            rows.append({"stage": name, "metric": "judge score (SFT -> policy)", "before": x["base_score"],
                         "after": x["policy_score"], "seconds": x["train_seconds"]})
    if g:
        rows.append({"stage": "grpo", "metric": f"instruction accuracy, {cfg.eval.grpo_instruction_per_task} "
                     "per task (SFT -> GRPO)", "before": g["instruction_accuracy_before"],
                     "after": g["instruction_accuracy_after"], "seconds": g["train_seconds"]})
    text = []
    for name, x in (("ppo", p), ("dpo", d)):
        if x:
            inside = "inside" if x["kl_to_base"] <= cfg.eval.kl_budget else "OUTSIDE"
            text.append(f"- {name}: win rate {x['win_rate']:.2f} against SFT (ties count half), KL to SFT "
                        f"{x['kl_to_base']:.2f} nats per response, {inside} the budget of {cfg.eval.kl_budget}.")
    sections = {"Win rates": "\n".join(text)} if text else {}
    if g:
        by = by_task(g["by_task_before"], g["by_task_after"])
        t = trained_accuracy(g["by_task_before"], g["by_task_after"], cfg.grpo_tasks,
                             cfg.eval.grpo_instruction_per_task)
        on_trained = ("" if not t["tasks"] else
                      f"\n- on the tasks it trained on ({', '.join(t['tasks'])}; {t['items']} items): "
                      f"{t['before']:.3f} -> {t['after']:.3f}, {t['after'] - t['before']:+.3f}; one standard "
                      f"error of an accuracy near SFT's on {t['items']} items is {t['standard_error']:.3f}.")
        sections["GRPO"] = (
            f"- held-out instruction accuracy {g['instruction_accuracy_before']:.3f} (SFT) -> "
            f"{g['instruction_accuracy_after']:.3f} (greedy, {cfg.eval.grpo_instruction_per_task} per task); by "
            f"task {by}.\n- trained on {', '.join(cfg.grpo_tasks)} (training split) with their scorers as "
            f"rewards, {cfg.grpo.algorithm}, {g['steps']} steps of {cfg.grpo.prompts} prompts x "
            f"{cfg.grpo.group_size} samples.\n- KL to SFT {g['kl_to_base']:.2f} nats per response (sampled "
            f"answers to {cfg.eval.instruction_per_task} held-out instructions per task); sampled accuracy "
            f"{g['sampled_accuracy_sft']:.3f} (SFT) -> {g['sampled_accuracy']:.3f}." + on_trained)
    # Stage names, which plot_curves takes inside workdir: joining them with a relative
    # workdir (runs/demo, the README's) would be joined again and find no metrics.
    curves = report.plot_curves(workdir, ["pretrain", "sft", "rm", "ppo", "dpo", "grpo"])
    report.write_report(workdir, rows, curves, sections=sections or None)


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    tok = ByteTokenizer()
    mesh = sharding.make_mesh(cfg.mesh)
    # Every stage's settings and records, before the first stage trains (not DPO's after SFT).
    for name, kind in (("pretrain", "pretrain"), ("sft", "sft"), ("rm", "preferences"), ("dpo", "preferences")):
        runner.check(name, getattr(cfg, name), cfg.model, mesh, kind=kind, data_shards=cfg.data_shards)
    grpo.check(cfg.grpo, cfg.model, mesh, "grpo")
    verifiers.check_tasks(cfg.grpo_tasks, "grpo_tasks")  # a misspelt task fails here, not after SFT
    cfg.ppo.train.validate("ppo.train")
    cfg.ppo.optim.validate("ppo.optim")
    # Every PPO update's minibatch is split over the data axes like a training batch.
    sharding.check_batch_fits_mesh(cfg.ppo.ppo.rollout_batch,
                                   cfg.ppo.ppo.minibatches * cfg.ppo.ppo.update_microbatches, mesh)
    write_run_json(workdir, cfg, "pipeline")
    if is_primary():
        tok.save(os.path.join(workdir, "tokenizer"))

    results = {}
    t0 = time.time()
    for stage in stages(workdir, cfg, mesh, tok):
        say(f"\n== {stage.name} ==")
        results[stage.name] = runner.run(workdir, stage, mesh)
        if results[stage.name] is None:
            return 0
        say(summary(stage.name, results[stage.name]))
    if is_primary():
        write_report(workdir, cfg, results)
    say(f"\ndone in {time.time() - t0:.0f}s: {workdir}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
