"""The built-in classification task: which rule turns the query into the answer?

Each record is one line of the built-in world's `query -> answer` format over
the reverse task's alphabet (3 to 6 distinct lowercase letters), labelled with
the rule that produced the answer:

    0 same      q d a m -> q d a m
    1 reverse   q d a m -> m a d q
    2 sort      q d a m -> a d m q

    {"text": "q d a m -> a d m q", "label": 2, "rule": "sort", "query": "q d a m"}

Why this task: every class uses exactly the same letters on both sides of the
arrow, in lines of the same length, so no single token (nor the length, nor the
letter set) tells the label; a model has to compare the order of the answer
with the order of the query, the relation the world's `reverse` and `sort`
tasks teach. It is still small enough for a 1M-parameter model to learn on a
CPU in about a minute, and it is scored by a program: `label_of` applies the
world's own scorers (`builtin.SCORERS["reverse"]`, `["sort"]`) to the line.
Queries that two rules map to the same answer (already sorted, or sorted
backwards) are redrawn, so every line has exactly one correct label.

Splits hash the query (`builtin.bucket("classify|" + query)`): an eval query
never appears in training under any label.
"""

from __future__ import annotations

import random

from llm_jax.data import builtin
from llm_jax.errors import InputError

CLASSES = ("same", "reverse", "sort")  # label = index into this tuple
LETTERS = builtin.LETTERS.lower()
ARROW = " -> "
QUERY_LENGTHS = (3, 6)  # letters per query, as the world's reverse task


def apply_rule(rule: str, xs: list[str]) -> list[str]:
    if rule == "same":
        return list(xs)
    if rule == "reverse":
        return xs[::-1]
    if rule == "sort":
        return sorted(xs)
    raise InputError(f"rule={rule!r}: unknown; pass one of {CLASSES}")


def draw_query(rng: random.Random, split: str | None) -> list[str]:
    """3-6 distinct letters, neither ascending nor descending (so the three rules
    give three different answers), whose hash falls in `split` (None: any)."""
    if split is not None and split not in builtin.SPLITS:
        raise InputError(f"split={split!r}: pass one of {builtin.SPLITS}, or None for any")
    while True:
        xs = rng.sample(LETTERS, rng.randint(*QUERY_LENGTHS))
        if xs == sorted(xs) or xs == sorted(xs, reverse=True):
            continue
        if split is None or builtin.bucket("classify|" + " ".join(xs)) == split:
            return xs


def classification_record(rng: random.Random, split: str, classes: tuple[str, ...] | None = None) -> dict:
    """One labelled line; `classes` restricts the rules drawn (labels keep their
    index in `CLASSES`)."""
    rule = rng.choice([c for c in CLASSES if c in (classes or CLASSES)])
    xs = draw_query(rng, split)
    query = " ".join(xs)
    return {"text": query + ARROW + " ".join(apply_rule(rule, xs)), "label": CLASSES.index(rule),
            "rule": rule, "query": query}


def label_of(text: str) -> int | None:
    """The program's label of a line: which of the world's scorers accepts it as
    the identity, a reversal or a sort of its query (None: none does, or several)."""
    query, sep, answer = text.partition(ARROW)
    if not sep:
        return None
    hits = [label for label, ok in enumerate((
        query.split() == answer.split(),
        builtin.score("reverse", query, answer),
        builtin.score("sort", query, answer))) if ok]
    return hits[0] if len(hits) == 1 else None
