"""The Loader: exact resume from a JSON state, disjoint shards per process, seeded epochs."""

import json

import numpy as np
import pytest

from llm_jax.data.errors import DataError
from llm_jax.data.loader import DataConfig, Loader
from llm_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = DataConfig(source="builtin:pretrain", seq_len=64, batch_size=4, size=300, seed=7)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("source", ["builtin:pretrain", "builtin:sft", "builtin:preferences"])
def test_resume_from_state_sees_the_same_batches(source):
    cfg = DataConfig(source=source, seq_len=64, batch_size=4, size=40, seed=1)
    first = Loader(cfg, TOK, shard_index=0, shard_count=1)
    take(first, 5)  # N batches
    state = json.loads(json.dumps(first.get_state()))  # survives a JSON round trip (checkpoint)
    # small: positions, counters and the skip report (at most 5 places per reason; at
    # seq_len 64 a few built-in pairs are equal once truncated, and are skipped)
    assert len(json.dumps(state)) < 600
    want = take(first, 8)  # M more: crosses the 40-record epoch boundary
    fresh = Loader(cfg, TOK, shard_index=0, shard_count=1)
    fresh.set_state(state)
    assert same(take(fresh, 8), want)
    assert fresh.stats == first.stats


def test_resume_inside_a_chunked_document():
    # every document is longer than a row, so batch boundaries fall inside documents
    cfg = DataConfig(source="builtin:pretrain/format", seq_len=16, batch_size=2, size=30)
    a = Loader(cfg, TOK, shard_index=0, shard_count=1)
    take(a, 3)
    state = a.get_state()
    assert state["chunk"] > 0
    b = Loader(cfg, TOK, shard_index=0, shard_count=1)
    b.set_state(state)
    assert same(take(b, 6), take(a, 6))


class CountingTokenizer(ByteTokenizer):
    """Counts the texts it encodes, by text."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def encode(self, text):
        self.calls[text] = self.calls.get(text, 0) + 1
        return super().encode(text)


@pytest.mark.parametrize("kind", ["pretrain", "classification"])
def test_a_long_document_is_read_and_tokenized_once(tmp_path, kind):
    """A document of 43 rows' worth of tokens is tokenized once, not once per chunk
    (Grain's map recomputes on each access; a 1 MB document took 0.75 s per
    8 x 128-token batch that way), and a classification record's label costs no
    second read."""
    long_text = "the quick brown fox jumps over the lazy dog. " * 60  # 2700 bytes, 43 rows of 64
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate([long_text] + [f"short document {i}" for i in range(5)]):
            f.write(json.dumps({"text": text, **({"label": i % 2} if kind == "classification" else {})}) + "\n")
    cfg = DataConfig(source=f"jsonl:{path}", kind=kind, seq_len=64, batch_size=4, shuffle=False,
                     num_epochs=1, cache_dir=str(tmp_path / "cache"))
    tok = CountingTokenizer()
    batches = list(Loader(cfg, tok, shard_index=0, shard_count=1))
    assert tok.calls[long_text] == 1  # the dry-run batch at construction reads it; the stream reuses it
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    if kind == "pretrain":  # every chunk of it was served
        assert real >= len(long_text)
    else:  # one truncated sequence per record, each with its label
        assert sum(int(b["label_mask"].sum()) for b in batches) == 6
        assert sorted(int(x) for b in batches for x in b["labels"][b["label_mask"] > 0]) == [0, 0, 0, 1, 1, 1]


def test_state_from_another_stream_is_refused():
    a = Loader(CFG, TOK, shard_index=0, shard_count=1)
    b = Loader(CFG.__class__(**{**CFG.__dict__, "seed": 8}), TOK, shard_index=0, shard_count=1)
    with pytest.raises(DataError, match="seed=7"):
        b.set_state(a.get_state())
    c = Loader(CFG, TOK, shard_index=1, shard_count=2)
    with pytest.raises(DataError, match="shard"):
        c.set_state(a.get_state())


def _record_order(loader, count):
    """Record indices in stream order (the Grain MapDataset behind the loader)."""
    return [int(loader._stream[p][0]) for p in range(count)]


def test_each_process_reads_only_its_shard_and_epochs_reshuffle():
    cfg = DataConfig(source="builtin:pretrain", seq_len=64, batch_size=6, size=300, seed=7)
    shards = [Loader(cfg, TOK, shard_index=i, shard_count=3) for i in range(3)]
    assert [s.rows for s in shards] == [2, 2, 2]  # each host holds its part of the global batch
    epochs = [_record_order(s, 2 * s.epoch_len) for s in shards]
    firsts = [set(e[:s.epoch_len]) for e, s in zip(epochs, shards)]
    assert all(len(f) == 100 for f in firsts)  # 300 records / 3 processes, each once per epoch
    assert not firsts[0] & firsts[1] and not firsts[1] & firsts[2] and not firsts[0] & firsts[2]
    assert set().union(*firsts) == set(range(300))
    e = epochs[0]
    assert set(e[100:]) == firsts[0] and e[100:] != e[:100]  # same shard, new order next epoch
    again = Loader(cfg, TOK, shard_index=0, shard_count=3)
    assert _record_order(again, 200) == e  # deterministic by seed


def test_batch_rows_are_this_process_share():
    cfg = DataConfig(source="builtin:sft", seq_len=32, batch_size=8, size=50)
    assert next(Loader(cfg, TOK, shard_index=1, shard_count=4))["inputs"].shape == (2, 32)
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        Loader(cfg, TOK, shard_index=0, shard_count=3)


def test_one_epoch_for_evaluation_visits_every_record_once():
    cfg = DataConfig(source="builtin:sft", split="eval", seq_len=64, batch_size=4, size=1000,
                     shuffle=False, num_epochs=1)
    ld = Loader(cfg, TOK, shard_index=0, shard_count=1)
    batches = list(ld)
    n_seq = sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
    assert n_seq == 100 == ld.stats["records_used"]
    assert 0.5 < ld.stats["packing_efficiency"] <= 1.0


def test_packed_rows_hold_several_sequences_with_restarted_positions():
    b = next(Loader(DataConfig(source="builtin:sft", seq_len=64, batch_size=4), TOK,
                    shard_index=0, shard_count=1))
    assert b["segment_ids"].max() >= 2
    for seg, pos in zip(b["segment_ids"], b["positions"]):
        for s in range(1, seg.max() + 1):
            assert list(pos[seg == s]) == list(range((seg == s).sum()))
