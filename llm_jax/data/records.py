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
* `jsonl:PATH`: one JSON object per line; blank lines are not records.
* `text:PATH`: one document per paragraph; paragraphs are separated by one or
  more blank (or whitespace-only) lines, and keep their inner newlines, because
  a few-shot document or a poem is several lines long. A paragraph's place is
  the line it starts on.
"""

from __future__ import annotations

import json
import os
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


def check_kind(kind: str) -> tuple[str, ...]:
    if kind not in KINDS:
        raise DataError(f"unknown record kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


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
        out[field] = value
    if kind == "preferences" and out["chosen"] == out["rejected"]:
        return "chosen equals rejected"
    return out


def _class_index(field: str, value: Any) -> int | str:
    """An int >= 0 (also from a numpy integer, as TFDS returns), or the reason it is not one.
    Floats and bools are refused: `1.0` or `true` in a label column is a data bug."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        return f"field '{field}' is {type(value).__name__}, not an integer class index"
    if value < 0:
        return f"field '{field}' is {value}, not a class index (>= 0)"
    return value


def check_file(path: str) -> None:
    """A clear error for a missing or empty file, before anything reads it."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")


def read_jsonl(path: str, kind: str) -> Iterator[tuple[int, dict | str]]:
    """(line number, record or reason) for every non-blank line."""
    check_file(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, "line is not valid UTF-8"
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, f"malformed JSON ({e.msg})"
                continue
            yield line_no, check_record(obj, kind)


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
