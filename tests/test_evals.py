"""Evaluations: scripted models with known answers, and the tiny model for the
numeric parts (batched decoding, KL against a numpy reference)."""

import collections
import json
import pathlib
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import evals, model
from llm_jax.config import ModelConfig, preset
from llm_jax.data import builtin, preferences
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.errors import InputError

TESTS = pathlib.Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
import reference_model as ref  # noqa: E402

TOK = ByteTokenizer()
BIG = ModelConfig(vocab_size=TOK.vocab_size, max_len=1024)  # scripted models never run it
CFG = preset("tiny", vocab_size=TOK.vocab_size, max_len=64)
PARAMS = model.init(CFG, jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------
# A scripted "model": solves the built-in tasks by its own rules.


def solve(query: str) -> tuple[str, str]:
    """(task, answer) of a built-in query, recognised by its shape (independent of builtin's scorers)."""
    xs = query.split()
    if "=" in query:
        f = dict(kv.split("=") for kv in query.split(", "))
        return "format", json.dumps({"name": f["name"], "age": int(f["age"]), "city": f["city"]})
    if "+" in query:
        a, b = query.split(" + ")
        return "add", str(int(a) + int(b))
    if query in builtin.GERMAN_ENGLISH:
        return "translate", builtin.GERMAN_ENGLISH[query]
    if len(xs) == 1:
        return "square", str(int(query) ** 2)
    if all(x.isdigit() for x in xs):
        return "sort", " ".join(sorted(xs, key=int))
    if all(x.islower() for x in xs):
        return "reverse", " ".join(xs[::-1])
    period = xs.index(xs[0], 1)  # copy: the pattern is xs[:period]; the prompt shows len(xs) of it
    return "copy", " ".join(xs[len(xs) - period:period])


def rule_from_shots(text: str, task: str, query: str, answer: str) -> tuple[str, str]:
    """French instead of English, double instead of square, when the first shot that
    tells them apart says so; with no such shot, English and square."""
    for line in text.split("\n")[:-1]:
        q, a = line.split(" -> ")
        if task == "translate" and builtin.GERMAN_FRENCH[q] != builtin.GERMAN_ENGLISH[q]:
            return ("translate_fr", builtin.GERMAN_FRENCH[query]) if a == builtin.GERMAN_FRENCH[q] else (task, answer)
        if task == "square" and int(q) ** 2 != 2 * int(q):
            return ("double", str(2 * int(query))) if a == str(2 * int(q)) else (task, answer)
    return task, answer


INSTRUCTION_FORMS = [("square", "What is ", " squared?"), ("add", "What is ", "?"),
                     ("copy", "Continue the pattern: ", ""), ("sort", "Sort these numbers: ", ""),
                     ("reverse", "Reverse: ", ""), ("translate", "Translate ", " from German to English."),
                     ("format", "Format as JSON: ", "")]


def instruction_query(text: str) -> str:
    for _, head, tail in INSTRUCTION_FORMS:
        if text.startswith(head) and text.endswith(tail):
            return text[len(head):len(text) - len(tail)]
    raise AssertionError(f"not an instruction: {text!r}")


def scripted(calls=None):
    """generate_fn whose `params` picks the behaviour: "right", "wrong" (a plausible
    answer the task rejects), or "right-with-shots" (right only with >= 1 example)."""
    def fake(cfg, params, prompts, *, max_new_tokens, rng, temperature, top_k, top_p, eos_id, pad_id, pad_to):
        assert eos_id == TOK.eos_id and pad_id == TOK.pad_id and pad_to >= max(len(p) for p in prompts)
        if calls is not None:
            calls.append(len(prompts))
        out = []
        for p in prompts:
            text = TOK.decode(p)
            raw = p[1] != TOK.prompt_id
            if raw:  # [bos] few-shot text ending in "query ->"
                assert p[0] == TOK.bos_id and TOK.response_id not in p
                query = text.split("\n")[-1].removesuffix(" ->")
            else:  # [bos, prompt] instruction [response]
                assert p[:2] == [TOK.bos_id, TOK.prompt_id] and p[-1] == TOK.response_id
                query = instruction_query(text)
            task, answer = solve(query)
            if raw:  # a rule that shares its queries with another: the shots say which
                task, answer = rule_from_shots(text, task, query, answer)
            if params == "wrong" or (params == "right-with-shots" and "\n" not in text):
                answer = preferences.wrong_answer(random.Random(text), task, query, answer)
            ids = TOK.encode(" " + answer + "\nKatze -> cat\n") if raw else TOK.encode(answer)
            out.append(ids[:max_new_tokens])
        return out
    return fake


def test_solver_agrees_with_the_generators():
    rng = random.Random(0)
    for task, item in builtin.TASKS.items():
        for _ in range(50):
            q, a = item(rng)
            assert solve(q) == (task, a) or (task == "sort" and solve(q)[1] == a)


# ---------------------------------------------------------------------------
# In-context and instruction accuracy


def test_icl_accuracy_of_scripted_models():
    calls = []
    kw = dict(shots=(0, 1, 3), per_task=5, batch_size=16, generate_fn=scripted(calls), tasks=tuple(builtin.TASKS))
    right = evals.icl_accuracy(BIG, "right", TOK, **kw)
    assert right["by_shots"] == {0: 1.0, 1: 1.0, 3: 1.0}
    assert all(v == 1.0 for row in right["by_task"].values() for v in row.values())
    assert calls == [16] * 7  # 7 tasks x 3 shot counts x 5 = 105 probes, 16 per generate call
    assert sum(v for row in right["evaluated"].values() for v in row.values()) == 105
    assert right["distinct_prompts"]["translate"][0] == 1  # one eval word: 0-shot probes repeat
    assert evals.icl_accuracy(BIG, "wrong", TOK, **kw)["by_shots"] == {0: 0.0, 1: 0.0, 3: 0.0}
    shots = evals.icl_accuracy(BIG, "right-with-shots", TOK, **kw)
    assert shots["by_shots"] == {0: 0.0, 1: 1.0, 3: 1.0}
    assert shots["by_task"]["sort"] == {0: 0.0, 1: 1.0, 3: 1.0}
    assert len(shots["samples"]) == 21 and not shots["samples"][0]["correct"]


def test_rules_that_share_queries_are_told_apart_by_the_shots():
    # The scripted model reads the rule from the shots and says English / square
    # without them: at 0 shots it is right on French or double only where the two
    # rules give the same answer (Tisch -> table; 0 and 2).
    out = evals.icl_accuracy(BIG, "right", TOK, shots=(0, 1, 3), per_task=8, seed=5,
                             tasks=("double", "square", "translate", "translate_fr"), generate_fn=scripted())
    assert out["by_task"]["translate"] == out["by_task"]["square"] == {0: 1.0, 1: 1.0, 3: 1.0}
    same = {"translate_fr": lambda q: builtin.GERMAN_FRENCH[q] == builtin.GERMAN_ENGLISH[q],
            "double": lambda q: int(q) ** 2 == 2 * int(q)}
    for task, coincide in same.items():
        for shots in (0, 1, 3):
            probes = evals.icl_probes(task, shots, 8, seed=5)
            # told apart: some shot's two rules differ (that shot then names the rule)
            told = [any(not coincide(line.split(" -> ")[0]) for line in p["prompt"].split("\n")[:-1])
                    or coincide(p["query"]) for p in probes]
            assert out["by_task"][task][shots] == np.mean(told), (task, shots)
        assert out["by_task"][task][0] < 1.0  # the held-out 0-shot prompts are not all coincidences
    assert out["by_shots"][0] < out["by_shots"][1]
    assert out["pooled_tasks"] == ["double", "square", "translate", "translate_fr"]


def test_probes_that_do_not_fit_are_skipped_and_counted():
    cfg = ModelConfig(vocab_size=TOK.vocab_size, max_len=120)  # 0-shot format fits, 3-shot (~280) does not
    out = evals.icl_accuracy(cfg, "right", TOK, shots=(0, 3), per_task=4, tasks=("format",),
                             generate_fn=scripted())
    assert out["by_task"] == {"format": {0: 1.0, 3: None}}
    assert out["skipped"] == {"format": {0: 0, 3: 4}}
    assert out["by_shots"] == {0: None, 3: None} and out["pooled_tasks"] == []  # not scored at every shot count


def test_instruction_accuracy_of_scripted_models():
    calls = []
    right = evals.instruction_accuracy(BIG, "right", TOK, per_task=6, batch_size=64, num_samples=3,
                                       generate_fn=scripted(calls))
    assert calls == [42]
    assert right["accuracy"] == 1.0 and set(right["by_task"].values()) == {1.0}
    assert right["eos_rate"] == 1.0 and right["evaluated"] == 42 and right["skipped"] == 0
    assert len(right["samples"]) == 3 and right["samples"][0]["response"] == right["samples"][0]["expected"]
    wrong = evals.instruction_accuracy(BIG, "wrong", TOK, per_task=6, generate_fn=scripted())
    assert wrong["accuracy"] == 0.0 and set(wrong["by_task"].values()) == {0.0}


def test_batched_decoding_equals_reference_decodes():
    """decode_batched (batches of 2, left-padded to a width of 32, the last batch
    filled with a copy) against each prompt decoded alone by the float64 reference
    model with no padding or cache. Weights where the greedy token follows the
    context (at init's it is the current token: [last] * n whatever the batching)."""
    shapes = jax.eval_shape(lambda: model.init(CFG, jax.random.PRNGKey(0)))
    params = jax.tree.map(jnp.asarray, ref.random_params(shapes, seed=3))
    prompts = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55], [1, 60, 61, 62]]
    kw = dict(max_new_tokens=6, eos_id=TOK.eos_id, pad_id=TOK.pad_id, batch_size=2)
    want = ref.decode(CFG, params, prompts, 6, eos_id=TOK.eos_id)
    assert all(out != [p[-1]] * 6 for p, out in zip(prompts, want)) and len(set(map(tuple, want))) == 3, want
    assert evals.decode_batched(CFG, params, prompts, **kw) == want
    # Sampling: batch i draws with fold_in(PRNGKey(seed), i), its step j with key j
    # of split(that, max_new_tokens), over the batch's rows (the copy included).
    def pick_with(batch_key):
        keys = jax.random.split(batch_key, 6)
        return lambda step, logits: [int(t) for t in np.asarray(jax.random.categorical(
            keys[step], jnp.asarray(logits / 0.8, jnp.float32)))]
    key = jax.random.PRNGKey(5)
    sampled = (ref.decode(CFG, params, prompts[:2], 6, eos_id=TOK.eos_id, pick=pick_with(jax.random.fold_in(key, 0)))
               + ref.decode(CFG, params, [prompts[2]] * 2, 6, eos_id=TOK.eos_id,
                            pick=pick_with(jax.random.fold_in(key, 1)))[:1])
    assert sampled != want
    assert evals.decode_batched(CFG, params, prompts, seed=5, temperature=0.8, **kw) == sampled


# ---------------------------------------------------------------------------
# Judge, win rate, KL


def test_builtin_judge_prefers_chosen_on_every_kind():
    rng = random.Random(0)
    for kind in preferences.PREFERENCE_KINDS:
        for split in ("train", "eval"):
            for _ in range(100):
                r = preferences.preference_record(rng, split, (kind,))
                assert evals.builtin_judge(r["prompt"], r["chosen"]) == 1.0, r
                assert evals.builtin_judge(r["prompt"], r["rejected"]) == 0.0, r
    assert evals.builtin_judge("Explain what a cache is.", "") == 0.0  # no jargon, but no answer either
    with pytest.raises(InputError, match="no rule for the prompt"):
        evals.builtin_judge("Tell me a joke.", "no")


def test_win_rate_of_scripted_models():
    prompts = [r["prompt"] for r in evals.instruction_records(3, seed=1)]
    kw = dict(samples=2, max_new_tokens=64, with_kl=False, generate_fn=scripted())
    out = evals.win_rate(BIG, "right", "wrong", TOK, prompts, evals.builtin_judge, **kw)
    assert (out["win_rate"], out["tie_rate"], out["loss_rate"]) == (1.0, 0.0, 0.0)
    assert (out["policy_score"], out["base_score"], out["kl_to_base"]) == (1.0, 0.0, None)
    out = evals.win_rate(BIG, "wrong", "right", TOK, prompts, evals.builtin_judge, **kw)
    assert (out["win_rate"], out["loss_rate"]) == (0.0, 1.0)
    out = evals.win_rate(BIG, "right", "right", TOK, prompts, evals.builtin_judge, **kw)
    assert (out["win_rate"], out["tie_rate"]) == (0.5, 1.0)
    # samples of a filtered distribution (top-k) give no KL estimate
    out = evals.win_rate(BIG, "right", "wrong", TOK, prompts, evals.builtin_judge, samples=1, top_k=5,
                         generate_fn=scripted())
    assert out["kl_to_base"] is None


def test_identical_policies_tie_with_zero_kl():
    distinct_chars = lambda prompt, response: float(len(set(response)))  # noqa: E731
    out = evals.win_rate(CFG, PARAMS, PARAMS, TOK, ["Reverse: a b c", "What is 2 + 3?"], distinct_chars,
                         samples=2, temperature=1.0, max_new_tokens=8)
    assert (out["win_rate"], out["tie_rate"], out["loss_rate"]) == (0.5, 1.0, 0.0)
    assert out["kl_to_base"] == 0.0
    assert all(s["policy"] == s["base"] for s in out["samples"])


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_to_base_against_numpy():
    other = model.init(CFG, jax.random.PRNGKey(1))
    prompts = ["Reverse: a b c", "What is 2 + 3?"]
    scripted_responses = {0: [40, 41, 42], 1: [50, 51, 52, 53, 54]}  # the second runs out of budget

    def fake(cfg, params, rows, *, max_new_tokens, **kw):
        return [list(scripted_responses[i // 2]) for i in range(len(rows))]

    seqs, heads = [], []
    for i, prompt in enumerate(prompts):
        head = [TOK.bos_id, TOK.prompt_id, *TOK.encode(prompt), TOK.response_id]
        resp = scripted_responses[i] + ([TOK.eos_id] if len(scripted_responses[i]) < 5 else [])  # eos: it stopped
        seqs.append(np.array([head + resp], np.int32))
        heads.append(len(head))
    logits = {name: [np.asarray(model.apply(CFG, p, s), np.float64)[0] for s in seqs]
              for name, p in (("policy", PARAMS), ("base", other))}
    for temperature in (1.0, 0.5):
        out = evals.win_rate(CFG, PARAMS, other, TOK, prompts, lambda p, r: 0.0, samples=2,
                             temperature=temperature, max_new_tokens=5, generate_fn=fake)
        kls = []
        for i, (seq, h) in enumerate(zip(seqs, heads)):
            lp = {k: _log_softmax(v[i] / temperature) for k, v in logits.items()}
            kls.append(sum(lp["policy"][t - 1, seq[0, t]] - lp["base"][t - 1, seq[0, t]]
                           for t in range(h, seq.shape[1])))
        assert out["kl_to_base"] == pytest.approx(np.mean(kls), rel=1e-4, abs=1e-5)
        assert out["tie_rate"] == 1.0


# ---------------------------------------------------------------------------
# Self-consistency


def test_majority_vote_by_hand():
    assert evals.majority_vote(["1081", "1081", "981", "1081", "1081"]) == "1081"  # seed 003's example
    assert evals.majority_vote(["b", "a", "a", "b"]) == "b"  # a tie goes to the first sampled
    assert evals.majority_vote([" 1 2  3", "1 2 3 ", "3 2 1"]) == "1 2 3"
    with pytest.raises(InputError, match="at least one answer"):
        evals.majority_vote([])


def counting(script):
    """generate_fn giving the k-th sample of each prompt script(query, answer, k), k counted per prompt."""
    seen = collections.Counter()

    def fake(cfg, params, prompts, *, max_new_tokens, **kw):
        out = []
        for p in prompts:
            text = TOK.decode(p)
            query = instruction_query(text)
            out.append(TOK.encode(script(query, solve(query)[1], seen[text]))[:max_new_tokens])
            seen[text] += 1
        return out
    return fake


def test_self_consistency_majority_of_samples():
    scripts = {"23 + 47": ["1081", "1081", "981", "1081", "1081"], "a b": ["b a", "a b", "a b", "b a", "x"]}
    fake = counting(lambda query, answer, k: scripts[query][k % 5])
    got = evals.self_consistency(BIG, None, TOK, ["What is 23 + 47?", "Reverse: a b"], samples=5, batch_size=3,
                                 generate_fn=fake)
    assert got == ["1081", "b a"]  # "b a" and "a b" tie at 2: the first sampled wins


def test_self_consistency_accuracy_majority_vs_single_samples():
    # 3 of 8 samples right, the other 5 all different: the majority is right
    spread = counting(lambda q, a, k: a if k % 8 < 3 else f"wrong {k % 8}")
    out = evals.self_consistency_accuracy(BIG, None, TOK, per_task=2, samples=8, generate_fn=spread)
    assert out["accuracy"] == 1.0 and out["sample_accuracy"] == pytest.approx(3 / 8)
    # 3 of 8 right, the other 5 agree on one wrong answer: the majority is wrong
    herd = counting(lambda q, a, k: a if k % 8 < 3 else "42 42")
    out = evals.self_consistency_accuracy(BIG, None, TOK, per_task=2, samples=8, generate_fn=herd)
    assert out["accuracy"] == 0.0 and out["sample_accuracy"] == pytest.approx(3 / 8)
    assert out["by_task"]["add"] == {"majority": 0.0, "sample": pytest.approx(3 / 8)}
