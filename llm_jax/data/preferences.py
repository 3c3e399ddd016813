"""Built-in preference pairs for reward models, DPO and PPO: three kinds.

* correct: a built-in instruction answered right (chosen) or wrong (rejected);
* polite: declining a request or answering thanks, politely or bluntly;
* plain: explaining a concept in plain words or in jargon.

Each record is `{"prompt", "chosen", "rejected", "kind", ...}` and each kind
has a verifier (`prefers`) so a trained reward model or policy can be scored
by a program. Splits hash `kind|prompt` (see `builtin.bucket`), so an eval
prompt is never a training prompt.
"""

from __future__ import annotations

import json
import random

from llm_jax.data import builtin

PREFERENCE_KINDS = ("correct", "polite", "plain")

REQUESTS = ("write my exam", "pay my rent", "read my neighbour's letters", "do my homework",
            "lend me your passport", "delete the shared folder", "skip the safety check",
            "sign the contract in my name")
WHEN = ("tomorrow", "tonight", "right now", "next week", "for me")
FAVOURS = ("fixing my bicycle", "the recipe", "explaining the map", "your help with the report",
           "carrying the boxes", "the quick answer", "checking my letter", "the directions")
POLITE_DECLINES = ("I'm sorry, but I can't {r}. Thank you for understanding.",
                   "I'm afraid I can't {r}, sorry. Thanks for asking, though.",
                   "Sorry, I'm not able to {r}. I hope you understand.")
BLUNT_DECLINES = ("No.", "Not my problem.", "Do it yourself.", "Forget it.")
POLITE_THANKS = ("You're welcome! I'm glad I could help.", "You're very welcome, happy to help!",
                 "My pleasure, thank you for asking!")
BLUNT_THANKS = ("Whatever.", "Fine.", "Yeah, sure.", "Finally.")
CONCEPTS = {  # concept -> (plain, jargon)
    "cache": ("A cache keeps a copy of things you used recently so you can get them again quickly.",
              "A cache is a latency-amortizing memoization layer leveraging temporal locality heuristics."),
    "battery": ("A battery stores energy and gives it back as electricity.",
                "A battery is an electrochemical potential differential storage paradigm."),
    "map": ("A map is a drawing of a place that shows where things are.",
            "A map is a scale-invariant geospatial projection artefact of topological semantics."),
    "recipe": ("A recipe tells you what to mix and how to cook it.",
               "A recipe is a procedural ingredient-orchestration specification paradigm."),
    "bridge": ("A bridge lets people cross a river or a road.",
               "A bridge is a load-bearing span-optimized infrastructural connectivity artefact."),
    "password": ("A password is a secret word that keeps others out of your account.",
                 "A password is a knowledge-factor authentication credential leveraging entropy paradigms."),
    "library": ("A library is a place where you can borrow books.",
                "A library is a curated knowledge-asset circulation ecosystem leveraging synergies."),
    "thermometer": ("A thermometer shows how warm or cold something is.",
                    "A thermometer is a thermal-state quantification instrumentation modality."),
}
# Twelve wordings: a held-out prompt is a new wording of a concept that training asks in
# the others. With four, the SFT model had learned whole prompts: "In one sentence, what is
# a cache?" (held out) got the battery's jargon or noise, 0.13 of held-out questions were
# answered plainly and on topic, and DPO lowered that to 0.04; with twelve 0.65 (2026-12-03).
EXPLAIN = ("Explain what a {c} is.", "What is a {c}?", "Tell me briefly what a {c} is.",
           "In one sentence, what is a {c}?", "What does a {c} do?", "Can you explain what a {c} is?",
           "Describe a {c}.", "Define a {c}.", "I'd like to know what a {c} is.", "Please explain a {c}.",
           "What exactly is a {c}?", "Tell me what a {c} is.")
POLITE_MARKERS = ("sorry", "thank", "welcome", "pleasure", "glad", "happy", "please", "afraid")
JARGON_MARKERS = ("leverag", "paradigm", "artefact", "synerg", "modality", "orchestration",
                  "ecosystem", "heuristic", "amortiz", "quantification", "credential", "-")


def pair_split(kind: str, prompt: str) -> str:
    """The split of a pair: its kind and prompt are the key (`builtin.bucket`)."""
    return builtin.bucket(f"{kind}|{prompt}")


# The English words that a training pair may offer as a wrong translation: only those
# that some training pair also prefers. Drawn from all 26, the held-out prompts' answers
# (car, butter, ...) reached the reward model only as *rejected* responses to other
# prompts, so it learned those words are bad answers and scored 0.10 on held-out
# translate pairs (measured 2026-12-02).
TRAIN_TRANSLATIONS = tuple(sorted(e for g, e in builtin.GERMAN_ENGLISH.items()
                                  if pair_split("correct", builtin.instruction("translate", g)) == "train"))


def wrong_answer(rng: random.Random, task: str, query: str, answer: str, split: str | None = None) -> str:
    """A plausible answer that the task's scorer rejects. For a "train" pair a wrong
    translation is one of TRAIN_TRANSLATIONS, never a held-out prompt's answer."""
    words = TRAIN_TRANSLATIONS if split == "train" else builtin.GERMAN_ENGLISH.values()
    while True:
        if task == "translate":
            wrong = rng.choice(sorted(set(words) - {answer}))
        elif task in ("square", "add"):
            wrong = str(int(answer) + rng.choice((-2, -1, 1, 2, 10)))
        elif task == "format":
            rec = json.loads(answer)
            rec["age"] += rng.choice((-1, 1))
            wrong = rng.choice((json.dumps(rec), answer.replace('"', "'"), query))
        elif task in ("sort", "reverse"):
            xs = answer.split()
            rng.shuffle(xs)
            # a shuffle, the query itself, or one element lost ("3 3 3" has no wrong order)
            wrong = rng.choice((" ".join(xs), query, " ".join(xs[1:])))
        else:  # copy: the pattern restarted, or one letter changed
            xs = answer.split()
            xs[rng.randrange(len(xs))] = rng.choice(builtin.LETTERS)
            wrong = " ".join(xs)
        if not builtin.score(task, query, wrong):
            return wrong


def _draw(rng: random.Random, kind: str, split: str) -> dict:
    if kind == "correct":
        task = rng.choice(sorted(builtin.TASKS))
        q, a = builtin.TASKS[task](rng)
        return {"prompt": builtin.instruction(task, q), "chosen": a,
                "rejected": wrong_answer(rng, task, q, a, split), "task": task, "query": q}
    if kind == "polite":
        if rng.random() < 0.5:
            r = rng.choice(REQUESTS)
            return {"prompt": f"Could you {r} {rng.choice(WHEN)}?",
                    "chosen": rng.choice(POLITE_DECLINES).format(r=r), "rejected": rng.choice(BLUNT_DECLINES)}
        return {"prompt": f"Thank you for {rng.choice(FAVOURS)}!", "chosen": rng.choice(POLITE_THANKS),
                "rejected": rng.choice(BLUNT_THANKS)}
    concept = rng.choice(sorted(CONCEPTS))
    plain, jargon = CONCEPTS[concept]
    return {"prompt": rng.choice(EXPLAIN).format(c=concept), "chosen": plain, "rejected": jargon}


def preference_record(rng: random.Random, split: str, kinds: tuple[str, ...] | None = None) -> dict:
    """One pair of a random kind whose `kind|prompt` falls in `split`."""
    kind = rng.choice(sorted(kinds or PREFERENCE_KINDS))
    while True:
        rec = _draw(rng, kind, split)
        if pair_split(kind, rec["prompt"]) == split:
            return {**rec, "kind": kind}


# Share of `builtin:chat` records that are instructions. The algorithmic tasks need most
# of the SFT budget (measured: 600 steps of 32 rows of instructions alone reached 0.48
# instruction accuracy from a 300-step pipeline base model, a 0.85 mix 0.24 with
# otherwise equal settings); the styled chat needs far fewer examples.
CHAT_INSTRUCTION_SHARE = 0.85


def chat_record(rng: random.Random, split: str, tasks: tuple[str, ...] | None = None) -> dict:
    """An SFT demonstration of mixed quality (`builtin:chat`): with probability
    CHAT_INSTRUCTION_SHARE a built-in instruction with its right answer, otherwise a
    request, thanks or question answered with the preferred or the dispreferred
    response at random.

    Real SFT data is like this: it teaches the format and a spread of behaviours,
    not only the best one. The SFT model then answers politely or bluntly, in plain
    words or in jargon, about half the time each, and the reward model, PPO and DPO
    have a preference to learn and a measurable gap to close."""
    if rng.random() < CHAT_INSTRUCTION_SHARE:
        return {**builtin.sft_record(rng, split, tasks), "kind": "instruction"}
    rec = preference_record(rng, split, ("polite", "plain"))
    return {"prompt": rec["prompt"], "response": rec["chosen"] if rng.random() < 0.5 else rec["rejected"],
            "kind": rec["kind"]}


def is_polite(response: str) -> bool:
    return any(m in response.lower() for m in POLITE_MARKERS)


def is_plain(response: str) -> bool:
    return not any(m in response.lower() for m in JARGON_MARKERS)


def prefers(record: dict, response: str) -> bool:
    """Verifier: would the record's kind count `response` as the preferred behaviour?"""
    kind = record["kind"]
    if kind == "correct":
        return builtin.score(record["task"], record["query"], response)
    return is_polite(response) if kind == "polite" else is_plain(response)
