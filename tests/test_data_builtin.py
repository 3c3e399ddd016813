"""The built-in world: scorers, held-out splits, formats of each view, preference verifiers."""

import collections
import json
import random

import pytest

from llm_jax.data import builtin, preferences
from llm_jax.data.sources import open_source


def test_scorers_on_hand_checked_answers():
    score = builtin.score
    assert score("translate", "Blume", "flower") and not score("translate", "Blume", "dog")
    assert score("sort", "3 1 2", "1 2 3") and not score("sort", "3 1 2", "1 2") and not score("sort", "3 1 2", "3 1 2")
    assert score("reverse", "a b c", "c b a") and not score("reverse", "a b c", "a b c")
    assert score("square", "7", "49") and not score("square", "7", "14")
    assert score("add", "3 + 4", " 7 ") and not score("add", "3 + 4", "seven")
    assert score("copy", "A B C A", "B C") and not score("copy", "A B C A", "C")
    q = "name=Alice, age=10, city=Berlin"
    assert score("format", q, '{"city": "Berlin", "age": 10, "name": "Alice"}')  # JSON equality
    assert not score("format", q, '{"name": "Alice", "age": "10", "city": "Berlin"}')
    assert not score("format", q, "name: Alice")
    assert score("double", "7", "14") and not score("double", "7", "49")
    assert score("translate_fr", "Auto", "voiture") and not score("translate_fr", "Auto", "car")
    assert set(builtin.PRETRAIN_TASKS) == set(builtin.TASKS) | set(builtin.ICL_ONLY_TASKS)
    for task, gen in builtin.PRETRAIN_TASKS.items():  # every generated answer passes its own scorer
        rng = random.Random(task)
        assert all(score(task, *gen(rng)) for _ in range(200)), task


def test_instructions_parse_back_and_score():
    assert builtin.instruction("translate", "Blume") == "Translate Blume from German to English."
    assert builtin.parse_instruction("What is 7 squared?") == ("square", "7")
    assert builtin.parse_instruction("What is 3 + 4?") == ("add", "3 + 4")
    assert builtin.parse_instruction("Sort these numbers: 3 1 2") == ("sort", "3 1 2")
    assert builtin.score_instruction("Format as JSON: name=Bob, age=25, city=Munich",
                                     json.dumps({"name": "Bob", "age": 25, "city": "Munich"})) == 1.0
    assert builtin.score_instruction("Reverse: a b c", "a b c") == 0.0
    assert builtin.score_instruction("Tell me a joke.", "no") is None


def _lines(doc):
    return [tuple(line.split(" -> ")) for line in doc.strip().split("\n")]


def test_pretraining_splits_share_no_item_or_prompt():
    train = builtin.pretrain_documents(0, 3000, split="train")
    evals = builtin.pretrain_documents(1, 600, split="eval")
    open_tasks = [t for t in builtin.TASKS if t not in builtin.CLOSED_TASKS]
    train_queries = {q for d in train for q, _ in _lines(d)}
    eval_queries = {q for d in evals for q, _ in _lines(d)}
    # open tasks: no query of an eval document appears anywhere in training
    for t in open_tasks:
        rng = random.Random(t)
        eval_items = {builtin.draw_item(rng, t, "eval")[0] for _ in range(50)}
        assert not eval_items & train_queries, t
    assert eval_queries - train_queries  # and eval documents do use unseen queries
    # closed tasks: no eval document (prompt) is a training document, but the words are shared
    assert not set(evals) & set(train)
    rng = random.Random(5)
    probes = [builtin.icl_probe(rng, "translate", 3) for _ in range(100)]
    assert all(p["query"] in builtin.GERMAN_ENGLISH for p in probes)
    train_prompts = {d for d in train}
    assert not any(p["prompt"] + f" {p['answer']}\n" in train_prompts for p in probes)
    # nor the beginning of one, at any shot count (0 shots: `Auto ->` never opens a training document)
    for task in sorted(builtin.CLOSED_TASKS):
        for shots in (0, 1, 3):
            for p in (builtin.icl_probe(rng, task, shots) for _ in range(30)):
                assert not any(d.startswith(p["prompt"] + f" {p['answer']}\n") for d in train), (task, shots)
    assert all(builtin.score("translate", p["query"], p["answer"]) for p in probes)


def test_rules_sharing_queries_are_in_pretraining_but_not_in_sft():
    docs = builtin.pretrain_documents(0, 900)
    first = collections.Counter()
    for d in docs:
        q, a = _lines(d)[0]
        if q in builtin.GERMAN_FRENCH:
            first["fr" if a == builtin.GERMAN_FRENCH[q] != builtin.GERMAN_ENGLISH[q] else "other"] += 1
    assert first["fr"] > 40 and first["other"] > 40  # both tables over the same German words
    # the same queries: every French query is a German word of the English table
    assert set(builtin.GERMAN_FRENCH) == set(builtin.GERMAN_ENGLISH)
    rng = random.Random(0)
    assert {builtin.sft_record(rng, "train")["task"] for _ in range(500)} == set(builtin.TASKS)


def test_pretraining_never_shows_the_instruction_format():
    docs = "".join(builtin.pretrain_documents(0, 2000))
    fixed_words = [part.strip() for t in builtin.INSTRUCTIONS.values() for part in t.split("{q}")]
    assert len([w for w in fixed_words if w]) == 10  # "Reverse:", "from German to English.", "?", ...
    for words in filter(None, fixed_words):
        assert words not in docs, words


def test_sft_splits_are_disjoint_by_task_and_query():
    train = open_source("builtin:sft", split="train", size=3000).records
    evals = open_source("builtin:sft", split="eval", size=3000).records
    assert len(train) == 3000 and len(evals) == 300  # one `size` scales both
    tq = {(r["task"], r["query"]) for r in train}
    eq = {(r["task"], r["query"]) for r in evals}
    assert tq and eq and not tq & eq
    for r in list(evals)[:100]:
        assert builtin.score_instruction(r["prompt"], r["response"]) == 1.0
    # SFT-eval translation words are still known from pretraining (the table)
    assert {q for t, q in eq if t == "translate"} <= set(builtin.GERMAN_ENGLISH)


def test_preferences_every_kind_verifies_and_splits():
    train = open_source("builtin:preferences", split="train", size=600).records
    evals = open_source("builtin:preferences", split="eval", size=600).records
    kinds = {r["kind"] for r in evals}
    assert kinds == set(preferences.PREFERENCE_KINDS)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    for r in list(train) + list(evals):
        assert preferences.prefers(r, r["chosen"]), r
        assert not preferences.prefers(r, r["rejected"]), r
    polite = next(r for r in evals if r["kind"] == "polite")
    assert len(polite["chosen"]) > len(polite["rejected"])


def test_training_pairs_never_reject_a_held_out_answer():
    """A training pair's wrong translation is a word some training pair prefers: a
    held-out prompt's answer (Auto -> car) never reaches the reward model as rejected only."""
    train = [r for r in open_source("builtin:preferences", split="train", size=3000).records
             if r["kind"] == "correct" and r["task"] == "translate"]
    split = {e: builtin.bucket(f"correct|Translate {g} from German to English.")
             for g, e in builtin.GERMAN_ENGLISH.items()}
    assert "eval" in split.values() and len(train) > 50
    assert {split[r["chosen"]] for r in train} == {"train"}
    assert {split[r["rejected"]] for r in train} == {"train"}


def test_held_out_questions_ask_about_a_concept_that_training_asks_in_many_wordings():
    """An eval "explain" prompt is a new wording of a concept that training asks in at
    least 8 other wordings, so answering it means reading the concept, not recalling
    the whole prompt (with 4 wordings the SFT model answered held-out ones with another
    concept's sentence or with noise)."""
    wordings = collections.defaultdict(set)
    held_out = []
    for c in preferences.CONCEPTS:
        for e in preferences.EXPLAIN:
            prompt = e.format(c=c)
            if preferences.pair_split("plain", prompt) == "train":
                wordings[c].add(e)
            else:
                held_out.append(c)
    assert held_out
    assert all(len(wordings[c]) >= 8 for c in held_out), {c: len(wordings[c]) for c in held_out}


def test_chat_mixes_instructions_with_good_and_bad_demonstrations():
    """builtin:chat: CHAT_INSTRUCTION_SHARE instructions (always answered right), the rest requests,
    thanks and questions answered with the preferred or the dispreferred response
    about equally often; its eval prompts are never training prompts."""
    train = list(open_source("builtin:chat", split="train", size=2000).records)
    evals = list(open_source("builtin:chat", split="eval", size=2000).records)
    kinds = [r["kind"] for r in train]
    share = preferences.CHAT_INSTRUCTION_SHARE
    assert share - 0.05 < kinds.count("instruction") / len(train) < share + 0.05
    for r in train:
        if r["kind"] == "instruction":
            assert builtin.score_instruction(r["prompt"], r["response"]) == 1.0
    styled = [r for r in train if r["kind"] != "instruction"]
    good = sum(preferences.prefers(r, r["response"]) for r in styled) / len(styled)
    assert 0.4 < good < 0.6, good
    assert not {r["prompt"] for r in train if r["kind"] != "instruction"} & {
        r["prompt"] for r in evals if r["kind"] != "instruction"}


def test_builtin_records_are_deterministic_and_seeded():
    a = open_source("builtin:pretrain", size=50, seed=3).records
    b = open_source("builtin:pretrain", size=50, seed=3).records
    c = open_source("builtin:pretrain", size=50, seed=4).records
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)] != [c[i] for i in range(50)]
    sub = open_source("builtin:sft/translate,square", size=50).records
    assert {r["task"] for r in sub} == {"translate", "square"}


def test_verifiable_records_name_an_unknown_task():
    from llm_jax import verifiers
    from llm_jax.errors import ConfigError

    recs = verifiers.builtin_records(40, seed=1, tasks=("add", "copy"))
    assert {r["task"] for r in recs} == {"add", "copy"}
    assert all(builtin.score_instruction(r["prompt"], r["answer"]) == 1.0 for r in recs)
    # A misspelt task was a KeyError traceback from inside the item generator.
    with pytest.raises(ConfigError, match=r"\['ad'\].*choose from"):
        verifiers.builtin_records(1, tasks=("ad", "copy"))
    with pytest.raises(ConfigError, match=r"^grpo_tasks \['zz'\]: not built-in"):
        verifiers.check_tasks(("copy", "zz"), "grpo_tasks")
    verifiers.check_tasks(None)  # no filter: every task


def test_legacy_helpers_keep_their_signatures():
    doc = builtin.few_shot_document(random.Random(0), "square", 3)
    assert len(_lines(doc)) == 3 and all(int(a) == int(q) ** 2 for q, a in _lines(doc))
    assert len(builtin.pretrain_documents(0, 5)) == 5
    with pytest.raises(ValueError, match="split"):
        builtin.few_shot_document(random.Random(0), "sort", 2, split="test")
