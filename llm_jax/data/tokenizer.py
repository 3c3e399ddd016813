"""Tokenizers. The special tokens are defined once, here, for every stage.

Two kinds share one interface (`encode(text) -> list[int]`, `decode(ids) -> str`
dropping special tokens, `vocab_size`, `pad_id` ... `response_id`, `save(dir)`):

* `ByteTokenizer`: no training; UTF-8 bytes shifted past the special ids.
* `BpeTokenizer`: byte-level BPE trained on the run's own corpus with the
  `tokenizers` library (`train_bpe`); any text round-trips, no unknown token.

Both keep the special tokens at ids 0..5, so a batch means the same thing
whichever tokenizer made it. A tokenizer directory holds `meta.json` (kind,
special tokens, vocab size) and `tokenizer.json` (for BPE the `tokenizers`
file; for bytes a copy of the meta), and `load_tokenizer(dir)` returns
whichever kind was saved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

# id -> name; the same ids in every tokenizer of this package.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>", "<prompt>", "<response>")
PAD_ID, BOS_ID, EOS_ID, MASK_ID, PROMPT_ID, RESPONSE_ID = range(len(SPECIAL_TOKENS))
META_FILE = "meta.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or does not fit the model."""


class _Specials:
    pad_id, bos_id, eos_id, mask_id, prompt_id, response_id = (
        PAD_ID, BOS_ID, EOS_ID, MASK_ID, PROMPT_ID, RESPONSE_ID)
    num_special = len(SPECIAL_TOKENS)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def _write_meta(self, directory: str, **extra) -> dict:
        os.makedirs(directory, exist_ok=True)
        meta = {"kind": self.kind, "special_tokens": list(SPECIAL_TOKENS),
                "vocab_size": self.vocab_size, **extra}
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        return meta


class ByteTokenizer(_Specials):
    """Byte-level: token id = byte value + number of special tokens."""

    kind = "byte"
    offset = len(SPECIAL_TOKENS)
    vocab_size = offset + 256

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        """Special tokens are dropped; bytes that are not valid UTF-8 become U+FFFD."""
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        meta = self._write_meta(directory)
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:  # older runs read this one
            json.dump(meta, f, indent=2)


class BpeTokenizer(_Specials):
    """Byte-level BPE (a `tokenizers.Tokenizer`) with our special tokens at ids 0..5."""

    kind = "bpe"

    def __init__(self, tokenizer):
        for i, name in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(name) != i:
                raise TokenizerError(f"BPE tokenizer has {name} at id {tokenizer.token_to_id(name)}, "
                                     f"expected {i}")
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> None:
        self._write_meta(directory)
        self._tok.save(os.path.join(directory, "tokenizer.json"))


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BpeTokenizer:
    """Trains a byte-level BPE on `texts` (the run's own corpus).

    The byte alphabet (256 symbols) is always in the vocabulary, so any string
    encodes without an unknown token; `vocab_size` counts it and the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise TokenizerError(f"BPE vocab_size={vocab_size} is below the byte alphabet plus specials ({floor})")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: "Blume" encodes the same at the start of a prompt and after "\n".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tok)


def load_tokenizer(directory: str) -> ByteTokenizer | BpeTokenizer:
    """The tokenizer saved in `directory` by `save`, whichever kind it is."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):  # directories written before meta.json existed
        path = os.path.join(directory, "tokenizer.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer at {directory} (no {META_FILE}): "
                                "was the run directory created by llm_jax?") from None
    if tuple(meta.get("special_tokens", ())) != SPECIAL_TOKENS:
        raise TokenizerError(f"{path}: special tokens {meta.get('special_tokens')} differ from this "
                             f"version's {list(SPECIAL_TOKENS)}")
    kind = meta.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer
        return BpeTokenizer(Tokenizer.from_file(os.path.join(directory, "tokenizer.json")))
    raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r} (expected 'byte' or 'bpe')")


def check_vocab_fits(tokenizer, model_vocab_size: int) -> None:
    """Every id the tokenizer can emit must index the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{model_vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
