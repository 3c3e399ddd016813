"""Record kinds and their validation, and the readers of local files.

Four kinds of record, one per family of stages:

    pretrain        {"text": str}
    sft             {"prompt": str, "response": str}
    preferences     {"prompt": str, "chosen": str, "rejected": str}
    classification  {"text": str, "label": int}    # label: a class index >= 0

Extra fields are kept (the built-in world adds "task" and "query" for its
scorers) but never read by the pipeline. `check_record` returns the cleaned
record or the reason it is unusable; readers yield `(line, record_or_reason)`
so every skip can be reported with its file and line.

File rules:
* `jsonl:PATH`: one JSON object per line; blank lines are not records. A line
  that cannot be read (not UTF-8, malformed JSON, nested too deeply, a number
  with too many digits) is a reason like any check's, never an exception.
* `text:PATH`: one document per paragraph; paragraphs are separated by one or
  more blank (or whitespace-only) lines, and keep their inner newlines, because
  a few-shot document or a poem is several lines long. A paragraph's place is
  the line it starts on.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

from llm_jax.data.errors import DataError

KINDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("text",),
    "sft": ("prompt", "response"),
    "preferences": ("prompt", "chosen", "rejected"),
    "classification": ("text", "label"),
}
INT_FIELDS = frozenset({"label"})  # every other field is a string
# Labels travel as int32 in a batch (and int64 in a built dataset): a larger one is no class index.
LABEL_LIMIT = 2**31
# How messages name each kind: "holds pretraining records", "the sft stage needs".
KIND_NAMES = {"pretrain": "pretraining", "sft": "sft", "preferences": "preference",
              "classification": "classification"}


def check_kind(kind: str) -> tuple[str, ...]:
    if kind not in KINDS:
        raise DataError(f"unknown record kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


def fields_text(fields) -> str:
    """{"prompt","response"}: fields as a record shows them."""
    return "{" + ",".join(f'"{f}"' for f in fields) + "}"


def kind_of(raw: Any) -> str | None:
    """The most specific kind whose fields `raw` has (classification over pretrain), or None."""
    fields = raw.keys() if isinstance(raw, dict) else ()
    for kind in ("preferences", "sft", "classification", "pretrain"):
        if all(f in fields for f in KINDS[kind]):
            return kind
    return None


def has_fields(raw: Any, kind: str) -> bool:
    """Whether `raw` (a record, or a kind's name) has every field `kind` needs; extra fields
    are fine: {"text", "label"} records are also a pretraining corpus."""
    fields = KINDS[raw] if isinstance(raw, str) else raw.keys() if isinstance(raw, dict) else ()
    return all(f in fields for f in check_kind(kind))


def wrong_kind(source: str, found: Any, kind: str) -> str:
    """The message for a source whose records (`found`: a kind's name or a sample record)
    lack fields the `kind` stage needs: it names the source, what it holds and what is needed."""
    found_kind = found if isinstance(found, str) else kind_of(found)
    if found_kind is not None:
        holds = f"{KIND_NAMES[found_kind]} records {fields_text(KINDS[found_kind])}"
    elif isinstance(found, dict):
        holds = f"records with fields {fields_text(sorted(map(str, found)))}"
    else:
        holds = f"records that are not JSON objects ({type(found).__name__})"
    return (f"data.source={source} holds {holds}; the {KIND_NAMES[kind]} stage needs "
            f"{fields_text(KINDS[kind])} records")


def check_record(raw: Any, kind: str) -> dict | str:
    """The record with its fields as `str` (a label as `int`), or the reason it cannot be used."""
    if not isinstance(raw, dict):
        return f"not a JSON object ({type(raw).__name__})"
    out = dict(raw)
    for field in check_kind(kind):
        if field not in raw:
            return f"missing field '{field}'"
        value = raw[field]
        if field in INT_FIELDS:
            value = _class_index(field, value)
            if isinstance(value, str):
                return value
            out[field] = value
            continue
        if isinstance(value, (bytes, bytearray)):  # TFDS Text features come back as bytes
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                return f"field '{field}' is not valid UTF-8"
        elif hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
            value = value.item()
            if isinstance(value, bytes):
                return check_record({**raw, field: value}, kind)
        if not isinstance(value, str):
            return f"field '{field}' is {type(value).__name__}, not a string"
        if not value.strip():
            return f"empty field '{field}'"
        # JSON may escape half a surrogate pair ("\ud800"): a str that no UTF-8 writer
        # (the built dataset, the tokenizer) accepts. isascii() is O(1) in CPython, so
        # the encode only runs for non-ASCII text.
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"field '{field}' is not valid Unicode (a lone surrogate)"
        out[field] = value
    if kind == "preferences" and out["chosen"] == out["rejected"]:
        return "chosen equals rejected"
    return out


def _class_index(field: str, value: Any) -> int | str:
    """An int >= 0 (also from a numpy integer, as TFDS returns), or the reason it is not one.
    Floats and bools are refused: `1.0` or `true` in a label column is a data bug."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN, Infinity, -Infinity
        name = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        return f"field '{field}' is {name}, not an integer class index"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"field '{field}' is {type(value).__name__}, not an integer class index"
    # Range before value: a reason never prints a huge number (JSON allows thousands of digits).
    if value >= LABEL_LIMIT:
        return f"field '{field}' is too large for a class index (2**31 or more)"
    if value < 0:
        shown = value if value > -LABEL_LIMIT else "below -2**31"
        return f"field '{field}' is {shown}, not a class index (>= 0)"
    return value


def check_file(path: str) -> None:
    """A clear error for a missing or empty file, before anything reads it."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")


def parse_line(raw: bytes) -> tuple[Any, str | None]:
    """(the JSON value of one line, None) or (None, the reason it cannot be read).

    Every way a line can fail to parse is a reason, never an exception: a bad line
    is skipped and counted with its place like any other."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "line is not valid UTF-8"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg})"
    except RecursionError:  # [[[[...]]]] deeper than the interpreter's stack
        return None, "malformed JSON (nested too deeply)"
    except ValueError:  # the only other ValueError of json.loads: Python's limit on integer digits
        return None, f"number too long to read (over {sys.get_int_max_str_digits()} digits)"


def first_json_object(path: str) -> dict | None:
    """The first line of a jsonl file that is a JSON object (what kind of records it holds)."""
    with open(path, "rb") as f:
        for raw in f:
            obj, _ = parse_line(raw)
            if isinstance(obj, dict):
                return obj
    return None


def read_jsonl(path: str, kind: str) -> Iterator[tuple[int, dict | str]]:
    """(line number, record or reason) for every non-blank line."""
    check_file(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            obj, reason = parse_line(raw)
            yield line_no, reason or check_record(obj, kind)


def read_text(path: str, kind: str) -> Iterator[tuple[int, dict | str]]:
    """(first line number, {"text": paragraph} or reason) for every paragraph."""
    if kind != "pretrain":
        raise DataError(f"text:{path} holds plain text, which only makes pretraining records "
                        f"(kind='pretrain'), not kind={kind!r}; use a jsonl file")
    check_file(path)
    start, lines, bad = 0, [], False
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line, bad = "?", True
            if line.strip():
                if not lines:
                    start = line_no
                lines.append(line.rstrip("\r\n"))
                continue
            if lines:
                yield start, ("paragraph is not valid UTF-8" if bad else {"text": "\n".join(lines)})
            lines, bad = [], False
    if lines:
        yield start, ("paragraph is not valid UTF-8" if bad else {"text": "\n".join(lines)})
