"""Tokenizers. The special tokens are defined once, here, for every stage.

Two kinds share one interface (`encode(text) -> list[int]`, `decode(ids) -> str`
dropping special tokens, `vocab_size`, `pad_id` ... `response_id`, `save(dir)`):

* `ByteTokenizer`: no training; UTF-8 bytes shifted past the special ids.
* `BpeTokenizer`: byte-level BPE trained on the run's own corpus with the
  `tokenizers` library (`train_bpe`); any text round-trips, no unknown token.
* `HfTokenizer`: a Hugging Face `tokenizer.json` from a local directory
  (`load_hf_tokenizer`), for a model imported with `llm_jax.hf`; its special
  tokens keep the ids that model was trained with.

The first two keep the special tokens at ids 0..5, so a batch means the same
thing whichever tokenizer made it. A tokenizer directory holds `meta.json` (kind,
special tokens, vocab size) and `tokenizer.json` (for BPE the `tokenizers`
file; for bytes a copy of the meta), and `load_tokenizer(dir)` returns
whichever kind was saved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from llm_jax.errors import TokenizerError

# id -> name; the same ids in every tokenizer of this package.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>", "<prompt>", "<response>")
PAD_ID, BOS_ID, EOS_ID, MASK_ID, PROMPT_ID, RESPONSE_ID = range(len(SPECIAL_TOKENS))
META_FILE = "meta.json"


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


class _TokenizersLib:
    """encode/decode through a `tokenizers.Tokenizer` held as `self._tok` (BPE and HF)."""

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class BpeTokenizer(_TokenizersLib, _Specials):
    """Byte-level BPE (a `tokenizers.Tokenizer`) with our special tokens at ids 0..5."""

    kind = "bpe"

    def __init__(self, tokenizer):
        for i, name in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(name) != i:
                raise TokenizerError(f"BPE tokenizer has {name} at id {tokenizer.token_to_id(name)}, "
                                     f"expected {i}")
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, directory: str) -> None:
        self._write_meta(directory)
        self._tok.save(os.path.join(directory, "tokenizer.json"))

    def save_hf(self, directory: str) -> None:
        """The files `transformers.AutoTokenizer` loads (for `llm_jax.hf` export)."""
        _save_hf_files(self._tok, directory, {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "mask": "<mask>"})


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
    if meta.get("kind") != "hf" and tuple(meta.get("special_tokens", ())) != SPECIAL_TOKENS:
        raise TokenizerError(f"{path}: special tokens {meta.get('special_tokens')} differ from this "
                             f"version's {list(SPECIAL_TOKENS)}")
    kind = meta.get("kind")
    if kind == "hf":
        return HfTokenizer.load(directory, meta)
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


# ---------------------------------------------------------------------------
# Hugging Face tokenizers

# Where each of our roles is looked up in a HF tokenizer_config.json /
# special_tokens_map.json, first match wins (BERT has cls/sep, not bos/eos).
HF_ROLES = {"bos": ("bos_token", "cls_token"), "eos": ("eos_token", "sep_token"),
            "pad": ("pad_token", "eos_token", "sep_token"), "mask": ("mask_token",)}
HF_KEYS = {key for keys in HF_ROLES.values() for key in keys}
# The SFT template's markers: kept if the tokenizer has them, else added at the
# end of its vocabulary (the model's embeddings grow to match: `hf.resize_vocab`).
TEMPLATE_TOKENS = {"prompt": "<prompt>", "response": "<response>"}


class HfTokenizer(_TokenizersLib):
    """A Hugging Face fast tokenizer (`tokenizer.json`) with the special-token ids its
    model was trained with: bos/eos/pad/mask from its config, plus the SFT
    template's <prompt>/<response> markers. `mask_id` is None when it has no mask token."""

    kind = "hf"

    def __init__(self, tokenizer, tokens: dict[str, str | None]):
        from tokenizers import AddedToken
        missing = [v for k, v in TEMPLATE_TOKENS.items() if tokenizer.token_to_id(v) is None]
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.tokens = {**tokens, **TEMPLATE_TOKENS}
        for role in ("bos", "eos", "pad"):
            if self.tokens.get(role) is None:
                raise TokenizerError(f"Hugging Face tokenizer has no {role} token "
                                     f"(looked for {', '.join(HF_ROLES[role])})")
        ids = {}
        for role, text in self.tokens.items():
            ids[role] = None if text is None else tokenizer.token_to_id(text)
            if text is not None and ids[role] is None:
                raise TokenizerError(f"Hugging Face tokenizer: {role} token {text!r} is not in its vocabulary")
        self._tok = tokenizer
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = ids["bos"], ids["eos"], ids["pad"], ids["mask"]
        self.prompt_id, self.response_id = ids["prompt"], ids["response"]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, directory: str) -> None:
        """The run's tokenizer/: meta.json (kind "hf", the role tokens) + tokenizer.json."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump({"kind": self.kind, "tokens": self.tokens, "vocab_size": self.vocab_size}, f, indent=2)
        self._tok.save(os.path.join(directory, "tokenizer.json"))

    @classmethod
    def load(cls, directory: str, meta: dict) -> "HfTokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(os.path.join(directory, "tokenizer.json")), meta["tokens"])

    def save_hf(self, directory: str) -> None:
        """tokenizer.json + tokenizer_config.json as `transformers.AutoTokenizer` reads them."""
        _save_hf_files(self._tok, directory, self.tokens)


def _save_hf_files(tok, directory: str, tokens: dict[str, str | None]) -> None:
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(1e30),
              **{f"{role}_token": tokens[role] for role in ("bos", "eos", "pad", "mask")
                 if tokens.get(role) is not None}}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_hf_tokenizer(directory: str) -> HfTokenizer:
    """The Hugging Face tokenizer in a local directory (tokenizer.json, with its
    special tokens named in tokenizer_config.json or special_tokens_map.json)."""
    from tokenizers import Tokenizer
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise TokenizerError(f"{directory}: no tokenizer.json (only Hugging Face fast tokenizers "
                             "can be loaded; convert a slow one with transformers first)")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises its own exception type
        raise TokenizerError(f"{path}: not a readable Hugging Face tokenizer ({e})") from None
    named: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        file = os.path.join(directory, name)
        if os.path.exists(file):
            try:
                with open(file) as f:
                    entries = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{file}: not a readable JSON file ({e})") from None
            if not isinstance(entries, dict):
                raise TokenizerError(f"{file}: expected a JSON object of settings, found "
                                     f"{type(entries).__name__}")
            for k, v in entries.items():
                if k in HF_KEYS and v is not None and _token_text(v) is None:
                    raise TokenizerError(f"{file}: {k}={v!r} is neither a token string nor an object "
                                         "with a 'content' string")
            named.update({k: v for k, v in entries.items() if _token_text(v) is not None})
    tokens = {role: next((_token_text(named[k]) for k in keys if k in named), None)
              for role, keys in HF_ROLES.items()}
    return HfTokenizer(tok, tokens)
