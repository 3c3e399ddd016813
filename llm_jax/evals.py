"""Evaluations scored by programs, not by a guess.

    icl_accuracy          zero-, one- and few-shot accuracy of a raw LM (Brown et al. 2020)
    instruction_accuracy  held-out built-in instructions, answered in the template
    win_rate              policy vs base on the same prompts, judged by a program,
                          plus a Monte-Carlo KL(pi_policy || pi_base) on the policy's samples
    self_consistency      majority vote over sampled answers (Wang et al. 2022)

Every function takes (model config, params, tokenizer) and returns plain dicts
of numbers (perplexity is `experiments.pretrain.heldout_loss`). Prompts are
decoded in batches, one `generate` call per `batch_size` prompts; every batch
has the same rows and the same padded width, so an evaluation compiles one
program instead of one per batch. `generate_fn` (default `generate.generate`,
same signature) is where a test puts a model whose answers are known.

All prompts are held out (`split="eval"` of `llm_jax.data.builtin`, see its
docstring). Each (task, shots) draws from its own seeded stream, so adding a
task or a shot count does not change the other probes.

A probe whose prompt plus answer budget does not fit `model.max_len` is not
run: it is counted under "skipped" and left out of every accuracy (None when
nothing of a group fits). With a small context the few-shot numbers of long
tasks (format) can be missing; the counts say so.

Brown et al. 2020, "Language Models are Few-Shot Learners", arXiv:2005.14165;
Wang et al. 2022, "Self-Consistency Improves Chain of Thought Reasoning in
Language Models", arXiv:2203.11171.
"""

from __future__ import annotations

import collections
import functools
import random
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import generate, losses, model
from llm_jax.config import ModelConfig
from llm_jax.data import builtin, formats, preferences
from llm_jax.errors import InputError
from llm_jax.stages import reward

GenerateFn = Callable[..., list[list[int]]]  # the signature of generate.generate
Judge = Callable[[str, str], float]  # (prompt, response) -> score
WIDTH_MULTIPLE = 32  # prompt widths are rounded up to this: few distinct shapes, few compiles
ANSWER_SLACK = 8  # decode budget beyond the longest expected answer (leading space, newline, ...)


# ---------------------------------------------------------------------------
# Batched decoding


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def decode_batched(cfg: ModelConfig, params, prompts: Sequence[list[int]], *, max_new_tokens: int,
                   eos_id: int, pad_id: int, batch_size: int = 64, seed: int = 0,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   generate_fn: GenerateFn = generate.generate) -> list[list[int]]:
    """New tokens (eos excluded) for every prompt, one `generate_fn` call per batch.

    Every call gets min(batch_size, len(prompts)) rows (the last batch is filled
    with copies of its last prompt, whose outputs are dropped) and the same
    left-padded width, so a jitted sampler compiles once. Batch i samples with
    fold_in(PRNGKey(seed), i)."""
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: must be at least 1")
    if not prompts:
        return []
    rows = min(batch_size, len(prompts))
    width = _round_up(max(len(p) for p in prompts), WIDTH_MULTIPLE)
    key = jax.random.PRNGKey(seed)
    out: list[list[int]] = []
    for b, start in enumerate(range(0, len(prompts), rows)):
        chunk = list(prompts[start:start + rows])
        padded = chunk + [chunk[-1]] * (rows - len(chunk))
        got = generate_fn(cfg, params, padded, max_new_tokens=max_new_tokens,
                          rng=jax.random.fold_in(key, b), temperature=temperature, top_k=top_k,
                          top_p=top_p, eos_id=eos_id, pad_id=pad_id, pad_to=width)
        out.extend(list(g) for g in got[:len(chunk)])
    return out


def _answer_budget(tok, answers: Sequence[str]) -> int:
    # " " + answer: in a raw continuation the answer follows "->" and a space.
    return max(len(tok.encode(" " + a)) for a in answers) + ANSWER_SLACK


def _check_fits(cfg: ModelConfig, prompts: Sequence[list[int]], max_new_tokens: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) + max_new_tokens > cfg.max_len:
            raise InputError(f"prompt {i} is {len(p)} tokens; with max_new_tokens={max_new_tokens} "
                             f"that exceeds model.max_len={cfg.max_len}: lower max_new_tokens or "
                             "shorten the prompt")


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _check_tasks(tasks: Sequence[str] | None, known=builtin.TASKS) -> list[str]:
    tasks = sorted(tasks or known)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise InputError(f"tasks {unknown}: unknown; pass built-in tasks from {sorted(known)}")
    return tasks


def _encode_prompt(tok, prompt: str, raw: bool) -> list[int]:
    """raw: [bos] text (a continuation); else the instruction template."""
    return [tok.bos_id, *tok.encode(prompt)] if raw else formats.prompt_tokens(tok, prompt)


# ---------------------------------------------------------------------------
# In-context learning (Brown et al. 2020, arXiv:2005.14165): zero-, one-, few-shot on raw text


def icl_probes(task: str, shots: int, n: int, seed: int = 0) -> list[dict]:
    """`n` held-out probes of `task` with `shots` examples (`builtin.icl_probe`).

    shots=0 is the bare `query ->`. Closed tasks hold out whole prompts, and
    only a few one-line prompts are in the eval split (one word for translate,
    one number for square), so their 0-shot probes repeat; `icl_accuracy`
    reports the number of distinct prompts."""
    if shots < 0 or n < 1:
        raise InputError(f"icl_probes: shots={shots} must be >= 0 and n={n} >= 1")
    rng = random.Random(f"icl|{seed}|{task}|{shots}")
    return [builtin.icl_probe(rng, task, shots, split="eval") for _ in range(n)]


def _answers(cfg: ModelConfig, params, tok, prompts: list[str], answers: list[str], *, raw: bool,
             max_new_tokens: int | None, batch_size: int, seed: int, temperature: float,
             generate_fn: GenerateFn) -> tuple[int, list[int], list[list[int]]]:
    """(decode budget, indices of the prompts that fit max_len with it, their outputs):
    the budget is `max_new_tokens` or what the longest expected answer needs."""
    encoded = [_encode_prompt(tok, p, raw=raw) for p in prompts]
    budget = max_new_tokens or _answer_budget(tok, answers)
    keep = [i for i, p in enumerate(encoded) if len(p) + budget <= cfg.max_len]
    outs = decode_batched(cfg, params, [encoded[i] for i in keep], max_new_tokens=budget, eos_id=tok.eos_id,
                          pad_id=tok.pad_id, batch_size=batch_size, seed=seed, temperature=temperature,
                          generate_fn=generate_fn)
    return budget, keep, outs


def icl_accuracy(cfg: ModelConfig, params, tok, *, shots: Sequence[int] = (0, 1, 3), per_task: int = 32,
                 tasks: Sequence[str] | None = None, seed: int = 0, batch_size: int = 64,
                 max_new_tokens: int | None = None, temperature: float = 0.0,
                 generate_fn: GenerateFn = generate.generate) -> dict:
    """Accuracy of raw continuations of held-out in-context probes.

    The model sees `[bos] + encode(prompt)` (as in pretraining); its answer is
    the continuation up to the first newline, scored by `builtin.score`.
    Returns {"by_shots": {shots: acc}, "by_task": {task: {shots: acc}},
    "evaluated"/"skipped"/"distinct_prompts": {task: {shots: count}},
    "max_new_tokens", "samples": one probe per (shots, task), "pooled_tasks"}.
    by_shots pools the probes of the tasks whose every probe fits the context at
    every shot count ("pooled_tasks"), so each shot count is scored on the same
    tasks: a task whose few-shot prompts are too long (format at 3 shots) would
    otherwise count at 0 shots and drop out at k."""
    tasks, shots = _check_tasks(tasks, builtin.PRETRAIN_TASKS), list(shots)
    probes = [{**p, "shots": s} for t in tasks for s in shots for p in icl_probes(t, s, per_task, seed)]
    budget, keep, outs = _answers(cfg, params, tok, [p["prompt"] for p in probes], [p["answer"] for p in probes],
                                  raw=True, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                  temperature=temperature, generate_fn=generate_fn)
    results: dict[tuple[str, int], list[bool]] = collections.defaultdict(list)
    samples = {}
    for i, out in zip(keep, outs):
        p = probes[i]
        got = tok.decode(out).split("\n")[0].strip()
        ok = builtin.score(p["task"], p["query"], got)
        results[p["task"], p["shots"]].append(ok)
        samples.setdefault((p["shots"], p["task"]), {
            "task": p["task"], "shots": p["shots"], "prompt": p["prompt"], "expected": p["answer"],
            "got": got, "correct": ok})
    per_group = collections.Counter((p["task"], p["shots"]) for p in probes)
    distinct = {key: len({p["prompt"] for p in probes if (p["task"], p["shots"]) == key}) for key in per_group}
    table = lambda f: {t: {s: f(t, s) for s in shots} for t in tasks}  # noqa: E731
    pooled = [t for t in tasks if all(len(results[t, s]) == per_group[t, s] for s in shots)]
    return {
        "by_shots": {s: _mean([ok for t in pooled for ok in results[t, s]]) for s in shots},
        "pooled_tasks": pooled,
        "by_task": table(lambda t, s: _mean(results[t, s])),
        "evaluated": table(lambda t, s: len(results[t, s])),
        "skipped": table(lambda t, s: per_group[t, s] - len(results[t, s])),
        "distinct_prompts": table(lambda t, s: distinct[t, s]),
        "max_new_tokens": budget,
        "samples": [samples[k] for k in sorted(samples)],
    }


# ---------------------------------------------------------------------------
# Instruction following


def instruction_records(per_task: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[dict]:
    """`per_task` held-out `builtin.sft_record`s of each task ({"prompt", "response", "task", "query"})."""
    if per_task < 1:
        raise InputError(f"per_task={per_task}: must be at least 1")
    out = []
    for task in _check_tasks(tasks):
        rng = random.Random(f"instruction|{seed}|{task}")
        out += [builtin.sft_record(rng, "eval", tasks=(task,)) for _ in range(per_task)]
    return out


def instruction_accuracy(cfg: ModelConfig, params, tok, *, per_task: int = 32,
                         tasks: Sequence[str] | None = None, seed: int = 0, batch_size: int = 64,
                         max_new_tokens: int | None = None, temperature: float = 0.0,
                         num_samples: int = 8, generate_fn: GenerateFn = generate.generate) -> dict:
    """Accuracy on held-out built-in instructions.

    Input `formats.prompt_tokens(tok, prompt)`; the response is everything up
    to eos (or the decode budget), scored by `builtin.score_instruction`.
    Returns {"accuracy", "by_task": {task: acc}, "eos_rate" (share of responses
    that ended with eos rather than running out of budget), "evaluated",
    "skipped", "max_new_tokens", "samples": the first `num_samples`}."""
    records = instruction_records(per_task, seed, tasks)
    budget, keep, outs = _answers(cfg, params, tok, [r["prompt"] for r in records], [r["response"] for r in records],
                                  raw=False, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                  temperature=temperature, generate_fn=generate_fn)
    by_task: dict[str, list[float]] = collections.defaultdict(list)
    samples, stopped = [], []
    for i, out in zip(keep, outs):
        r = records[i]
        response = tok.decode(out)
        ok = builtin.score_instruction(r["prompt"], response)
        by_task[r["task"]].append(ok)
        stopped.append(len(out) < budget)  # generate drops the eos; a shorter row stopped there
        if len(samples) < num_samples:
            samples.append({"task": r["task"], "prompt": r["prompt"], "expected": r["response"],
                            "response": response, "correct": bool(ok)})
    tasks = sorted({r["task"] for r in records})
    return {
        "accuracy": _mean([x for t in tasks for x in by_task[t]]),
        "by_task": {t: _mean(by_task[t]) for t in tasks},
        "eos_rate": _mean(stopped),
        "evaluated": len(keep),
        "skipped": len(records) - len(keep),
        "max_new_tokens": budget,
        "samples": samples,
    }


# ---------------------------------------------------------------------------
# A program judge for the built-in prompts


@functools.cache
def _preference_prompts() -> dict[str, tuple[str, str | None]]:
    """Every prompt `preferences` can draw for the polite and plain kinds ->
    (kind, concept). Rebuilt from its tables; a prompt not found here is an
    error in `builtin_judge`, so a template change there cannot go unnoticed."""
    table: dict[str, tuple[str, str | None]] = {}
    for r in preferences.REQUESTS:
        for w in preferences.WHEN:
            table[f"Could you {r} {w}?"] = ("polite", None)
    for f in preferences.FAVOURS:
        table[f"Thank you for {f}!"] = ("polite", None)
    for c in preferences.CONCEPTS:
        for e in preferences.EXPLAIN:
            table[e.format(c=c)] = ("plain", c)
    return table


def builtin_judge(prompt: str, response: str) -> float:
    """1.0 / 0.0 for a response to a built-in prompt.

    * an instruction: `builtin.score_instruction` (the task's verifier);
    * a request or a thank-you (preference kind "polite"): `preferences.is_polite`;
    * "explain a concept" (kind "plain"): `preferences.is_plain` *and* the
      response names the concept. `is_plain` alone only checks for jargon
      markers, so an empty or off-topic answer would pass it; every plain
      reference answer names its concept.
    Any other prompt: InputError (no silent zero)."""
    score = builtin.score_instruction(prompt, response)
    if score is not None:
        return score
    found = _preference_prompts().get(prompt.strip())
    if found is None:
        raise InputError(f"builtin_judge has no rule for the prompt {prompt!r}: it judges the built-in "
                         "instructions and preference prompts only; pass your own judge for other prompts")
    kind, concept = found
    if kind == "polite":
        return float(preferences.is_polite(response))
    return float(preferences.is_plain(response) and concept in response.lower())


def preference_prompts(n: int, *, seed: int = 0, kinds: Sequence[str] | None = None) -> list[str]:
    """`n` held-out prompts of the preference data (kinds correct/polite/plain);
    with only a few held-out polite/plain prompts, these repeat."""
    rng = random.Random(f"preference|{seed}")
    kinds = tuple(kinds) if kinds else None
    return [preferences.preference_record(rng, "eval", kinds)["prompt"] for _ in range(n)]


def preference_records(n: int, *, seed: int = 0) -> list[dict]:
    """`n` held-out preference pairs (`preferences.preference_record`, split "eval")."""
    rng = random.Random(f"preference-pairs|{seed}")
    return [preferences.preference_record(rng, "eval") for _ in range(n)]


def pairwise_accuracy_by_kind(cfg: ModelConfig, reward_params, tok, records: Sequence[dict],
                              batch_size: int = 64) -> dict:
    """A reward model's pairwise accuracy (r(chosen) > r(rejected)) on preference
    records, overall, per kind (correct / polite / plain) and per task of the
    "correct" pairs: {"accuracy", "pairs", "skipped", "by_kind", "by_task",
    "pairs_by_kind"}. Each response is scored alone by `reward.score_sequences`
    (as trained: the value at its last token, plus the likelihood term of a
    likelihood model); a pair longer than model.max_len is
    skipped and counted."""
    if not records:
        raise InputError("pairwise_accuracy_by_kind: no records; pass at least one preference pair")
    heads = [formats.prompt_tokens(tok, r["prompt"]) for r in records]
    pairs = [[h + tok.encode(r[side]) for side in ("chosen", "rejected")] for h, r in zip(heads, records)]
    fits = [max(map(len, p)) <= cfg.max_len for p in pairs]
    skipped = len(records) - sum(fits)
    records = [r for r, ok in zip(records, fits) if ok]
    starts = [len(h) for h, ok in zip(heads, fits) if ok for _ in range(2)]  # where each response begins
    if not records:
        raise InputError(f"pairwise_accuracy_by_kind: no pair of the {len(fits)} fits model.max_len="
                         f"{cfg.max_len}; pass shorter pairs or use a model with a longer context")
    seqs = [s for p, ok in zip(pairs, fits) if ok for s in p]
    scores = np.concatenate([np.asarray(reward.score_sequences(cfg, reward_params, seqs[i:i + batch_size],
                                                               response_starts=starts[i:i + batch_size],
                                                               eos_id=tok.eos_id))
                             for i in range(0, len(seqs), batch_size)])
    right = scores[0::2] > scores[1::2]
    groups: dict[str, dict[str, list[bool]]] = {"by_kind": collections.defaultdict(list),
                                                "by_task": collections.defaultdict(list)}
    for r, ok in zip(records, right):
        groups["by_kind"][r["kind"]].append(bool(ok))
        if r["kind"] == "correct":
            groups["by_task"][r["task"]].append(bool(ok))
    return {"accuracy": float(right.mean()), "pairs": len(records), "skipped": skipped,
            **{g: {k: _mean(v) for k, v in sorted(d.items())} for g, d in groups.items()},
            "pairs_by_kind": {k: len(v) for k, v in sorted(groups["by_kind"].items())}}


# ---------------------------------------------------------------------------
# Policy vs base: win rate and KL


@functools.partial(jax.jit, static_argnames=("cfg",))
def _next_token_logprobs(cfg: ModelConfig, params, tokens, temperature):
    """tokens [B, T] (right-padded) -> log p(tokens[:, t+1] | tokens[:, :t+1]) [B, T-1],
    from logits / temperature."""
    logits = model.apply(cfg, params, tokens[:, :-1])  # [B, T-1, V] float32
    return losses.token_logprobs(logits / temperature, tokens[:, 1:])


def response_logprobs(cfg: ModelConfig, params, prompts: Sequence[list[int]],
                      responses: Sequence[list[int]], *, temperature: float = 1.0,
                      batch_size: int = 64) -> list[np.ndarray]:
    """Per-token log-probs [len(response)] of each response after its prompt,
    under softmax(logits / temperature): one forward per batch over prompt+response.

    Rows are right-padded (a causal model's earlier positions never see the
    padding) to one width, and every batch has the same rows: one compile."""
    if temperature <= 0:
        raise InputError(f"temperature={temperature}: log-probs need a temperature > 0")
    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts but {len(responses)} responses; pass one response per prompt")
    if not prompts:
        return []
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    rows = min(batch_size, len(seqs))
    width = _round_up(max(len(s) for s in seqs), WIDTH_MULTIPLE)
    out: list[np.ndarray] = []
    for start in range(0, len(seqs), rows):
        chunk = seqs[start:start + rows]
        tokens = np.zeros((rows, width), np.int32)
        for i, s in enumerate(chunk):
            tokens[i, :len(s)] = s
        lp = np.asarray(_next_token_logprobs(cfg, params, jnp.asarray(tokens), jnp.float32(temperature)))
        for i in range(len(chunk)):
            p, r = len(prompts[start + i]), len(responses[start + i])
            out.append(lp[i, p - 1:p - 1 + r])  # logprob[t] scores token t+1
    return out


def win_rate(cfg: ModelConfig, policy_params, base_params, tok, prompts: Sequence[str], judge: Judge, *,
             samples: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             max_new_tokens: int = 64, raw: bool = False, seed: int = 0, batch_size: int = 64,
             with_kl: bool = True, num_samples: int = 4,
             generate_fn: GenerateFn = generate.generate) -> dict:
    """Policy vs base on the same prompts, judged by `judge(prompt, response) -> float`.

    Each model answers each prompt `samples` times, with the same random keys
    (common random numbers: identical models give identical answers). A
    prompt's score is the mean over its samples; the policy wins the prompt if
    its score is higher, ties count half in win_rate.

    kl_to_base: mean over the policy's samples of
        sum_t [log pi(y_t | x, y_<t) - log pi_base(y_t | x, y_<t)]
    over the response tokens, eos included when the policy stopped: a
    Monte-Carlo estimate of KL(pi || pi_base) (of the tempered distributions
    when temperature != 1). None when with_kl is False or the responses are not
    samples of that distribution (greedy, top-k, top-p).

    Returns {"win_rate", "tie_rate", "loss_rate", "policy_score", "base_score",
    "kl_to_base", "num_prompts", "samples": the first `num_samples` pairs}."""
    if samples < 1 or not prompts:
        raise InputError(f"win_rate needs prompts and samples >= 1 (got {len(prompts)} prompts, "
                         f"samples={samples})")
    ids = [_encode_prompt(tok, p, raw) for p in prompts]
    _check_fits(cfg, ids, max_new_tokens)
    rows = [x for x in ids for _ in range(samples)]  # prompt i's samples at rows i*samples ...
    kw = dict(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, batch_size=batch_size,
              seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, generate_fn=generate_fn)
    pol_out = decode_batched(cfg, policy_params, rows, **kw)
    base_out = decode_batched(cfg, base_params, rows, **kw)
    pol_text = [tok.decode(o) for o in pol_out]
    base_text = [tok.decode(o) for o in base_out]
    pol_scores = np.array([judge(prompts[j // samples], t) for j, t in enumerate(pol_text)], np.float64)
    base_scores = np.array([judge(prompts[j // samples], t) for j, t in enumerate(base_text)], np.float64)
    pol_mean = pol_scores.reshape(len(prompts), samples).mean(axis=1)
    base_mean = base_scores.reshape(len(prompts), samples).mean(axis=1)
    wins, ties, lost = (float(np.mean(pol_mean > base_mean)), float(np.mean(pol_mean == base_mean)),
                           float(np.mean(pol_mean < base_mean)))

    kl = None
    if with_kl and temperature > 0 and top_k == 0 and top_p == 1.0:
        # the sampled sequence ends with eos when generation stopped before the budget
        responses = [o + [tok.eos_id] if len(o) < max_new_tokens else o for o in pol_out]
        lp_pol = response_logprobs(cfg, policy_params, rows, responses, temperature=temperature,
                                   batch_size=batch_size)
        lp_base = response_logprobs(cfg, base_params, rows, responses, temperature=temperature,
                                    batch_size=batch_size)
        kl = float(np.mean([np.sum(a.astype(np.float64) - b.astype(np.float64))
                            for a, b in zip(lp_pol, lp_base)]))
    return {
        "win_rate": wins + 0.5 * ties, "tie_rate": ties, "loss_rate": lost,
        "policy_score": float(pol_scores.mean()), "base_score": float(base_scores.mean()),
        "kl_to_base": kl, "num_prompts": len(prompts),
        "samples": [{"prompt": prompts[j // samples], "policy": pol_text[j], "base": base_text[j],
                     "policy_score": float(pol_scores[j]), "base_score": float(base_scores[j])}
                    for j in range(min(num_samples, len(rows)))],
    }


# ---------------------------------------------------------------------------
# Self-consistency (Wang et al. 2022, arXiv:2203.11171): majority vote over sampled answers


def normalize_answer(text: str) -> str:
    """Whitespace collapsed: "1  2 3 " and "1 2 3" are one answer. (The built-in
    scorers ignore whitespace between tokens, so this never merges a right and
    a wrong answer.)"""
    return " ".join(text.split())


def majority_vote(answers: Sequence[str]) -> str:
    """The most frequent normalized answer; a tie goes to the one sampled first."""
    if not answers:
        raise InputError("majority_vote needs at least one answer")
    # Counter.most_common keeps first-seen order among equal counts
    return collections.Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]


def sampled_answers(cfg: ModelConfig, params, tok, prompts: Sequence[str], *, samples: int = 8,
                    temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, raw: bool = False,
                    max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64,
                    generate_fn: GenerateFn = generate.generate) -> list[list[str]]:
    """`samples` answers per prompt: the response up to eos (instruction
    template) or, with raw, the continuation up to its first newline."""
    if samples < 1:
        raise InputError(f"samples={samples}: must be at least 1")
    ids = [_encode_prompt(tok, p, raw) for p in prompts]
    _check_fits(cfg, ids, max_new_tokens)
    rows = [x for x in ids for _ in range(samples)]
    outs = decode_batched(cfg, params, rows, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                          pad_id=tok.pad_id, batch_size=batch_size, seed=seed, temperature=temperature,
                          top_k=top_k, top_p=top_p, generate_fn=generate_fn)
    texts = [tok.decode(o).split("\n")[0] if raw else tok.decode(o) for o in outs]
    return [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def self_consistency(cfg: ModelConfig, params, tok, prompts: Sequence[str], *, samples: int = 8,
                     temperature: float = 0.7, **kw) -> list[str]:
    """The majority answer of `samples` sampled answers per prompt (kw: see `sampled_answers`)."""
    return [majority_vote(a) for a in sampled_answers(cfg, params, tok, prompts, samples=samples,
                                                      temperature=temperature, **kw)]


def self_consistency_accuracy(cfg: ModelConfig, params, tok, *, per_task: int = 16,
                              tasks: Sequence[str] | None = None, samples: int = 8,
                              temperature: float = 0.7, seed: int = 0, max_new_tokens: int | None = None,
                              **kw) -> dict:
    """Held-out instructions: accuracy of the majority answer vs of single samples.

    Returns {"accuracy" (majority vote), "sample_accuracy" (mean over all
    samples: what one sample scores on average), "by_task": {task: {"majority",
    "sample"}}, "evaluated", "skipped", "max_new_tokens"}."""
    records = instruction_records(per_task, seed, tasks)
    budget = max_new_tokens or _answer_budget(tok, [r["response"] for r in records])
    fits = [len(_encode_prompt(tok, r["prompt"], raw=False)) + budget <= cfg.max_len for r in records]
    kept = [r for r, ok in zip(records, fits) if ok]
    answers = sampled_answers(cfg, params, tok, [r["prompt"] for r in kept], samples=samples,
                              temperature=temperature, max_new_tokens=budget, seed=seed, **kw)
    majority, single = collections.defaultdict(list), collections.defaultdict(list)
    for r, ans in zip(kept, answers):
        majority[r["task"]].append(builtin.score_instruction(r["prompt"], majority_vote(ans)))
        single[r["task"]].extend(builtin.score_instruction(r["prompt"], a) for a in ans)
    tasks = sorted({r["task"] for r in records})
    return {
        "accuracy": _mean([x for t in tasks for x in majority[t]]),
        "sample_accuracy": _mean([x for t in tasks for x in single[t]]),
        "by_task": {t: {"majority": _mean(majority[t]), "sample": _mean(single[t])} for t in tasks},
        "evaluated": len(kept), "skipped": len(records) - len(kept), "max_new_tokens": budget,
    }
