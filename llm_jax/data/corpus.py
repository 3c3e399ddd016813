"""A byte-level BPE trained on a text corpus, the same on every process.

    tok = corpus_tokenizer(workdir, data_cfg, vocab_size, sample)  # saved in, or read from, DIR/tokenizer/

Used by the corpus pretraining experiments (`experiments.gpt2_pretrain`,
`experiments.bert_mlm`); `corpus_texts` also gives held-out sentences to continue.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from llm_jax.data.loader import DataConfig
from llm_jax.data.records import check_record
from llm_jax.data.sources import open_source
from llm_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe
from llm_jax.errors import ConfigError, DataError, TokenizerError
from llm_jax.rundir import is_primary, say

BPE_FLOOR = len(SPECIAL_TOKENS) + 256  # the byte alphabet and the special tokens


def corpus_texts(data: DataConfig, split: str, count: int) -> list[str]:
    """Texts of `count` records spread evenly over `split` (all of them if fewer),
    the same on every process; unusable records are left out."""
    src = open_source(data.source, split=split, kind="pretrain", seed=data.seed, size=data.size,
                      data_dir=data.data_dir, cache_dir=data.cache_dir, download=data.download)
    n = len(src.records)
    picks = np.unique(np.linspace(0, n - 1, num=min(count, n)).astype(np.int64)).tolist()
    texts = []
    for i in picks:  # random access, as the training loader reads them
        rec = check_record(src.records[i], "pretrain")
        if isinstance(rec, dict):
            texts.append(rec["text"])
    if not texts:
        raise DataError(f"{data.source} ({split}): none of {len(picks)} sampled records has usable text")
    return texts


def corpus_tokenizer(workdir: str, data: DataConfig, vocab_size: int, sample: int):
    """The run's tokenizer: DIR/tokenizer/ if it exists (a resumed run), else a
    byte-level BPE of `vocab_size` tokens trained on `sample` training records.

    Every process trains its own copy from the same records (BPE training is
    deterministic), so no shared file system is needed; a checksum comparison
    across processes makes sure they agree. Process 0 saves a new one in DIR/tokenizer/."""
    directory = os.path.join(workdir, "tokenizer")
    if vocab_size < BPE_FLOOR:
        raise ConfigError(f"model.vocab_size={vocab_size}: a byte-level BPE needs at least {BPE_FLOOR} "
                          "tokens (256 bytes + special tokens)")
    if sample < 1:
        raise ConfigError(f"tokenizer_sample={sample} must be positive")
    try:
        if os.path.exists(os.path.join(directory, "meta.json")):
            tok = load_tokenizer(directory)
            say(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens, from {directory}")
        else:
            texts = corpus_texts(data, data.split, sample)
            tok = train_bpe(texts, vocab_size)
            say(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained on {len(texts)} records "
                f"of {data.source} ({data.split})")
    except TokenizerError as e:
        raise ConfigError(f"tokenizer ({directory}): {e}") from None
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
                          f"({directory}, from an earlier run?)")
    if jax.process_count() > 1:
        multihost_utils.assert_equal(np.frombuffer(_fingerprint(tok), np.uint32),
                                     "the processes built different tokenizers")
    _save(workdir, tok)
    return tok


def _fingerprint(tok) -> bytes:
    """sha256 of the tokenizer's saved files (their serialization is deterministic)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.digest()


def _save(workdir: str, tok) -> None:
    """DIR/tokenizer/ (process 0), unless a resumed run already has it."""
    directory = os.path.join(workdir, "tokenizer")
    if is_primary() and not os.path.exists(os.path.join(directory, "meta.json")):
        tok.save(directory)
