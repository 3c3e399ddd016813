"""Sampling with a KV cache: greedy, temperature, top-k, top-p, batched.

Prompts of different lengths are left-padded so every row's next token lands in
the same cache slot; padding carries segment 0 (never attended to) and positions
count from each row's first real token, so a padded row decodes exactly as it
would alone. The whole decode loop is one `lax.scan` inside one jit.

From the command line, sample from any trained stage of a run directory
(prompts go through the instruction template unless --raw, the default for
pretrain; one JSON line {"prompt", "completion"} per prompt):

    python -m llm_jax.generate --workdir runs/demo --stage sft "Translate Blume from German to English."
    python -m llm_jax.generate --workdir runs/demo --stage pretrain --temperature 0.8 $'Katze -> cat\\nHund ->'
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llm_jax import checkpoint, cli, model
from llm_jax.config import ModelConfig
from llm_jax.data import formats
from llm_jax.data.tokenizer import check_vocab_fits, load_tokenizer
from llm_jax.errors import ConfigError, InputError, TokenizerError


def left_pad(prompts: list[list[int]], pad_id: int, pad_to: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens [B, P] and a 0/1 real-token mask [B, P], P = max(longest prompt, pad_to)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        empty = "no prompts" if not prompts else f"prompt {[len(p) for p in prompts].index(0)} is empty"
        raise InputError(f"{empty}: every prompt needs at least one token (e.g. the tokenizer's bos)")
    width = max(pad_to, max(len(p) for p in prompts))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return tokens, mask


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """[B, V] float32 -> logits with everything outside top-k / the top-p nucleus at -inf."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "use_cache"))
def _sample(config: ModelConfig, params, tokens, mask, rng, *, max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, eos_id: int, use_cache: bool = True):
    B, P = tokens.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    next_pos = positions[:, -1] + 1  # [B]

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)

    keys = jax.random.split(rng, max_new_tokens)
    if use_cache:
        cache = model.init_cache(config, B, P + max_new_tokens)
        logits, cache = model.apply_with_cache(config, params, tokens, cache, positions=positions,
                                               segment_ids=mask)
        first = pick(logits[:, -1], keys[0])

        def step(carry, key):
            cache, tok, pos, done = carry
            logits, cache = model.apply_with_cache(config, params, tok[:, None], cache,
                                                   positions=pos[:, None],
                                                   segment_ids=jnp.ones((B, 1), jnp.int32))
            new = pick(logits[:, -1], key)
            new = jnp.where(done, eos_id, new)
            return (cache, new, pos + 1, done | (new == eos_id)), new

        carry = (cache, first, next_pos, first == eos_id)
        _, rest = jax.lax.scan(step, carry, keys[1:])
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    # Without a cache: re-run the whole (growing, fixed-size) buffer every step.
    # Only for benchmarks/tests of the cache; O(T^2) work.
    buf = jnp.concatenate([tokens, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    seg = jnp.concatenate([mask, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    pos = jnp.concatenate([positions, next_pos[:, None] + jnp.arange(max_new_tokens)], axis=1)

    def step_nocache(carry, xs):
        buf, seg, done = carry
        i, key = xs
        logits = model.apply(config, params, buf, positions=pos, segment_ids=seg)
        last = jax.lax.dynamic_index_in_dim(logits, P + i - 1, axis=1, keepdims=False)
        new = jnp.where(done, eos_id, pick(last, key))
        buf = jax.lax.dynamic_update_index_in_dim(buf, new, P + i, axis=1)
        seg = jax.lax.dynamic_update_index_in_dim(seg, jnp.ones((B,), jnp.int32), P + i, axis=1)
        return (buf, seg, done | (new == eos_id)), new

    _, out = jax.lax.scan(step_nocache, (buf, seg, jnp.zeros((B,), bool)),
                          (jnp.arange(max_new_tokens), keys))
    return out.T


def generate(config: ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int,
             rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int = -1, pad_id: int = 0,
             use_cache: bool = True, pad_to: int = 0) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens (stopping at eos_id).

    temperature 0 is greedy. Returns the new tokens per prompt, eos excluded (a
    row shorter than `max_new_tokens` stopped at eos). `pad_to` left-pads to at
    least that width: calls with the same (rows, width) reuse one compiled
    program, which matters when an evaluation runs many batches."""
    if temperature < 0:
        raise InputError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p={top_p}: must lie in (0, 1] (1 keeps every token)")
    if top_k < 0:
        raise InputError(f"top_k={top_k}: must be >= 0 (0 keeps every token)")
    if max_new_tokens < 1:  # _sample reads its first key before any step: it used to fail with an IndexError
        raise InputError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    tokens, mask = left_pad(prompts, pad_id, pad_to)
    longest = max(len(p) for p in prompts) + max_new_tokens
    if config.positions == "learned" and longest > config.max_len:
        raise InputError(f"prompt + max_new_tokens = {longest} exceeds model.max_len={config.max_len}; "
                         "shorten the prompt or lower max_new_tokens")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out = np.asarray(_sample(config, params, jnp.asarray(tokens), jnp.asarray(mask), rng,
                             max_new_tokens=max_new_tokens, temperature=float(temperature),
                             top_k=int(top_k), top_p=float(top_p), eos_id=int(eos_id),
                             use_cache=use_cache))
    results = []
    for row in out.tolist():
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results


# ---------------------------------------------------------------------------
# Command line: sample from a trained stage of a run directory.
#
#     python -m llm_jax.generate --workdir runs/demo --stage sft "Translate Blume from German to English."

CLI_DESCRIPTION = "Sample completions from a trained stage of a run directory."


def model_config_from_dict(d: dict, where: str) -> ModelConfig:
    """A stage's saved `model` section (JSON) -> ModelConfig.

    JSON has no tuples, so list values of tuple-typed fields become tuples; an
    unknown field (a config from another version) is an error naming it."""
    hints = typing.get_type_hints(ModelConfig)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: model fields {unknown} are not ModelConfig fields "
                          f"(written by another version of llm_jax?)")
    kwargs = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name in d:
            v = d[f.name]
            is_tuple = hints[f.name] is tuple or typing.get_origin(hints[f.name]) is tuple
            kwargs[f.name] = tuple(v) if is_tuple and isinstance(v, list) else v
    try:
        return ModelConfig(**kwargs).validate()
    except TypeError as e:
        raise ConfigError(f"{where}: bad model section: {e}") from None


def _saved_params_tree(ckpt_dir: str, step: int | None) -> tuple[int, dict]:
    """(step, metadata tree of the saved `params`) without reading any array."""
    if not os.path.isdir(ckpt_dir):
        raise checkpoint.CheckpointError(f"no checkpoints at {ckpt_dir}: has that stage run?")
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers=checkpoint._handlers(),
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise checkpoint.CheckpointError(f"no finished checkpoint in {ckpt_dir}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise checkpoint.CheckpointError(f"--step {step}: {ckpt_dir} has steps {steps}")
        meta = manager.item_metadata(step)[checkpoint.STATE]
        tree = getattr(meta, "tree", meta)
        return step, (tree["params"] if isinstance(tree, dict) else tree.params)
    finally:
        manager.close()


def load_stage(workdir: str, stage: str, step: int | None = None, *, decoder_only: bool = True):
    """(model config, LM params on one device, tokenizer, step) of a run's stage.

    The stage's params are the LM params themselves (pretrain, sft, dpo) or a
    dict holding them under "policy" (ppo, whose other entries, e.g. the value
    model, are loaded and dropped). A scalar model ("model" + "head": the reward
    model) has no LM head to sample from, and a LoRA stage's checkpoints hold only
    adapters: ConfigError. `decoder_only=False` also loads encoders (for export;
    they cannot generate)."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: no such directory")
    stage_dir = os.path.join(workdir, stage)
    config_path = os.path.join(stage_dir, "config.json")
    if not os.path.exists(config_path):
        found = sorted(d for d in os.listdir(workdir)
                       if os.path.exists(os.path.join(workdir, d, "config.json")))
        raise ConfigError(f"--stage {stage}: no {config_path}; stages in {workdir}: {found or 'none'}")
    try:
        with open(config_path) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config_path}: not a readable JSON file ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ConfigError(f"{config_path} has no 'model' section")
    cfg = model_config_from_dict(saved["model"], config_path)
    lora = saved.get("lora")
    if isinstance(lora, dict) and isinstance(lora.get("rank"), int) and lora["rank"] > 0:
        raise ConfigError(f"--stage {stage}: trained with LoRA (lora.rank={lora['rank']} in {config_path}), "
                          "so its checkpoints hold only the adapters over a frozen base, not a model; to "
                          "get the merged model, rerun the experiment that trained it (experiments.llama_sft_dpo or "
                          "experiments.grpo) with --set export_dir=DIR (it writes the final policy, LoRA merged, "
                          "as a Hugging Face directory)")
    if decoder_only and not cfg.causal:
        raise ConfigError(f"--stage {stage}: model.causal=False (an encoder) cannot generate text")
    try:
        tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
        check_vocab_fits(tok, cfg.vocab_size)
    except (FileNotFoundError, TokenizerError) as e:
        raise ConfigError(str(e)) from None

    ckpt_dir = os.path.abspath(os.path.join(stage_dir, "checkpoints"))
    step, saved_params = _saved_params_tree(ckpt_dir, step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    lm = jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))
    lm = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), lm)
    keys = set(saved_params) if isinstance(saved_params, dict) else set()
    if {"model", "head"} <= keys:
        raise ConfigError(f"--stage {stage}: its params are a scalar model or a classifier (model + "
                          "head, e.g. the reward model), which has no LM head to generate with or export")
    if "policy" in keys:  # ppo: load the whole tree (names checked), keep the policy
        def like_saved(leaf):
            return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=device)
        abstract = {k: lm if k == "policy" else jax.tree.map(like_saved, v) for k, v in saved_params.items()}
        params = checkpoint.load_params(ckpt_dir, abstract, step)["policy"]
    else:
        params = checkpoint.load_params(ckpt_dir, lm, step)
    return cfg, params, tok, step


def _parse_cli(argv):
    parser = argparse.ArgumentParser(prog="python -m llm_jax.generate", description=CLI_DESCRIPTION,
                                     epilog="Prints one JSON line {\"prompt\", \"completion\"} per prompt.")
    parser.add_argument("--workdir", required=True, help="run directory (python -m experiments.NAME --workdir)")
    parser.add_argument("--stage", required=True, help="stage directory inside it: pretrain, sft, dpo, ppo, ...")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--raw", action=argparse.BooleanOptionalAction, default=None,
                        help="continue the text as is ([bos] text) instead of wrapping it in the "
                             "instruction template; default: raw for stage 'pretrain' only")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_cli(argv)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0 or not 0.0 < args.top_p <= 1.0 or args.top_k < 0:
        raise ConfigError(f"bad sampling settings: --temperature {args.temperature}, --top-k {args.top_k}, "
                          f"--top-p {args.top_p} (need temperature >= 0, top-k >= 0, 0 < top-p <= 1)")
    cfg, params, tok, _ = load_stage(args.workdir, args.stage, args.step)
    raw = args.stage == "pretrain" if args.raw is None else args.raw
    prompts = [[tok.bos_id, *tok.encode(p)] if raw else formats.prompt_tokens(tok, p) for p in args.prompts]
    for i, p in enumerate(prompts):
        if len(p) + args.max_new_tokens > cfg.max_len:
            raise ConfigError(f"prompt {i + 1} is {len(p)} tokens; with --max-new-tokens "
                              f"{args.max_new_tokens} that exceeds model.max_len={cfg.max_len}")
    outs = generate(cfg, params, prompts, max_new_tokens=args.max_new_tokens,
                    rng=jax.random.PRNGKey(args.seed), temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, eos_id=tok.eos_id, pad_id=tok.pad_id)
    for text, out in zip(args.prompts, outs):
        print(json.dumps({"prompt": text, "completion": tok.decode(out)}, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main(sys.argv[1:])))
