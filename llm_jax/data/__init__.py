"""Turning text into batches: tokenizers, sources, the built-in world, packing, the loader.

    tokenizer    ByteTokenizer, BpeTokenizer / train_bpe, load_tokenizer, check_vocab_fits
    sources      open_source("builtin:sft" | "tfds:NAME[/CONFIG]" | "jsonl:PATH" | "text:PATH")
    records      the three record kinds and their checks; jsonl/text readers
    local        local files -> TFDS ArrayRecord datasets (built once, cached by content hash)
    formats      the one template: records -> tokens + completion-only weights
    packing      first-fit packing with segment ids; sequence_scores per (row, segment)
    loader       DataConfig, Loader (host-local batches, JSON-able resumable state)
    builtin      the built-in world's tasks, scorers, splits, SFT instructions
    preferences  built-in preference pairs: correct, polite, plain
    errors       DataError, SkipReport
"""
