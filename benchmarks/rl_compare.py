"""PPO vs GRPO vs Dr. GRPO vs RLOO vs REINFORCE vs DPO from one SFT model, on one sampling budget.

    cd /work/main && PYTHONPATH=. python -m benchmarks.rl_compare --sft runs/demo/sft   # 8-11 min, 2 shared cores
    PYTHONPATH=. python -m benchmarks.rl_compare --sft runs/demo/sft --steps 2 --eval-per-task 2 \\
        --kl-per-task 1 --in-process --out /tmp/rl.md                # does it run? numbers mean nothing
    PYTHONPATH=. python -m benchmarks.rl_compare --report-only benchmarks/RL_COMPARE.json --out /tmp/rl.md

Writes benchmarks/RL_COMPARE.md and .json beside it (or `--out PATH.md` and
PATH.json). `--sft` is the SFT stage directory of a finished main job
(`python -m experiments.pipeline --workdir runs/demo`); it is only read. Every
method starts from its weights, trains on the same training-split instruction
prompts of the built-in tasks add, copy and sort (`verifiers.builtin_records`)
and is rewarded by the same program (`verifiers.builtin_verifier`, i.e.
`builtin.score_instruction`: 1 for a right answer, else 0). Each method runs
alone in its own process (`--worker`), one after the other; the stage
directories, logs and per-method results stay in `--workdir`.

The sampling budget is the same for all: `steps` batches of `prompts` prompts
x `group_size` completions of at most `max_new_tokens` tokens at temperature 1,
the prompts drawn by one `grpo.GroupPromptLoader` with one seed, so step i of
every method sees the same prompts. Completions and tokens are counted from
what each run sampled (its logged per-step metrics, or DPO's samples), not from
the settings.

The stage settings are the main job's (`experiments.pipeline.Config()`), with
the changes `stage_configs` makes:
  grpo, dr_grpo, rloo, reinforce   the GRPO stage (`stages.grpo.stage`, run by
        `runner.run`) with the main job's GRPO config (group 8, 12 new tokens,
        lr 2e-4 after 10 warmup steps, cosine-decayed to 2e-5, clip_norm 1, no weight decay,
        no KL term) except the algorithm, 16 prompts a step, and dynamic
        sampling OFF for all four: with it a step samples one or two rounds
        depending on how many of the policy's own groups are flat, so the
        budget would differ from method to method, and PPO and DPO have no such
        filter.
  ppo   `stages.ppo.make_ppo_step(score_fn=...)` with the verifier as the score
        (`program_scores`); `ppo.stage` wants a reward model, so the benchmark
        declares its own `runner.Stage` around the library's step (`ppo_stage`).
        A rollout is the GRPO batch's 16 prompts each repeated 8 times
        (`RepeatedPrompts`): 128 completions a step. The value model is the SFT
        model with a fresh scalar head (`model.init_scalar_head`; the main job's
        starts from the reward model), trained with the policy under one
        optimizer. The main job's PPO config otherwise: lr 1e-4, 2 epochs x 2
        minibatches a rollout (4 optimizer steps), kl_coef 0.05 fixed, vf_coef
        0.1, whitened GAE advantages (gamma 1, lambda 0.95).
  dpo   offline: the SFT model samples 8 completions for each prompt of the same
        `steps` batches (`sample_pairs`: the GRPO stage's sampler and verifier,
        so the same budget; with the same keys as GRPO's step i), the verifier
        labels them, and each prompt with a right and a wrong completion gives
        one pair (`pair_up`: its first right one chosen, its first wrong one
        rejected, blank texts passed over). The DPO stage (`stages.dpo.stage`)
        trains on those pairs (a jsonl file) with the main job's DPO config (lr
        1e-4, 10 warmup steps, beta 0.1, 16 packed rows of 128 tokens a step)
        for `steps` optimizer steps, as many as the GRPO family takes.

Judged, for every method and for the SFT model itself: held-out instruction
accuracy on all seven built-in tasks, greedy (`evals.instruction_accuracy`, 64
per task, seed 1234: the main job's GRPO evaluation), and, against the SFT model
on the held-out instructions `evals.instruction_records(16, 1234)` sampled at
temperature 1 with the same keys, up to 64 new tokens (`evals.win_rate` with
`evals.builtin_judge`), the KL to SFT in nats per response, the win rate (ties
half) and the sampled accuracy. Wall time: the training loop (`train_seconds`:
for DPO plus its sampling and its reference pass, which the online methods do
inside their loop) and the method's whole process (start-up, loading,
compiling, evaluating).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GRPO_METHODS = ("grpo", "dr_grpo", "rloo", "reinforce")  # each the GRPO stage with that algorithm
METHODS = (*GRPO_METHODS, "ppo", "dpo")
REFERENCE = "sft"  # the starting model: evaluated, not trained
ALL_TASKS = ("add", "copy", "format", "reverse", "sort", "square", "translate")  # builtin.TASKS, sorted


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the comparison varies or fixes (the JSON records it; the workers read it).
    The rest of each stage's config is the main job's (`stage_configs`)."""

    steps: int = 60  # sampling batches (GRPO and PPO steps; DPO's samples), and DPO's optimizer steps
    prompts: int = 16  # prompts a step
    group_size: int = 8  # completions per prompt
    max_new_tokens: int = 12  # the main job's GRPO budget: the longest sort answer and its eos
    dynamic_sampling: bool = False  # for every GRPO-family method (see the module docstring)
    tasks: tuple[str, ...] = ("add", "copy", "sort")  # the main job's GRPO tasks
    records: int = 20_000  # training-split prompts drawn (the main job's grpo_prompts)
    seed: int = 6  # the main job's GRPO train seed: the prompt order and sampling keys of every method
    verifier: str = "builtin"  # a `verifiers.load_verifier` name (the tests use a toy one)
    eval_per_task: int = 64  # held-out greedy instruction accuracy, all seven tasks
    eval_seed: int = 1234
    kl_per_task: int = 16  # held-out instructions per task for the KL and the win rate
    kl_max_new_tokens: int = 64

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def stage_configs(s: Settings, workdir: str = "") -> dict:
    """{"grpo": GRPOConfig (algorithm grpo; the others replace it), "ppo": PPOStageConfig,
    "dpo": DPOConfig}: the main job's, with the budget of `s` and every step logged."""
    from experiments import pipeline
    from llm_jax.data.loader import DataConfig
    main = pipeline.Config()

    def train(tc):
        return dataclasses.replace(tc, steps=s.steps, log_every=1, seed=s.seed)

    g = dataclasses.replace(main.grpo, algorithm="grpo", train=train(main.grpo.train), prompts=s.prompts,
                            group_size=s.group_size, max_new_tokens=s.max_new_tokens,
                            dynamic_sampling=s.dynamic_sampling)
    p = dataclasses.replace(main.ppo, train=train(main.ppo.train), prompts=s.records,
                            ppo=dataclasses.replace(main.ppo.ppo, rollout_batch=s.rows,
                                                    max_new_tokens=s.max_new_tokens, temperature=g.temperature))
    # DPO keeps its own train seed (its data order); the pairs come from the shared prompts.
    d = dataclasses.replace(main.dpo, train=dataclasses.replace(main.dpo.train, steps=s.steps, log_every=1),
                            data=DataConfig(source=f"jsonl:{os.path.join(workdir, 'dpo_pairs.jsonl')}",
                                            cache_dir=os.path.join(workdir, "data_cache")))
    return {"grpo": g, "ppo": p, "dpo": d}


# ---------------------------------------------------------------------------
# What every method shares


def load_sft(sft_dir: str):
    """(model config, params as numpy on the host, tokenizer) of a finished SFT stage.
    Host copies: every device copy made from them is fresh, so no training step can
    donate (delete) the buffers that the reference and the evaluations read."""
    import jax
    from llm_jax import generate
    path = os.path.normpath(sft_dir)
    cfg, params, tok, _ = generate.load_stage(os.path.dirname(path) or ".", os.path.basename(path))
    return cfg, jax.tree.map(np.asarray, jax.device_get(params)), tok


def one_device_mesh():
    import jax
    from llm_jax import sharding
    from llm_jax.config import MeshConfig
    return sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def on_mesh(params, mesh):
    """A fresh device copy of host params, placed by the partitioning table."""
    import jax
    from llm_jax import sharding
    return jax.device_put(params, sharding.tree_shardings(params, mesh))


def training_records(s: Settings) -> list[dict]:
    from llm_jax import verifiers
    return verifiers.builtin_records(s.records, s.seed, "train", s.tasks)


def prompt_loader(records: list[dict], tok, s: Settings):
    """The one prompt stream of every method: batch i is step i's `prompts` prompts
    (what the GRPO stage's own loader yields with train.seed = s.seed)."""
    from llm_jax.stages import grpo
    return grpo.GroupPromptLoader(records, tok, s.prompts, s.seed)


def evaluate(model_cfg, params, sft_params, tok, s: Settings) -> dict:
    """Held-out greedy instruction accuracy on every task; with `sft_params`, also the KL
    to SFT, the win rate and the sampled accuracies on held-out instructions."""
    from llm_jax import evals
    t0 = time.perf_counter()
    acc = evals.instruction_accuracy(model_cfg, params, tok, per_task=s.eval_per_task, seed=s.eval_seed)
    out = {"accuracy": acc["accuracy"], "by_task": acc["by_task"], "evaluated": acc["evaluated"],
           "skipped": acc["skipped"], "eos_rate": acc["eos_rate"], "samples": acc["samples"][:4]}
    if sft_params is not None:
        prompts = [r["prompt"] for r in evals.instruction_records(s.kl_per_task, s.eval_seed)]
        vs = evals.win_rate(model_cfg, params, sft_params, tok, prompts, evals.builtin_judge, temperature=1.0,
                            max_new_tokens=s.kl_max_new_tokens, seed=s.eval_seed)
        out.update(kl_to_sft=vs["kl_to_base"], win_rate=vs["win_rate"], tie_rate=vs["tie_rate"],
                   loss_rate=vs["loss_rate"], sampled_accuracy=vs["policy_score"],
                   sampled_accuracy_sft=vs["base_score"], kl_prompts=vs["num_prompts"])
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def sampled_counts(metrics_path: str, rows: int, max_new_tokens: int) -> dict:
    """Completions and tokens a GRPO or PPO run sampled, from its metrics.jsonl (every
    step logged): per step `rows` completions a round (1 + refill_rounds rounds), each
    `response_length` real tokens plus its eos when it stopped (1 - no_eos_fraction).
    The real-token count covers each step's first round (the metrics' round): exact
    without dynamic sampling. token_slots = completions x max_new_tokens, the positions
    the fixed-length sampler computes."""
    with open(metrics_path) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    steps = [m for m in logged if "loss" in m]  # not the rollback events
    rounds = [1 + int(m.get("refill_rounds", 0)) for m in steps]
    by_step = [int(round(rows * (float(m["response_length"]) + 1.0 - float(m["no_eos_fraction"]))))
               for m in steps]
    completions = sum(rounds) * rows
    return {"steps": len(steps), "completions": completions, "tokens": sum(by_step),
            "token_slots": completions * max_new_tokens, "refill_rounds": sum(rounds) - len(steps),
            "tokens_exact": sum(rounds) == len(steps), "tokens_by_step": by_step}


def reward_trend(metrics_path: str, key: str, n: int = 10) -> dict:
    """Mean of `key` over the first and the last `n` logged steps (the training reward)."""
    with open(metrics_path) as f:
        xs = [float(m[key]) for m in (json.loads(line) for line in f if line.strip()) if key in m]
    return {"key": key, "first": float(np.mean(xs[:n])), "last": float(np.mean(xs[-n:])), "steps": len(xs)}


def update_stats(metrics_path: str, clip_norm: float) -> dict:
    """The GRPO-family update's size per step: the mean |advantage| and the gradient norm
    before clipping, and in how many steps that norm exceeded clip_norm (a clipped step's
    update does not depend on the advantages' scale)."""
    with open(metrics_path) as f:
        steps = [m for m in (json.loads(line) for line in f if line.strip()) if "loss" in m]
    norms = [float(m["grad_norm"]) for m in steps]
    return {"advantage_abs_mean": float(np.mean([float(m["advantage_abs"]) for m in steps])),
            "grad_norm_min": float(np.min(norms)), "grad_norm_median": float(np.median(norms)),
            "clip_norm": clip_norm, "clipped_steps": sum(n > clip_norm for n in norms), "steps": len(steps)}


# ---------------------------------------------------------------------------
# The GRPO family


def run_grpo(method: str, workdir: str, model_cfg, sft, tok, records: list[dict], s: Settings, mesh) -> dict:
    """One GRPO-family method (`method` is its algorithm) through the GRPO stage."""
    from llm_jax.stages import grpo, runner
    cfg = dataclasses.replace(stage_configs(s, workdir)["grpo"], algorithm=method)
    stage = grpo.stage(model_cfg, cfg, tok, mesh, init=lambda: on_mesh(sft, mesh), records=lambda: records,
                       verifier=s.verifier, name=method,
                       after=lambda p: {"evaluation": evaluate(model_cfg, runner.host_params(p), sft, tok, s)})
    result = runner.run(workdir, stage, mesh)
    metrics = os.path.join(workdir, method, "metrics.jsonl")
    return {"evaluation": result["evaluation"], "sampled": sampled_counts(metrics, s.rows, s.max_new_tokens),
            "optimizer_steps": s.steps * cfg.optimizer_steps_per_step, "train_seconds": result["train_seconds"],
            "training_seconds": result["train_seconds"], "train_reward": reward_trend(metrics, "reward_mean"),
            "updates": update_stats(metrics, cfg.optim.clip_norm), "config": dataclasses.asdict(cfg)}


# ---------------------------------------------------------------------------
# PPO with the program as its reward


class RepeatedPrompts:
    """A prompt loader's batches with every prompt repeated `times` times in a row:
    PPO's rollout batch is the GRPO batch's prompts x group size. Its state is the
    inner loader's (a `data.loader.StageLoader`)."""

    def __init__(self, loader, times: int):
        self.loader, self.times = loader, times

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.loader)
        return {k: np.repeat(batch[k], self.times, axis=0) for k in ("tokens", "mask")}

    def get_state(self) -> dict:
        return self.loader.get_state()

    def set_state(self, state: dict) -> None:
        self.loader.set_state(state)

    def restore(self, states: list[dict]) -> None:
        self.loader.restore(states)

    @property
    def stats(self) -> dict:
        return self.loader.stats


def program_scores(tok, records: list[dict], verifier_name: str, max_new_tokens: int):
    """PPO's `score_fn(tokens [B, P + N], mask [B, P + N]) -> [B]`: the verifier on each
    row's completion (its real tokens before the eos, decoded as the GRPO stage does),
    the row's record found by its prompt tokens (the left padding stripped). Records
    with the same prompt are the same instruction, so the first one stands for all."""
    from llm_jax import verifiers
    from llm_jax.data import formats
    from llm_jax.stages import grpo
    fn = verifiers.load_verifier(verifier_name)
    by_prompt: dict[tuple[int, ...], int] = {}
    for i, r in enumerate(records):
        by_prompt.setdefault(tuple(formats.prompt_tokens(tok, r["prompt"])), i)

    def score(tokens, mask) -> np.ndarray:
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        width = tokens.shape[1] - max_new_tokens
        index = []
        for row in tokens[:, :width]:
            prompt = tuple(int(t) for t in row[int(np.argmax(row != tok.pad_id)):])
            if prompt not in by_prompt:
                raise KeyError(f"PPO rollout prompt {tok.decode(list(prompt))!r} is not among the training records")
            index.append(by_prompt[prompt])
        texts = grpo.completions(tok, tokens[:, width:], mask[:, width:], tok.eos_id)
        return verifiers.rewards(fn, verifier_name, records, index, texts)

    return score


def ppo_stage(model_cfg, cfg, tok, mesh, *, sft, records: list[dict], s: Settings, after):
    """A `runner.Stage` around `ppo.make_ppo_step` with `program_scores` as the reward:
    policy and reference from the SFT params, the value model the SFT model with a
    fresh scalar head (`model.init_scalar_head`, seeded by train.seed)."""
    import jax
    from llm_jax import model
    from llm_jax.stages import ppo, runner
    frozen: dict = {}

    def init() -> dict:
        frozen["reference"] = on_mesh(sft, mesh)
        head = jax.device_get(model.init_scalar_head(model_cfg, jax.random.PRNGKey(cfg.train.seed)))
        return {"policy": on_mesh(sft, mesh), "value": {"model": on_mesh(sft, mesh), "head": on_mesh(head, mesh)}}

    def build(params, tx, schedule):
        state, shardings = ppo.create_ppo_state(params, tx, mesh, cfg.train.seed, cfg.ppo.kl_coef)
        step = ppo.make_ppo_step(model_cfg, cfg.ppo, tx, reference_params=frozen["reference"],
                                 score_fn=program_scores(tok, records, s.verifier, cfg.ppo.max_new_tokens),
                                 schedule=schedule, mesh=mesh, state_shardings=shardings, eos_id=tok.eos_id,
                                 pad_id=tok.pad_id)
        return state, shardings, step

    return runner.Stage(
        "ppo", model_cfg, cfg, init=init,
        loader=lambda _dir: RepeatedPrompts(prompt_loader(records, tok, s), s.group_size), build=build,
        optimizer_steps=ppo.optimizer_steps(cfg.train.steps, cfg.ppo), after=lambda p: after(p["policy"]),
        extra={"verifier": s.verifier, "value_model": "the SFT model with a fresh scalar head"})


def run_ppo(workdir: str, model_cfg, sft, tok, records: list[dict], s: Settings, mesh) -> dict:
    from llm_jax.stages import ppo, runner
    cfg = stage_configs(s, workdir)["ppo"]
    stage = ppo_stage(model_cfg, cfg, tok, mesh, sft=sft, records=records, s=s,
                      after=lambda p: {"evaluation": evaluate(model_cfg, runner.host_params(p), sft, tok, s)})
    result = runner.run(workdir, stage, mesh)
    metrics = os.path.join(workdir, "ppo", "metrics.jsonl")
    return {"evaluation": result["evaluation"], "sampled": sampled_counts(metrics, s.rows, s.max_new_tokens),
            "optimizer_steps": ppo.optimizer_steps(s.steps, cfg.ppo), "train_seconds": result["train_seconds"],
            "training_seconds": result["train_seconds"], "train_reward": reward_trend(metrics, "score"),
            "config": dataclasses.asdict(cfg)}


# ---------------------------------------------------------------------------
# DPO on pairs the verifier labelled


def pair_up(records: list[dict], index, texts: list[str], rewards, group_size: int,
            threshold: float) -> tuple[list[dict], dict]:
    """One pair per group (rows [g*G, (g+1)*G) are one prompt's completions) that has a
    right (reward >= threshold) and a wrong completion with non-blank text (DPO's data
    refuses empty fields): its first right one chosen, its first wrong one rejected.
    Returns (pairs {"prompt", "chosen", "rejected", "record", "chosen_reward",
    "rejected_reward"}, {why a group gave none: count})."""
    pairs: list[dict] = []
    none: dict[str, int] = {}
    for g in range(len(texts) // group_size):
        rows = range(g * group_size, (g + 1) * group_size)
        right = [j for j in rows if rewards[j] >= threshold and texts[j].strip()]
        wrong = [j for j in rows if rewards[j] < threshold and texts[j].strip()]
        if not right or not wrong:
            n_right = sum(bool(rewards[j] >= threshold) for j in rows)
            why = "all right" if n_right == group_size else "all wrong" if n_right == 0 else "blank text"
            none[why] = none.get(why, 0) + 1
            continue
        i, j = right[0], wrong[0]
        pairs.append({"prompt": records[int(index[i])]["prompt"], "chosen": texts[i], "rejected": texts[j],
                      "record": int(index[i]), "chosen_reward": float(rewards[i]),
                      "rejected_reward": float(rewards[j])})
    return pairs, none


def sample_pairs(model_cfg, sft, tok, records: list[dict], s: Settings, mesh) -> tuple[list[dict], dict]:
    """The SFT model's `group_size` completions for every prompt of the `steps` batches
    of the shared prompt stream, sampled and scored by the GRPO stage's own
    `collect` (sampler, keys of step i, verifier), paired by `pair_up`. Returns
    (pairs, counts of what was sampled)."""
    import jax.numpy as jnp
    from llm_jax import sharding, train, verifiers
    from llm_jax.stages import grpo
    t0 = time.perf_counter()
    g = dataclasses.replace(stage_configs(s)["grpo"], dynamic_sampling=False)
    fn = verifiers.load_verifier(s.verifier)
    tx, _ = train.make_optimizer(g.optim, 1)  # the step wants one; sampling never updates
    state, shardings = train.state_from_params(on_mesh(sft, mesh), tx, mesh, g.train.seed)
    step = grpo.make_grpo_step(model_cfg, g, tx, tok, records=records, verifier=fn, verifier_name=s.verifier,
                               mesh=mesh, state_shardings=shardings)
    loader = prompt_loader(records, tok, s)
    pairs, none, completions, by_step = [], {}, 0, []
    for i in range(s.steps):
        rnd, _ = step.collect(dataclasses.replace(state, step=jnp.asarray(i, jnp.int32)),
                              sharding.shard_batch(next(loader), mesh))
        texts = grpo.completions(tok, rnd.rollout["response"], rnd.rollout["weights"], tok.eos_id)
        got, why = pair_up(records, rnd.index, texts, rnd.rewards, s.group_size, verifiers.success_threshold(fn))
        pairs += got
        for k, v in why.items():
            none[k] = none.get(k, 0) + v
        completions += len(texts)
        by_step.append(int(np.sum(rnd.rollout["weights"])))  # real tokens, the eos included
    return pairs, {"steps": s.steps, "completions": completions, "tokens": sum(by_step),
                   "token_slots": completions * s.max_new_tokens, "refill_rounds": 0, "tokens_exact": True,
                   "tokens_by_step": by_step,
                   "groups": completions // s.group_size, "pairs": len(pairs), "groups_without_pair": none,
                   "sample_seconds": time.perf_counter() - t0}


def pairs_read(cfg, tok) -> int:
    """Pairs in the first train.steps batches of the DPO stage's loader (a fresh one, same
    config and seed: the batches the stage trained on), repeats counted."""
    from llm_jax.stages import runner
    loader = runner.stage_loader(cfg.data, cfg.train, tok, kind="preferences")
    return int(sum(np.sum(next(loader)["pair_mask"]) for _ in range(cfg.train.steps)))


def run_dpo(workdir: str, model_cfg, sft, tok, records: list[dict], s: Settings, mesh) -> dict:
    from llm_jax.stages import dpo, runner
    pairs, sampled = sample_pairs(model_cfg, sft, tok, records, s, mesh)
    if not pairs:
        raise RuntimeError(f"none of the {sampled['groups']} prompts got a right and a wrong completion "
                           f"({sampled['groups_without_pair']}): DPO has no pair to train on")
    cfg = stage_configs(s, workdir)["dpo"]
    with open(cfg.data.source[len("jsonl:"):], "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    stage = dpo.stage(model_cfg, cfg, tok, mesh, init=lambda: on_mesh(sft, mesh),
                      after=lambda p: {"evaluation": evaluate(model_cfg, runner.host_params(p), sft, tok, s)})
    result = runner.run(workdir, stage, mesh)
    data = result.get("data", {})
    return {"evaluation": result["evaluation"], "sampled": sampled, "optimizer_steps": s.steps,
            "train_seconds": result["train_seconds"], "reference_seconds": result["reference_seconds"],
            "training_seconds": sampled["sample_seconds"] + result["reference_seconds"] + result["train_seconds"],
            "pairs_used": data.get("records_used"), "pairs_read": pairs_read(cfg, tok),
            "pairs_skipped": data.get("skipped", {}),
            "pairs_file": cfg.data.source[len("jsonl:"):], "pair_examples": pairs[:3],
            "train_reward": reward_trend(os.path.join(workdir, "dpo", "metrics.jsonl"), "accuracy"),
            "config": dataclasses.asdict(cfg)}


# ---------------------------------------------------------------------------
# One method, in its own process


def run_method(method: str, sft_dir: str, workdir: str, s: Settings) -> dict:
    """Trains (or, for "sft", only evaluates) one method from the SFT stage in `sft_dir`;
    its stage directory is workdir/<method>."""
    t0 = time.perf_counter()
    model_cfg, sft, tok = load_sft(sft_dir)
    mesh = one_device_mesh()
    if method == REFERENCE:
        out = {"evaluation": evaluate(model_cfg, sft, None, tok, s)}
    else:
        records = training_records(s)
        if method in GRPO_METHODS:
            out = run_grpo(method, workdir, model_cfg, sft, tok, records, s, mesh)
        elif method == "ppo":
            out = run_ppo(workdir, model_cfg, sft, tok, records, s, mesh)
        elif method == "dpo":
            out = run_dpo(workdir, model_cfg, sft, tok, records, s, mesh)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {(REFERENCE, *METHODS)}")
    return {"method": method, **out, "method_seconds": time.perf_counter() - t0}


def result_path(workdir: str, method: str) -> str:
    return os.path.join(workdir, f"result-{method}.json")


def worker_main(method: str, workdir: str) -> None:
    with open(os.path.join(workdir, "settings.json")) as f:
        saved = json.load(f)
    result = run_method(method, saved["sft"], workdir, Settings.from_dict(saved["settings"]))
    with open(result_path(workdir, method), "w") as f:
        json.dump(result, f, indent=1, default=str)


def run_worker(method: str, workdir: str, timeout: int) -> dict:
    """`python -m benchmarks.rl_compare --worker METHOD` in a fresh process (its output in
    workdir/METHOD.log): its result, with the process's wall time and the load averages
    around it, or {"error": the log's tail}."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = os.path.join(workdir, f"{method}.log")
    load0, t0 = os.getloadavg(), time.perf_counter()
    try:
        with open(log, "w") as f:
            code = subprocess.run([sys.executable, "-m", "benchmarks.rl_compare", "--worker", method,
                                   "--workdir", workdir], env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = f"timed out after {timeout} s"
    error = None
    if code != 0 or not os.path.exists(result_path(workdir, method)):
        with open(log) as f:
            error = f"exit {code}: " + f.read()[-3000:]
    return _collected(method, workdir, error, load0, t0, log)


def run_here(method: str, workdir: str, timeout: int) -> dict:
    """`run_worker` inside this process (`--in-process`; the tests): one JAX process for
    every method, so the times are not each method's alone. `timeout` is not enforced."""
    del timeout
    load0, t0 = os.getloadavg(), time.perf_counter()
    worker_main(method, workdir)
    return _collected(method, workdir, None, load0, t0, "(this process)")


def _collected(method: str, workdir: str, error: str | None, load0, t0: float, log: str) -> dict:
    around = {"process_seconds": time.perf_counter() - t0, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "log": log}
    if error is not None:
        return {"method": method, "error": error, **around}
    with open(result_path(workdir, method)) as f:
        return {**json.load(f), **around}


def measure(sft_dir: str, workdir: str, s: Settings, methods=METHODS, *, timeout: int = 1800,
            run=run_worker, progress=print) -> dict:
    """The SFT model's evaluation, then each method, one after the other (`run`: each in its
    own process by default), all in `workdir` (made; it must be new or empty): the
    results without the command line and the total time."""
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise ValueError(f"--workdir {workdir} is not empty: the runner would reuse finished stages; give a new one")
    os.makedirs(workdir, exist_ok=True)
    machine = common.machine_info()  # the load average before any work
    t_start = time.perf_counter()
    sft_dir = os.path.abspath(sft_dir)
    # The SFT run's tokenizer: workdir is then a run directory like any other, whose stages
    # `generate.load_stage` (and `python -m llm_jax.generate`) read.
    shutil.copytree(os.path.join(os.path.dirname(sft_dir), "tokenizer"), os.path.join(workdir, "tokenizer"))
    with open(os.path.join(workdir, "settings.json"), "w") as f:
        json.dump({"sft": sft_dir, "settings": dataclasses.asdict(s)}, f, indent=1)
    versions = common.versions()
    versions.pop("torch", None)
    with open(os.path.join(sft_dir, "config.json")) as f:
        sft_model = json.load(f)["model"]
    sft_run = {}  # what made the SFT stage (its run's run.json), when it says
    if os.path.exists(os.path.join(os.path.dirname(sft_dir), "run.json")):
        with open(os.path.join(os.path.dirname(sft_dir), "run.json")) as f:
            sft_run = {k: v for k, v in json.load(f).items() if k in ("experiment", "git_revision", "started")}
    results: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": machine, "versions": versions, "git": git_revision(), "sft": sft_dir,
                     "sft_run": sft_run, "sft_model": sft_model, "sft_params": sft_param_count(sft_model), "workdir": workdir,
                     "settings": dataclasses.asdict(s),
                     "configs": {k: dataclasses.asdict(c) for k, c in stage_configs(s, workdir).items()},
                     "methods": {}}
    for method in (REFERENCE, *methods):
        progress(f"[{time.perf_counter() - t_start:.0f}s] {method} (log: {workdir}/{method}.log)")
        x = results["methods"][method] = run(method, workdir, timeout)
        progress(f"[{time.perf_counter() - t_start:.0f}s] {method}: "
                 + (x["error"][-300:] if "error" in x else
                    f"held-out accuracy {x['evaluation']['accuracy']:.3f} ({x['process_seconds']:.0f} s)"))
    results["loadavg_end"] = os.getloadavg()
    results["runtime_s"] = time.perf_counter() - t_start
    return results


# ---------------------------------------------------------------------------
# The report


def _f(x, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _load(x) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in x) + ")"


HEAD = ["method", "held-out accuracy, 7 tasks", *ALL_TASKS, "KL to SFT (nats)", "win rate vs SFT",
        "sampled accuracy", "completions sampled", "tokens sampled", "optimizer steps", "training s", "total s"]
TIMES = 2  # the last cells of a row: wall times


def row_cells(r: dict, name: str) -> list[str]:
    """One method's table row (the SFT model's: its own figures, 0 and 0.5 against itself)."""
    x = r["methods"][name]
    e = x["evaluation"]
    cells = [name, _f(e["accuracy"]), *(_f(e["by_task"].get(t), "{:.2f}") for t in ALL_TASKS)]
    if name == REFERENCE:
        # Every method's win_rate sampled the SFT model with the same keys: its score is one number.
        sft_sampled = next((y["evaluation"]["sampled_accuracy_sft"] for y in r["methods"].values()
                            if "sampled_accuracy_sft" in y.get("evaluation", {})), None)
        cells += ["0 (itself)", "0.5 (itself)", _f(sft_sampled), "-", "-", "-", "-"]
    else:
        sm = x["sampled"]
        cells += [_f(e["kl_to_sft"], "{:.2f}"), _f(e["win_rate"]), _f(e["sampled_accuracy"]),
                  f"{sm['completions']:,}", f"{sm['tokens']:,}", str(x["optimizer_steps"]),
                  f"{x['training_seconds']:.0f}"]
    return cells + [f"{x['process_seconds']:.0f}"]


def table(r: dict) -> list[str]:
    """The results table: one row for the SFT model, one per method (a failed one says so)."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for name, x in r["methods"].items():
        cells = [name, "failed: see below", *[""] * (len(HEAD) - 2)] if "error" in x else row_cells(r, name)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reading(r: dict) -> list[str]:
    """Sentences that restate the table's numbers (computed, so they follow the run)."""
    ms = {k: v for k, v in r["methods"].items() if "error" not in v}
    if REFERENCE not in ms:
        return []
    base = ms[REFERENCE]["evaluation"]
    n = base["evaluated"]
    trained = {k: v for k, v in ms.items() if k != REFERENCE}
    if not trained:
        return []
    p = base["accuracy"]
    se = float(np.sqrt(p * (1 - p) / n))
    tasks = r["settings"]["tasks"]
    out = []
    deltas = {k: v["evaluation"]["accuracy"] - p for k, v in trained.items()}
    order = sorted(deltas, key=deltas.get, reverse=True)
    out.append(f"- Held-out accuracy (greedy, {n} items over 7 tasks): SFT {p:.3f}; "
               + ", ".join(f"{k} {trained[k]['evaluation']['accuracy']:.3f} ({deltas[k]:+.3f}, "
                           f"{round(deltas[k] * n):+d} items)" for k in order) + ".")
    big = [k for k in order if abs(deltas[k]) > 2 * se]
    out.append(f"- One standard error of an accuracy near SFT's is sqrt(p(1-p)/{n}) = {se:.3f}; changes larger "
               f"than two ({2 * se:.3f}): {', '.join(f'{k} ({deltas[k]:+.3f})' for k in big) or 'none'}. "
               "Each method ran once, with one seed.")

    def mean_of(e):
        vals = [e["by_task"].get(t) for t in tasks]
        return None if any(v is None for v in vals) else float(np.mean(vals))
    b = mean_of(base)
    if b is not None:
        out.append(f"- On the trained tasks ({', '.join(tasks)}; mean of the three accuracies): SFT {b:.3f}; "
                   + ", ".join(f"{k} {_f(mean_of(trained[k]['evaluation']))}" for k in order) + ".")
    moved = [f"{k} {t} {trained[k]['evaluation']['by_task'][t] - base['by_task'][t]:+.2f}" for k in order
             for t in ALL_TASKS if None not in (trained[k]["evaluation"]["by_task"].get(t), base["by_task"].get(t))
             and abs(trained[k]["evaluation"]["by_task"][t] - base["by_task"][t]) >= 0.1 - 1e-9]
    out.append("- Tasks that moved by 0.10 or more from SFT (64 items each, so 0.10 is 6-7 items): "
               + (", ".join(moved) or "none") + ".")
    kl = {k: v["evaluation"]["kl_to_sft"] for k, v in trained.items() if v["evaluation"].get("kl_to_sft") is not None}
    if kl:
        out.append("- KL to SFT (nats per sampled response to the held-out instructions), low to high: "
                   + ", ".join(f"{k} {kl[k]:.2f}" for k in sorted(kl, key=kl.get)) + ".")
    wins = {k: v["evaluation"]["win_rate"] for k, v in trained.items() if v["evaluation"].get("win_rate") is not None}
    if wins:
        kp = next(iter(trained.values()))["evaluation"].get("kl_prompts")
        out.append(f"- Win rate against SFT ({kp} held-out prompts, one sample each, ties half): "
                   + ", ".join(f"{k} {wins[k]:.3f}" for k in sorted(wins, key=wins.get, reverse=True))
                   + f"; sampled accuracy on them: SFT {next(iter(trained.values()))['evaluation']['sampled_accuracy_sft']:.3f}, "
                   + ", ".join(f"{k} {trained[k]['evaluation']['sampled_accuracy']:.3f}" for k in order) + ".")
    sampled = {k: v["sampled"] for k, v in trained.items()}
    comps = {v["completions"] for v in sampled.values()}
    slots = {v["token_slots"] for v in sampled.values()}
    if len(comps) == 1 and len(slots) == 1:
        out.append(f"- Every method sampled {comps.pop():,} completions for training ({slots.pop():,} token "
                   "positions of the fixed-length sampler); the real tokens, up to and including each "
                   "eos, ranged from " + ", ".join(f"{k} {sampled[k]['tokens']:,}"
                                                   for k in sorted(sampled, key=lambda k: sampled[k]['tokens']))
                   + ".")
    else:
        out.append("- The methods did NOT sample the same number of completions: "
                   + ", ".join(f"{k} {v['completions']:,}" for k, v in sampled.items()) + ".")
    G = r["settings"]["group_size"]
    shown = {k: row_cells(r, k)[1:-TIMES] for k in trained}  # the row as printed, times aside
    same = [(a, b) for i, a in enumerate(trained) for b in list(trained)[i + 1:] if shown[a] == shown[b]]
    for a, b in same:
        line = f"- {a} and {b} gave the same row."
        ua, ub = trained[a].get("updates"), trained[b].get("updates")
        if ua and ub:
            line += (f" Their mean |advantage| was {ua['advantage_abs_mean']:.4f} and {ub['advantage_abs_mean']:.4f} "
                     f"(ratio {ua['advantage_abs_mean'] / ub['advantage_abs_mean']:.3f}; G/(G-1) = "
                     f"{G / (G - 1):.3f}), and the gradient norm exceeded clip_norm "
                     f"{ua['clip_norm']:g} in {ua['clipped_steps']} and {ub['clipped_steps']} of {ua['steps']} steps "
                     f"(smallest {ua['grad_norm_min']:.2f} and {ub['grad_norm_min']:.2f}).")
        out.append(line)
    t = {k: v["training_seconds"] for k, v in trained.items()}
    out.append("- Training wall time, fast to slow: " + ", ".join(f"{k} {t[k]:.0f} s" for k in sorted(t, key=t.get))
               + " (a shared machine: see the load averages).")
    return out


def report(r: dict) -> str:
    m, v, s = r["machine"], r["versions"], r["settings"]
    lines: list[str] = []
    w = lines.append
    w("# RL methods from one SFT model on one sampling budget\n")
    w(f"Generated by `benchmarks/rl_compare.py` on {r['date']}; the run took {r['runtime_s']:.0f} s. "
      "To measure again:\n")
    w("```")
    w(r["command"])
    w("```\n")
    w(f"**A shared machine**: {m['cores']} cores shared with other jobs; the load average (1, 5, 15 min) was "
      f"{_load(m['loadavg_start'])} at the start and {_load(r['loadavg_end'])} at the end (each method's below), "
      "so the wall times are indicative only.\n")
    g = r["configs"]["grpo"]
    w("## Setup\n")
    run = r.get("sft_run") or {}
    made = (f", made by `experiments.{run['experiment']}` (started {run.get('started', '?')}, git "
            f"{run.get('git_revision', '?')})" if run.get("experiment") else "")
    w(f"- Start: the SFT stage `{r['sft']}` ({r['sft_params']:,} parameters){made}, for every method.")
    w(f"- Prompts: training-split instructions of the built-in tasks {', '.join(s['tasks'])} "
      f"(`verifiers.builtin_records({s['records']}, {s['seed']}, \"train\", tasks)`), one prompt stream "
      f"(`grpo.GroupPromptLoader`, seed {s['seed']}): step i of every method has the same {s['prompts']} prompts.")
    w(f"- Reward: the verifier `{s['verifier']}` (`builtin.score_instruction`: 1 right, 0 wrong).")
    w(f"- Budget: {s['steps']} steps x {s['prompts']} prompts x {s['group_size']} completions, at most "
      f"{s['max_new_tokens']} new tokens, temperature {g['temperature']}.")
    w(f"- grpo, dr_grpo, rloo, reinforce: the GRPO stage with the main job's config except the algorithm, "
      f"{s['prompts']} prompts a step and dynamic sampling {'on' if s['dynamic_sampling'] else 'off'} for all "
      f"four: lr {g['optim']['lr']:g} ({g['optim']['warmup_steps']} warmup steps, cosine to "
      f"{g['optim']['lr'] * g['optim']['end_lr_ratio']:g}), "
      f"clip_norm {g['optim']['clip_norm']:g}, weight decay {g['optim']['weight_decay']:g}, "
      f"{g['updates']} update x {g['minibatches']} minibatch a step, clip {g['clip_eps']:g}, KL coefficient "
      f"{g['kl_coef']:g}. Dynamic sampling is off because it samples a second round when too many of the "
      "policy's own groups are flat, so the budget would differ between the four, and PPO and DPO have no "
      "such filter.")
    p = r["configs"]["ppo"]
    w(f"- ppo: `ppo.make_ppo_step` with `score_fn` = the verifier (the library's `ppo.stage` takes a reward "
      "model only, so the benchmark declares a `runner.Stage` around the library's step: `ppo_stage`, "
      f"`program_scores`). Rollout batch {p['ppo']['rollout_batch']} = the same {s['prompts']} prompts each "
      f"repeated {s['group_size']} times; value model = the SFT model with a fresh scalar head; the main job's "
      f"PPO config: lr {p['optim']['lr']:g} (cosine to {p['optim']['lr'] * p['optim']['end_lr_ratio']:g}), "
      f"{p['ppo']['epochs']} epochs x {p['ppo']['minibatches']} minibatches a rollout, kl_coef "
      f"{p['ppo']['kl_coef']:g} (fixed, the main job's), vf_coef {p['ppo']['vf_coef']:g}, whitened GAE "
      f"advantages (gamma {p['ppo']['gamma']:g}, lambda {p['ppo']['lam']:g}).")
    d = r["configs"]["dpo"]
    dm = r["methods"].get("dpo", {})
    pairs = dm.get("sampled", {}).get("pairs")
    w(f"- dpo: the SFT model sampled {s['group_size']} completions for each prompt of the same {s['steps']} "
      "batches (the GRPO stage's sampler, verifier and keys); each prompt with a right and a wrong completion "
      "gave one pair (its first right one chosen, its first wrong one rejected)"
      + (f": {pairs} pairs from {dm['sampled']['groups']} prompts (none from: "
         + ", ".join(f"{k} {c}" for k, c in dm["sampled"]["groups_without_pair"].items()) + ")" if pairs else "")
      + f". The DPO stage trained on them with the main job's config: lr {d['optim']['lr']:g}, "
      f"{d['optim']['warmup_steps']} warmup steps, beta {d['beta']:g}, {d['train']['batch_size']} packed rows of "
      f"{d['train']['seq_len']} tokens a step, {d['train']['steps']} optimizer steps"
      + (f" ({dm['pairs_read']:,} pairs read, {dm['pairs_read'] / pairs:.1f} passes over them; "
         f"{dm['pairs_used']:,} distinct pairs used)" if pairs and dm.get("pairs_read") else "") + ".")
    w(f"- Held-out accuracy: `evals.instruction_accuracy(per_task={s['eval_per_task']}, seed={s['eval_seed']})`, "
      "greedy, all seven tasks. KL to SFT, win rate and sampled accuracy: `evals.win_rate` against the SFT "
      f"model on `evals.instruction_records({s['kl_per_task']}, {s['eval_seed']})`, temperature 1, the same keys "
      f"for both models, up to {s['kl_max_new_tokens']} new tokens, judged by `evals.builtin_judge`. The KL is "
      "a Monte-Carlo estimate (the mean over the policy's samples of the summed log-ratio), which can come out "
      "below 0 for a policy close to SFT.")
    w("- Completions and tokens sampled: counted from each run (GRPO and PPO: every step's logged "
      "`response_length` and `no_eos_fraction`; DPO: its samples); tokens are the real ones up to and including "
      "each eos. Training s: the stage's training loop (rollouts included); for DPO plus its sampling and "
      "reference pass. Total s: the method's whole process (start-up, loading, compiling, evaluating).\n")
    w("## Results\n")
    lines += table(r)
    w("")
    w("## Reading\n")
    lines += reading(r)
    w("")
    w("## Details\n")
    for name, x in r["methods"].items():
        if "error" in x:
            w(f"- {name}: FAILED ({x['log']}):\n\n```\n{x['error'][-1500:]}\n```")
            continue
        bits = [f"load average {_load(x['loadavg_start'])} -> {_load(x['loadavg_end'])}",
                f"evaluation {x['evaluation']['eval_seconds']:.0f} s"]
        tr = x.get("train_reward")
        if tr:
            what = "implicit-reward accuracy on the pairs" if name == "dpo" else "mean training reward"
            bits.append(f"{what} {tr['first']:.3f} (first 10 steps) -> {tr['last']:.3f} (last 10)")
        u = x.get("updates")
        if u:
            bits.append(f"mean |advantage| {u['advantage_abs_mean']:.4f}, gradient norm median "
                        f"{u['grad_norm_median']:.2f} (above clip_norm {u['clip_norm']:g} in {u['clipped_steps']} of "
                        f"{u['steps']} steps)")
        if name == "dpo":
            bits.append(f"sampling {x['sampled']['sample_seconds']:.0f} s, reference pass "
                        f"{x['reference_seconds']:.0f} s, DPO loop {x['train_seconds']:.0f} s")
        w(f"- {name}: " + "; ".join(bits) + ".")
    w("")
    w("## Machine and versions\n")
    w(f"- CPU: {m['cpu_model']}; {m['cores']} cores visible; RAM {m['ram_bytes'] / 2**30:.1f} GiB; {m['platform']}")
    w(f"- python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']}, numpy {v['numpy']}; "
      f"git {r.get('git', 'unknown')}")
    w("- one CPU device, float32\n")
    return "\n".join(lines)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", help="the SFT stage directory of a finished main job (only read), e.g. runs/demo/sft")
    ap.add_argument("--workdir", help="a new or empty directory for the runs (default: a fresh one under /tmp)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=Settings.steps, help="sampling steps of every method")
    ap.add_argument("--eval-per-task", type=int, default=Settings.eval_per_task)
    ap.add_argument("--kl-per-task", type=int, default=Settings.kl_per_task)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds a method's process may take")
    ap.add_argument("--in-process", action="store_true",
                    help="every method in this one process (checks that it runs; times are not each method's own)")
    ap.add_argument("--out", default=os.path.join(HERE, "RL_COMPARE.md"),
                    help="the report (default benchmarks/RL_COMPARE.md); the JSON goes beside it")
    ap.add_argument("--report-only", metavar="JSON", help="measure nothing: re-render --out from a saved JSON")
    ap.add_argument("--worker", metavar="METHOD", help="internal: run one method in this process")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.workdir)
        return 0
    if args.report_only:
        common.rerender(args.report_only, args.out, report)
        return 0
    if not args.sft:
        ap.error("--sft is required (the SFT stage directory of a finished main job)")
    methods = args.methods.split(",")
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="rl_compare-")
    if os.path.isdir(workdir) and os.listdir(workdir):
        ap.error(f"--workdir {workdir} is not empty: the runner would reuse finished stages; give a new one")
    command = common.rerun_command("benchmarks.rl_compare", argv)
    s = Settings(steps=args.steps, eval_per_task=args.eval_per_task, kl_per_task=args.kl_per_task)
    results = measure(args.sft, workdir, s, methods, timeout=args.timeout,
                      run=run_here if args.in_process else run_worker,
                      progress=lambda line: print(line, flush=True))
    results["command"] = command
    common.save_report(args.out, results, report)
    return 1 if any("error" in x for x in results["methods"].values()) else 0


def sft_param_count(model_dict: dict) -> int:
    """Parameters of the SFT model (abstract init: nothing is computed)."""
    import functools
    import jax
    from llm_jax import generate, model
    cfg = generate.model_config_from_dict(model_dict, "sft config.json")
    return model.count_params(jax.eval_shape(functools.partial(model.init, cfg), jax.random.PRNGKey(0)))


if __name__ == "__main__":
    raise SystemExit(main())
