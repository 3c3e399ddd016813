"""Verifiable rewards: programs that score a completion, for RL without a reward model.

A verifier is a function `verifier(prompt, completion, record) -> float` where
`record` is the prompt's JSONL record (`{"prompt", "answer", ...}`, every field
as the user wrote it). RL from verifiable rewards (Lambert et al. 2024, "Tulu 3",
arXiv:2411.15124; DeepSeek-AI 2025, "DeepSeek-R1", arXiv:2501.12948) trains on
such scores instead of a learned reward model, which cannot be gamed the way
a reward model can.

    builtin                 the built-in world's instruction scorers (1.0 / 0.0)
    module:function         a user's function, imported by name (`load_verifier`)

Mistakes are found early and named: a name that does not import or is not
callable is a `ConfigError` before training; a verifier that raises, or returns
something other than a finite number, is a `DataError` naming the verifier and
the record (its index and prompt), never a traceback in the middle of a run.

A verifier may set an attribute `success_threshold` (a float): a completion whose
reward reaches it counts as a success in the logged accuracy (default 1.0, the
score of a correct answer under 0/1 rewards).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llm_jax.data import builtin
from llm_jax.data.errors import SkipReport
from llm_jax.data.records import check_file, parse_line
from llm_jax.errors import ConfigError, DataError

Verifier = Callable[[str, str, dict], float]
BUILTIN = "builtin"
SUCCESS_THRESHOLD = 1.0  # a reward >= this is a success unless the verifier says otherwise
FIELDS = ("prompt", "answer")


def builtin_verifier(prompt: str, completion: str, record: dict) -> float:
    """1.0 if `completion` answers the built-in instruction `prompt`, else 0.0:
    `builtin.score_instruction`, the scorer of `evals.instruction_accuracy`."""
    del record  # the prompt names the task and the query; the scorer needs nothing else
    scored = builtin.score_instruction(prompt, completion)
    if scored is None:
        raise ValueError("not a built-in instruction (see llm_jax.data.builtin.INSTRUCTIONS)")
    return scored


def load_verifier(name: str, field: str = "verifier") -> Verifier:
    """The verifier called `name`: "builtin" or "module:function" (the module
    importable from the working directory or sys.path, e.g. "my_rewards:exact_match").
    A ConfigError naming `field` when it cannot be used."""
    if name == BUILTIN:
        return builtin_verifier
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{field}={name!r}: expected 'builtin' or 'module:function' "
                          "(e.g. my_rewards:exact_match, a function in my_rewards.py)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise ConfigError(f"{field}={name!r}: module {module_name!r} does not import "
                          f"({type(e).__name__}: {e}); is its directory on PYTHONPATH?") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"{field}={name!r}: {module_name} has no {attr!r} "
                              f"(defined: {', '.join(sorted(n for n in dir(module) if not n.startswith('_')))})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{field}={name!r}: {attr} is a {type(fn).__name__}, not a function "
                          "(prompt, completion, record) -> float")
    return fn


def success_threshold(verifier: Verifier) -> float:
    """The reward from which a completion counts as a success (see the module docstring)."""
    value = getattr(verifier, "success_threshold", SUCCESS_THRESHOLD)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"verifier {getattr(verifier, '__name__', verifier)!r}: success_threshold="
                          f"{value!r} must be a finite number")
    return float(value)


def _shown(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _value(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."



def reward(verifier: Verifier, name: str, record: dict, completion: str, index: int) -> float:
    """One verifier call, its result checked: a finite float, or a DataError that
    names the verifier and the record (index and prompt)."""
    where = f"record {index} (prompt {_shown(record['prompt'])})"
    try:
        value = verifier(record["prompt"], completion, record)
    except Exception as e:  # noqa: BLE001 - the user's code: any failure becomes one clear line
        raise DataError(f"verifier {name} raised {type(e).__name__}: {e} on {where}, completion "
                        f"{_shown(completion)}; fix the verifier or the record") from None
    if isinstance(value, (bool, np.bool_)):
        value = float(value)
    if not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise DataError(f"verifier {name} returned {type(value).__name__} {_value(value)} on {where}: "
                        "a verifier returns a number (float)")
    value = float(value)
    if not math.isfinite(value):
        raise DataError(f"verifier {name} returned {value} on {where}: rewards must be finite numbers")
    return value


def rewards(verifier: Verifier, name: str, records: Sequence[dict], indices: Sequence[int],
            completions: Sequence[str]) -> np.ndarray:
    """[len(indices)] float32: the reward of completions[i] for records[indices[i]]."""
    return np.asarray([reward(verifier, name, records[int(i)], c, int(i))
                       for i, c in zip(indices, completions)], np.float32)


# ---------------------------------------------------------------------------
# Records


def check_verifiable(raw: Any) -> dict | str:
    """The record, or the reason it cannot be used: a JSON object with a non-empty
    string "prompt" and an "answer" (any JSON value; only the verifier reads it)."""
    if not isinstance(raw, dict):
        return f"not a JSON object ({type(raw).__name__})"
    for field in FIELDS:
        if field not in raw:
            return f"missing field '{field}'"
    if not isinstance(raw["prompt"], str):
        return f"field 'prompt' is {type(raw['prompt']).__name__}, not a string"
    if not raw["prompt"].strip():
        return "empty field 'prompt'"
    return raw


@dataclasses.dataclass(frozen=True)
class Records:
    """Verifiable records of one file, and what reading it skipped (reason -> places)."""

    records: list[dict]
    skipped: SkipReport


def read_records(path: str) -> Records:
    """`{"prompt", "answer", ...}` lines of a JSONL file. A bad line is skipped and
    counted with its line number; a file with no usable record is a DataError."""
    check_file(path)
    out, skipped = [], SkipReport()
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            obj, reason = parse_line(raw)
            checked = reason or check_verifiable(obj)
            if isinstance(checked, str):
                skipped.add(checked, f"{path}:{line_no}")
            else:
                out.append(checked)
    if not out:
        raise DataError(f"{path}: no usable record ({skipped.summary()}); each line needs "
                        '{"prompt": "...", "answer": ...}')
    return Records(out, skipped)


def check_tasks(tasks: Sequence[str] | None, field: str = "tasks") -> None:
    """ConfigError naming any of `tasks` that is not a built-in instruction task: what a
    run calls before it writes anything."""
    unknown = sorted(set(tasks or ()) - set(builtin.TASKS))
    if unknown:
        raise ConfigError(f"{field} {unknown}: not built-in instruction tasks; choose from {sorted(builtin.TASKS)}")


def builtin_records(count: int, seed: int = 0, split: str = "train",
                    tasks: tuple[str, ...] | None = None) -> list[dict]:
    """`count` built-in instruction tasks as verifiable records {"prompt", "answer",
    "task", "query"} (`builtin.sft_record`; the held-out split is "eval"). An unknown
    task name is a ConfigError (`check_tasks`)."""
    check_tasks(tasks)
    rng = random.Random(seed)
    return [{"prompt": r["prompt"], "answer": r["response"], "task": r["task"], "query": r["query"]}
            for r in (builtin.sft_record(rng, split, tasks) for _ in range(count))]
