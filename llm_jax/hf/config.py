"""config.json: reading it, and the typed, checked field reads every family's
mapping to a ModelConfig goes through (see `llm_jax.hf.families`).

Each field is read with its type checked (`Fields`): a key that is missing or
holds the wrong type is an HFError naming the file, the key and the value, and a
setting this model does not implement is refused by name (`require`), never
loaded into a model that would compute something else.
"""

from __future__ import annotations

import json
import math
import os

from llm_jax.errors import HFError
from llm_jax.hf.safetensors import is_int

CONFIG_FILE = "config.json"


def read_config(directory: str) -> dict:
    """The config.json object of a HF directory, as parsed JSON (its fields are
    checked when a family maps it, see `Fields`)."""
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:  # JSON is UTF-8 whatever the locale
            hf = json.load(f)
    except FileNotFoundError:
        raise HFError(f"{directory}: no {CONFIG_FILE}; is this a Hugging Face model directory?") from None
    except OSError as e:
        raise HFError(f"{path}: cannot be read ({e})") from None
    except UnicodeDecodeError as e:
        raise HFError(f"{path}: not UTF-8 text ({e})") from None
    except ValueError as e:
        raise HFError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise HFError(f"{path}: a JSON {type(hf).__name__}, not the JSON object of a model config")
    return hf


_REQUIRED = object()


class Fields:
    """Typed reads of a config.json object (or one of its nested objects, `prefix`
    naming it): a key that is missing or holds the wrong type is an HFError naming the
    file, the key and the value, not a KeyError, a TypeError from deep in ModelConfig,
    or a string silently taken for a number or a bool ("false" is truthy). A JSON null
    reads as the default, as transformers reads it."""

    def __init__(self, hf: dict, where: str, prefix: str = ""):
        self.hf, self.where, self.prefix = hf, where, prefix

    def _absent(self, key: str, default):
        """The default of a key that is absent or null, or the HFError of a required one."""
        if default is not _REQUIRED:
            return default
        if key in self.hf:
            raise HFError(f"{self.where}: {self.prefix}{key}=None: a value is required")
        raise HFError(f"{self.where}: {self.prefix}{key} is missing")

    def _bad(self, key: str, value, expected: str) -> HFError:
        return HFError(f"{self.where}: {self.prefix}{key}={value!r}: expected {expected}")

    def int(self, key: str, default=_REQUIRED, minimum: int = 1) -> int:
        value = self.hf.get(key)
        if value is None:
            return self._absent(key, default)
        if not (is_int(value) and value >= minimum):
            raise self._bad(key, value, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        return value

    def number(self, key: str, default=_REQUIRED, positive: bool = True) -> float:
        value = self.hf.get(key)
        if value is None:
            return self._absent(key, default)
        real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not real or value < 0 or (positive and value == 0):
            raise self._bad(key, value, "a positive number" if positive else "a number >= 0")
        return float(value)

    def bool(self, key: str, default=_REQUIRED) -> bool:
        value = self.hf.get(key)
        if value is None:
            return self._absent(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def object(self, key: str) -> dict:
        value = self.hf.get(key)
        if value is not None and not isinstance(value, dict):
            raise self._bad(key, value, "a JSON object (or null)")
        return dict(value or {})


def require(hf: dict, where: str, key: str, allowed, default=None) -> None:
    """An HFError naming `key` unless its value (`default` when absent) is one of
    `allowed`: the settings of a family that llm_jax implements only one way."""
    value = hf.get(key, default)
    if value not in allowed:
        raise HFError(f"{where}: {key}={value!r} is not supported by llm_jax (supported: {list(allowed)})")


def special_ids(tokenizer) -> dict:
    """The config.json entries of a tokenizer's special tokens (none without one)."""
    if tokenizer is None:
        return {}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
