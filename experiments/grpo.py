"""RL from verifiable rewards: GRPO (or Dr. GRPO, DAPO, RLOO, REINFORCE) from an earlier stage or a HF model.

    python -m experiments.grpo --workdir runs/grpo --set init_from=runs/demo/sft \\
        [--set grpo.algorithm=dr_grpo --set grpo.train.steps=200 ...]
    python -m experiments.grpo --workdir runs/grpo --set init_from=runs/base/sft \\
        --set data=jsonl:prompts.jsonl --set verifier=my_rewards:exact_match \\
        [--set heldout=jsonl:heldout.jsonl] [--set export_dir=out/hf_model]
    python -m experiments.grpo --workdir runs/grpo_hf --set init_from=hf:path/to/Llama-3.2-1B \\
        --set data=jsonl:prompts.jsonl --set verifier=my_rewards:exact_match \\
        --set lora.rank=8 [--set model.dtype=bfloat16] --set export_dir=out/hf_model

Prompts and rewards: by default the built-in instruction tasks ("Translate Blume
from German to English.", "Reverse: a b c", ...; their training split, never
the held-out items) scored by the built-in programs (`verifier=builtin`). With
`data=jsonl:PATH`, one `{"prompt", "answer", ...}` record per line (a bad line
is skipped and counted with its line number), scored by `verifier=module:function`,
a Python function (prompt, completion, record) -> float importable from the
working directory (`llm_jax.verifiers`). A verifier that does not import is an
error before anything runs; one that raises or returns a non-number names the
record.

`init_from` names a stage directory of an earlier llm_jax run (its
checkpoints/, its config.json's model, and the run's tokenizer/ beside it), or
`hf:DIR` a local Hugging Face directory (config.json, safetensors and
tokenizer.json; Llama, Mistral or GPT-2): the architecture then comes from
DIR/config.json and only how to compute (model.dtype, param_dtype, remat,
scan_layers, attention_impl, dropout) from this config, the vocabulary growing
by the prompt template's <prompt>/<response> tokens (`llm_jax.hf.init_config`).
Without it the model starts from random weights with `model` and a byte
tokenizer - a smoke test, not real use.

LoRA (`--set lora.rank=8 --set lora.targets='["q","v"]'`, see llm_jax/lora.py):
only low-rank adapters train, over the frozen initial weights, which are also
the KL reference (grpo.kl_coef > 0) without a second copy; the stage's
checkpoints hold the adapters and their optimizer state, and the evaluation
after training and the export see the merged model.

Evaluation before and after: on the built-in tasks, held-out instruction
accuracy (`evals.instruction_accuracy`, total and per task, greedy); on user
data with `heldout=jsonl:PATH`, the mean verifier reward and the share of
successes of greedy completions of those records. `export_dir` writes the final
policy (LoRA merged) as a Hugging Face directory with the tokenizer. Rerun the
command to resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax

from llm_jax import cli, evals, generate, hf, launch, lora, sharding, verifiers
from llm_jax.config import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.data.tokenizer import ByteTokenizer, load_hf_tokenizer, load_tokenizer
from llm_jax.errors import ConfigError
from llm_jax.rundir import is_primary, parse_args, say, write_run_json
from llm_jax.stages import grpo, runner

MODEL = ModelConfig(vocab_size=ByteTokenizer.vocab_size, d_model=128, num_layers=4, num_heads=4,
                    d_ff=512, max_len=256)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = MODEL  # without init_from (a stage's is its own; hf:DIR's takes the runtime fields)
    mesh: MeshConfig = MeshConfig()
    init_from: str = ""  # a stage directory of an earlier run (e.g. runs/demo/sft), or hf:DIR
    data: str = "builtin"  # "builtin" (instruction tasks) or jsonl:PATH of {"prompt", "answer", ...}
    verifier: str = verifiers.BUILTIN  # "builtin" or module:function
    heldout: str = ""  # jsonl:PATH of held-out records (user data): mean verifier reward before/after
    builtin_prompts: int = 20_000  # built-in training prompts drawn
    tasks: tuple[str, ...] = ()  # built-in tasks to train on; empty: all
    grpo: grpo.GRPOConfig = grpo.GRPOConfig(
        optim=OptimizerConfig(lr=1e-4, warmup_steps=0, weight_decay=0.0, clip_norm=1.0),
        train=TrainConfig(steps=40, log_every=5, seed=5, spike_factor=0.0),
        group_size=8, prompts=16, max_new_tokens=48)
    eval_per_task: int = 16  # built-in held-out instructions per task (the pipeline's)
    eval_seed: int = 1234  # the pipeline's, so the numbers compare with its SFT stage
    eval_max_new_tokens: int = 64  # heldout=jsonl: greedy completion budget
    lora: lora.LoRAConfig = lora.LoRAConfig()  # rank > 0: only adapters train, the base frozen
    export_dir: str = ""  # a Hugging Face directory for the final policy (LoRA merged)


def jsonl_path(value: str, field: str) -> str:
    if not value.startswith("jsonl:") or not value[len("jsonl:"):]:
        raise ConfigError(f"{field}={value!r}: expected jsonl:PATH (a file of {{\"prompt\", \"answer\", ...}} lines)")
    return value[len("jsonl:"):]


def init_stage(cfg: Config) -> tuple[str, str] | None:
    """(workdir, stage) of an init_from stage directory, or None (none, or hf:DIR)."""
    if not cfg.init_from or hf.init_dir(cfg.init_from) is not None:
        return None
    path = os.path.normpath(cfg.init_from)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"init_from={cfg.init_from}: no config.json there; give a stage directory of an "
                          "earlier run, e.g. runs/demo/sft")
    return os.path.dirname(path) or ".", os.path.basename(path)


def model_and_tokenizer(cfg: Config):
    """The initial model's config and tokenizer: the HF checkpoint's (hf:DIR), the
    initial stage's and its run's, or `model` and bytes."""
    directory = hf.init_dir(cfg.init_from)
    if directory is not None:
        tok = load_hf_tokenizer(directory)
        return hf.init_config(directory, cfg.model, Config().model, tok.vocab_size), tok
    src = init_stage(cfg)
    if src is None:
        return cfg.model, ByteTokenizer()
    config_path = os.path.join(*src, "config.json")
    with open(config_path) as f:
        model_cfg = generate.model_config_from_dict(json.load(f)["model"], config_path)
    return model_cfg, load_tokenizer(os.path.join(src[0], "tokenizer"))


def training_records(cfg: Config) -> list[dict]:
    if cfg.data == "builtin":
        return verifiers.builtin_records(cfg.builtin_prompts, cfg.grpo.train.seed, "train", cfg.tasks or None)
    read = verifiers.read_records(jsonl_path(cfg.data, "data"))
    if read.skipped.total:
        say(f"data: {cfg.data}: skipped {read.skipped.total} bad lines: {read.skipped.summary()}")
    return read.records


def evaluation(cfg: Config, model_cfg: ModelConfig, tok, when: str):
    """params -> held-out numbers named *_<when>."""
    fn = verifiers.load_verifier(cfg.verifier)

    def run(params) -> dict:
        host = runner.host_params(params)
        if cfg.data == "builtin":
            acc = evals.instruction_accuracy(model_cfg, host, tok, per_task=cfg.eval_per_task, seed=cfg.eval_seed,
                                             tasks=cfg.tasks or None)
            return {f"instruction_accuracy_{when}": acc["accuracy"], f"by_task_{when}": acc["by_task"],
                    f"eos_rate_{when}": acc["eos_rate"]}
        if not cfg.heldout:
            return {}
        records = verifiers.read_records(jsonl_path(cfg.heldout, "heldout")).records
        got = grpo.heldout_reward(model_cfg, host, tok, records, fn, cfg.verifier,
                                  max_new_tokens=cfg.eval_max_new_tokens)
        return {f"heldout_reward_{when}": got["reward"], f"heldout_accuracy_{when}": got["accuracy"]}
    return run


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    if cfg.data != "builtin":
        jsonl_path(cfg.data, "data")
    else:
        verifiers.check_tasks(cfg.tasks)
    if cfg.heldout:
        jsonl_path(cfg.heldout, "heldout")
    model_cfg, tok = model_and_tokenizer(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_model_fits_mesh(model_cfg, mesh)
    like = runner.model_like(model_cfg, mesh)
    src, directory = init_stage(cfg), hf.init_dir(cfg.init_from)

    def init():
        """The initial weights (with LoRA also the frozen base the export merges into)."""
        if directory is not None:
            params = hf.init_params(directory, model_cfg)
        elif src is not None:
            params = generate.load_stage(*src)[1]
        else:
            return runner.fresh_params(model_cfg, mesh, cfg.grpo.train.seed)
        return jax.device_put(params, jax.tree.map(lambda x: x.sharding, like))

    # The stage is declared (config, LoRA and verifier checked) before anything is written.
    stage = grpo.stage(model_cfg, cfg.grpo, tok, mesh, init=init, records=lambda: training_records(cfg),
                       verifier=cfg.verifier, before=evaluation(cfg, model_cfg, tok, "before"),
                       after=evaluation(cfg, model_cfg, tok, "after"), lora=cfg.lora)
    write_run_json(workdir, cfg, "grpo")
    if is_primary():
        tok.save(os.path.join(workdir, "tokenizer"))
    if not cfg.init_from:
        say("init_from is empty: GRPO starts from random weights (a smoke test, not real use)")
    result = runner.run(workdir, stage, mesh)
    if result is None:
        return 0
    for key in ("instruction_accuracy", "heldout_reward", "heldout_accuracy"):
        if f"{key}_before" in result:
            say(f"grpo: {key.replace('_', ' ')} {result[f'{key}_before']:.3f} -> {result[f'{key}_after']:.3f}")
    if "by_task_after" in result:
        say("grpo: by task " + ", ".join(f"{t} {result['by_task_before'][t]:.2f} -> {v:.2f}"
                                         for t, v in result["by_task_after"].items()))
    if cfg.export_dir:
        if cfg.lora.enabled:  # the checkpoints hold the adapters: merged into the weights they trained on
            final = lora.load_merged(os.path.join(workdir, "grpo", "checkpoints"), init(), cfg.lora, model_cfg, mesh)
        else:
            final = runner.stage_params(workdir, "grpo", like)
        policy = runner.host_params(final)
        if is_primary():
            family = hf.save_pretrained(cfg.export_dir, model_cfg, policy, tokenizer=tok)
            say(f"export: the GRPO policy as a Hugging Face {family} model in {cfg.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
