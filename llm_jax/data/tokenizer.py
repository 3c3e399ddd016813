"""Tokenizers. The special tokens are defined once, here, for every stage.

`ByteTokenizer` needs no training: UTF-8 bytes shifted past the special ids.
"""

from __future__ import annotations

import json
import os

# id -> name; the same ids in every tokenizer of this package.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>", "<prompt>", "<response>")
PAD_ID, BOS_ID, EOS_ID, MASK_ID, PROMPT_ID, RESPONSE_ID = range(len(SPECIAL_TOKENS))


class ByteTokenizer:
    """Byte-level: token id = byte value + number of special tokens."""

    kind = "byte"
    offset = len(SPECIAL_TOKENS)
    vocab_size = offset + 256
    pad_id, bos_id, eos_id, mask_id, prompt_id, response_id = (
        PAD_ID, BOS_ID, EOS_ID, MASK_ID, PROMPT_ID, RESPONSE_ID)

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        """Special tokens are dropped; bytes that are not valid UTF-8 become U+FFFD."""
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            json.dump({"kind": self.kind, "special_tokens": list(SPECIAL_TOKENS),
                       "vocab_size": self.vocab_size}, f, indent=2)


def load_tokenizer(directory: str) -> ByteTokenizer:
    path = os.path.join(directory, "tokenizer.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer at {path}: was the run directory created by llm_jax?") from None
    if meta.get("kind") != "byte":
        raise ValueError(f"{path}: unknown tokenizer kind {meta.get('kind')!r}")
    if tuple(meta.get("special_tokens", ())) != SPECIAL_TOKENS:
        raise ValueError(f"{path}: special tokens {meta.get('special_tokens')} differ from this "
                         f"version's {list(SPECIAL_TOKENS)}")
    return ByteTokenizer()
