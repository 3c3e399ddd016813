"""The built-in world: small procedurally generated tasks from the seeds.

Every task draws (query, answer) items from a seeded `random.Random`; a
pretraining document shows several items of one task in the same plain
`query -> answer` format, one per line, so a model can only lower its loss by
picking up the pattern in context (seed 000: "A B C ... A B -> C"). The
instruction format ("Translate Blume from German to English.") never appears
in pretraining text.
"""

from __future__ import annotations

import json
import random

# A small German -> English table (seed 000).
GERMAN_ENGLISH = {
    "Milch": "milk", "Butter": "butter", "Fenster": "window", "Blume": "flower",
    "Katze": "cat", "Hund": "dog", "Haus": "house", "Baum": "tree", "Buch": "book",
    "Wasser": "water", "Brot": "bread", "Apfel": "apple", "Tisch": "table",
    "Stuhl": "chair", "Sonne": "sun", "Mond": "moon", "Vogel": "bird", "Fisch": "fish",
    "Auto": "car", "Schule": "school", "Tür": "door", "Garten": "garden",
    "Käse": "cheese", "Stern": "star", "Berg": "mountain", "Fluss": "river",
}
NAMES = ("Alice", "Bob", "Clara", "David", "Emma", "Felix", "Greta", "Hans", "Ida", "Jonas")
CITIES = ("Berlin", "Munich", "Hamburg", "Cologne", "Vienna", "Zurich", "Bremen", "Dresden")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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


def translate_item(rng: random.Random) -> tuple[str, str]:
    german = rng.choice(sorted(GERMAN_ENGLISH))
    return german, GERMAN_ENGLISH[german]


def format_item(rng: random.Random) -> tuple[str, str]:
    rec = {"name": rng.choice(NAMES), "age": rng.randint(5, 80), "city": rng.choice(CITIES)}
    query = ", ".join(f"{k}={v}" for k, v in rec.items())
    return query, json.dumps(rec)


def square_item(rng: random.Random) -> tuple[str, str]:
    x = rng.randint(0, 20)
    return str(x), str(x * x)


def add_item(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"{a} + {b}", str(a + b)


TASKS = {
    "copy": copy_item, "sort": sort_item, "reverse": reverse_item, "translate": translate_item,
    "format": format_item, "square": square_item, "add": add_item,
}


def few_shot_document(rng: random.Random, task: str, shots: int) -> str:
    """`shots` items of one task, one `query -> answer` per line."""
    return "".join(f"{q} -> {a}\n" for q, a in (TASKS[task](rng) for _ in range(shots)))


def pretrain_documents(seed: int, count: int, min_shots: int = 2, max_shots: int = 6) -> list[str]:
    """The pretraining mixture: few-shot documents of every task, in a seeded order."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    return [few_shot_document(rng, rng.choice(names), rng.randint(min_shots, max_shots))
            for _ in range(count)]
