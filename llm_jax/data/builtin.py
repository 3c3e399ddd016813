"""The built-in world: small procedurally generated tasks.

Every task draws (query, answer) items from a seeded `random.Random` and has a
program scorer (`SCORERS`: exact match, JSON equality or a verifier). Three
views of the same tasks feed the stages:

* pretraining (`pretrain_documents`): several items of one task in the plain
  `query -> answer` format, one per line, so a model can only lower its loss
  by picking up the pattern in context (the induction pattern "A B ... A -> B"
  of Olsson et al. 2022, "In-context Learning and Induction Heads",
  arXiv:2209.11895). The instruction format never appears in pretraining text,
  so a base model continues text rather than following instructions (the gap
  instruction tuning closes: Ouyang et al. 2022, "Training language models to
  follow instructions with human feedback", arXiv:2203.02155).
  Pretraining also has two rules that share another task's queries
  (`ICL_ONLY_TASKS`: German -> French beside German -> English, x -> 2x beside
  x -> x^2), so a bare `Auto ->` or `7 ->` does not say which rule is asked and
  only the shots do: what in-context learning is (Brown et al. 2020, "Language
  Models are Few-Shot Learners", arXiv:2005.14165). Without them
  every query names its task by its shape, and shots could add nothing.
* SFT (`sft_record`): the same items as instructions,
  "Translate Blume from German to English." -> "flower".
* preferences (`llm_jax.data.preferences`): correct vs wrong, polite vs blunt,
  plain vs jargon.

Held-out splits (`split="train" | "eval"`) never share an item with training.
A key is hashed into a bucket (`bucket`, 10% eval):
* open tasks (copy, sort, reverse, format, add) hash `task|query`: an eval
  query never appears anywhere in training, neither as a query nor as a shot,
  neither in pretraining nor in SFT;
* closed tasks (translate, translate_fr, square, double) have a small fixed
  table that the model can only know from pretraining (26 German words, 21 numbers). Holding out words
  would make them unknowable, so in-context evaluation holds out *prompts*:
  the whole combination (which shots, in which order, and which query) is
  hashed, and an eval prompt is never a training document nor the beginning
  of one (every prefix of a training document hashes to train). The words are
  shared. SFT instructions still hash `task|query`, so SFT evaluation asks for
  words (or squares) that SFT never trained on but pretraining showed: that is
  instruction following transferred to known facts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

from llm_jax.errors import InputError

# A small German -> English table.
GERMAN_ENGLISH = {
    "Milch": "milk", "Butter": "butter", "Fenster": "window", "Blume": "flower",
    "Katze": "cat", "Hund": "dog", "Haus": "house", "Baum": "tree", "Buch": "book",
    "Wasser": "water", "Brot": "bread", "Apfel": "apple", "Tisch": "table",
    "Stuhl": "chair", "Sonne": "sun", "Mond": "moon", "Vogel": "bird", "Fisch": "fish",
    "Auto": "car", "Schule": "school", "Tür": "door", "Garten": "garden",
    "Käse": "cheese", "Stern": "star", "Berg": "mountain", "Fluss": "river",
}
# The same German words in French (after Brown et al. 2020's "Translate English to French"): a
# second table over the same queries, so `Auto ->` alone does not say which is asked.
GERMAN_FRENCH = {
    "Milch": "lait", "Butter": "beurre", "Fenster": "fenêtre", "Blume": "fleur",
    "Katze": "chat", "Hund": "chien", "Haus": "maison", "Baum": "arbre", "Buch": "livre",
    "Wasser": "eau", "Brot": "pain", "Apfel": "pomme", "Tisch": "table",
    "Stuhl": "chaise", "Sonne": "soleil", "Mond": "lune", "Vogel": "oiseau", "Fisch": "poisson",
    "Auto": "voiture", "Schule": "école", "Tür": "porte", "Garten": "jardin",
    "Käse": "fromage", "Stern": "étoile", "Berg": "montagne", "Fluss": "rivière",
}
NAMES = ("Alice", "Bob", "Clara", "David", "Emma", "Felix", "Greta", "Hans", "Ida", "Jonas")
CITIES = ("Berlin", "Munich", "Hamburg", "Cologne", "Vienna", "Zurich", "Bremen", "Dresden")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPLITS = ("train", "eval")
EVAL_PERCENT = 10


def copy_item(rng: random.Random) -> tuple[str, str]:
    """A B C D A B -> C D: continue a repeated pattern."""
    n = rng.randint(3, 5)
    pattern = rng.sample(LETTERS, n)
    cut = rng.randint(1, n - 1)
    return " ".join(pattern + pattern[:cut]), " ".join(pattern[cut:])


def sort_item(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))


def reverse_item(rng: random.Random) -> tuple[str, str]:
    xs = rng.sample(LETTERS.lower(), rng.randint(3, 6))
    return " ".join(xs), " ".join(reversed(xs))


def _word_item(table: dict[str, str], rng: random.Random) -> tuple[str, str]:
    german = rng.choice(sorted(table))
    return german, table[german]


def translate_item(rng: random.Random) -> tuple[str, str]:
    return _word_item(GERMAN_ENGLISH, rng)


def format_item(rng: random.Random) -> tuple[str, str]:
    rec = {"name": rng.choice(NAMES), "age": rng.randint(5, 80), "city": rng.choice(CITIES)}
    query = ", ".join(f"{k}={v}" for k, v in rec.items())
    return query, json.dumps(rec)


def translate_fr_item(rng: random.Random) -> tuple[str, str]:
    return _word_item(GERMAN_FRENCH, rng)


def square_item(rng: random.Random) -> tuple[str, str]:
    x = rng.randint(0, 20)
    return str(x), str(x * x)


def double_item(rng: random.Random) -> tuple[str, str]:
    x = rng.randint(0, 20)  # the same queries as square: `7 ->` is 49 or 14, the shots say which
    return str(x), str(2 * x)


def add_item(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"{a} + {b}", str(a + b)


TASKS = {
    "copy": copy_item, "sort": sort_item, "reverse": reverse_item, "translate": translate_item,
    "format": format_item, "square": square_item, "add": add_item,
}
# Pretraining-only tasks: rules whose queries are another task's queries, so only
# the shots tell which rule a document follows (in-context learning proper: at 0
# shots `Auto ->` is English or French, `7 ->` a square or a double). They have no
# instruction; SFT, preferences and their evaluations use TASKS.
ICL_ONLY_TASKS = {"translate_fr": translate_fr_item, "double": double_item}
PRETRAIN_TASKS = {**TASKS, **ICL_ONLY_TASKS}
CLOSED_TASKS = frozenset({"translate", "translate_fr", "square", "double"})  # held out by prompt (see above)


# ---------------------------------------------------------------------------
# Scorers: the answer a program expects, checked without a model.


def _json_equal(query: str, response: str) -> bool:
    try:
        got = json.loads(response)
    except (json.JSONDecodeError, ValueError):
        return False
    fields = dict(kv.split("=", 1) for kv in query.split(", "))
    return got == {"name": fields["name"], "age": int(fields["age"]), "city": fields["city"]}


def _sort_ok(query: str, response: str) -> bool:
    got = response.split()
    return got == sorted(got) and sorted(got) == sorted(query.split())


def _int_ok(value: int, response: str) -> bool:
    try:
        return int(response.strip()) == value
    except ValueError:
        return False


def _word_ok(table: dict[str, str], query: str, response: str) -> bool:
    return response.strip().lower() == table.get(query, "\0")


def _copy_ok(query: str, response: str) -> bool:
    # the answer is the rest of the pattern: the first repeat of the opening letter marks its period
    xs = query.split()
    if xs[0] not in xs[1:]:
        return False
    period = xs.index(xs[0], 1)
    return response.split() == xs[len(xs) - period:period]


SCORERS = {
    "copy": _copy_ok,
    "sort": _sort_ok,  # verifier: sorted and a permutation of the query
    "reverse": lambda q, r: r.split() == q.split()[::-1],
    "translate": lambda q, r: _word_ok(GERMAN_ENGLISH, q, r),
    "translate_fr": lambda q, r: _word_ok(GERMAN_FRENCH, q, r),
    "format": _json_equal,  # JSON equality, not string equality
    "square": lambda q, r: _int_ok(int(q) ** 2, r),
    "double": lambda q, r: _int_ok(2 * int(q), r),
    "add": lambda q, r: _int_ok(sum(int(x) for x in q.split(" + ")), r),
}


def score(task: str, query: str, response: str) -> bool:
    """Whether `response` answers `query` of `task` (whitespace at the ends ignored)."""
    return bool(SCORERS[task](query, response.strip()))


# ---------------------------------------------------------------------------
# Held-out splits.


def bucket(key: str) -> str:
    """'eval' for EVAL_PERCENT% of keys, 'train' for the rest; stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "eval" if h % 100 < EVAL_PERCENT else "train"


def item_key(task: str, query: str) -> str:
    return f"{task}|{query}"


def draw_item(rng: random.Random, task: str, split: str | None) -> tuple[str, str]:
    """An item of `task` whose (task, query) falls in `split` (None: any)."""
    while True:
        q, a = PRETRAIN_TASKS[task](rng)
        if split is None or bucket(item_key(task, q)) == split:
            return q, a


def draw_document(rng: random.Random, task: str, shots: int, split: str | None) -> list[tuple[str, str]]:
    """`shots` items of one task, every item (open tasks) or the whole prompt
    (closed tasks; for "train" every prefix too) in `split`."""
    if split is not None and split not in SPLITS:
        raise InputError(f"split={split!r}: pass one of {SPLITS}, or None for any")
    if task not in CLOSED_TASKS:
        return [draw_item(rng, task, split) for _ in range(shots)]
    while True:
        items = [PRETRAIN_TASKS[task](rng) for _ in range(shots)]
        if split is None:
            return items
        # A training document has no eval prompt as a prefix either: a 0-shot probe
        # `Auto ->` (-> car) must not be how training documents begin.
        keys = [prompt_key(task, items)] if split == "eval" else [prompt_key(task, items[:k])
                                                                  for k in range(1, shots + 1)]
        if all(bucket(k) == split for k in keys):
            return items


def prompt_key(task: str, items: list[tuple[str, str]]) -> str:
    """The split key of a closed task's prompt (its lines, answers included)."""
    return f"{task}|prompt|" + render(items)


def render(items: list[tuple[str, str]]) -> str:
    """The pretraining format: one `query -> answer` per line."""
    return "".join(f"{q} -> {a}\n" for q, a in items)


def few_shot_document(rng: random.Random, task: str, shots: int, split: str | None = None) -> str:
    """`shots` items of one task, one `query -> answer` per line."""
    return render(draw_document(rng, task, shots, split))


def pretrain_documents(seed: int, count: int, min_shots: int = 2, max_shots: int = 6,
                       split: str | None = "train", tasks: tuple[str, ...] | None = None) -> list[str]:
    """The pretraining mixture: few-shot documents of every task, in a seeded order."""
    rng = random.Random(seed)
    names = sorted(tasks or PRETRAIN_TASKS)
    return [few_shot_document(rng, rng.choice(names), rng.randint(min_shots, max_shots), split)
            for _ in range(count)]


def icl_probe(rng: random.Random, task: str, shots: int, split: str = "eval") -> dict:
    """An in-context prompt (`shots` examples, then `query ->`) and its answer.

    The whole prompt, query included, is drawn from `split`, with the same rule
    as pretraining documents, so an eval probe is never a training document."""
    items = draw_document(rng, task, shots + 1, split)
    q, a = items[-1]
    return {"prompt": render(items[:-1]) + f"{q} ->", "answer": a, "task": task, "query": q}


# ---------------------------------------------------------------------------
# Instructions (SFT): the same items, asked for in words.

INSTRUCTIONS = {
    "copy": "Continue the pattern: {q}",
    "sort": "Sort these numbers: {q}",
    "reverse": "Reverse: {q}",
    "translate": "Translate {q} from German to English.",
    "format": "Format as JSON: {q}",
    "square": "What is {q} squared?",
    "add": "What is {q}?",
}
_INSTRUCTION_RES = {t: re.compile("^" + re.escape(s).replace(re.escape("{q}"), "(.+)") + "$")
                    for t, s in INSTRUCTIONS.items()}


def instruction(task: str, query: str) -> str:
    return INSTRUCTIONS[task].format(q=query)


def parse_instruction(prompt: str) -> tuple[str, str] | None:
    """(task, query) of a built-in instruction, or None. Templates are tried in
    a fixed order; "What is 3 squared?" is a square, not an addition."""
    for task in ("square", *[t for t in INSTRUCTIONS if t != "square"]):
        m = _INSTRUCTION_RES[task].match(prompt.strip())
        if m and (task != "add" or re.fullmatch(r"\d+ \+ \d+", m.group(1))):
            return task, m.group(1)
    return None


def score_instruction(prompt: str, response: str) -> float | None:
    """1.0 / 0.0 for a built-in instruction's response; None for other prompts.
    A program reward for PPO and a metric for SFT evaluation."""
    parsed = parse_instruction(prompt)
    return None if parsed is None else float(score(*parsed, response))


def sft_record(rng: random.Random, split: str, tasks: tuple[str, ...] | None = None) -> dict:
    task = rng.choice(sorted(tasks or TASKS))
    q, a = draw_item(rng, task, split)
    return {"prompt": instruction(task, q), "response": a, "task": task, "query": q}


def pretrain_record(rng: random.Random, split: str, tasks: tuple[str, ...] | None = None) -> dict:
    task = rng.choice(sorted(tasks or PRETRAIN_TASKS))
    return {"text": few_shot_document(rng, task, rng.randint(2, 6), split), "task": task}
